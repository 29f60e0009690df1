"""Structural invariants of the TDP MMU (DESIGN §3), one named function each.

The function name is the InvariantViolation name (stable: it is part of a
finding's signature).  All of them read one snapshot of the reachable tables,
taken at a quiescent point (after an op, RCU callbacks drained).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import itemgetter
from typing import Optional

from mmufuzz.harness.ops import PAGES_PER_2M, PG_LEVEL_2M, PG_LEVEL_4K
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp.checkpoint import Shared
from mmufuzz.harness.tdp.pgalloc import used_entries
from mmufuzz.harness.tdp.sept import MAPPED, NL_MAPPED, PENDING
from mmufuzz.harness.tdp.spte import (
    EPT_SPTE_HOST_WRITABLE,
    EPT_SPTE_MMU_WRITABLE,
    PAGES_PER_LEVEL,
    PT_WRITABLE_MASK,
    ROOT_LEVEL,
    SPTE_DIRTY_MASK,
    SPTE_MMU_PRESENT_MASK,
    check_mmio_spte,
    get_mmio_spte_gfn,
    is_last_spte,
    is_mmio_spte,
    is_shadow_present_pte,
    pages_per_level,
    spte_index,
    spte_to_pfn,
)


@dataclass
class Snapshot:
    """What a walk from the roots reached: tables, leaves, odd non-present entries."""

    pages: list = field(default_factory=list)
    present: list = field(default_factory=list)     # present entries of pages[i], counted
    leaves: list = field(default_factory=list)      # (mirror, gfn, level, spte)
    # (level, mirror, gfn, spte) of the entries != SHADOW_NONPRESENT_VALUE that are not present
    nonpresent: list = field(default_factory=list)


class Seen(Shared):
    """A table's records (:func:`_table_records`) and a copy of the entries they were read from.

    They name no object, only values (a child table by the entry that links
    it), so a checkpoint shares them with every copy of the table it
    restores: a schedule variant's check reads again only the tables it changed.
    """

    __slots__ = ("entries", "records")

    def __init__(self, entries: list, records: tuple):
        self.entries, self.records = entries, records


def _fail(name: str, detail: str):
    raise InvariantViolation(name, detail)


# The last snapshot taken: (weak reference to its VM, its roots, the snapshot, the
# ``TablePage.seen`` of each of its pages when it was taken).
_last: Optional[tuple] = None


def take_snapshot(kvm) -> Snapshot:
    """Walk every root; a link to a freed table is ``reachable_freed_table``.

    Most checks find every table as the check before did (a check after every
    op, and most ops change no SPTE): then the last snapshot is the one a walk
    would build, and is returned instead.  It is, when every page it reached
    still has the records (``TablePage.seen``) it was built from and their
    entries still equal the page's: every record, the child tables included,
    derives from those entries, so the walk would reach the same pages in
    the same order and read the same records.
    """
    global _last
    roots = kvm.mmu.roots()
    if _last is not None and _last[0]() is kvm and _last[1] == roots:
        snap = _last[2]
        for page, seen in zip(snap.pages, _last[3]):
            if page.seen is not seen or page.freed or seen.entries != page.spt:
                break
        else:
            return snap
    snap = _walk(kvm, roots)
    _last = (weakref.ref(kvm), roots, snap, [page.seen for page in snap.pages])
    return snap


def _walk(kvm, roots: list) -> Snapshot:
    """The snapshot of a walk of ``roots``."""
    snap = Snapshot()
    stack = list(reversed(roots))
    while stack:
        page = stack.pop()
        if page.freed:
            _fail("reachable_freed_table", f"gfn={page.gfn:#x} level={page.level} "
                                           f"pfn={page.pfn:#x}")
        snap.pages.append(page)
        present, leaves, nonpresent, children = _table_records(page)
        snap.present.append(present)
        snap.leaves += leaves
        snap.nonpresent += nonpresent
        stack.extend(reversed(list(map(kvm.mmu.alloc.child, children))))
    return snap


def _table_records(page) -> tuple:
    """What a snapshot records of one table: its present count, leaves, odd non-present
    entries and the entries that link child tables.

    Kept on the page (``TablePage.seen``, a :class:`Seen`) with a copy of the
    entries they were read from, and reused while the entries are equal: one
    C-level list comparison, where most tables are as they were at the check
    before (or at the checkpoint a schedule variant was restored from).
    """
    seen = page.seen
    if seen is not None and seen.entries == page.spt:
        return seen.records
    if page.level == PG_LEVEL_4K:
        records = _records_4k(page)
    else:
        step = pages_per_level(page.level)
        leaves, nonpresent, children = [], [], []
        for i in used_entries(page.spt):
            spte, gfn = page.spt[i], page.gfn + i * step
            if not is_shadow_present_pte(spte):
                nonpresent.append((page.level, page.mirror, gfn, spte))
            elif is_last_spte(spte, page.level):
                leaves.append((page.mirror, gfn, page.level, spte))
            else:
                children.append(spte)
        records = (len(leaves) + len(children), leaves, nonpresent, children)
    page.seen = Seen(page.spt[:], records)
    return records


def record_tables(kvm) -> None:
    """Take the records of every live table now (a checkpoint shares them with its copies)."""
    for page in kvm.pgalloc.live_pages():
        _table_records(page)


def _records_4k(page) -> tuple:
    """_table_records of a 4K table, whose present entries are all leaves, in bulk (a split
    leaves 512 of them): the same records in the same order."""
    spt, gfn = page.spt, page.gfn
    used = used_entries(spt)
    sptes = list(map(spt.__getitem__, used))
    present = list(map(SPTE_MMU_PRESENT_MASK.__and__, sptes))
    index = list(compress(used, present))
    nonpresent = [] if len(index) == len(used) else [
        (PG_LEVEL_4K, page.mirror, gfn + i, spte)
        for i, spte in zip(used, sptes) if not spte & SPTE_MMU_PRESENT_MASK]
    leaves = list(zip(repeat(page.mirror), map(gfn.__add__, index), repeat(PG_LEVEL_4K),
                      compress(sptes, present)))
    return len(leaves), leaves, nonpresent, []


def nonpresent_value(kvm, snap: Snapshot) -> None:
    """Every non-present entry is SHADOW_NONPRESENT_VALUE or a 4K MMIO SPTE for its own gfn."""
    for level, mirror, gfn, spte in snap.nonpresent:
        if not (level == PG_LEVEL_4K and not mirror
                and is_mmio_spte(spte, kvm.mmio_value) and get_mmio_spte_gfn(spte) == gfn):
            _fail("nonpresent_value", f"gfn={gfn:#x} level={level} spte={spte:#x}")


def leaf_pfn_matches_backing(kvm, snap: Snapshot) -> None:
    """Every leaf maps its gfns to the slot's current backing pages, writable only if allowed."""
    def fail(why: str):
        _fail("leaf_pfn_matches_backing", f"gfn={gfn:#x} level={level} spte={spte:#x} {why}")

    lookup = kvm.memslots.lookup
    start = end = 0  # the gfns of the slot looked up last: leaves come in gfn order
    for mirror, gfn, level, spte in snap.leaves:
        pages = PAGES_PER_LEVEL[level]
        if not start <= gfn < gfn + pages <= end:
            slot = lookup(gfn)
            if slot is None or gfn + pages > slot.end_gfn:
                fail("outside any slot")
            start, end, readonly = slot.base_gfn, slot.end_gfn, slot.readonly
        backing = slot.gmem if mirror else slot.backing
        if backing is None:
            fail("private leaf in a shared slot")
        first, pfn = gfn - slot.base_gfn, spte_to_pfn(spte)
        # A 4K leaf's last page is its first: one backing lookup.
        if backing.pfn(first) != pfn or (
                pages > 1 and backing.pfn(first + pages - 1) != pfn + pages - 1):
            fail(f"backing pfn={backing.pfn(first):#x}")
        if spte & PT_WRITABLE_MASK and readonly:  # is_writable_pte
            fail("writable in a readonly slot")


def huge_leaf_legal(kvm, snap: Snapshot) -> None:
    """Every 2M leaf satisfies SEMANTICS §G (host page, slot, alignment, log, attribute)."""
    for mirror, gfn, level, spte in snap.leaves:
        if level == PG_LEVEL_4K:
            continue
        slot = kvm.memslots.lookup(gfn)
        backing = slot.gmem if mirror else slot.backing
        # With initially-set bitmaps a 2M leaf made before logging started stays (SEMANTICS
        # §G); dirty_log_write_protected checks it cannot take unlogged writes.
        legal = (level == PG_LEVEL_2M and slot.hugepage_inside(gfn)
                 and (slot.dirty is None or kvm.dirty_log.initially_set)
                 and kvm.attributes.uniform(gfn, gfn + PAGES_PER_2M)
                 and backing.host_level(gfn - slot.base_gfn) == PG_LEVEL_2M)
        if not legal:
            _fail("huge_leaf_legal", f"gfn={gfn:#x} level={level} spte={spte:#x}")


def private_leaf_placement(kvm, snap: Snapshot) -> None:
    """Private leaves only in the mirror, under private attributes, in private slots."""
    attributes = kvm.attributes
    leaves = snap.leaves
    if not attributes.any_private():  # then only a mirror leaf can break it: skip the others
        leaves = compress(leaves, map(itemgetter(0), leaves))
    for mirror, gfn, level, spte in leaves:
        end = gfn + pages_per_level(level)
        private = attributes.private_ranges(gfn, end)
        if mirror and (private != [(gfn, end)] or not kvm.memslots.lookup(gfn).private):
            _fail("private_leaf_placement", f"gfn={gfn:#x} level={level} mirror leaf not private")
        if not mirror and private:
            _fail("private_leaf_placement", f"gfn={gfn:#x} level={level} shared leaf on private")


def sept_matches_mirror(kvm, snap: Snapshot) -> None:
    """The secure EPT holds exactly the mirror's leaves, each in its pages' accept state, and
    none blocked at a quiescent point (every BLOCK is followed by REMOVE, DEMOTE, PROMOTE
    or UNBLOCK within the op)."""
    if kvm.sept is None:
        return
    mirror = {(level, gfn): spte_to_pfn(spte) for m, gfn, level, spte in snap.leaves if m}
    sept = kvm.sept.leaves()
    for key in sorted(mirror.keys() ^ sept.keys()):
        _fail("sept_matches_mirror", f"gfn={key[1]:#x} level={key[0]} "
                                     f"mirror={key in mirror} sept={key in sept}")
    for (level, gfn), leaf in sorted(sept.items()):
        slot = kvm.memslots.lookup(gfn)
        first = gfn - slot.base_gfn
        states = {i in slot.accepted for i in range(first, first + pages_per_level(level))}
        if (leaf.pfn != mirror[(level, gfn)] or states != {leaf.accepted}
                or leaf.state not in (MAPPED, PENDING)):
            _fail("sept_matches_mirror", f"gfn={gfn:#x} level={level} pfn={leaf.pfn:#x} "
                                         f"state={leaf.state}")


def sept_tables_match_mirror(kvm, snap: Snapshot) -> None:
    """Every mirror table has its S-EPT page (TDH.MEM.SEPT.ADD when linked) and the module
    has no other, none blocked; and no guest TDCALL still holds an entry between ops."""
    if kvm.sept is None:
        return
    root = kvm.mmu.mirror_root
    mirror = {(page.level + 1, page.gfn) for page in snap.pages if page.mirror and page is not root}
    sept = {key for key, entry in kvm.sept.entries().items() if entry.child is not None}
    for key in sorted(mirror ^ sept):
        _fail("sept_tables_match_mirror", f"gfn={key[1]:#x} level={key[0]} "
                                          f"mirror={key in mirror} sept={key in sept}")
    for key, entry in sorted(kvm.sept.entries().items()):
        if entry.child is not None and entry.state != NL_MAPPED:
            _fail("sept_tables_match_mirror", f"gfn={key[1]:#x} level={key[0]} {entry.state}")
    if kvm.sept.held:
        _fail("sept_tables_match_mirror", f"{len(kvm.sept.held)} TDCALL(s) in flight")


def mmio_spte_with_slot(kvm, snap: Snapshot) -> None:
    """No MMIO SPTE of the current generation caches a gfn that has a slot."""
    memslots = kvm.memslots
    for level, _, gfn, spte in snap.nonpresent:
        if (is_mmio_spte(spte, kvm.mmio_value) and check_mmio_spte(spte, memslots.generation)
                and memslots.lookup(gfn) is not None):
            _fail("mmio_spte_with_slot", f"gfn={gfn:#x} level={level} spte={spte:#x}")


def leaked_table_page(kvm, snap: Snapshot) -> None:
    """After a quiescent point every live table page is reachable from a root."""
    if kvm.rcu.pending():
        _fail("leaked_table_page", "RCU callbacks pending at a quiescent point")
    reachable = {page.pfn for page in snap.pages}
    for page in kvm.pgalloc.live_pages():
        if page.pfn not in reachable:
            _fail("leaked_table_page", f"gfn={page.gfn:#x} level={page.level} pfn={page.pfn:#x}")


def refcount_matches_children(kvm, snap: Snapshot) -> None:
    """Each table's refcount equals its present entries."""
    for page, present in zip(snap.pages, snap.present):
        if page.refcount != present:
            _fail("refcount_matches_children", f"gfn={page.gfn:#x} level={page.level} "
                                               f"refcount={page.refcount} present={present}")


def page_stats_match_leaves(kvm, snap: Snapshot) -> None:
    """The per-level leaf statistics equal the leaves actually reachable."""
    counts = [0] * (ROOT_LEVEL + 1)
    for _, _, level, _ in snap.leaves:
        counts[level] += 1
    if counts != kvm.mmu.stats:
        _fail("page_stats_match_leaves", f"stats={kvm.mmu.stats} leaves={counts}")


def dirty_log_covers_writes(kvm, snap: Snapshot) -> None:
    """Every gfn the guest wrote in a dirty-logging slot since the last get is logged."""
    for slot in kvm.memslots.by_id.values():
        state = slot.dirty
        if state is not None and not state.written <= state.bitmap:
            gfn = slot.base_gfn + min(state.written - state.bitmap)
            _fail("dirty_log_covers_writes", f"gfn={gfn:#x} slot={slot.id}")


def writable_leaf_logged(kvm, gfn: int, npages: int, detail: str) -> None:
    """``dirty_log_write_protected`` for one writable leaf over [gfn, gfn+npages): if its
    slot logs, every page's dirty bit is set (a write through the leaf is not logged)."""
    slot = kvm.memslots.lookup(gfn)
    if slot is None or slot.dirty is None or not slot.dirty.armed:
        return
    bitmap = slot.dirty.bitmap
    first = gfn - slot.base_gfn
    for page in range(first, min(first + npages, slot.npages)):
        if page not in bitmap:
            _fail("dirty_log_write_protected",
                  f"gfn={slot.base_gfn + page:#x} slot={slot.id} writable leaf gfn={gfn:#x} "
                  f"{detail}")


def dirty_log_write_protected(kvm, snap: Snapshot) -> None:
    """No writable huge leaf of a logging slot maps a page whose dirty bit is clear
    (SEMANTICS §I): with initially-set bitmaps huge leaves outlive the start of logging,
    and a clear must write-protect the ones over its pages.  (4K leaves and the TLB:
    :func:`dirty_state_logged`.)"""
    if not kvm.memslots.logging:
        return
    for mirror, gfn, level, spte in snap.leaves:
        if not mirror and level > PG_LEVEL_4K and spte & PT_WRITABLE_MASK:
            writable_leaf_logged(kvm, gfn, pages_per_level(level), f"level={level} spte={spte:#x}")


def spte_writable_invariants(kvm, snap: Snapshot) -> None:
    """A leaf is Writable only if MMU-writable, and MMU-writable only if host-writable
    (spte.h's check_spte_writable_invariants): the fast path makes exactly the
    MMU-writable leaves writable, so a leaf that the host or the memslot forbids
    writing must never carry the bit."""
    for mirror, gfn, level, spte in snap.leaves:
        if ((spte & PT_WRITABLE_MASK and not spte & EPT_SPTE_MMU_WRITABLE)
                or (spte & EPT_SPTE_MMU_WRITABLE and not spte & EPT_SPTE_HOST_WRITABLE)):
            _fail("spte_writable_invariants", f"gfn={gfn:#x} level={level} spte={spte:#x}")


def dirty_state_logged(kvm, snap: Snapshot) -> None:
    """In an armed dirty-logging slot, every 4K leaf and cached translation through which
    a write would not reach the log has its gfn in the bitmap: a Writable one in
    write-protect mode, a Writable and Dirty one with PML (the CPU logs only the
    Dirty bit's 0 -> 1; a translation caches Writable only with Dirty set)."""
    memslots = kvm.memslots
    if not memslots.logging:
        return
    armed = SPTE_DIRTY_MASK | PT_WRITABLE_MASK if kvm.cpu_dirty_log_size else PT_WRITABLE_MASK
    gfns = [gfn for mirror, gfn, level, spte in snap.leaves
            if not mirror and level == PG_LEVEL_4K and spte & armed == armed]
    for vcpu in kvm.vcpus:
        gfns += [gfn for gfn, (_, perms) in vcpu.tlb_shared.items() if perms & PT_WRITABLE_MASK]
    for gfn in sorted(gfns):
        slot = memslots.lookup(gfn)
        state = slot.dirty if slot is not None else None
        if state is not None and state.armed and gfn - slot.base_gfn not in state.bitmap:
            _fail("dirty_state_logged", f"gfn={gfn:#x} slot={slot.id}")


def tlb_matches_sptes(kvm, snap: Snapshot) -> None:
    """Every cached gpa translation still matches a leaf granting at least as much."""
    if not any(vcpu.tlb_shared or vcpu.tlb_private for vcpu in kvm.vcpus):
        return
    shared = {}
    for mirror, gfn, level, spte in snap.leaves:
        if not mirror:
            shared[(level, gfn)] = spte
    for vcpu in kvm.vcpus:
        for gfn, (pfn, perms) in sorted(vcpu.tlb_shared.items()):
            head = gfn - gfn % PAGES_PER_2M
            spte, base = shared.get((PG_LEVEL_4K, gfn)), gfn
            if spte is None:
                spte, base = shared.get((PG_LEVEL_2M, head)), head
            # A cached Writable needs the leaf's Dirty bit: the CPU caches it only then.
            if (spte is None or spte_to_pfn(spte) + gfn - base != pfn or perms & ~spte
                    or (perms & PT_WRITABLE_MASK and not spte & SPTE_DIRTY_MASK)):
                _fail("tlb_matches_sptes", f"gfn={gfn:#x} vcpu={vcpu.index} pfn={pfn:#x}")
        for gfn, pfn in sorted(vcpu.tlb_private.items()):
            leaf = kvm.sept.lookup(gfn)
            if leaf is None or not leaf.accepted or leaf.pfn + gfn % pages_per_level(
                    leaf.level) != pfn:
                _fail("tlb_matches_sptes", f"gfn={gfn:#x} vcpu={vcpu.index} private pfn={pfn:#x}")


def walk_cache_matches_sptes(kvm, snap: Snapshot) -> None:
    """Every table a vCPU's paging-structure caches hold is still linked where it was.

    KVM flushes after unlinking a table (and before the RCU grace period that
    frees it can end); a cached upper-level entry to an unlinked table is a
    flush that was missed, and the vCPU's next walk through it reads a
    removed, or freed, table.
    """
    for vcpu in kvm.vcpus:
        for (level, prefix), page in sorted(vcpu.walk_cache.items(), key=lambda e: e[0]):
            gfn = prefix << vcpu.cache_shift[level]
            table, at = vcpu.root, ROOT_LEVEL
            while at > level + 1 and not table.freed:
                spte = table.spt[spte_index(gfn, at)]
                if not is_shadow_present_pte(spte) or is_last_spte(spte, at):
                    break
                table, at = kvm.mmu.alloc.child(spte), at - 1
            linked = (at == level + 1 and not table.freed
                      and is_shadow_present_pte(table.spt[spte_index(gfn, at)])
                      and spte_to_pfn(table.spt[spte_index(gfn, at)]) == page.pfn)
            if not linked:
                _fail("walk_cache_matches_sptes", f"gfn={gfn:#x} level={level} vcpu={vcpu.index} "
                                                  f"table pfn={page.pfn:#x} freed={page.freed}")


def root_refcounts(kvm, snap: Snapshot) -> None:
    """Each root's tdp_mmu_root_count is its references: the TDP MMU's own while it is valid,
    and one per vCPU that has it loaded; an invalid root on the list is empty (it was
    zapped before the invalidation returned, and no fault may install into it)."""
    mmu = kvm.mmu
    for root in mmu.tdp_mmu_roots:
        invalid, count = mmu.is_invalid(root), mmu.root_count[root]
        refs = (not invalid) + sum(vcpu.root is root for vcpu in kvm.vcpus)
        if count != refs:
            _fail("root_refcounts", f"root pfn={root.pfn:#x} invalid={invalid} "
                                    f"count={count} refs={refs}")
        if invalid and root.refcount:
            _fail("root_refcounts", f"root pfn={root.pfn:#x} invalid, "
                                    f"{root.refcount} entries present")


INVARIANTS = (nonpresent_value, leaf_pfn_matches_backing, huge_leaf_legal,
              private_leaf_placement, sept_matches_mirror, sept_tables_match_mirror,
              mmio_spte_with_slot,
              leaked_table_page, refcount_matches_children, page_stats_match_leaves,
              dirty_log_covers_writes, spte_writable_invariants, dirty_state_logged,
              dirty_log_write_protected, tlb_matches_sptes, walk_cache_matches_sptes,
              root_refcounts)


# The invariants that read nothing but the snapshot, the VM's constants and its memslot
# layout (which every memslot update replaces under a new generation): held once over a
# snapshot and a generation, they hold again over the same two.
_OF_SNAPSHOT_AND_LAYOUT = frozenset((nonpresent_value, mmio_spte_with_slot))
# (snapshot, memslot generation) of the last check that passed.
_passed: Optional[tuple] = None


def check_invariants(kvm) -> None:
    """Raise InvariantViolation for the first invariant that does not hold.

    A check that reuses the snapshot of the last check that passed, under the
    same memslot layout, skips the invariants that read only those.
    """
    global _passed
    snap = take_snapshot(kvm)
    generation = kvm.memslots.generation
    again = _passed is not None and _passed[0] is snap and _passed[1] == generation
    for invariant in INVARIANTS:
        if not (again and invariant in _OF_SNAPSHOT_AND_LAYOUT):
            invariant(kvm, snap)
    _passed = (snap, generation)

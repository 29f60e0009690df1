"""Structural invariants of the stage-2 target, one named function each.

The function name is the InvariantViolation name (stable: part of a finding's
signature).  All read one walk of the reachable tables, taken at a quiescent
point (after an op, RCU callbacks drained), and the vCPUs' stage-2 caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmufuzz.harness.ops import PG_LEVEL_2M
from mmufuzz.harness.stage2.mmu import memslot_is_logging
from mmufuzz.harness.stage2.pte import (
    GRANULE_PAGES,
    KVM_PGTABLE_LAST_LEVEL,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    kvm_pte_table,
    kvm_pte_to_pfn,
    kvm_pte_valid,
    leaf_memattr,
    leaf_perms,
    stage2_pte_is_counted,
)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp.invariants import dirty_log_covers_writes, writable_leaf_logged

_BLOCK_2M = 2  # the stage-2 level of a 2M block


@dataclass
class Snapshot:
    """What a walk from the root reached."""

    tables: list = field(default_factory=list)   # (table, counted entries)
    leaves: dict = field(default_factory=dict)   # (level, gfn) -> pte
    linked: dict = field(default_factory=dict)   # (level, gfn) -> table linked there
    odd: list = field(default_factory=list)      # (table, gfn, pte): invalid but non-zero


def _fail(name: str, detail: str):
    raise InvariantViolation(name, detail)


def take_snapshot(kvm) -> Snapshot:
    """Walk the stage-2 tables; a link to a freed table is ``reachable_freed_table``."""
    snap = Snapshot()
    stack = [kvm.pgt.root]
    while stack:
        table = stack.pop()
        if table.freed:
            _fail("reachable_freed_table", f"gfn={table.gfn:#x} level={table.level} "
                                           f"pfn={table.pfn:#x}")
        step = GRANULE_PAGES[table.level]
        counted = 0
        for i in table.used():
            pte, gfn = table.ptes[i], table.gfn + i * step
            counted += stage2_pte_is_counted(pte)
            if not kvm_pte_valid(pte):
                snap.odd.append((table, gfn, pte))
            elif kvm_pte_table(pte, table.level):
                child = kvm.pgt.follow(pte)
                snap.linked[(table.level + 1, gfn)] = child
                stack.append(child)
            else:
                snap.leaves[(table.level, gfn)] = pte
        snap.tables.append((table, counted))
    return snap


def invalid_pte_at_rest(kvm, snap: Snapshot) -> None:
    """Between ops every invalid entry is 0: no entry stays locked, no owner annotation."""
    for table, gfn, pte in snap.odd:
        _fail("invalid_pte_at_rest", f"gfn={gfn:#x} level={table.level} pte={pte:#x}")


def table_refcount(kvm, snap: Snapshot) -> None:
    """A table page's count is one for itself plus one per non-zero entry."""
    for table, counted in snap.tables:
        if table.refcount != 1 + counted:
            _fail("table_refcount", f"gfn={table.gfn:#x} level={table.level} "
                                    f"refcount={table.refcount} entries={counted}")


def leaked_table_page(kvm, snap: Snapshot) -> None:
    """After a quiescent point every live table page is reachable from the root."""
    if kvm.rcu.pending():
        _fail("leaked_table_page", "RCU callbacks pending at a quiescent point")
    reachable = {id(table) for table, _ in snap.tables}
    for table in kvm.pgt.tables.values():
        if not table.freed and id(table) not in reachable:
            _fail("leaked_table_page", f"gfn={table.gfn:#x} level={table.level} "
                                       f"pfn={table.pfn:#x}")


def leaf_pfn_matches_backing(kvm, snap: Snapshot) -> None:
    """Every leaf maps its gfns to the slot's current backing, writable only if allowed."""
    lookup = kvm.memslots.lookup
    for (level, gfn), pte in sorted(snap.leaves.items()):
        slot, pages, pfn = lookup(gfn), GRANULE_PAGES[level], kvm_pte_to_pfn(pte)
        why = None
        if slot is None or gfn + pages > slot.end_gfn:
            why = "outside any slot"
        elif slot.backing.pfn(gfn - slot.base_gfn) != pfn or (
                pages > 1 and slot.backing.pfn(gfn - slot.base_gfn + pages - 1)
                != pfn + pages - 1):
            why = f"backing pfn={slot.backing.pfn(gfn - slot.base_gfn):#x}"
        elif pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W and slot.readonly:
            why = "writable in a readonly slot"
        if why:
            _fail("leaf_pfn_matches_backing", f"gfn={gfn:#x} level={level} pte={pte:#x} {why}")


def block_legal(kvm, snap: Snapshot) -> None:
    """Blocks are 2M, inside their slot, over one host THP; none writable while logging,
    unless logging started with every bit set (then dirty_log_write_protected decides)."""
    for (level, gfn), pte in sorted(snap.leaves.items()):
        if level == KVM_PGTABLE_LAST_LEVEL:
            continue
        slot = kvm.memslots.lookup(gfn)
        logged = memslot_is_logging(slot) and not kvm.dirty_log.initially_set
        legal = (level == _BLOCK_2M and slot.hugepage_inside(gfn)
                 and slot.backing.host_level(gfn - slot.base_gfn) == PG_LEVEL_2M
                 and not (logged and pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W))
        if not legal:
            _fail("block_legal", f"gfn={gfn:#x} level={level} pte={pte:#x}")


def dirty_log_write_protected(kvm, snap: Snapshot) -> None:
    """No writable leaf of a logging slot maps a page whose dirty bit is clear (tdp's)."""
    if not kvm.memslots.logging:
        return
    for (level, gfn), pte in sorted(snap.leaves.items()):
        if pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W:
            writable_leaf_logged(kvm, gfn, GRANULE_PAGES[level], f"level={level} pte={pte:#x}")


def _leaf_at(snap: Snapshot, gfn: int):
    """``(level, base gfn, pte)`` of the valid leaf translating ``gfn``, or None."""
    for level in (3, 2, 1):
        base = gfn & -GRANULE_PAGES[level]
        pte = snap.leaves.get((level, base))
        if pte is not None:
            return level, base, pte
    return None


def break_before_make(kvm, snap: Snapshot) -> None:
    """No IPA has two live translations differing in output, MemAttr or size.

    Live: a vCPU's TLB entry and the leaf the tables hold now (a permission
    difference is allowed: relaxing or write-protecting needs no break).
    """
    for vcpu in kvm.vcpus:
        for (level, base), (pfn, _, memattr) in sorted(vcpu.s2_tlb.items()):
            vcpu.s2_lookup(base)  # two cached sizes for one IPA
            leaf = _leaf_at(snap, base)
            if leaf is None:
                continue
            at, leaf_base, pte = leaf
            if (at != level or kvm_pte_to_pfn(pte) + base - leaf_base != pfn
                    or leaf_memattr(pte) != memattr):
                _fail("break_before_make", f"gfn={base:#x} vcpu={vcpu.index} TLB level={level} "
                                           f"pfn={pfn:#x}, table level={at} pte={pte:#x}")


def stale_tlb_entry(kvm, snap: Snapshot) -> None:
    """Every TLB entry translates an IPA the tables still map, granting no more than the
    leaf does; every walk-cache entry names the table linked there now."""
    for vcpu in kvm.vcpus:
        for (level, base), (pfn, perms, _) in sorted(vcpu.s2_tlb.items()):
            leaf = _leaf_at(snap, base)
            if leaf is None or perms & ~leaf_perms(leaf[2]):
                _fail("stale_tlb_entry", f"gfn={base:#x} level={level} vcpu={vcpu.index} "
                                         f"pfn={pfn:#x}")
        for (level, base), table in sorted(vcpu.s2_walk.items(), key=lambda item: item[0]):
            if snap.linked.get((level, base)) is not table:
                _fail("stale_tlb_entry", f"gfn={base:#x} level={level} vcpu={vcpu.index} "
                                         f"walk cache holds unlinked table pfn={table.pfn:#x}")


INVARIANTS = (invalid_pte_at_rest, table_refcount, leaked_table_page, leaf_pfn_matches_backing,
              block_legal, break_before_make, stale_tlb_entry, dirty_log_covers_writes,
              dirty_log_write_protected)


def check_invariants(kvm) -> None:
    """Raise InvariantViolation for the first invariant that does not hold."""
    snap = take_snapshot(kvm)
    for invariant in INVARIANTS:
        invariant(kvm, snap)


"""tdp_mmu: the radix of SPTEs and the one choke point every SPTE change goes through.

All writers change an entry with ``set_spte_atomic`` (a cmpxchg against the
value their iterator read) and then call ``handle_changed_spte``, which keeps
the books: present-children refcounts, leaf statistics, dirty logging, the
secure-EPT mirror hooks, and the teardown of tables an entry stopped linking
(``handle_removed_pt``).  A removed table is queued for freeing with
call_rcu at once, as KVM's handle_removed_pt does; what keeps hardware walkers
off it is that every caller that unlinks a table flushes TLBs before it leaves
its own RCU read-side section (KVM commit bb95dfb9e2df made that flush the
caller's duty), so the grace period cannot end before the flush.
"""

from __future__ import annotations

from functools import partial

from mmufuzz.harness import faults
from mmufuzz.harness.ops import PG_LEVEL_4K
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp import tdx
from mmufuzz.harness.tdp.iter import TdpIter
from mmufuzz.harness.tdp.pgalloc import TablePage, next_used
from mmufuzz.harness.tdp.spte import (
    FROZEN_SPTE,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    ROOT_LEVEL,
    SHADOW_NONPRESENT_VALUE,
    SPTE_BASE_ADDR_MASK,
    SPTE_DIRTY_MASK,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    is_last_spte,
    is_shadow_present_pte,
    make_nonleaf_spte,
    pages_per_level,
    spte_index,
    spte_to_pfn,
)

GFN_END = 1 << (9 * ROOT_LEVEL)  # first gfn past what a 4-level root maps
# need_resched(): a walk that has visited this many entries has used up its time slice.
RESCHED_ENTRIES = 256


class TdpMmu:
    """The roots (tdp_mmu_roots): direct roots for shared gfns, which ``zap_all`` replaces,
    and in a TDX VM the mirror root for private gfns, which it never touches."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.alloc = kvm.pgalloc
        self.tdp_mmu_roots: list[TablePage] = []
        # Per root: role.invalid (membership only: a set of pages has no stable order) and
        # tdp_mmu_root_count (kvm_tdp_mmu_get_root / put_root).
        self.invalid_roots: set[TablePage] = set()
        self.root_count: dict[TablePage, int] = {}
        self._new_root(mirror=False)
        self.mirror_root = self._new_root(mirror=True) if kvm.tdx else None
        self.stats = [0] * (ROOT_LEVEL + 1)  # present leaves per level (kvm_update_page_stats)

    # --- roots (kvm_tdp_mmu_alloc_root, get_root/put_root, fast invalidation) --------

    def _new_root(self, mirror: bool) -> TablePage:
        """A root holding the TDP MMU's own reference, put only once it is invalidated and
        zapped (kvm_tdp_mmu_zap_invalidated_roots).  The mirror root is the VM's for its
        life: no vCPU takes references to it here."""
        root = self.alloc.alloc(ROOT_LEVEL, 0, mirror)
        self.root_count[root] = 1
        self.tdp_mmu_roots.append(root)
        return root

    def roots(self, only_valid: bool = False) -> list[TablePage]:
        """The roots in tdp_mmu_roots, invalid ones too unless ``only_valid``."""
        return [r for r in self.tdp_mmu_roots if not (only_valid and r in self.invalid_roots)]

    def is_invalid(self, root: TablePage) -> bool:
        """role.invalid: the root was invalidated by zap_all (kvm_tdp_mmu_invalidate_roots)."""
        return root in self.invalid_roots

    def direct_roots(self, only_valid: bool = False) -> list[TablePage]:
        return [r for r in self.roots(only_valid) if not r.mirror]

    @property
    def direct_root(self) -> TablePage | None:
        """The valid direct root vCPUs load now, if any."""
        valid = self.direct_roots(only_valid=True)
        return valid[-1] if valid else None

    def root(self, private: bool) -> TablePage | None:
        return self.mirror_root if private else self.direct_root

    def alloc_root(self) -> TablePage:
        """kvm_tdp_mmu_alloc_root: a reference to the valid direct root, made if none is left
        (two references then: the vCPU's and the TDP MMU's)."""
        root = self.direct_root
        if root is None:
            root = self._new_root(mirror=False)
        self.root_count[root] += 1  # kvm_tdp_mmu_get_root
        return root

    def put_root(self, root: TablePage) -> None:
        """kvm_tdp_mmu_put_root: the last reference (only ever of an invalid root) takes the
        root off tdp_mmu_roots and frees its page after a grace period."""
        self.root_count[root] -= 1
        if self.root_count[root]:
            return
        del self.root_count[root]
        self.invalid_roots.discard(root)
        self.tdp_mmu_roots.remove(root)
        self.kvm.rcu.call_rcu(partial(self.alloc.free, root))

    def held(self, roots: list):
        """Each of ``roots`` with a reference taken while the caller works on it, as
        for_each_tdp_mmu_root_yield_safe does (tdp_mmu_next_root: kvm_tdp_mmu_get_root,
        then kvm_tdp_mmu_put_root of the previous one): a zap that yields and drops
        mmu_lock must not find its root freed by a vCPU putting the last reference
        meanwhile.  A root whose last reference is already gone is skipped."""
        for root in roots:
            if root not in self.root_count:
                continue
            self.root_count[root] += 1
            try:
                yield root
            finally:
                self.put_root(root)

    def invalidate_roots(self) -> list[TablePage]:
        """kvm_tdp_mmu_invalidate_roots(KVM_DIRECT_ROOTS), mmu_lock held for write: mark the
        valid direct roots invalid; returns them, to be zapped (tdp_mmu_scheduled_root_to_zap)."""
        roots = self.direct_roots(only_valid=True)
        self.invalid_roots.update(roots)
        return roots

    def zap_invalidated_roots(self, roots: list):
        """Generator: kvm_tdp_mmu_zap_invalidated_roots: zap each root with mmu_lock held for
        read, then put the TDP MMU's reference (after the zap: mmu-notifiers must reach
        the root while it is zapped)."""
        lock = self.kvm.mmu_lock
        yield from lock.read_lock()
        for root in roots:
            yield from self.zap_root(root)
            self.put_root(root)
        lock.read_unlock()

    def walk_depth(self, root: TablePage, gfn: int) -> tuple[int, bool]:
        """``(level, is_leaf)`` of the deepest present SPTE on ``gfn``'s walk; (0, False) if none."""
        page, level, deepest = root, ROOT_LEVEL, 0
        while True:
            spte = page.spt[spte_index(gfn, level)]
            if not is_shadow_present_pte(spte):
                return deepest, False
            if is_last_spte(spte, level):
                return level, True
            page, level, deepest = self.alloc.child(spte), level - 1, level

    def iter(self, root: TablePage, start: int, end: int, min_level: int = PG_LEVEL_4K):
        return TdpIter(self.alloc, root, start, end, min_level)

    # --- the choke point ------------------------------------------------------

    def handle_changed_spte(self, page: TablePage, gfn: int, old: int, new: int, level: int,
                            external: bool = True):
        """Generator: book-keep one SPTE change from ``old`` to ``new``.

        ``external`` false means the caller already told the secure EPT (a merge).
        The book-keeping never yields; only the teardown of a table the change
        unlinked does, so hot loops call :meth:`account_changed_spte` and go
        into ``handle_removed_pt`` only when it returns a table.
        """
        removed = self.account_changed_spte(page, gfn, old, new, level, external)
        if removed is not None:
            yield from self.handle_removed_pt(removed, external)

    def account_changed_spte(self, page: TablePage, gfn: int, old: int, new: int, level: int,
                             external: bool = True):
        """handle_changed_spte up to its handle_removed_pt: the table the change unlinked, or None."""
        if old == new:
            return None
        # The spte.h tests inline (is_shadow_present_pte, is_last_spte, spte_to_pfn):
        # every SPTE change comes through here.
        was_present = old & SPTE_MMU_PRESENT_MASK != 0
        now_present = new & SPTE_MMU_PRESENT_MASK != 0
        was_leaf = was_present and (level == PG_LEVEL_4K or old & PT_PAGE_SIZE_MASK != 0)
        now_leaf = now_present and (level == PG_LEVEL_4K or new & PT_PAGE_SIZE_MASK != 0)
        same_pfn = not (old ^ new) & SPTE_BASE_ADDR_MASK
        self.kvm.events[level << 6 | page.mirror << 5 | (was_present + was_leaf) << 3
                        | (now_present + now_leaf) << 1 | same_pfn] += 1  # tdp.events
        if was_present != now_present:
            page.refcount += 1 if now_present else -1
        if was_leaf:
            self.stats[level] -= 1
        if now_leaf:
            self.stats[level] += 1
            # make_spte's mark_page_dirty_in_slot: 4K only, as kvm_mmu_hugepage_adjust
            # never maps huge in a logging slot; a huge leaf that raced the enable
            # belongs to the old, unlogged slot and is split by the enable after it.
            if level == PG_LEVEL_4K and new & PT_WRITABLE_MASK and not (
                    was_leaf and old & PT_WRITABLE_MASK and same_pfn):
                self.kvm.dirty_log.mark_page_dirty_in_slot(gfn)
        elif now_present and not (was_present and same_pfn):
            # A table just linked: its children (none, or a split's leaves) count now.
            self.stats[level - 1] += self.alloc.child(new).refcount
        if page.mirror and external:
            self._notify_external(gfn, old, new, level, was_leaf, now_present, now_leaf)
        if was_present and not was_leaf and (not now_present or now_leaf or not same_pfn):
            return self.alloc.child(old)
        return None

    def _notify_external(self, gfn, old, new, level, was_leaf, now_present, now_leaf):
        """The mirror root's hooks into the secure EPT (KVM's *_external_spt ops, :mod:`.tdx`)."""
        kvm = self.kvm
        if was_leaf and not now_present:
            tdx.tdx_sept_remove_leaf_spte(kvm, gfn, level, spte_to_pfn(old))
        elif was_leaf and not now_leaf:
            tdx.tdx_sept_split_private_spt(kvm, gfn, level)
        elif now_leaf and not was_leaf:
            tdx.tdx_sept_set_private_spte(kvm, gfn, level, spte_to_pfn(new))
        elif now_present and not old & SPTE_MMU_PRESENT_MASK:
            tdx.tdx_sept_link_private_spt(kvm, gfn, level)
        elif old & SPTE_MMU_PRESENT_MASK and not now_present:
            tdx.tdx_sept_free_private_spt(kvm, gfn, level)

    def handle_removed_pt(self, pt: TablePage, external: bool = True):
        """Generator: freeze every entry of an unlinked table, then queue it for freeing.

        A child some other thread has frozen is waited for: that thread will
        write its final value into this (unlinked) table first.

        Tables are sparse, and an entry still SHADOW_NONPRESENT_VALUE needs no
        wait, no yield and no book-keeping: each run of them is frozen with one
        slice write, and only the other entries go through the loop body.  Each
        scan for the next such entry starts after the previous one is done, so
        it reads an entry no sooner than KVM's loop does (a yield before that
        may let another thread write into this table).
        """
        step = pages_per_level(pt.level)
        spt = pt.spt  # only this function frees pt, after the loop: the list stays pt's
        frozen_up_to = 0
        while frozen_up_to < SPTE_ENT_PER_PAGE:
            i = frozen_up_to
            if spt[i] == SHADOW_NONPRESENT_VALUE:  # else a dense table's next entry: no scan
                i = next_used(spt, i, SPTE_ENT_PER_PAGE)
                if i == SPTE_ENT_PER_PAGE:
                    break
                spt[frozen_up_to:i] = [FROZEN_SPTE] * (i - frozen_up_to)
            old = spt[i]
            while old == FROZEN_SPTE:  # is_frozen_spte
                yield
                old = spt[i]
            spt[i] = FROZEN_SPTE
            frozen_up_to = i + 1
            if old & SPTE_MMU_PRESENT_MASK:  # is_shadow_present_pte
                yield
                removed = self.account_changed_spte(pt, pt.gfn + i * step, old, FROZEN_SPTE,
                                                    pt.level, external)
                if removed is not None:
                    yield from self.handle_removed_pt(removed, external)
        spt[frozen_up_to:] = [FROZEN_SPTE] * (SPTE_ENT_PER_PAGE - frozen_up_to)
        if faults.active("free-before-flush"):
            self.alloc.free(pt)  # walkers that still hold it read poison
        else:
            # tdp_mmu_free_sp_rcu_callback: after the grace period, which waits for the
            # caller's RCU section and so for the flush the caller owes before leaving it.
            self.kvm.rcu.call_rcu(partial(self.alloc.free, pt))

    # --- writers ----------------------------------------------------------------

    def set_spte_atomic(self, it: TdpIter, new: int):
        """Generator: tdp_mmu_set_spte_atomic; False (and ``it.old_spte`` refreshed) if raced.

        A present value for a mirror entry is installed as KVM's
        set_external_spte_present does: freeze, tell the secure EPT, write.
        Other threads see the frozen entry meanwhile and must not use it.
        """
        yield
        page, index = it.pt_path[it.level], it.index  # it.page, without the property call
        current = page.spt[index]
        if current != it.old_spte:
            it.old_spte = current
            return False
        if page.mirror and new != FROZEN_SPTE:  # is_mirror_sptep && !is_frozen_spte(new)
            if not new & SPTE_MMU_PRESENT_MASK:
                # KVM_BUG_ON(!is_shadow_present_pte(new_spte)): atomic zaps of a mirror
                # entry go through FROZEN_SPTE (tdp_mmu_zap_spte_atomic), nothing else clears one.
                raise InvariantViolation("mirror_atomic_nonpresent",
                                         f"gfn={it.gfn:#x} level={it.level} new={new:#x}")
            page.spt[index] = FROZEN_SPTE
            yield
            yield from self.handle_changed_spte(page, it.gfn, current, new, it.level)
            page.spt[index] = new
        else:
            page.spt[index] = new
            removed = self.account_changed_spte(page, it.gfn, current, new, it.level)
            if removed is not None:
                yield from self.handle_removed_pt(removed)
        it.old_spte = new
        return True

    def link_sp(self, it: TdpIter):
        """Generator: link a fresh empty table at a non-present entry (tdp_mmu_link_sp)."""
        sp = self.alloc.alloc(it.level - 1, it.gfn, it.root.mirror)
        if (yield from self.set_spte_atomic(it, make_nonleaf_spte(sp.pfn))):
            return True
        self.alloc.free(sp)  # never visible to anyone
        return False

    @staticmethod
    def nonpresent_value() -> int:
        """What a zap writes: SHADOW_NONPRESENT_VALUE (suppress-#VE set), as every zap does
        since KVM commits 7f01cab84928 and d8fa2031faab; the atomic zap was missed and
        fixed by 803482f472cc."""
        return 0 if faults.active("nonpresent-zero") else SHADOW_NONPRESENT_VALUE

    def write_frozen(self, frozen: list):
        """Generator: after the flush, write the frozen entries non-present; returns the value."""
        nonpresent = self.nonpresent_value()
        for page, index in frozen:
            yield
            page.spt[index] = nonpresent
        return nonpresent

    def zap_spte_atomic(self, it: TdpIter):
        """Generator: freeze -> flush -> write non-present, for one entry (tdp_mmu_zap_spte_atomic)."""
        if not (yield from self.set_spte_atomic(it, FROZEN_SPTE)):
            return False
        self.flush_gfn(it.gfn, it.level)
        it.old_spte = yield from self.write_frozen([(it.page, it.index)])
        return True

    def flush(self) -> None:
        """kvm_flush_remote_tlbs: every vCPU drops its gpa translations and leaves any
        walk in flight (KVM_REQ_TLB_FLUSH, kick and wait: the IPI forces an exit and the
        flush happens before the vCPU enters again), so none still holds a removed table."""
        for vcpu in self.kvm.vcpus:
            vcpu.flush_guest_physical()

    def flush_range(self, start: int, nr_pages: int) -> None:
        """kvm_flush_remote_tlbs_range: the gfns [start, start + nr_pages) if the host can
        (kvm_arch_flush_remote_tlbs_range: only kvm_x86_ops.flush_remote_tlbs_range, KVM
        on Hyper-V), else everything (its -EOPNOTSUPP falls back to kvm_flush_remote_tlbs)."""
        if not self.kvm.range_flush:
            self.flush()
            return
        for vcpu in self.kvm.vcpus:
            vcpu.flush_guest_physical_range(start, start + nr_pages)

    def flush_gfn(self, gfn: int, level: int) -> None:
        """kvm_flush_remote_tlbs_gfn: all that an SPTE at ``level`` maps (gfn_round_for_level)."""
        pages = pages_per_level(level)
        self.flush_range(gfn & -pages, pages)

    def flush_memslot(self, slot) -> None:
        """kvm_flush_remote_tlbs_memslot: the slot's gfns (callers hold slots_lock or
        mmu_lock, which orders the flush against other users of the slot)."""
        self.flush_range(slot.base_gfn, slot.npages)

    # --- range operations (callers hold mmu_lock) ----------------------------------

    def zap_leafs(self, root: TablePage, start: int, end: int, shared: bool = False,
                  max_level: int = ROOT_LEVEL):
        """Generator: zap every leaf up to ``max_level`` overlapping [start, end).

        Batched break-before-make: leaves are frozen, then one flush, then all
        are written non-present.  When another thread waits for mmu_lock, or
        the walk has run long (need_resched), the batch is finished (flushed)
        before the lock is dropped (tdp_mmu_iter_cond_resched).
        """
        rcu = self.kvm.rcu
        token = rcu.read_lock()
        frozen = []
        yielded_gfn = None
        visited = 0
        needbreak_of = self.kvm.mmu_lock.needbreak
        it = self.iter(root, start, end)
        while it.valid:
            spte, level = it.old_spte, it.level
            # is_shadow_present_pte and is_last_spte, inline: this runs for every entry visited.
            if (spte & SPTE_MMU_PRESENT_MASK and (level == PG_LEVEL_4K or spte & PT_PAGE_SIZE_MASK)
                    and level <= max_level):
                if not (yield from self.set_spte_atomic(it, FROZEN_SPTE)):
                    continue
                frozen.append((it.pt_path[level], it.index))
            visited += 1
            needbreak = needbreak_of()
            if ((needbreak or visited % RESCHED_ENTRIES == 0)
                    and it.next_last_level_gfn != yielded_gfn):
                yielded_gfn = it.next_last_level_gfn
                token = yield from self._cond_resched(it, frozen, token, shared)
                continue
            if not needbreak:  # the entries skipped would not have rescheduled
                visited += it.skip_absent(RESCHED_ENTRIES - 1 - visited % RESCHED_ENTRIES)
            it.next()
        yield from self._finish_batch(frozen)
        rcu.read_unlock(token)

    def _finish_batch(self, frozen: list):
        if frozen:
            self.flush()
            yield from self.write_frozen(frozen)
            frozen.clear()

    def _cond_resched(self, it: TdpIter, frozen: list, token: int, shared: bool):
        """Generator: flush pending work, let waiters take mmu_lock, resume from ``it.gfn``."""
        if faults.active("lost-flush-on-yield"):
            yield from self.write_frozen(frozen)  # the pending flush is dropped
            frozen.clear()
        else:
            yield from self._finish_batch(frozen)
        lock, rcu = self.kvm.mmu_lock, self.kvm.rcu
        rcu.read_unlock(token)
        if shared:
            lock.read_unlock()
            yield
            yield from lock.read_lock()
        else:
            lock.write_unlock()
            yield
            yield from lock.write_lock()
        token = rcu.read_lock()
        it.restart()
        return token

    def zap_leafs_all_roots(self, start: int, end: int):
        """Generator: zap [start, end) in the direct and the mirror root (slot removal)."""
        # 4e103134b862 zapped the slot's gfns through the 4K rmaps only.
        max_level = PG_LEVEL_4K if faults.active("slot-delete-leaf-only") else ROOT_LEVEL
        for root in self.held(self.roots()):
            yield from self.zap_leafs(root, start, end, max_level=max_level)

    def zap_root(self, root: TablePage):
        """Generator: tdp_mmu_zap_root of an invalidated root, mmu_lock held for read.

        Its top-level entries are set non-present by cmpxchg; their tables go to
        the deferred free.  No flush: every vCPU was made to leave the root
        (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS) before the zap, and loading a new root
        flushes.
        """
        rcu = self.kvm.rcu
        token = rcu.read_lock()
        nonpresent = self.nonpresent_value()
        it = self.iter(root, 0, GFN_END, min_level=ROOT_LEVEL)
        while it.valid:
            if is_shadow_present_pte(it.old_spte):
                if not (yield from self.set_spte_atomic(it, nonpresent)):
                    continue
            it.skip_absent(SPTE_ENT_PER_PAGE)
            it.next()
        rcu.read_unlock(token)

    def write_protect(self, root: TablePage, start: int, end: int, gfns=None,
                      max_level: int = ROOT_LEVEL, min_level: int = PG_LEVEL_4K):
        """Generator: clear hardware-writable on the leaves of levels ``min_level`` to
        ``max_level`` in [start, end) (or of ``gfns``); MMU-writable stays, so a write
        fault restores it in the fast path.

        Returns whether anything changed.
        """
        return (yield from self.clear_leaf_bit(root, start, end, PT_WRITABLE_MASK, gfns,
                                               max_level, min_level))

    def clear_dirty(self, root: TablePage, start: int, end: int, gfns=None,
                    max_level: int = ROOT_LEVEL):
        """Generator: clear the EPT Dirty bit of the leaves up to ``max_level`` in
        [start, end) (or of ``gfns``): the dirty-bit half of dirty logging, when the
        CPU logs writes itself (PML).  clear_dirty_gfn_range on enable (every leaf of
        the slot) and clear_dirty_pt_masked on KVM_GET_DIRTY_LOG (the 4K leaves of the
        reported gfns), both by atomic update: the CPU may set Dirty meanwhile.

        Returns whether anything changed.
        """
        return (yield from self.clear_leaf_bit(root, start, end, SPTE_DIRTY_MASK, gfns,
                                               max_level))

    def clear_leaf_bit(self, root: TablePage, start: int, end: int, dbit: int, gfns=None,
                       max_level: int = ROOT_LEVEL, min_level: int = PG_LEVEL_4K):
        """Generator: clear ``dbit`` (Writable or Dirty: tdp_mmu.c's ``dbit``) in the leaves of
        levels ``min_level`` to ``max_level`` in [start, end) (or of ``gfns``), each by
        cmpxchg that is retried on the entry's new value.  Returns whether any changed
        (the caller flushes)."""
        rcu = self.kvm.rcu
        token = rcu.read_lock()
        changed = False
        it = self.iter(root, start, end)
        while it.valid:
            spte, level = it.old_spte, it.level
            # is_shadow_present_pte and is_last_spte, inline: this runs for every entry visited
            # (enabling dirty logging visits every leaf of the slot, a split's 512 among them).
            if (spte & dbit and spte & SPTE_MMU_PRESENT_MASK
                    and (level == PG_LEVEL_4K or spte & PT_PAGE_SIZE_MASK)
                    and min_level <= level <= max_level
                    and (gfns is None or it.gfn in gfns)):
                if not (yield from self.set_spte_atomic(it, spte & ~dbit)):
                    continue
                changed = True
            it.skip_absent(SPTE_ENT_PER_PAGE)
            it.next()
        rcu.read_unlock(token)
        return changed

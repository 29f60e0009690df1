"""Huge pages: eager split, recovery (in place and merge), and 2M installs over tables.

Shared memory is recovered in place: a table of 4K leaves becomes the 2M
leaf its first leaf implies (recover_huge_pages_range, KVM commit
13e2e4f62a4b; before it KVM zapped and refaulted).  Private 4K children are
merged through the TDX module (the RFC merge series): only when all 512 are
present, contiguous, equally permissive and (the secure EPT checks) in one
accept state, since zapping a private page loses its accepted contents.
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import EINVAL, OK, PG_LEVEL_2M, PG_LEVEL_4K
from mmufuzz.harness.tdp import tdx
from mmufuzz.harness.tdp.lpage import max_mapping_level
from mmufuzz.harness.tdp.pgalloc import next_used
from mmufuzz.harness.tdp.spte import (
    ACC_ALL,
    FROZEN_SPTE,
    SPTE_ENT_PER_PAGE,
    is_frozen_spte,
    is_large_pte,
    is_last_spte,
    is_shadow_present_pte,
    leaf_permissions,
    make_huge_page_split_spte,
    make_huge_spte,
    make_nonleaf_spte,
    make_spte,
    pages_per_level,
    spte_to_pfn,
)

MERGED, UNMERGED, RETRY = "merged", "unmerged", "retry"


def split_huge_page(kvm, it):
    """Generator: tdp_mmu_split_huge_page; replace the huge leaf at ``it`` by a full table.

    Child i maps pfn + i with the huge leaf's permissions, so the mapping is
    unchanged and no flush is needed.  False if the entry changed meanwhile.
    """
    mmu = kvm.mmu
    huge = it.old_spte
    sp = mmu.alloc.alloc(it.level - 1, it.gfn, it.root.mirror)
    # make_huge_page_split_spte(huge, level, i) for every i: child 0's SPTE plus i pages
    # of the child level (the pfn field; the bits below it are every child's).
    first = make_huge_page_split_spte(huge, it.level, 0)
    stride = make_huge_page_split_spte(huge, it.level, 1) - first
    sp.spt = list(range(first, first + SPTE_ENT_PER_PAGE * stride, stride))
    sp.refcount = SPTE_ENT_PER_PAGE
    if (yield from mmu.set_spte_atomic(it, make_nonleaf_spte(sp.pfn))):
        return True
    mmu.alloc.free(sp)  # never linked
    return False


def split_range(kvm, root, start: int, end: int):
    """Generator: split every huge leaf overlapping [start, end) (mmu_lock held for read)."""
    token = kvm.rcu.read_lock()
    it = kvm.mmu.iter(root, start, end, min_level=PG_LEVEL_2M)
    while it.valid:
        yield
        spte = it.read()
        if (is_shadow_present_pte(spte) and it.level > PG_LEVEL_4K and is_large_pte(spte)
                and not (yield from split_huge_page(kvm, it))):
            continue  # raced: look at the entry again
        it.next()
    kvm.rcu.read_unlock(token)


def split_slot(kvm, op):
    """The ``split`` op: eagerly split the huge leaves of a slot in every root.

    Under slots_lock, as KVM's callers hold it (kvm_mmu_slot_apply_flags when
    logging starts, KVM_CLEAR_DIRTY_LOG): a split copies a huge leaf's pfn into
    4K leaves, and only slots_lock keeps it from running beside in-place
    recovery (:func:`recover`), which may rebuild a huge leaf that an
    invalidation had half zapped before it yielded.
    """
    yield from kvm.slots_lock.write_lock()
    try:
        slot = kvm.memslots.by_id.get(op.slot)
        if slot is None:
            return EINVAL
        yield from kvm.mmu_lock.read_lock()
        for root in kvm.mmu.held(kvm.mmu.roots(only_valid=True)):
            yield from split_range(kvm, root, slot.base_gfn, slot.end_gfn)
        kvm.mmu_lock.read_unlock()
        return OK
    finally:
        kvm.slots_lock.write_unlock()


def replace_table_with_huge(kvm, it, huge: int):
    """Generator: install huge leaf ``huge`` over the table at ``it``, as x86 does it.

    tdp_mmu_map_handle_target_level (and recover_huge_pages_range, in place
    since KVM commit 13e2e4f62a4b) replace the table with one cmpxchg; no
    vCPU sees a non-present entry in between (break-before-make is arm64's
    rule).  handle_removed_pt queues the old table for call_rcu, and the
    caller flushes (kvm_flush_remote_tlbs_gfn of the huge leaf: every gfn the
    old table mapped, range since 1e203847aa92) before it leaves its RCU
    section: a vCPU still walking the old table, or caching its 4K
    translations, drops them before the page can be freed.  False if raced.
    """
    mmu = kvm.mmu
    if not (yield from mmu.set_spte_atomic(it, huge)):
        return False
    # KVM commit bb95dfb9e2df made this flush the caller's duty.
    if faults.active("removed-pt-flush-wrong-start"):
        # 574c3c55e969: the removed table's flush started at its last child's gfn.
        child = pages_per_level(it.level - 1)
        mmu.flush_range(it.gfn + (SPTE_ENT_PER_PAGE - 1) * child, pages_per_level(it.level))
    elif not faults.active("huge-over-table-no-flush"):
        mmu.flush_gfn(it.gfn, it.level)
    return True


def merge_private_spt(kvm, it, fault=None):
    """Generator: merge the private 4K table at ``it`` into one 2M leaf, in place.

    With ``fault`` (the fault path, seed thread 000) missing children are
    populated first from ``fault.pfn``; without it (``recover``) a missing
    child means no merge.  The parent is frozen while the children are read,
    the secure EPT link is blocked and tracked, then the TDX module promotes;
    it refuses mixed accept states, and the 4K mapping stays.
    """
    mmu = kvm.mmu
    if fault is not None and faults.active("merge-by-zap"):
        if not (yield from mmu.zap_spte_atomic(it)):  # the 4K leaves go (PAGE.REMOVE)
            return RETRY
        huge = make_spte(fault.pfn, PG_LEVEL_2M, ACC_ALL)  # and the range is AUGed at 2M
        return MERGED if (yield from mmu.set_spte_atomic(it, huge)) else RETRY
    page, index, gfn, table = it.page, it.index, it.gfn, it.old_spte
    yield
    if page.spt[index] != table:
        return RETRY
    page.spt[index] = FROZEN_SPTE
    child = mmu.alloc.child(table)
    result = yield from _check_or_populate_children(kvm, child, fault)
    if result is not MERGED:
        page.spt[index] = table
        return result
    if not tdx.tdx_sept_merge_private_spt(kvm, gfn):  # BLOCK, TRACK (a flush), PROMOTE
        page.spt[index] = table
        return UNMERGED
    huge = make_huge_spte(child.spt[0], PG_LEVEL_2M)
    page.spt[index] = huge
    yield from mmu.handle_changed_spte(page, gfn, table, huge, PG_LEVEL_2M, external=False)
    mmu.flush()
    it.old_spte = huge
    return MERGED


def _check_or_populate_children(kvm, child, fault):
    """Generator: MERGED if all 512 children are (now) contiguous, alike leaves."""
    first = child.spt[0]
    if fault is not None:
        base = fault.pfn
        model = make_spte(base, PG_LEVEL_4K, ACC_ALL)
    elif is_shadow_present_pte(first):
        base, model = spte_to_pfn(first), first
    else:
        return UNMERGED
    for i in range(SPTE_ENT_PER_PAGE):
        yield
        spte = child.spt[i]
        if is_frozen_spte(spte) and not faults.active("merge-frozen-child"):
            return RETRY
        if is_shadow_present_pte(spte):
            if spte_to_pfn(spte) != base + i or leaf_permissions(spte) != leaf_permissions(model):
                return UNMERGED
        elif fault is None:
            return UNMERGED
        else:
            new = make_spte(base + i, PG_LEVEL_4K, ACC_ALL)
            child.spt[i] = new
            yield from kvm.mmu.handle_changed_spte(child, child.gfn + i, spte, new, PG_LEVEL_4K)
    return MERGED


def make_huge_spte_from_children(kvm, table: int):
    """tdp_mmu_make_huge_spte: the 2M leaf made from the first present leaf under ``table``,
    or None (-ENOENT: nothing mapped, nothing to recover)."""
    child = kvm.mmu.alloc.child(table)
    i = next_used(child.spt, 0, SPTE_ENT_PER_PAGE)
    while i < SPTE_ENT_PER_PAGE:
        spte = child.spt[i]
        if is_shadow_present_pte(spte):
            return make_huge_spte(spte, PG_LEVEL_2M)
        i = next_used(child.spt, i + 1, SPTE_ENT_PER_PAGE)
    return None


def recover_range(kvm, root, slot, private: bool):
    """Generator: recover (shared: in place) or merge (private) every legal 2M range of ``slot``.

    Shared: recover_huge_pages_range (KVM commit 13e2e4f62a4b): each table at
    2M whose range may be huge becomes the huge leaf its first present leaf
    implies, by cmpxchg; one flush after the walk, before the RCU section
    ends, covers the removed tables (kvm_flush_remote_tlbs_memslot: a 2M range
    that may be huge lies inside the slot).
    """
    mmu = kvm.mmu
    token = kvm.rcu.read_lock()
    flush = False
    it = mmu.iter(root, slot.base_gfn, slot.end_gfn, min_level=PG_LEVEL_2M)
    while it.valid:
        yield
        spte = it.read()
        if (it.level == PG_LEVEL_2M and is_shadow_present_pte(spte)
                and not is_last_spte(spte, it.level)
                and max_mapping_level(slot, it.gfn, private) >= PG_LEVEL_2M):
            if private:
                if (yield from merge_private_spt(kvm, it)) is RETRY:
                    continue
            else:
                huge = make_huge_spte_from_children(kvm, spte)
                if huge is not None:
                    if not (yield from mmu.set_spte_atomic(it, huge)):
                        continue
                    if faults.active("collapsible-flush-sp-base") and kvm.range_flush:
                        # 1b2dc7360463: kvm_mmu_zap_collapsible_spte flushed, when a
                        # ranged flush was available, the zapped SPTE's table from its
                        # base gfn for one SPTE's size (sp->gfn, sp->role.level), and
                        # left no flush for the end.
                        mmu.flush_range(it.gfn, pages_per_level(it.level - 1))
                    else:
                        flush = True
        it.next()
    if flush:
        mmu.flush_memslot(slot)
    kvm.rcu.read_unlock(token)


def recover_slot(kvm, slot):
    """Generator: kvm_mmu_recover_huge_pages for one slot (and the TDX merge)."""
    yield from kvm.mmu_lock.read_lock()
    for root in kvm.mmu.held(kvm.mmu.direct_roots(only_valid=True)):
        yield from recover_range(kvm, root, slot, private=False)
    if slot.private:
        yield from recover_range(kvm, kvm.mmu.mirror_root, slot, private=True)
    kvm.mmu_lock.read_unlock()


def for_each_slot(kvm, per_slot):
    """Generator: ``per_slot(kvm, slot)`` for every slot, in gfn order.

    Like KVM's NX-recovery worker it reads the memslots under kvm->srcu, so a
    slot being deleted is either skipped (already invalid) or kept until the
    work is done (the delete's synchronize_srcu waits for it).
    """
    token = kvm.srcu.read_lock()
    try:
        for slot in sorted(kvm.memslots.by_id.values(), key=lambda s: s.base_gfn):
            if not slot.invalid:
                yield from per_slot(kvm, slot)
    finally:
        kvm.srcu.read_unlock(token)


def recover(kvm, op):
    """The ``recover`` op: every slot (:func:`for_each_slot`), under slots_lock.

    In-place recovery (recover_huge_pages_range) runs in mainline only from
    kvm_mmu_recover_huge_pages, whose caller (kvm_mmu_slot_apply_flags, when
    logging stops) holds slots_lock; the NX-recovery worker, which does not,
    zaps instead.  So a recovery never runs beside an eager split
    (:func:`split_slot`).
    """
    yield from kvm.slots_lock.write_lock()
    try:
        yield from for_each_slot(kvm, recover_slot)
    finally:
        kvm.slots_lock.write_unlock()
    return OK

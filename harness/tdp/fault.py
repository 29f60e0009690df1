"""The page-fault path: kvm_mmu_page_fault -> kvm_mmu_faultin_pfn -> kvm_tdp_mmu_map.

Lazy: nothing is mapped until a vCPU touches it.  The order of checks is
KVM's (kvm_mmu_faultin_pfn), which is also the order of the guest-visible
exits (SEMANTICS §D).  The fault snapshots mmu_invalidate_seq before looking
up the pfn and re-checks it under mmu_lock, so a racing invalidation makes it
retry rather than install a stale pfn.

Before all that, ``fast_page_fault`` tries to resolve a write to a present,
write-protected leaf without mmu_lock: it is how a write after dirty logging
write-protected a page gets its Writable bit back (kvm_tdp_mmu_page_fault).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmufuzz.harness import faults
from mmufuzz.harness.ops import PG_LEVEL_2M, PG_LEVEL_4K, MemoryFaultExit, MmioExit
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp import events, huge, notifier
from mmufuzz.harness.tdp.lpage import max_mapping_level
from mmufuzz.harness.tdp.spte import (
    ACC_ALL,
    FROZEN_SPTE,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    ROOT_LEVEL,
    SPTE_MMU_PRESENT_MASK,
    TDP_MAX_GFN,
    is_access_allowed,
    is_last_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    leaf_spte_change_narrows,
    leaf_spte_change_needs_tlb_flush,
    make_mmio_spte,
    make_spte,
    pages_per_level,
    spte_index,
    spte_to_pfn,
)

# KVM's RET_PF_* results that stay inside the fault path.
RET_PF_CONTINUE, RET_PF_RETRY, RET_PF_EMULATE, RET_PF_INVALID, RET_PF_FIXED = 0, 1, 2, 3, 5
RET_PF_SPURIOUS = 6
# fast_page_fault gives up after this many lost cmpxchgs ("Fast #PF retrying more than 4 times").
FAST_PF_RETRIES = 4


@dataclass(slots=True)
class KvmPageFault:
    """struct kvm_page_fault: what one EPT violation asks for and what it resolved to."""

    addr: int
    gfn: int
    write: bool
    exec: bool
    is_private: bool
    max_level: int
    present: bool = False  # PFERR_PRESENT: the walk met a present leaf lacking a permission
    slot: object = None
    pfn: int = 0
    map_writable: bool = False
    mmu_seq: int = 0
    gen: int = 0
    goal_level: int = PG_LEVEL_4K
    root: object = None  # the vCPU's direct root (vcpu->arch.mmu->root) the fault started on


def kvm_mmu_page_fault(kvm, vcpu, addr: int, write: bool, exec_: bool, private: bool,
                       max_level: int = PG_LEVEL_2M, present: bool = False):
    """Generator: handle an EPT violation at byte ``addr``.

    Returns None when the vCPU should retry the access (something is mapped
    now), or the exit Outcome.  Retries loop here, never reaching the guest.
    """
    while True:
        fault = KvmPageFault(addr, addr >> 12, write, exec_, private, max_level, present)
        # A retry re-enters the guest first: pending requests (a root made obsolete) are
        # handled and a root is loaded (kvm_mmu_reload).
        fault.root = vcpu.mmu_reload()
        token = kvm.srcu.read_lock()  # the slot this fault resolves stays until it is done
        try:
            result = yield from fast_page_fault(kvm, vcpu, fault)
            if result is RET_PF_FIXED or result is RET_PF_SPURIOUS:
                return None
            fault.mmu_seq = kvm.mmu_invalidate_seq
            yield
            result = kvm_mmu_faultin_pfn(kvm, vcpu, fault)
            if result is RET_PF_CONTINUE:
                yield from kvm.mmu_lock.read_lock()
                try:
                    if is_page_fault_stale(kvm, fault):
                        result = RET_PF_RETRY
                    else:
                        result = yield from kvm_tdp_mmu_map(kvm, fault)
                finally:
                    kvm.mmu_lock.read_unlock()
        finally:
            kvm.srcu.read_unlock(token)
        if result is RET_PF_RETRY:
            yield
            continue
        if result is RET_PF_EMULATE:
            return MmioExit(addr, write)
        if result is RET_PF_FIXED:
            return None
        return result


def page_fault_can_be_fast(kvm, fault: KvmPageFault) -> bool:
    """mmu.c's page_fault_can_be_fast, for the EPT violations this target takes.

    Private faults never are: the mirror root's SPTEs change only through the
    TDX module (kvm_tdp_mmu_fast_pf_get_last_sptep walks the direct root).  A
    fault whose private-ness the attributes contradict must reach
    kvm_mmu_faultin_pfn to exit.  EPT A/D bits are on (enable_ept_ad_bits), so
    a non-present SPTE is never an access-tracked one: only a write to a
    present leaf can be fixed.
    """
    if fault.is_private or (kvm.tdx and kvm.attributes.is_private(fault.gfn)):
        return False
    return fault.present and fault.write


def fast_page_fault(kvm, vcpu, fault: KvmPageFault):
    """Generator: mmu.c's fast_page_fault on the TDP MMU, without mmu_lock.

    Walks the vCPU's direct root under RCU to the last SPTE for the gfn.  A
    leaf that already allows the access was fixed by someone else (or a TLB
    entry was stale): RET_PF_SPURIOUS.  A leaf that is MMU-writable gets its
    Writable bit back by cmpxchg (fast_pf_fix_direct_spte), which loses to
    any concurrent writer (a write-protect, a zap's freeze) and retries; a
    won cmpxchg that made the leaf writable marks the gfn dirty in the slot
    the fault resolved (mark_page_dirty_in_slot).  A huge leaf in a
    dirty-logging slot is left to the slow path, which maps 4K: marking its
    first gfn would miss writes to the others.  Anything else is
    RET_PF_INVALID: the slow path.
    """
    if not page_fault_can_be_fast(kvm, fault):
        return RET_PF_INVALID
    # kvm_mmu_do_page_fault looked the slot up (kvm_vcpu_gfn_to_memslot) before this.
    slot = vcpu.gfn_to_memslot(fault.gfn)
    token = kvm.rcu.read_lock()  # walk_shadow_page_lockless_begin
    try:
        for _ in range(FAST_PF_RETRIES + 1):
            page, level, spte = yield from kvm_tdp_mmu_fast_pf_get_last_sptep(kvm, fault)
            if not spte & SPTE_MMU_PRESENT_MASK or not is_last_spte(spte, level):
                return RET_PF_INVALID
            if is_access_allowed(spte, fault.write, fault.exec):
                return RET_PF_SPURIOUS
            new = spte
            if fault.write and (is_mmu_writable_spte(spte)
                                or faults.active("fast-pf-ignores-mmu-writable")):
                new |= PT_WRITABLE_MASK
                if level > PG_LEVEL_4K and slot is not None and slot.dirty is not None:
                    return RET_PF_INVALID
            if new == spte or not is_access_allowed(new, fault.write, fault.exec):
                return RET_PF_INVALID
            yield
            index = spte_index(fault.gfn, level)
            if page.spt[index] == spte:  # fast_pf_fix_direct_spte's try_cmpxchg64
                page.spt[index] = new
                kvm.events[events.FAST_PF_FIXED] += 1
                if new & PT_WRITABLE_MASK and not spte & PT_WRITABLE_MASK:
                    kvm.dirty_log.mark_page_dirty_in_slot(fault.gfn, slot)
                return RET_PF_FIXED
            kvm.events[events.FAST_PF_CMPXCHG_LOST] += 1
        return RET_PF_INVALID
    finally:
        kvm.rcu.read_unlock(token)


def kvm_tdp_mmu_fast_pf_get_last_sptep(kvm, fault: KvmPageFault):
    """Generator: ``(table, level, spte)`` of the last SPTE on the gfn's walk of the
    direct root (for_each_tdp_pte down to the first non-present or leaf entry)."""
    page, level = fault.root, ROOT_LEVEL
    while True:
        spte = page.spt[spte_index(fault.gfn, level)]
        yield
        if not spte & SPTE_MMU_PRESENT_MASK or is_last_spte(spte, level):
            return page, level, spte
        page, level = kvm.mmu.alloc.child(spte), level - 1


def kvm_mmu_faultin_pfn(kvm, vcpu, fault: KvmPageFault):
    """Resolve the fault's slot and pfn, or the exit it ends in (an Outcome).

    In mainline's order: the private/shared mismatch, the no-slot path
    (kvm_handle_noslot_fault), an invalid slot, then a retry before the pfn is
    looked up or mmu_lock taken if an invalidation covers the gfn or ran since
    ``mmu_seq`` (mmu_invalidate_retry_gfn_unsafe; KVM commit d02c357e5bfa "KVM:
    x86/mmu: Retry fault before acquiring mmu_lock if mapping is changing"), then
    the pfn (kvm_mmu_faultin_pfn_private refuses a slot that cannot be private; a
    write to a readonly slot is KVM_PFN_ERR_RO_FAULT, emulated).  Mainline checks
    again once it has the pfn; nothing yields in between here, so that check
    would see the same state.
    """
    gfn = fault.gfn
    if faults.active("noslot-before-attributes"):
        slot = vcpu.gfn_to_memslot(gfn)
        if slot is None and not fault.is_private:
            fault.slot, fault.gen = None, kvm.memslots.generation
            return RET_PF_CONTINUE  # the no-slot check ran before the attribute check
    if fault.is_private != kvm.attributes.is_private(gfn):
        return MemoryFaultExit(gfn << 12, fault.is_private)
    slot = vcpu.gfn_to_memslot(gfn)
    fault.slot, fault.gen = slot, kvm.memslots.generation
    if slot is None:
        if fault.is_private:
            return MemoryFaultExit(gfn << 12, True)  # kvm_handle_noslot_fault
        if gfn > TDP_MAX_GFN:
            return MmioExit(fault.addr, fault.write)  # kvm_handle_noslot_fault: emulate
        return RET_PF_CONTINUE  # kvm_handle_noslot_fault: the map installs an MMIO SPTE
    if slot.invalid:
        kvm.events[events.RETRY_SLOT_INVALID] += 1
        return RET_PF_RETRY  # being deleted or moved: its old SPTEs are not zapped yet
    if not faults.active("invalidate-vs-memslot-race") and \
            mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, gfn):
        return RET_PF_RETRY
    if fault.is_private and not slot.private:
        return MemoryFaultExit(gfn << 12, True)
    if fault.write and slot.readonly:
        return MmioExit(fault.addr, True)  # KVM_PFN_ERR_RO_FAULT: emulate
    backing = slot.gmem if fault.is_private else slot.backing
    fault.pfn = backing.pfn(gfn - slot.base_gfn)
    fault.map_writable = not slot.readonly
    return RET_PF_CONTINUE


_RETRY_EVENTS = {notifier.IN_PROGRESS: events.RETRY_IN_PROGRESS,
                 notifier.SEQUENCE: events.RETRY_SEQUENCE}


def mmu_invalidate_retry_gfn(kvm, mmu_seq: int, gfn: int) -> bool:
    """:func:`~mmufuzz.harness.tdp.notifier.mmu_invalidate_retry_gfn`, its reason counted
    as a TDP MMU event."""
    reason = notifier.mmu_invalidate_retry_gfn(kvm, mmu_seq, gfn)
    if reason is None:
        return False
    kvm.events[_RETRY_EVENTS[reason]] += 1
    return True


def is_page_fault_stale(kvm, fault: KvmPageFault) -> bool:
    """is_page_fault_stale, under mmu_lock: the vCPU's root was invalidated (KVM commit
    a955cad84cda: a fault into an obsolete root installs behind the zap of it), or an
    invalidation covering the gfn ran or is running (mmu_invalidate_retry_gfn)."""
    if kvm.mmu.is_invalid(fault.root) and not faults.active("fault-on-obsolete-root"):
        return True
    if fault.slot is None or faults.active("invalidate-vs-memslot-race"):
        return False
    return mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn)


def kvm_mmu_hugepage_adjust(fault: KvmPageFault) -> None:
    """Pick the goal level: the largest the lpage rules and the fault's max level allow."""
    fault.goal_level = PG_LEVEL_4K
    if fault.slot is None or fault.max_level == PG_LEVEL_4K:
        return
    level = min(fault.max_level, max_mapping_level(fault.slot, fault.gfn, fault.is_private))
    if level == PG_LEVEL_4K:
        return
    fault.goal_level = level
    fault.pfn &= -pages_per_level(level)


def kvm_tdp_mmu_map(kvm, fault: KvmPageFault):
    """Generator: walk to the goal level, linking or splitting on the way, then map."""
    kvm_mmu_hugepage_adjust(fault)
    mmu = kvm.mmu
    token = kvm.rcu.read_lock()
    try:
        root = mmu.mirror_root if fault.is_private else fault.root
        it = mmu.iter(root, fault.gfn, fault.gfn + 1)
        goal_level = fault.goal_level
        while True:
            yield
            spte = it.read()
            # is_frozen_spte, is_shadow_present_pte and is_large_pte inline: once per level.
            if spte == FROZEN_SPTE:
                kvm.events[events.RETRY_FROZEN] += 1
                return RET_PF_RETRY
            if it.level == goal_level:
                return (yield from _map_target_level(kvm, fault, it))
            present = spte & SPTE_MMU_PRESENT_MASK
            if present and not spte & PT_PAGE_SIZE_MASK:
                it.next()
                continue
            if present:
                linked = yield from huge.split_huge_page(kvm, it)
            else:
                linked = yield from mmu.link_sp(it)
            if not linked:
                return RET_PF_RETRY
            it.next()
    finally:
        kvm.rcu.read_unlock(token)


def _map_target_level(kvm, fault: KvmPageFault, it):
    """Generator: tdp_mmu_map_handle_target_level."""
    mmu, old = kvm.mmu, it.old_spte
    # A leaf that already allows the access was fixed by another vCPU, or by the fast
    # path (KVM commit "KVM: x86/mmu: Treat TDP MMU faults as spurious if access is
    # already allowed"): replacing it would only clear its Dirty bit.
    if (old & SPTE_MMU_PRESENT_MASK and is_last_spte(old, it.level)
            and is_access_allowed(old, fault.write, fault.exec)):
        # WARN_ON_ONCE(fault->pfn != spte_to_pfn(old)) (KVM commit 988da7820206), for a
        # fault that resolved a slot; one that found none (docs/semantics.md §I) is not checked.
        if fault.slot is not None and fault.pfn != spte_to_pfn(old):
            raise InvariantViolation("spurious_fault_pfn", f"gfn={it.gfn:#x} level={it.level} "
                                     f"old={old:#x} fault pfn={fault.pfn:#x}")
        return RET_PF_FIXED
    if fault.slot is None:
        new = make_mmio_spte(fault.gfn, ACC_ALL, fault.gen, kvm.mmio_value)
        kvm.events[events.MMIO_SPTE if fault.gen == kvm.memslots.generation
                   else events.MMIO_SPTE_GENERATION_MOVED] += 1
    else:
        new = make_spte(fault.pfn, it.level, ACC_ALL, fault.map_writable)
        if is_shadow_present_pte(old) and not is_last_spte(old, it.level):
            if fault.is_private:
                merged = yield from huge.merge_private_spt(kvm, it, fault)
                return RET_PF_RETRY if merged is huge.RETRY else RET_PF_FIXED
            replaced = yield from huge.replace_table_with_huge(kvm, it, new)
            return RET_PF_FIXED if replaced else RET_PF_RETRY
    if new == old:
        return RET_PF_FIXED  # spurious: another vCPU mapped it
    if not (yield from mmu.set_spte_atomic(it, new)):
        kvm.events[events.RETRY_CMPXCHG] += 1
        return RET_PF_RETRY
    if is_shadow_present_pte(old):
        # Mainline: WARN_ON_ONCE(leaf_spte_change_needs_tlb_flush(old, new)), then the flush.
        # A fault with a slot never takes MMU-writable away (only a zap or write-protection
        # does), so the warning is a KVM bug: an invariant.  A fault that found no slot, racing
        # a memslot creation and another vCPU's fault, can put an MMIO SPTE over that vCPU's
        # leaf (docs/semantics.md §I): not checked, and flushed as any narrowing is.
        if fault.slot is not None and leaf_spte_change_needs_tlb_flush(old, new):
            raise InvariantViolation("fault_leaf_change_needs_flush", f"gfn={it.gfn:#x} "
                                     f"level={it.level} old={old:#x} new={new:#x}")
        if leaf_spte_change_narrows(old, new):
            mmu.flush_gfn(it.gfn, it.level)
    return RET_PF_EMULATE if fault.slot is None else RET_PF_FIXED


"""The page-fault path: kvm_mmu_page_fault -> kvm_mmu_faultin_pfn -> kvm_tdp_mmu_map.

Lazy: nothing is mapped until a vCPU touches it.  The order of checks is
KVM's (kvm_mmu_faultin_pfn), which is also the order of the guest-visible
exits (SEMANTICS §D).  The fault snapshots mmu_invalidate_seq before looking
up the pfn and re-checks it under mmu_lock, so a racing invalidation makes it
retry rather than install a stale pfn.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmufuzz.harness import faults
from mmufuzz.harness.ops import PG_LEVEL_2M, PG_LEVEL_4K, MemoryFaultExit, MmioExit
from mmufuzz.harness.tdp import events, huge
from mmufuzz.harness.tdp.lpage import max_mapping_level
from mmufuzz.harness.tdp.spte import (
    ACC_ALL,
    FROZEN_SPTE,
    PT_PAGE_SIZE_MASK,
    SPTE_MMU_PRESENT_MASK,
    TDP_MAX_GFN,
    is_last_spte,
    is_shadow_present_pte,
    leaf_spte_change_needs_tlb_flush,
    make_mmio_spte,
    make_spte,
    pages_per_level,
)

# KVM's RET_PF_* results that stay inside the fault path.
RET_PF_CONTINUE, RET_PF_RETRY, RET_PF_EMULATE, RET_PF_FIXED = 0, 1, 2, 5


@dataclass(slots=True)
class KvmPageFault:
    """struct kvm_page_fault: what one EPT violation asks for and what it resolved to."""

    addr: int
    gfn: int
    write: bool
    exec: bool
    is_private: bool
    max_level: int
    slot: object = None
    pfn: int = 0
    map_writable: bool = False
    mmu_seq: int = 0
    gen: int = 0
    goal_level: int = PG_LEVEL_4K
    root: object = None  # the vCPU's direct root (vcpu->arch.mmu->root) the fault started on


def kvm_mmu_page_fault(kvm, vcpu, addr: int, write: bool, exec_: bool, private: bool,
                       max_level: int = PG_LEVEL_2M):
    """Generator: handle an EPT violation at byte ``addr``.

    Returns None when the vCPU should retry the access (something is mapped
    now), or the exit Outcome.  Retries loop here, never reaching the guest.
    """
    while True:
        fault = KvmPageFault(addr, addr >> 12, write, exec_, private, max_level)
        # A retry re-enters the guest first: pending requests (a root made obsolete) are
        # handled and a root is loaded (kvm_mmu_reload).
        fault.root = vcpu.mmu_reload()
        fault.mmu_seq = kvm.mmu_invalidate_seq
        token = kvm.srcu.read_lock()  # the slot this fault resolves stays until it is done
        try:
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


def kvm_mmu_faultin_pfn(kvm, vcpu, fault: KvmPageFault):
    """Resolve the fault's slot and pfn, or the exit it ends in (an Outcome)."""
    gfn = fault.gfn
    if fault.is_private != kvm.attributes.is_private(gfn):
        return MemoryFaultExit(gfn << 12, fault.is_private)
    slot = vcpu.gfn_to_memslot(gfn)
    fault.slot, fault.gen = slot, kvm.memslots.generation
    if fault.is_private and (slot is None or not slot.private):
        return MemoryFaultExit(gfn << 12, True)
    if slot is None:
        if gfn > TDP_MAX_GFN:
            return MmioExit(fault.addr, fault.write)  # kvm_handle_noslot_fault: emulate
        return RET_PF_CONTINUE  # kvm_handle_noslot_fault: the map installs an MMIO SPTE
    if slot.invalid:
        kvm.events[events.RETRY_SLOT_INVALID] += 1
        return RET_PF_RETRY  # being deleted or moved: its old SPTEs are not zapped yet
    if fault.write and slot.readonly:
        return MmioExit(fault.addr, True)  # KVM_PFN_ERR_RO_FAULT: emulate
    backing = slot.gmem if fault.is_private else slot.backing
    fault.pfn = backing.pfn(gfn - slot.base_gfn)
    fault.map_writable = not slot.readonly
    return RET_PF_CONTINUE


def is_page_fault_stale(kvm, fault: KvmPageFault) -> bool:
    """is_page_fault_stale, under mmu_lock: the vCPU's root was invalidated (KVM commit
    a955cad84cda: a fault into an obsolete root installs behind the zap of it), or an
    invalidation covering the gfn ran or is running (mmu_invalidate_retry_gfn)."""
    if kvm.mmu.is_invalid(fault.root) and not faults.active("fault-on-obsolete-root"):
        return True
    if fault.slot is None or faults.active("invalidate-vs-memslot-race"):
        return False
    if kvm.mmu_invalidate_in_progress and kvm.invalidate_covers(fault.gfn):
        kvm.events[events.RETRY_IN_PROGRESS] += 1
        return True
    if kvm.mmu_invalidate_seq != fault.mmu_seq:
        kvm.events[events.RETRY_SEQUENCE] += 1
        return True
    return False


def _huge_range_invalidated(kvm, fault: KvmPageFault) -> bool:
    """An invalidation in progress overlaps the huge private leaf the fault would map.

    mmu_invalidate_retry_gfn checks the faulting gfn only, which is enough where
    a zap of a huge leaf costs a refault.  A huge private leaf is different: a
    conversion splits the leaves crossing its edges and zaps only its range
    (the accepted neighbours keep their contents), but its zap yields mmu_lock,
    and a fault outside the range mapping (or merging) 2M in that window would
    hand the resumed zap a leaf that takes 511 accepted pages with it (found by
    a default campaign: ``corpus/regressions/clean-private-huge-map-waits-for-conversion.repro``).
    Mainline TDX maps private memory at 4K only; with huge private leaves the
    fault waits for the invalidation to end, as it does for its own gfn.
    """
    if not kvm.mmu_invalidate_in_progress:
        return False
    pages = pages_per_level(fault.goal_level)
    head = fault.gfn - fault.gfn % pages
    start, end = kvm.mmu_invalidate_range
    return start < head + pages and head < end


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
    if fault.is_private and fault.goal_level > PG_LEVEL_4K and _huge_range_invalidated(kvm, fault):
        kvm.events[events.RETRY_IN_PROGRESS] += 1
        return RET_PF_RETRY
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
    if is_shadow_present_pte(old) and leaf_spte_change_needs_tlb_flush(old, new):
        mmu.flush_gfn(it.gfn, it.level)
    return RET_PF_EMULATE if fault.slot is None else RET_PF_FIXED


"""The page-fault path of the shadow MMU and the emulator's part in it.

``kvm_mmu_page_fault`` takes the #PF the CPU raised on the shadow tables: a
reserved-bit fault is an MMIO SPTE (``handle_mmio_page_fault``, the fast
path), anything else goes to ``FNAME(page_fault)`` (paging on) or
``direct_page_fault`` (a physical access, or paging off).  What a fault
cannot fix by mapping it hands to the emulator: MMIO (no slot), a write to a
read-only slot, and a write to a write-tracked guest page table, which is
how KVM sees the guest change a table it shadows (``kvm_mmu_track_write``).

A physical access (``access gpa=``, ``write_pte``) runs as the vCPU would
with paging off: on the vCPU's direct (nonpaging) root.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmufuzz.harness.ops import (PAGE_SHIFT, PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PG_LEVEL_2M,
                                 PG_LEVEL_4K,
                                 AccessKind, MmioExit, Ok, PageFault)
from mmufuzz.harness.shadow import page_track, paging_tmpl
from mmufuzz.harness.shadow.mmu import (
    EEXIST,
    RET_PF_CONTINUE,
    RET_PF_EMULATE,
    RET_PF_FIXED,
    RET_PF_INVALID,
    RET_PF_RETRY,
    RET_PF_SPURIOUS,
    RET_PF_WRITE_PROTECTED,
)
from mmufuzz.harness.shadow.spte import (
    ACC_ALL,
    PT64_ROOT_4LEVEL,
    SHADOW_MMIO_ACCESS_MASK,
    check_mmio_spte,
    get_mmio_spte_access,
    get_mmio_spte_gfn,
    is_mmio_spte,
    kvm_mmu_max_gfn,
)
from mmufuzz.harness.tdp.notifier import mmu_invalidate_retry_gfn
from mmufuzz.harness.tdp.spte import pages_per_level

WRITE = AccessKind.WRITE


@dataclass
class KvmPageFault:
    """struct kvm_page_fault: the faulting access and what it resolved to."""

    addr: int
    gfn: int
    write: bool
    present: bool
    slot: object = None
    pfn: object = None
    map_writable: bool = False
    mmu_seq: int = 0
    gen: int = 0  # the memslot generation the fault looked the gfn up in
    max_level: int = PG_LEVEL_2M  # the guest's page size (direct: the largest KVM maps here)
    goal_level: int = PG_LEVEL_4K  # what kvm_mmu_hugepage_adjust allows
    prefetch: bool = False  # a prefetched neighbour's (FNAME(prefetch_gpte), direct_pte_prefetch)


def kvm_mmu_page_fault(vcpu, addr: int, kind: AccessKind, error_code: int, direct: bool):
    """Generator: handle the #PF of one access.

    Returns None when the access should retry (something is mapped now), an
    exit or #PF Outcome, or RET_PF_EMULATE when the emulator must do the access.
    """
    r = RET_PF_INVALID
    if error_code & PFERR_RSVD_MASK:
        r = handle_mmio_page_fault(vcpu, addr, direct)
    if r == RET_PF_INVALID:
        fault = KvmPageFault(addr, addr >> PAGE_SHIFT, kind is WRITE,
                             bool(error_code & PFERR_PRESENT_MASK))
        if direct:
            r = yield from direct_page_fault(vcpu, fault)
        else:
            r = yield from shadow_page_fault(vcpu, fault, kind)
    if r == RET_PF_WRITE_PROTECTED:
        r = RET_PF_EMULATE  # kvm_mmu_write_protect_fault: no event to reinject, not nested
    if r in (RET_PF_RETRY, RET_PF_FIXED, RET_PF_SPURIOUS):
        return None
    return r


def handle_mmio_page_fault(vcpu, addr: int, direct: bool) -> int:
    """The MMIO fast path: a current-generation MMIO SPTE is emulated without a walk."""
    if vcpu.mmio_info_in_cache(addr, direct):
        return RET_PF_EMULATE
    spte = vcpu.get_mmio_spte(addr, direct)
    if is_mmio_spte(spte):
        memslots = vcpu.kvm.memslots
        if memslots.update_in_progress or not check_mmio_spte(spte, memslots.generation):
            return RET_PF_INVALID
        vcpu.vcpu_cache_mmio_info(0 if direct else addr, get_mmio_spte_gfn(spte),
                                  get_mmio_spte_access(spte))
        return RET_PF_EMULATE
    return RET_PF_RETRY  # zapped meanwhile: fault again


def kvm_mmu_faultin_pfn(vcpu, fault: KvmPageFault, access: int, direct: bool):
    """The slot and pfn of the fault, RET_PF_CONTINUE, or another RET_PF_*."""
    kvm = vcpu.kvm
    fault.mmu_seq = kvm.mmu_invalidate_seq
    # kvm_vcpu_memslots() as the fault read them: an MMIO SPTE made from this lookup
    # carries their generation, so it is stale once a racing update publishes a slot.
    fault.gen = kvm.memslots.generation
    slot = fault.slot = vcpu.gfn_to_memslot(fault.gfn)
    if slot is None:
        # kvm_handle_noslot_fault: cache the MMIO info, map an MMIO SPTE.
        vcpu.vcpu_cache_mmio_info(0 if direct else fault.addr, fault.gfn,
                                  access & SHADOW_MMIO_ACCESS_MASK)
        return RET_PF_EMULATE if fault.gfn > kvm_mmu_max_gfn() else RET_PF_CONTINUE
    if slot.invalid:
        return RET_PF_RETRY
    if mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn) is not None:
        # mmu_invalidate_retry_gfn_unsafe, before the pfn and mmu_lock (KVM commit
        # d02c357e5bfa, "KVM: x86/mmu: Retry fault before acquiring mmu_lock if mapping is
        # changing"), where mainline has it: after the no-slot and invalid-slot paths.  The
        # fault is certain to retry, and contending mmu_lock would only delay the
        # invalidation.  (Without it a retry loop that holds mmu_lock whenever the
        # invalidation's turn comes starves it: a campaign found a three-actor parallel
        # that hung.)
        return RET_PF_RETRY
    if fault.write and slot.readonly:
        return RET_PF_EMULATE  # KVM_PFN_ERR_RO_FAULT
    fault.pfn = slot.backing.pfn(fault.gfn - slot.base_gfn)
    fault.map_writable = not slot.readonly
    return RET_PF_CONTINUE


def is_page_fault_stale(vcpu, fault: KvmPageFault, root) -> bool:
    """The root became obsolete or an invalidation covering the gfn ran meanwhile."""
    kvm = vcpu.kvm
    if root is None or root is paging_tmpl.DUMMY_ROOT:
        if vcpu.request_free_obsolete_roots:
            return True
    elif kvm.mmu.is_obsolete_sp(root):
        return True
    if fault.slot is None:
        return False
    return mmu_invalidate_retry_gfn(kvm, fault.mmu_seq, fault.gfn) is not None


def page_fault_handle_page_track(vcpu, fault: KvmPageFault) -> bool:
    """A write that hit a present, write-tracked page: only emulation can do it."""
    return fault.present and fault.write and vcpu.kvm.mmu.kvm_gfn_is_write_tracked(fault.gfn)


def shadow_page_fault(vcpu, fault: KvmPageFault, kind: AccessKind):
    """Generator: FNAME(page_fault): walk the guest tables, then fetch under mmu_lock."""
    walker = yield from paging_tmpl.walk_addr_generic(vcpu, fault.addr, kind)
    if type(walker) is int:
        return walker
    if type(walker) is tuple:
        outcome = walker[0]
        if type(outcome) is PageFault:
            yield from vcpu.kvm_inject_emulated_page_fault(outcome)
        return outcome
    fault.gfn, fault.max_level = walker.gfn, walker.level
    if page_fault_handle_page_track(vcpu, fault):
        vcpu.shadow_page_table_clear_flood(fault.addr)
        return RET_PF_WRITE_PROTECTED
    r = kvm_mmu_faultin_pfn(vcpu, fault, walker.pte_access, False)
    if r != RET_PF_CONTINUE:
        return r
    return (yield from _map_locked(vcpu, fault, vcpu.root, paging_tmpl.fetch, walker))


def _map_locked(vcpu, fault: KvmPageFault, root, map_fn, *args):
    """Generator: take mmu_lock for write; map unless the fault went stale meanwhile."""
    kvm = vcpu.kvm
    yield from kvm.mmu_lock.write_lock()
    try:
        if is_page_fault_stale(vcpu, fault, root):
            return RET_PF_RETRY
        return map_fn(vcpu, fault, *args)
    finally:
        kvm.mmu_lock.write_unlock()


def direct_page_fault(vcpu, fault: KvmPageFault):
    """Generator: the nonpaging fault: map gfn == address through direct pages."""
    yield
    if page_fault_handle_page_track(vcpu, fault):
        return RET_PF_WRITE_PROTECTED
    r = kvm_mmu_faultin_pfn(vcpu, fault, ACC_ALL, True)
    if r != RET_PF_CONTINUE:
        return r
    return (yield from _map_locked(vcpu, fault, vcpu.phys_root, direct_map))


def direct_map(vcpu, fault: KvmPageFault) -> int:
    """Link direct pages down to the goal level (2M where allowed), then set the leaf."""
    mmu = vcpu.kvm.mmu
    mmu.kvm_mmu_hugepage_adjust(fault)
    sp, level = vcpu.phys_root, PT64_ROOT_4LEVEL
    while level > fault.goal_level:
        index = (fault.gfn >> (9 * (level - 1))) & 511
        base_gfn = fault.gfn & -pages_per_level(level)
        child = mmu.kvm_mmu_get_child_sp(vcpu, sp, index, base_gfn, True, ACC_ALL)
        if child is not EEXIST:
            mmu.link_shadow_page(sp, index, child)
        sp, level = mmu.sp_of(sp.spt[index]), level - 1
    index = (fault.gfn >> (9 * (level - 1))) & 511
    ret = mmu.mmu_set_spte(sp, index, ACC_ALL, fault)
    if ret != RET_PF_SPURIOUS:
        paging_tmpl.pte_prefetch(vcpu, fault, sp, index)  # direct_pte_prefetch
    return ret


def emulate(vcpu, addr: int, kind: AccessKind, value, virtual: bool, tag: bool):
    """Generator: x86_emulate_instruction of the one access: translate, then read or write.

    The emulator translates a gva through the vCPU's MMIO cache or a fresh
    walk, then accesses guest memory through the memslots; a write reaches
    ``kvm_page_track_write``.  No slot (or a read-only one, for a write): MMIO.
    None: retry the access (a slot on its way is being deleted or moved).
    """
    offset = addr & ((1 << PAGE_SHIFT) - 1)
    mmio = False
    if virtual:
        if vcpu.vcpu_match_mmio_gva(addr) and not paging_tmpl.permission_fault(
                vcpu.mmio_access, kind):
            gpa, mmio = (vcpu.mmio_gfn << PAGE_SHIFT) | offset, True
        else:
            walker = yield from paging_tmpl.walk_addr_generic(vcpu, addr, kind)
            if type(walker) is int:
                return None
            if type(walker) is tuple:
                if type(walker[0]) is PageFault:
                    yield from vcpu.kvm_inject_emulated_page_fault(walker[0])
                return walker[0]
            gpa = walker.gpa_page | offset
            mmio = vcpu.vcpu_match_mmio_gpa(gpa)
    else:
        gpa = addr
        mmio = vcpu.vcpu_match_mmio_gpa(gpa)
    write = kind is WRITE
    reported = gpa if tag else None
    if vcpu.in_invalid_slot(gpa):
        return None
    if not mmio:
        if write:
            if vcpu.write_guest(gpa, value):
                yield from page_track.kvm_page_track_write(vcpu, gpa)
                return Ok(None, reported)
        else:
            data = vcpu.read_guest(gpa)
            if data is not None:
                return Ok(data, reported)
    return MmioExit(gpa, write)


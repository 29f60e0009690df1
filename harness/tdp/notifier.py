"""Host events: mmu-notifier invalidation (a page migration) and zap_all.

Both act on shared mappings only: private leaves are never touched by host
events (KVM_FILTER_SHARED; kvm_mmu_zap_all_fast spares the mirror root).  An
invalidation brackets the host's change with invalidate_begin/end so faults
that looked up a pfn before or during it retry instead of mapping the old page.
"""

from __future__ import annotations

from mmufuzz.harness.ops import OK, HostInvalidate, ZapAll


# Why a fault must retry (mmu_invalidate_retry_gfn): an invalidation covering its gfn is
# running, or one ran since the fault read mmu_invalidate_seq.
IN_PROGRESS, SEQUENCE = "in progress", "sequence"


def mmu_invalidate_retry_gfn(kvm, mmu_seq: int, gfn: int):
    """kvm_host.h's mmu_invalidate_retry_gfn and its _unsafe twin (which reads the same
    fields without mmu_lock), the same for every MMU: IN_PROGRESS or SEQUENCE if a fault
    on ``gfn`` that read ``mmu_seq`` must retry, else None.  A fault that maps anyway
    installs an SPTE the invalidation has already zapped, or is about to miss."""
    if kvm.mmu_invalidate_in_progress and kvm.invalidate_covers(gfn):
        return IN_PROGRESS
    if kvm.mmu_invalidate_seq != mmu_seq:
        return SEQUENCE
    return None


def host_invalidate(kvm, op: HostInvalidate, unmap_gfn_range=None):
    """Generator: the host migrates the shared pages backing [base, base+npages).

    Whole 2M host pages move together, so the gfn ranges to zap are widened
    to the slot pages sharing those host pages.  The bracket is kvm_main.c's
    (kvm_mmu_notifier_invalidate_range_start/end), the same for every MMU;
    ``unmap_gfn_range(kvm, ranges)``, a generator, is the MMU's
    kvm_unmap_gfn_range, run under mmu_lock between invalidate_begin and the
    host's change (the TDP MMU's by default).
    """
    lo, hi = op.base, op.base + op.npages
    ranges = []
    for slot in kvm.memslots.overlapping(lo, hi):
        a, b = slot.backing.host_page_range(max(lo, slot.base_gfn) - slot.base_gfn,
                                            min(hi, slot.end_gfn) - slot.base_gfn)
        ranges.append((slot, a, b))
    if not ranges:
        return OK
    kvm.mn_active_invalidate_count += 1
    yield from kvm.mmu_lock.write_lock()
    kvm.invalidate_begin(ranges[0][0].base_gfn + ranges[0][1],
                         ranges[-1][0].base_gfn + ranges[-1][2])
    yield from (unmap_gfn_range or kvm_tdp_mmu_unmap_gfn_range)(kvm, ranges)
    kvm.mmu_lock.write_unlock()
    yield
    for slot, a, b in ranges:
        if kvm.memslots.by_id.get(slot.id) is slot:  # a racing delete already dropped it
            slot.backing.migrate(a, b)
    yield
    yield from kvm.mmu_lock.write_lock()
    kvm.invalidate_end()
    kvm.mn_active_invalidate_count -= 1
    kvm.mmu_lock.write_unlock()
    return OK


def kvm_tdp_mmu_unmap_gfn_range(kvm, ranges):
    """Generator: zap the shared leaves of ``ranges`` ((slot, first, end) slot pages) in
    every direct root, invalid ones too."""
    mmu = kvm.mmu
    for slot, a, b in ranges:
        for root in mmu.held(mmu.direct_roots()):
            yield from mmu.zap_leafs(root, slot.base_gfn + a, slot.base_gfn + b)


def zap_all(kvm, op: ZapAll):
    """Generator: kvm_mmu_zap_all_fast; drop every shared mapping and its tables.

    Under slots_lock.  With mmu_lock held for write: invalidate the direct roots
    and make every vCPU leave them (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: a vCPU
    puts its invalid root and loads a fresh one before it enters the guest
    again; a fault holding an invalid root retries, is_page_fault_stale).  Then
    zap the invalidated roots with mmu_lock held for read, before returning: a
    memslot update that follows must find no SPTE left in them.
    """
    mmu = kvm.mmu
    yield from kvm.slots_lock.write_lock()
    yield from kvm.mmu_lock.write_lock()
    roots = mmu.invalidate_roots()
    for vcpu in kvm.vcpus:
        vcpu.request_free_obsolete_roots()
    kvm.mmu_lock.write_unlock()
    yield from mmu.zap_invalidated_roots(roots)
    kvm.slots_lock.write_unlock()
    return OK

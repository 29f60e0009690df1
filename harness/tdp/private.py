"""Private memory ops: the guest's TDG.MEM.PAGE.ACCEPT, and conversions (KVM_SET_MEMORY_ATTRIBUTES).

The secure EPT they act on is the TDX module's (:mod:`.sept`); KVM changes it
only through the mirror root's hooks (:mod:`.tdx`), called from
handle_changed_spte, so a mirror/secure-EPT disagreement is a KVM bug.
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (
    ALREADY_ACCEPTED,
    EINVAL,
    OK,
    PAGE_SHIFT,
    SIZE_MISMATCH,
    UNSUPPORTED,
    Accept,
    SetAttributes,
)
from mmufuzz.harness.tdp import lpage
from mmufuzz.harness.tdp.fault import kvm_mmu_page_fault
from mmufuzz.harness.tdp.huge import split_range


def accept(kvm, vcpu, op: Accept):
    """Generator: the guest's TDG.MEM.PAGE.ACCEPT of ``op.gpa`` at ``op.level``.

    An unmapped range (or one mapped below the accept level) is an EPT
    violation at that level: KVM maps it, merging 4K children if it can.  If
    the mapping is still smaller, the module reports TDX_PAGE_SIZE_MISMATCH.
    A 4K accept of a page under a pending 2M leaf makes KVM demote it first.
    """
    if not kvm.tdx:
        return UNSUPPORTED
    gfn = op.gpa >> PAGE_SHIFT
    while True:
        yield
        leaf = kvm.sept.lookup(gfn)
        if leaf is None or leaf.level < op.level:
            exit_ = yield from kvm_mmu_page_fault(kvm, vcpu, op.gpa, False, False, True,
                                                  op.level)
            if exit_ is not None:
                return exit_
            leaf = kvm.sept.lookup(gfn)
            if leaf is None:
                continue
            if leaf.level < op.level and not faults.active("accept-level-ignored"):
                return SIZE_MISMATCH
        if leaf.accepted:
            return ALREADY_ACCEPTED
        if leaf.level > op.level:
            exit_ = yield from kvm_mmu_page_fault(kvm, vcpu, op.gpa, False, False, True,
                                                  op.level)
            if exit_ is not None:
                return exit_
            continue
        # The module holds the entry while the TDCALL runs: a host SEAMCALL on it meanwhile
        # fails with TDX_OPERAND_BUSY (tdh_do_no_vcpus forces this vCPU out, which lets the
        # TDCALL complete first).
        call = kvm.sept.accept_begin(leaf)
        yield
        kvm.sept.accept_end(call)
        return OK


def set_memory_attributes(kvm, op: SetAttributes):
    """Generator: kvm_vm_set_mem_attributes; zap -> flush -> change -> recompute mixed flags.

    Runs as an mmu-notifier-style invalidation so racing faults retry.  The
    zap walks memslots only (a cached MMIO SPTE of a slot-less gfn survives),
    and huge private leaves that cross the range's edges are split first so
    the zap never takes accepted neighbours with it.
    """
    if not kvm.tdx:
        return UNSUPPORTED
    if op.npages == 0:
        return EINVAL
    lo, hi, private = op.base, op.base + op.npages, op.private
    attributes = kvm.attributes
    if not attributes.ranges_in_state(lo, hi, not private):
        return OK  # "Nothing to do if the entire range has the desired attributes"
    yield from kvm.slots_lock.write_lock()
    yield from kvm.mmu_lock.write_lock()
    kvm.invalidate_begin(lo, hi)
    mmu = kvm.mmu
    zapped = [] if faults.active("convert-no-zap") else kvm.memslots.overlapping(lo, hi)
    for slot in zapped:
        a, b = max(lo, slot.base_gfn), min(hi, slot.end_gfn)
        if private:
            for root in mmu.held(mmu.direct_roots()):
                yield from mmu.zap_leafs(root, a, b)
        else:
            for edge in (a, b - 1):
                yield from split_range(kvm, mmu.mirror_root, edge, edge + 1)
            yield from mmu.zap_leafs(mmu.mirror_root, a, b)
    changed = attributes.ranges_in_state(lo, hi, not private)
    attributes.set(lo, hi, private)
    for slot in kvm.memslots.overlapping(lo, hi):
        if not faults.active("mixed-attr-stale"):
            lpage.update_mixed(attributes, slot, lo, hi)
        if slot.private and not private:
            for a, b in changed:
                _drop_private_state(kvm, slot, max(a, slot.base_gfn), min(b, slot.end_gfn))
    kvm.invalidate_end()
    kvm.mmu_lock.write_unlock()
    kvm.slots_lock.write_unlock()
    return OK


def _drop_private_state(kvm, slot, lo: int, hi: int) -> None:
    """Conversion to shared discards private contents and accept state of [lo, hi)."""
    if lo >= hi:
        return
    first, last = lo - slot.base_gfn, hi - slot.base_gfn
    slot.accepted.difference_update([i for i in slot.accepted if first <= i < last])
    kvm.host.clear(slot.gmem.pfn(first), last - first)  # gmem never migrates: contiguous

"""Private memory ops: the guest's TDG.MEM.PAGE.ACCEPT (and KVM's handling of the EPT
violation it may exit with), and conversions (KVM_SET_MEMORY_ATTRIBUTES).

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
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    SIZE_MISMATCH,
    UNSUPPORTED,
    Accept,
    SetAttributes,
)
from mmufuzz.harness.tdp import lpage
from mmufuzz.harness.tdp.fault import kvm_mmu_page_fault
from mmufuzz.harness.tdp.huge import split_range
from mmufuzz.harness.tdp.sept import (
    TDX_EXT_EXIT_QUAL_TYPE_ACCEPT,
    TDX_OPERAND_BUSY,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_SIZE_MISMATCH,
)
from mmufuzz.harness.tdp.spte import gfn_round_for_level


def accept(kvm, vcpu, op: Accept):
    """Generator: the guest's TDG.MEM.PAGE.ACCEPT of ``op.gpa`` at ``op.level``.

    The TDX module decides (:meth:`SecureEpt.page_accept`): the page is taken,
    or the guest gets TDX_PAGE_ALREADY_ACCEPTED or TDX_PAGE_SIZE_MISMATCH (the
    range is mapped smaller than the accept level: the guest retries at 4K),
    or the TDCALL exits to KVM with an EPT violation that reports the accept
    level (:func:`tdx_handle_ept_violation`), after which the guest runs the
    ACCEPT again.
    """
    if not kvm.tdx:
        return UNSUPPORTED
    gfn, level = op.gpa >> PAGE_SHIFT, op.level
    while True:
        yield
        call = kvm.sept.page_accept(gfn, level)
        if call == TDX_PAGE_ALREADY_ACCEPTED:
            return ALREADY_ACCEPTED
        if call == TDX_PAGE_SIZE_MISMATCH:
            if not faults.active("accept-level-ignored"):
                return SIZE_MISMATCH
            level = PG_LEVEL_4K  # the page under the accept's gpa is taken at 4K
            continue
        if call == TDX_OPERAND_BUSY:
            # Another vCPU's ACCEPT holds the leaf: run this one again once that one is done.
            first = gfn_round_for_level(gfn, level)
            yield lambda: not kvm.sept.held_over(first, level)
            continue
        if call == TDX_EXT_EXIT_QUAL_TYPE_ACCEPT:
            exit_ = yield from tdx_handle_ept_violation(kvm, vcpu, op.gpa, level)
            if exit_ is not None:
                return exit_
            continue
        # The module holds the entry while the TDCALL runs: a host SEAMCALL on it meanwhile
        # fails with TDX_OPERAND_BUSY (tdh_do_no_vcpus forces this vCPU out, which lets the
        # TDCALL complete first).
        yield
        kvm.sept.accept_end(call)
        return OK


def tdx_handle_ept_violation(kvm, vcpu, gpa: int, accept_level: int):
    """Generator: tdx_handle_ept_violation for the EPT violation a guest ACCEPT exited with;
    None when the guest should run the ACCEPT again, else the exit.

    KVM honours the accept level the extended exit qualification reports
    ("KVM: TDX: Honor the guest's accept level contained in an EPT violation",
    the TDX huge-page series): the fault maps no larger than that level, so a
    pending 2M leaf over a 4K accept is split (BLOCK, TRACK, DEMOTE) and the
    module finds a 4K leaf when the guest runs the ACCEPT again.  Here the
    level bounds the fault's max_level, as the earlier huge-page RFCs did
    (the level in the fault's error code; tdx_gmem_private_max_mapping_level
    of the faulting vCPU's accept range): the series' later guest inhibit,
    which bars 2M from the range for good, would rule out the private merges
    this model keeps (SEMANTICS §E).  TDX reports every private EPT violation
    as a write; the model's mirror leaves do not depend on it.
    """
    max_level = PG_LEVEL_2M if faults.active("accept-level-not-honored") else accept_level
    return (yield from kvm_mmu_page_fault(kvm, vcpu, gpa, False, False, True, max_level))


def set_memory_attributes(kvm, op: SetAttributes):
    """Generator: kvm_vm_set_mem_attributes; zap -> flush -> change -> recompute mixed flags.

    Runs as an mmu-notifier-style invalidation so racing faults retry: on the
    range itself and on the partly covered 2M ranges around it
    (:func:`lpage.pre_set_hugepage_ranges`).  The
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
        if not faults.active("convert-no-hugepage-retry"):
            for start, end in lpage.pre_set_hugepage_ranges(slot, a, b):
                kvm.invalidate_range_add(start, end)
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

"""KVM's side of the secure EPT (arch/x86/kvm/vmx/tdx.c): the SEAMCALL sequences of the mirror
root's hooks.

``handle_changed_spte`` calls one of these for each change of a mirror SPTE
(KVM's ``set_external_spte`` / ``*_external_spt`` ops, ``set_external_spte_present``):

- a table linked: ``tdx_sept_link_private_spt`` (TDH.MEM.SEPT.ADD);
- a leaf added: ``tdx_sept_set_private_spte`` -> ``tdx_mem_page_aug`` (TDH.MEM.PAGE.AUG);
- a leaf removed: ``tdx_sept_remove_leaf_spte``: RANGE.BLOCK, ``tdx_track``
  (TDH.MEM.TRACK, then every vCPU forced out of the guest, so that each
  flushes its TLBs when it enters again), PAGE.REMOVE, and the page cleared;
- a 2M leaf split: BLOCK, TRACK, PAGE.DEMOTE (the TDX huge-page series'
  ``tdx_sept_split_private_spt``);
- 512 leaves merged: BLOCK, TRACK, PAGE.PROMOTE, and RANGE.UNBLOCK when the
  module refuses (the RFC merge series).

BLOCK, REMOVE and DEMOTE race guest TDCALLs, not other SEAMCALLs (the callers
own the mirror entry), and fail with TDX_OPERAND_BUSY when a TDCALL holds the
entry: ``tdh_do_no_vcpus`` then forces every vCPU out of the guest and retries
once, which "is guaranteed to succeed".  Any other failure is a KVM bug, which
KVM answers with KVM_BUG_ON (``TDX_BUG_ON``): the VM is dead.  Here that is
the invariant ``tdx_seamcall_failed``.
"""

from __future__ import annotations

from mmufuzz.harness import faults
from mmufuzz.harness.ops import PG_LEVEL_2M
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp.sept import (
    TDX_EPT_INVALID_PROMOTE_CONDITIONS,
    TDX_OPERAND_BUSY,
    TDX_SUCCESS,
)
from mmufuzz.harness.tdp.spte import pages_per_level


def _seamcall_failed(status: str, seamcall: str, gfn: int, level: int) -> InvariantViolation:
    """TDX_BUG_ON of a SEAMCALL that failed.  Each caller raises it itself, so that a
    finding's site names the hook whose sequence broke."""
    return InvariantViolation("tdx_seamcall_failed",
                              f"{seamcall} gfn={gfn:#x} level={level}: {status}")


def _force_vcpus_out(kvm) -> None:
    """kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE): each vCPU leaves the guest
    once the instruction it runs has completed, a TDCALL in flight included."""
    kvm.sept.complete_tdcalls()


def tdh_do_no_vcpus(kvm, seamcall, gfn: int, level: int) -> str:
    """A BLOCK/REMOVE/DEMOTE/PROMOTE SEAMCALL, retried once after forcing every vCPU out of
    the guest if a guest TDCALL held the entry (TDX_OPERAND_BUSY)."""
    status = seamcall(gfn, level)
    if status == TDX_OPERAND_BUSY and not faults.active("sept-busy-no-retry"):
        _force_vcpus_out(kvm)
        status = seamcall(gfn, level)
    return status


def tdx_track(kvm) -> None:
    """tdx_track: TDH.MEM.TRACK, then every vCPU forced out of the guest; each flushes its
    shared and private EPT translations when it enters again (dropped at once here, as
    nothing can use them before)."""
    status = kvm.sept.track()
    if status != TDX_SUCCESS:
        raise _seamcall_failed(status, "TDH.MEM.TRACK", 0, 0)
    _force_vcpus_out(kvm)
    for vcpu in kvm.vcpus:
        vcpu.flush_guest_physical()


def tdx_block(kvm, gfn: int, level: int) -> None:
    """TDH.MEM.RANGE.BLOCK of the entry a removal, split or merge changes next."""
    status = tdh_do_no_vcpus(kvm, kvm.sept.range_block, gfn, level)
    if status != TDX_SUCCESS:
        raise _seamcall_failed(status, "TDH.MEM.RANGE.BLOCK", gfn, level)


def tdx_sept_link_private_spt(kvm, gfn: int, level: int) -> None:
    """A mirror table linked at ``level``: TDH.MEM.SEPT.ADD of its S-EPT page."""
    status = kvm.sept.sept_add(gfn, level)
    if status != TDX_SUCCESS:
        raise _seamcall_failed(status, "TDH.MEM.SEPT.ADD", gfn, level)


def tdx_sept_set_private_spte(kvm, gfn: int, level: int, pfn: int) -> None:
    """A mirror leaf added: TDH.MEM.PAGE.AUG (tdx_mem_page_aug)."""
    status = kvm.sept.page_aug(gfn, level, pfn)
    if status != TDX_SUCCESS:
        raise _seamcall_failed(status, "TDH.MEM.PAGE.AUG", gfn, level)


def tdx_sept_remove_leaf_spte(kvm, gfn: int, level: int, pfn: int) -> None:
    """A mirror leaf zapped: BLOCK, TRACK ("TDX requires TLB tracking before dropping private
    page"), REMOVE, then the page is cleared (tdx_quirk_reset_paddr).  The removed pages
    lose their accept state too: a later AUG brings them back pending."""
    tdx_block(kvm, gfn, level)
    if not faults.active("sept-remove-no-track"):
        tdx_track(kvm)
    status = tdh_do_no_vcpus(kvm, kvm.sept.page_remove, gfn, level)
    if status != TDX_SUCCESS:
        raise _seamcall_failed(status, "TDH.MEM.PAGE.REMOVE", gfn, level)
    slot = kvm.memslots.lookup(gfn)
    first, n = gfn - slot.base_gfn, pages_per_level(level)
    slot.accepted.difference_update(range(first, first + n))
    kvm.host.clear(pfn, n)


def tdx_sept_split_private_spt(kvm, gfn: int, level: int) -> None:
    """A mirror 2M leaf split into a table of 4K leaves: BLOCK, TRACK, DEMOTE."""
    tdx_block(kvm, gfn, level)
    tdx_track(kvm)
    status = tdh_do_no_vcpus(kvm, kvm.sept.page_demote, gfn, level)
    if status != TDX_SUCCESS:
        raise _seamcall_failed(status, "TDH.MEM.PAGE.DEMOTE", gfn, level)


def tdx_sept_merge_private_spt(kvm, gfn: int) -> bool:
    """512 mirror 4K leaves to merge into one 2M leaf at ``gfn``: BLOCK the link, TRACK,
    PROMOTE; False (and the link unblocked) if the module refuses, when the leaves are not
    contiguous or not in one accept state.  The merged leaf's state is all its pages'."""
    tdx_block(kvm, gfn, PG_LEVEL_2M)
    tdx_track(kvm)
    status = tdh_do_no_vcpus(kvm, kvm.sept.page_promote, gfn, PG_LEVEL_2M)
    if status == TDX_EPT_INVALID_PROMOTE_CONDITIONS:
        status = kvm.sept.range_unblock(gfn, PG_LEVEL_2M)
        if status != TDX_SUCCESS:
            raise _seamcall_failed(status, "TDH.MEM.RANGE.UNBLOCK", gfn, PG_LEVEL_2M)
        return False
    if status != TDX_SUCCESS:
        raise _seamcall_failed(status, "TDH.MEM.PAGE.PROMOTE", gfn, PG_LEVEL_2M)
    slot = kvm.memslots.lookup(gfn)
    pages = range(gfn - slot.base_gfn, gfn - slot.base_gfn + pages_per_level(PG_LEVEL_2M))
    if kvm.sept.entry(gfn, PG_LEVEL_2M).accepted:
        slot.accepted.update(pages)
    else:
        slot.accepted.difference_update(pages)
    return True


def tdx_sept_free_private_spt(kvm, gfn: int, level: int) -> None:
    """A linked mirror table removed: KVM frees S-EPT pages only once the TD's HKID is
    released ("KVM doesn't (yet) zap page table pages in mirror page table while TD is
    active"): KVM_BUG_ON while the TD runs."""
    raise InvariantViolation("tdx_seamcall_failed",
                             f"free of the S-EPT page at gfn={gfn:#x} level={level} "
                             "while the TD runs")

"""The TDX module's secure EPT (harness/tdp/sept.py), KVM's SEAMCALL sequences (tdx.py), and
MMIO in a TD: what the module refuses, what KVM must do around it, and the faults that break it."""

from __future__ import annotations

import pytest
from test_tdp_mmu import PRIVATE, Vm

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (
    OK,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    Accept,
    MemslotAdd,
    MmioExit,
    Ok,
    SetAttributes,
    VePending,
    ZapAll,
)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp import tdx
from mmufuzz.harness.tdp.invariants import sept_tables_match_mirror, take_snapshot
from mmufuzz.harness.tdp.sched import run
from mmufuzz.harness.tdp.sept import (
    BLOCKED,
    MAPPED,
    NL_BLOCKED,
    NL_MAPPED,
    PENDING,
    PENDING_BLOCKED,
    TDX_EPT_ENTRY_STATE_INCORRECT,
    TDX_EPT_INVALID_PROMOTE_CONDITIONS,
    TDX_EPT_WALK_FAILED,
    TDX_EXT_EXIT_QUAL_TYPE_ACCEPT,
    TDX_OPERAND_BUSY,
    TDX_PAGE_ALREADY_ACCEPTED,
    TDX_PAGE_SIZE_MISMATCH,
    TDX_SUCCESS,
    TDX_TLB_TRACKING_NOT_DONE,
)


def private_vm(npages=0x400):
    vm = Vm(tdx=True)
    vm.do(MemslotAdd(0, 0x0, npages, PRIVATE, 0))
    vm.do(SetAttributes(0x200, 0x200, True))
    return vm


def mapped_4k(vm, gfn=0x200):
    """A pending 4K private leaf at ``gfn`` (a 4K accept maps at 4K), then accepted."""
    assert vm.do(Accept(0, gfn << 12, PG_LEVEL_4K)) == OK
    return vm.kvm.sept.entry(gfn, PG_LEVEL_4K)


# --- tables: S-EPT pages linked with SEPT.ADD, as the mirror's tables ------------------

def test_a_private_fault_links_an_s_ept_page_for_every_mirror_table():
    vm = private_vm()
    assert vm.read(0x203, private=True) == VePending(0x203000)  # maps a pending 2M leaf
    entries = vm.kvm.sept.entries()
    links = sorted(key for key, e in entries.items() if e.state == NL_MAPPED)
    assert links == [(3, 0x0), (4, 0x0)]  # PML4E and PDPTE link pages; the 2M leaf below
    assert entries[(PG_LEVEL_2M, 0x200)].state == PENDING
    sept_tables_match_mirror(vm.kvm, take_snapshot(vm.kvm))


def test_aug_without_its_s_ept_page_fails_the_walk():
    vm = Vm(tdx=True)
    vm.do(MemslotAdd(0, 0x0, 0x400, PRIVATE, 0))
    sept = vm.kvm.sept
    assert sept.page_aug(0x200, PG_LEVEL_4K, 0) == TDX_EPT_WALK_FAILED
    assert sept.sept_add(0x200, 4) == TDX_SUCCESS
    assert sept.sept_add(0x200, 4) == TDX_EPT_ENTRY_STATE_INCORRECT  # not FREE
    assert sept.sept_add(0x200, 3) == TDX_SUCCESS
    assert sept.page_aug(0x200, PG_LEVEL_2M, 0x40) == TDX_SUCCESS


def test_the_invariant_names_an_s_ept_page_the_mirror_does_not_have():
    vm = private_vm()
    vm.read(0x203, private=True)
    del vm.kvm.sept.root.entries[0].child.entries[0]  # the PDPTE's link, and what is below
    with pytest.raises(InvariantViolation) as error:
        sept_tables_match_mirror(vm.kvm, take_snapshot(vm.kvm))
    assert error.value.name == "sept_tables_match_mirror"


# --- BLOCKED, TRACK epochs, REMOVE ------------------------------------------------------

def test_remove_needs_a_block_and_then_a_track():
    vm = private_vm()
    leaf = mapped_4k(vm)
    assert leaf.state == MAPPED
    sept = vm.kvm.sept
    assert sept.page_remove(0x200, PG_LEVEL_4K) == TDX_EPT_ENTRY_STATE_INCORRECT
    assert sept.range_block(0x200, PG_LEVEL_4K) == TDX_SUCCESS
    assert leaf.state == BLOCKED and sept.lookup(0x200) is None  # the guest's walk stops
    assert sept.page_remove(0x200, PG_LEVEL_4K) == TDX_TLB_TRACKING_NOT_DONE
    assert sept.track() == TDX_SUCCESS
    assert sept.page_remove(0x200, PG_LEVEL_4K) == TDX_SUCCESS
    assert sept.entry(0x200, PG_LEVEL_4K) is None


def test_a_pending_leaf_blocks_into_pending_blocked_and_unblocks_back():
    vm = private_vm()
    vm.read(0x203, private=True)
    sept = vm.kvm.sept
    assert sept.range_block(0x200, PG_LEVEL_2M) == TDX_SUCCESS
    assert sept.entry(0x200, PG_LEVEL_2M).state == PENDING_BLOCKED
    assert sept.range_block(0x200, PG_LEVEL_2M) == TDX_EPT_ENTRY_STATE_INCORRECT
    assert sept.range_unblock(0x200, PG_LEVEL_2M) == TDX_SUCCESS
    assert sept.entry(0x200, PG_LEVEL_2M).state == PENDING


def test_conversion_removes_with_block_track_remove_and_kicks_the_vcpus():
    vm = private_vm()
    mapped_4k(vm)
    assert vm.read(0x200, private=True) == Ok(0)
    assert 0x200 in vm.kvm.vcpus[0].tlb_private
    epoch = vm.kvm.sept.epoch
    vm.do(SetAttributes(0x200, 1, False))
    assert vm.kvm.sept.epoch == epoch + 1 and vm.kvm.vcpus[0].tlb_private == {}
    assert vm.kvm.sept.entry(0x200, PG_LEVEL_4K) is None


def test_without_the_track_the_module_refuses_the_remove():
    vm = private_vm()
    mapped_4k(vm)
    with faults.injected({"sept-remove-no-track"}), pytest.raises(InvariantViolation) as error:
        run(vm.kvm.run(SetAttributes(0x200, 1, False)))  # the VM itself, without the oracle
    assert error.value.name == "tdx_seamcall_failed"
    assert TDX_TLB_TRACKING_NOT_DONE in error.value.detail


# --- DEMOTE and PROMOTE -----------------------------------------------------------------

def test_demote_needs_a_tracked_block_and_keeps_the_state_per_page():
    vm = private_vm()
    vm.read(0x203, private=True)
    sept = vm.kvm.sept
    huge = sept.entry(0x200, PG_LEVEL_2M)
    assert sept.page_demote(0x200, PG_LEVEL_2M) == TDX_EPT_ENTRY_STATE_INCORRECT
    sept.range_block(0x200, PG_LEVEL_2M)
    assert sept.page_demote(0x200, PG_LEVEL_2M) == TDX_TLB_TRACKING_NOT_DONE
    sept.track()
    assert sept.page_demote(0x200, PG_LEVEL_2M) == TDX_SUCCESS
    assert huge.state == NL_MAPPED and len(huge.child.entries) == 512
    child = sept.entry(0x203, PG_LEVEL_4K)
    assert child.state == PENDING and child.pfn == huge.child.entries[0].pfn + 3


def test_a_4k_accept_under_a_pending_2m_leaf_demotes_it_through_the_module():
    vm = private_vm()
    vm.read(0x203, private=True)
    assert vm.do(Accept(0, 0x203000, PG_LEVEL_4K)) == OK
    sept = vm.kvm.sept
    assert sept.entry(0x200, PG_LEVEL_2M).state == NL_MAPPED
    assert sept.entry(0x203, PG_LEVEL_4K).state == MAPPED
    assert sept.entry(0x204, PG_LEVEL_4K).state == PENDING


def test_promote_refuses_mixed_states_and_the_link_is_unblocked_again():
    vm = private_vm()
    vm.read(0x203, private=True)
    vm.do(Accept(0, 0x203000, PG_LEVEL_4K))  # demoted: one accepted page, 511 pending
    kvm = vm.kvm
    assert tdx.tdx_sept_merge_private_spt(kvm, 0x200) is False
    assert kvm.sept.entry(0x200, PG_LEVEL_2M).state == NL_MAPPED
    kvm.sept.range_block(0x200, PG_LEVEL_2M)
    kvm.sept.track()
    assert kvm.sept.page_promote(0x200, PG_LEVEL_2M) == TDX_EPT_INVALID_PROMOTE_CONDITIONS
    assert kvm.sept.entry(0x200, PG_LEVEL_2M).state == NL_BLOCKED


def test_promote_of_512_pending_leaves_gives_a_pending_2m_leaf():
    vm = private_vm()
    vm.read(0x203, private=True)
    kvm = vm.kvm
    sept = kvm.sept
    sept.range_block(0x200, PG_LEVEL_2M)
    sept.track()
    sept.page_demote(0x200, PG_LEVEL_2M)
    sept.range_block(0x200, PG_LEVEL_2M)
    assert sept.page_promote(0x200, PG_LEVEL_2M) == TDX_TLB_TRACKING_NOT_DONE
    sept.track()
    assert sept.page_promote(0x200, PG_LEVEL_2M) == TDX_SUCCESS
    assert sept.entry(0x200, PG_LEVEL_2M).state == PENDING
    assert sept.entry(0x200, PG_LEVEL_2M).child is None


# --- TDG.MEM.PAGE.ACCEPT: the level the page is mapped at against the accept level ------

def test_accept_checks_the_mapping_level_against_the_accept_level_as_the_module_does():
    vm = private_vm()
    sept = vm.kvm.sept
    # Nothing mapped, at either level: an EPT violation to KVM carrying the accept level.
    assert sept.page_accept(0x200, PG_LEVEL_4K) == TDX_EXT_EXIT_QUAL_TYPE_ACCEPT
    assert sept.page_accept(0x200, PG_LEVEL_2M) == TDX_EXT_EXIT_QUAL_TYPE_ACCEPT
    vm.read(0x200, private=True)  # a pending 2M leaf
    # A pending leaf larger than the request: the exit again (KVM must split it).
    assert sept.page_accept(0x203, PG_LEVEL_4K) == TDX_EXT_EXIT_QUAL_TYPE_ACCEPT
    call = sept.page_accept(0x200, PG_LEVEL_2M)  # the pending leaf at the level: taken
    assert call.entry is sept.entry(0x200, PG_LEVEL_2M) and sept.held == [call]
    sept.accept_end(call)
    # An accepted leaf at or above the request: already accepted, no exit.
    assert sept.page_accept(0x200, PG_LEVEL_2M) == TDX_PAGE_ALREADY_ACCEPTED
    assert sept.page_accept(0x203, PG_LEVEL_4K) == TDX_PAGE_ALREADY_ACCEPTED


def test_accept_at_2m_over_a_table_is_a_size_mismatch_whatever_the_leaves_hold():
    vm = private_vm()
    mapped_4k(vm, 0x300)
    sept = vm.kvm.sept
    assert sept.entry(0x300, PG_LEVEL_2M).state == NL_MAPPED
    assert sept.page_accept(0x300, PG_LEVEL_2M) == TDX_PAGE_SIZE_MISMATCH
    assert sept.page_accept(0x301, PG_LEVEL_4K) == TDX_EXT_EXIT_QUAL_TYPE_ACCEPT  # free 4K
    assert sept.page_accept(0x300, PG_LEVEL_4K) == TDX_PAGE_ALREADY_ACCEPTED


def test_accept_of_a_blocked_entry_exits_to_kvm():
    vm = private_vm()
    vm.read(0x200, private=True)
    sept = vm.kvm.sept
    assert sept.range_block(0x200, PG_LEVEL_2M) == TDX_SUCCESS
    assert sept.page_accept(0x200, PG_LEVEL_2M) == TDX_EXT_EXIT_QUAL_TYPE_ACCEPT
    assert sept.page_accept(0x201, PG_LEVEL_4K) == TDX_EXT_EXIT_QUAL_TYPE_ACCEPT
    assert sept.held == []


# --- TDX_OPERAND_BUSY: a guest TDCALL holds the entry -----------------------------------

def test_an_accept_in_flight_makes_block_busy_and_the_kick_lets_it_finish_first():
    vm = private_vm()
    vm.read(0x200, private=True)  # pending 2M
    kvm = vm.kvm
    leaf = kvm.sept.entry(0x200, PG_LEVEL_2M)
    call = kvm.sept.page_accept(0x200, PG_LEVEL_2M)
    assert call.entry is leaf
    assert kvm.sept.range_block(0x200, PG_LEVEL_2M) == TDX_OPERAND_BUSY
    assert tdx.tdh_do_no_vcpus(kvm, kvm.sept.range_block, 0x200, PG_LEVEL_2M) == TDX_SUCCESS
    assert call.done and leaf.state == BLOCKED  # accepted first, then blocked
    kvm.sept.accept_end(call)  # the guest's TDCALL returns: nothing left to do
    assert kvm.sept.held == []


def test_without_the_retry_a_busy_block_is_a_kvm_bug():
    vm = private_vm()
    vm.read(0x200, private=True)
    kvm = vm.kvm
    kvm.sept.page_accept(0x200, PG_LEVEL_2M)
    with faults.injected({"sept-busy-no-retry"}), pytest.raises(InvariantViolation) as error:
        tdx.tdx_sept_split_private_spt(kvm, 0x200, PG_LEVEL_2M)
    assert TDX_OPERAND_BUSY in error.value.detail


# --- MMIO in a TD ---------------------------------------------------------------------

def test_a_td_mmio_spte_gives_ve_and_mmio_exit_with_no_generation_check():
    vm = Vm(tdx=True)
    assert vm.read(0x300) == MmioExit(0x300000, False)  # installs the MMIO SPTE
    vm.do(MemslotAdd(0, 0x300, 1, 0, 0))
    assert vm.read(0x300) == MmioExit(0x300000, False)  # stale, and still #VE -> TDVMCALL
    assert "walk:mmio:td_ve" in vm.target.features()
    vm.do(ZapAll())
    assert vm.read(0x300) == Ok(0)


def test_a_default_vm_mmio_spte_goes_stale_with_the_generation():
    vm = Vm()
    assert vm.read(0x300) == MmioExit(0x300000, False)
    vm.do(MemslotAdd(0, 0x300, 1, 0, 0))
    assert vm.read(0x300) == Ok(0)


def test_a_td_with_the_vmx_mmio_value_takes_an_ept_misconfig_exit():
    with faults.injected({"td-mmio-misconfig"}):
        vm = Vm(tdx=True)
        assert vm.read(0x300) == MmioExit(0x300000, False)
        with pytest.raises(AssertionError, match="td_ept_misconfig"):
            vm.read(0x300)


def test_the_secure_ept_survives_a_snapshot_round_trip():
    # Campaigns restore VMs from pickles: entry states must compare equal, not identical.
    vm = private_vm()
    vm.read(0x203, private=True)
    vm.do(Accept(0, 0x203000, PG_LEVEL_4K))
    target = vm.target
    target.restore(target.snapshot())
    kvm = target.kvm
    assert kvm.sept.lookup(0x203).state == MAPPED and kvm.sept.lookup(0x204).state == PENDING
    assert tdx.tdx_sept_merge_private_spt(kvm, 0x200) is False  # refused, and unblocked again
    assert kvm.sept.lookup(0x203) is kvm.sept.entry(0x203, PG_LEVEL_4K)

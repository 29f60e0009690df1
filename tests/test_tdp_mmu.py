"""TDP MMU mechanisms, each pinned by a short program run beside the reference.

Every op goes through ``Vm.do``: the reference must allow the tdp outcome and
the invariants must hold afterwards, so each test checks guest-visible
behaviour and structure at once, then asserts the mechanism it is about.
"""

from __future__ import annotations

import pytest

from mmufuzz.harness.ops import (
    OK,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    Access,
    AccessKind,
    DirtyLog,
    GetDirtyLog,
    HostInvalidate,
    MemslotAdd,
    MemslotDelete,
    MemslotFlag,
    MemslotSetFlags,
    MmioExit,
    Ok,
    Recover,
    SetAttributes,
    Split,
    VeUnexpected,
    VmHeader,
    VmType,
    ZapAll,
)
from mmufuzz.harness import faults
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp import TdpTarget
from mmufuzz.harness.tdp import fault as fault_path
from mmufuzz.harness.tdp.sched import run
from mmufuzz.harness.tdp.spte import (
    EPT_SPTE_MMU_WRITABLE,
    FROZEN_SPTE,
    PT_WRITABLE_MASK,
    SHADOW_NONPRESENT_VALUE,
    is_large_pte,
    is_mmio_spte,
    is_shadow_present_pte,
    is_writable_pte,
    spte_index,
    spte_to_pfn,
)
from mmufuzz.fuzz.encoding import parse_reproducer
from mmufuzz.fuzz.runner import Differential, run_program

HUGE = MemslotFlag.HOST_HUGE
PRIVATE = MemslotFlag.PRIVATE | MemslotFlag.HOST_HUGE


class Vm:
    """A tdp target and the reference side by side; every outcome must be allowed."""

    def __init__(self, tdx: bool = False, vcpus: int = 2, range_flush: bool = False):
        header = VmHeader(VmType.TDX if tdx else VmType.DEFAULT, vcpus, range_flush=range_flush)
        self.target = TdpTarget()
        self.differential = Differential(header, self.target)
        self.kvm = self.target.kvm

    def do(self, op):
        """Run ``op``; the runner's oracle (linearizability for a parallel) and invariants hold."""
        finding = self.differential.step(op)
        assert finding is None, finding.summary("tdp")
        return self.differential.outcome

    def write(self, gfn, value, word=0, vcpu=0, private=False):
        return self.do(Access(vcpu, gfn << 12, False, word, AccessKind.WRITE, value, private))

    def read(self, gfn, word=0, vcpu=0, private=False):
        return self.do(Access(vcpu, gfn << 12, False, word, AccessKind.READ, None, private))

    def leaf(self, gfn, private=False):
        """(level, spte) of the leaf mapping ``gfn``, or None."""
        mmu = self.kvm.mmu
        page = mmu.root(private)
        for level in (4, 3, 2, 1):
            spte = page.spt[spte_index(gfn, level)]
            if not is_shadow_present_pte(spte):
                return None
            if level == 1 or is_large_pte(spte):
                return level, spte
            page = mmu.alloc.child(spte)
        return None

    def table_at_2m(self, gfn, private=False):
        """The 4K table under the 2M entry of ``gfn``."""
        mmu = self.kvm.mmu
        page = mmu.root(private)
        for level in (4, 3, 2):
            page = mmu.alloc.child(page.spt[spte_index(gfn, level)])
        return page


def huge_vm(tdx: bool = False, range_flush: bool = False, **slot):
    vm = Vm(tdx, range_flush=range_flush)
    args = {"slot": 0, "base": 0x200, "npages": 0x400, "flags": HUGE, "host_offset": 0} | slot
    vm.do(MemslotAdd(**args))
    return vm


# --- lazy faults and the lpage rules ---------------------------------------------

def test_fault_maps_2m_only_for_an_aligned_huge_backed_range():
    vm = huge_vm()
    vm.write(0x203, 7)
    level, spte = vm.leaf(0x203)
    assert level == PG_LEVEL_2M
    assert spte_to_pfn(spte) == vm.kvm.memslots.lookup(0x200).backing.pfn(0)
    assert vm.read(0x203) == Ok(7)


@pytest.mark.parametrize("slot, gfn", [
    ({"base": 0x201, "npages": 0x3ff}, 0x202),        # slot head: [0x200, 0x400) not inside
    ({"base": 0x200, "npages": 0x3ff}, 0x401),        # slot tail
    ({"host_offset": 1}, 0x210),                      # gfn and host page misaligned
    ({"flags": MemslotFlag(0)}, 0x210),               # host backs with 4K pages
    ({"flags": HUGE | MemslotFlag.DIRTY_LOG}, 0x210),  # dirty logging forces 4K
])
def test_fault_maps_4k_where_a_2m_leaf_is_illegal(slot, gfn):
    vm = huge_vm(**slot)
    vm.write(gfn, 1)
    assert vm.leaf(gfn)[0] == PG_LEVEL_4K


def test_misaligned_slot_base_with_matching_host_offset_still_maps_2m():
    vm = huge_vm(base=0x201, npages=0x5ff, host_offset=1)
    vm.read(0x400)
    assert vm.leaf(0x400)[0] == PG_LEVEL_2M  # (0x400 - 0x201 + 1) % 512 == 0


def test_read_fault_installs_writable_spte_and_readonly_slot_does_not():
    vm = huge_vm(flags=MemslotFlag(0))
    vm.read(0x200)
    assert is_writable_pte(vm.leaf(0x200)[1])
    vm.do(MemslotAdd(1, 0x800, 1, MemslotFlag.READONLY, 0))
    vm.read(0x800)
    assert not is_writable_pte(vm.leaf(0x800)[1])
    assert vm.write(0x800, 1) == MmioExit(0x800000, True)


# --- split, recovery, huge leaves over tables -----------------------------------------

def test_eager_split_children_map_pfn_plus_i_and_recover_makes_huge_in_place():
    vm = huge_vm()
    vm.write(0x200, 5)
    huge_pfn = spte_to_pfn(vm.leaf(0x200)[1])
    vm.do(Split(0))
    for i in (0, 1, 511):
        level, spte = vm.leaf(0x200 + i)
        assert level == PG_LEVEL_4K and spte_to_pfn(spte) == huge_pfn + i
    table = vm.table_at_2m(0x200)
    vm.do(Recover())
    level, spte = vm.leaf(0x200)           # recover_huge_pages_range: in place, no refault
    assert level == PG_LEVEL_2M and spte_to_pfn(spte) == huge_pfn
    assert table.freed
    assert vm.read(0x3ff) == Ok(0) and vm.read(0x200) == Ok(5)


def test_in_place_recovery_takes_the_first_present_leaf_and_aligns_its_pfn():
    vm = huge_vm()
    vm.do(MemslotSetFlags(0, HUGE | MemslotFlag.DIRTY_LOG))
    vm.write(0x2f0, 7)                     # one 4K leaf, in the middle of its 2M range
    assert vm.leaf(0x2f0)[0] == PG_LEVEL_4K
    pfn = spte_to_pfn(vm.leaf(0x2f0)[1])
    vm.do(MemslotSetFlags(0, HUGE))        # disabling the log recovers huge pages
    level, spte = vm.leaf(0x2f0)
    assert level == PG_LEVEL_2M and spte_to_pfn(spte) == pfn - 0xf0
    assert vm.read(0x2f0) == Ok(7)


def test_zap_is_break_before_make_frozen_at_flush_then_nonpresent():
    vm = huge_vm(flags=MemslotFlag(0))
    vm.write(0x300, 1)
    mmu = vm.kvm.mmu
    table, index = vm.table_at_2m(0x300), spte_index(0x300, 1)
    seen, flush = [], mmu.flush
    mmu.flush = lambda: (seen.append(table.spt[index]), flush())
    vm.do(HostInvalidate(0x300, 1))
    assert seen == [FROZEN_SPTE]
    assert table.spt[index] == SHADOW_NONPRESENT_VALUE


def _table_then_2m_legal():
    """A TD whose 2M range at 0x200 is mapped by a table missing the entry of 0x205, with
    2M legal again: the next fault on 0x205 maps 2M over the table."""
    vm = Vm(tdx=True)
    vm.do(MemslotAdd(0, 0x200, 0x200, HUGE, 0))
    vm.write(0x200, 9)
    vm.do(Split(0))
    vm.do(SetAttributes(0x205, 1, True))    # zaps the 4K leaf of 0x205, marks 2M mixed
    vm.do(SetAttributes(0x205, 1, False))   # uniform again: 2M legal, the table remains
    mmu = vm.kvm.mmu
    parent = mmu.alloc.child(mmu.alloc.child(mmu.direct_root.spt[0]).spt[0])
    return vm, parent


def test_2m_fault_over_a_shared_table_replaces_it_by_cmpxchg_then_flushes():
    vm, parent = _table_then_2m_legal()
    old_table = vm.table_at_2m(0x200)
    mmu = vm.kvm.mmu
    at_flush, flush = [], mmu.flush
    mmu.flush = lambda: (at_flush.append(parent.spt[1]), flush())
    assert vm.read(0x205) == Ok(0)
    assert vm.leaf(0x205)[0] == PG_LEVEL_2M
    # x86: no break-before-make; the huge leaf is already in place when the flush comes.
    assert is_large_pte(at_flush[0]) and at_flush[0] == parent.spt[1]
    assert old_table.freed
    assert vm.read(0x200) == Ok(9)


def _walker_parked_in_old_table(vm):
    """vCPU 1's hardware walk of 0x206, parked having read the table link at 2M."""
    walker = vm.kvm.vcpus[1]._walk_ept(0x206, AccessKind.READ)
    for _ in range(3):                       # root, 1G, 2M entries read; next reads the table
        next(walker)
    return walker


@pytest.mark.parametrize("inject", [False, True])
def test_huge_over_table_flush_keeps_a_parked_walker_off_the_freed_table(inject):
    vm, _ = _table_then_2m_legal()
    old_table = vm.table_at_2m(0x200)
    walker = _walker_parked_in_old_table(vm)
    with faults.injected(["huge-over-table-no-flush"] if inject else []):
        assert vm.target.execute(Access(0, 0x205 << 12, False, 0, AccessKind.READ, None,
                                        False)) == Ok(0)
    assert old_table.freed                   # the grace period ended with the fault
    if inject:                               # no flush: the walk goes on into freed memory
        with pytest.raises(InvariantViolation) as error:
            next(walker)
        assert error.value.name == "walker_read_freed_table"
    else:                                    # flushed: the walk restarts from the root
        with pytest.raises(StopIteration):
            while True:
                next(walker)
        assert vm.leaf(0x206)[0] == PG_LEVEL_2M


# --- deferred free -----------------------------------------------------------------------

def test_removed_tables_are_freed_by_call_rcu_after_the_grace_period():
    vm = huge_vm(flags=MemslotFlag(0))
    vm.write(0x300, 1)
    kvm = vm.kvm
    table = vm.table_at_2m(0x300)
    reader = kvm.rcu.read_lock()   # a walker that could still see the table
    outcome = vm.target.execute(ZapAll())
    assert outcome == OK
    assert not table.freed and kvm.rcu.pending()
    kvm.rcu.read_unlock(reader)
    kvm.quiesce()
    assert table.freed and not kvm.rcu.pending()
    vm.target.check_invariants()  # zap_all is guest-invisible: the reference is unchanged
    assert vm.read(0x300) == Ok(1)


def test_leaked_table_is_an_invariant_violation():
    vm = huge_vm(flags=MemslotFlag(0))
    vm.write(0x300, 1)
    vm.kvm.pgalloc.alloc(1, 0x300, False)   # allocated, never linked, never freed
    with pytest.raises(InvariantViolation) as error:
        vm.target.check_invariants()
    assert error.value.name == "leaked_table_page"


# --- memslot generation and MMIO SPTEs -----------------------------------------------------

def test_mmio_spte_is_cached_then_made_stale_by_a_memslot_add():
    vm = Vm()
    assert vm.read(0x300, word=4) == MmioExit(0x300020, False)
    spte = vm.table_at_2m(0x300).spt[spte_index(0x300, 1)]
    assert is_mmio_spte(spte, vm.kvm.mmio_value)
    generation = vm.kvm.memslots.generation
    assert vm.read(0x300, word=4) == MmioExit(0x300020, False)   # served from the MMIO SPTE
    vm.do(MemslotAdd(0, 0x300, 0x10, MemslotFlag(0), 0))
    assert vm.kvm.memslots.generation == generation + 1
    assert vm.write(0x300, 3, word=4) == Ok()
    assert vm.read(0x300, word=4) == Ok(3)


def test_tdx_hardware_sees_a_zeroed_entry_as_ve_unexpected():
    vm = Vm(tdx=True)
    vm.do(MemslotAdd(0, 0x200, 0x200, MemslotFlag(0), 0))
    vm.write(0x210, 1)
    table = vm.table_at_2m(0x210)
    vm.kvm.mmu.flush()
    table.spt[spte_index(0x210, 1)] = 0   # what the nonpresent-zero bug writes
    outcome = vm.target.execute(Access(0, 0x210000, False, 0, AccessKind.READ, None, False))
    assert outcome == VeUnexpected(0x210000)
    with pytest.raises(InvariantViolation) as error:
        vm.target.check_invariants()
    assert error.value.name == "nonpresent_value"


def test_last_used_slot_cache_never_outlives_a_memslot_update():
    vm = huge_vm()
    vcpu = vm.kvm.vcpus[0]
    slot = vcpu.gfn_to_memslot(0x300)
    assert slot is vm.kvm.memslots.by_id[0] and vcpu.gfn_to_memslot(0x301) is slot
    vm.do(MemslotDelete(0))
    assert vcpu.gfn_to_memslot(0x300) is None


def test_slot_delete_zaps_and_poisons_its_host_pages():
    vm = huge_vm()
    vm.write(0x200, 1)
    pfn = spte_to_pfn(vm.leaf(0x200)[1])
    vm.do(MemslotDelete(0))
    assert vm.leaf(0x200) is None and vm.kvm.host.is_poisoned(pfn)
    assert vm.read(0x200) == MmioExit(0x200000, False)


# --- host migration and flushes --------------------------------------------------------------

def test_host_invalidate_migrates_contents_and_breaks_the_2m_host_page():
    vm = huge_vm()
    vm.write(0x201, 0x42, vcpu=1)
    old_pfn = spte_to_pfn(vm.leaf(0x201)[1])
    vm.do(HostInvalidate(0x201, 1))
    assert vm.kvm.host.is_poisoned(old_pfn + 1)
    assert not vm.kvm.vcpus[1].tlb_shared
    assert vm.read(0x201, vcpu=1) == Ok(0x42)
    assert vm.leaf(0x201)[0] == PG_LEVEL_4K       # host page now split: no 2M leaf
    assert vm.read(0x400) == Ok(0) and vm.leaf(0x400)[0] == PG_LEVEL_2M


def test_a_stale_host_translation_touches_a_poisoned_page():
    vm = huge_vm(flags=MemslotFlag(0))
    vm.write(0x300, 1)
    stale = dict(vm.kvm.vcpus[0].tlb_shared)
    vm.do(HostInvalidate(0x300, 1))
    vm.kvm.vcpus[0].tlb_shared.update(stale)   # as if the flush had been lost
    with pytest.raises(InvariantViolation) as error:
        vm.target.execute(Access(0, 0x300000, False, 0, AccessKind.READ, None, False))
    assert error.value.name == "stale_host_page_access"


# --- dirty logging ----------------------------------------------------------------------------

def test_dirty_log_enable_splits_and_write_protects_then_logs_writes():
    vm = huge_vm(tdx=True)  # a TD has no PML: dirty logging write-protects
    vm.write(0x200, 1)
    vm.do(MemslotSetFlags(0, HUGE | MemslotFlag.DIRTY_LOG))
    level, spte = vm.leaf(0x200)
    assert level == PG_LEVEL_4K and not is_writable_pte(spte)
    vm.write(0x203, 2)
    vm.write(0x203, 3, word=1)
    assert vm.do(GetDirtyLog(0)) == DirtyLog((0x203,))
    assert not is_writable_pte(vm.leaf(0x203)[1])   # re-protected by the get
    assert vm.do(GetDirtyLog(0)) == DirtyLog(())
    vm.write(0x203, 4)
    assert vm.do(GetDirtyLog(0)) == DirtyLog((0x203,))


def test_disabling_dirty_log_lets_huge_pages_come_back():
    vm = huge_vm(flags=HUGE | MemslotFlag.DIRTY_LOG)
    vm.write(0x210, 1)
    assert vm.leaf(0x210)[0] == PG_LEVEL_4K
    vm.do(MemslotSetFlags(0, HUGE))
    assert vm.read(0x210) == Ok(1)
    assert vm.leaf(0x210)[0] == PG_LEVEL_2M


def test_unlogged_write_is_an_invariant_violation():
    vm = huge_vm(flags=HUGE | MemslotFlag.DIRTY_LOG)
    vm.write(0x210, 1)
    vm.kvm.memslots.by_id[0].dirty.bitmap.clear()
    with pytest.raises(InvariantViolation) as error:
        vm.target.check_invariants()
    assert error.value.name == "dirty_log_covers_writes"


# --- roots: fast zap_all, references, obsolete roots ------------------------------------------

def test_zap_all_invalidates_the_root_and_vcpus_move_to_a_new_one():
    vm = huge_vm(flags=MemslotFlag(0))
    vm.write(0x300, 1, vcpu=0)
    vm.read(0x301, vcpu=1)
    mmu = vm.kvm.mmu
    old = mmu.direct_root
    assert mmu.root_count[old] == 3            # the TDP MMU's and two vCPUs'
    table = vm.table_at_2m(0x300)
    vm.do(ZapAll())
    assert mmu.is_invalid(old) and old.refcount == 0 and table.freed
    assert mmu.root_count[old] == 2 and mmu.direct_root is None   # the MMU's reference is put
    assert vm.read(0x300, vcpu=0) == Ok(1)     # vCPU 0 reloads onto a fresh root
    new = mmu.direct_root
    assert new is not old and vm.kvm.vcpus[0].root is new and mmu.root_count[new] == 2
    assert vm.read(0x301, vcpu=1) == Ok(0)     # the last reference: the old root goes
    assert old not in mmu.tdp_mmu_roots and old.freed
    assert mmu.root_count[new] == 3


def test_zap_all_spares_the_mirror_root():
    vm = Vm(tdx=True)
    vm.do(MemslotAdd(0, 0x200, 0x200, PRIVATE, 0))
    vm.do(SetAttributes(0x200, 1, True))
    vm.read(0x200, private=True)
    mirror = vm.kvm.mmu.mirror_root
    leaf = vm.leaf(0x200, private=True)
    vm.do(ZapAll())
    assert not vm.kvm.mmu.is_invalid(mirror) and vm.leaf(0x200, private=True) == leaf


def _fault_started_then_zap_all(vm):
    """vCPU 0's read of 0x300 parked inside the fault handler (root chosen, mmu_lock not yet
    taken), then a whole zap_all; returns the access, to be finished."""
    kvm = vm.kvm
    access = kvm.run(Access(0, 0x300 << 12, False, 0, AccessKind.READ, None, False))
    while not kvm.srcu._readers:               # kvm_mmu_page_fault holds kvm->srcu
        next(access)
    assert run(kvm.run(ZapAll())) == OK
    kvm.quiesce()
    return access


@pytest.mark.parametrize("inject", [False, True])
def test_a_fault_on_an_obsolete_root_retries_on_the_new_one(inject):
    vm = huge_vm(flags=MemslotFlag(0))
    vm.read(0x200)                             # vCPU 0 has the first root loaded
    old = vm.kvm.mmu.direct_root
    with faults.injected(["fault-on-obsolete-root"] if inject else []):
        access = _fault_started_then_zap_all(vm)
        assert run(access) == Ok(0)
    vm.kvm.quiesce()
    if inject:       # mapped behind the zap into the obsolete root, whose last put frees
        assert old.refcount == 1 and old.freed   # it: the tables under it leak
        with pytest.raises(InvariantViolation) as error:
            vm.target.check_invariants()
        assert error.value.name == "leaked_table_page"
    else:
        assert old.refcount == 0 and vm.kvm.vcpus[0].root is not old
        vm.target.check_invariants()


def test_root_refcounts_catches_a_lost_reference():
    vm = huge_vm()
    vm.read(0x200)
    vm.kvm.mmu.root_count[vm.kvm.mmu.direct_root] += 1
    with pytest.raises(InvariantViolation) as error:
        vm.target.check_invariants()
    assert error.value.name == "root_refcounts"


# --- the non-present value -------------------------------------------------------------------

@pytest.mark.parametrize("fault, ops", [
    ("table-init-zero", ()),
    ("nonpresent-zero", (MemslotDelete(0),)),                  # a zap under mmu_lock for write
    ("nonpresent-zero", (HostInvalidate(0x200, 1),)),
])
def test_a_zero_entry_is_a_nonpresent_value_violation_and_a_ve_in_a_td(fault, ops):
    with faults.injected([fault]):
        vm = Vm(tdx=True)
        vm.do(MemslotAdd(0, 0x200, 0x200, MemslotFlag(0), 0)) if fault != "table-init-zero" \
            else vm.target.execute(MemslotAdd(0, 0x200, 0x200, MemslotFlag(0), 0))
        if fault != "table-init-zero":
            vm.read(0x200)
        for op in ops:
            vm.target.execute(op)
        with pytest.raises(InvariantViolation) as error:
            vm.target.check_invariants()
        assert error.value.name == "nonpresent_value"


# --- targeted flushes (kvm_flush_remote_tlbs_range and its callers) ------------------------

def _split_and_walked(range_flush: bool):
    """A 2M page split to 4K, with vCPU 0 holding translations and walk-cache entries for
    0x200 and 0x201 (each walk made its own in a range-flush VM) and 0x600 (another slot)."""
    vm = huge_vm(range_flush=range_flush)
    vm.do(MemslotAdd(1, 0x600, 0x200, MemslotFlag(0), 0))
    vm.write(0x200, 5)
    vm.do(Split(0))
    for gfn in (0x200, 0x201, 0x600):
        vm.read(gfn)
    return vm, vm.kvm.vcpus[0]


def test_without_a_host_range_flush_every_ranged_flush_is_a_full_one():
    vm, vcpu = _split_and_walked(range_flush=False)
    assert vcpu.tlb_shared and vcpu.walk_cache
    vm.kvm.mmu.flush_gfn(0x201, PG_LEVEL_4K)
    assert not vcpu.tlb_shared and not vcpu.walk_cache


def test_a_ranged_flush_drops_only_what_translates_its_gfns():
    vm, vcpu = _split_and_walked(range_flush=True)
    tables = {key[1] for key in vcpu.walk_cache}
    assert {0x200, 0x201, 0x600} <= tables          # entries per gfn, not per table
    vm.kvm.mmu.flush_gfn(0x201, PG_LEVEL_4K)
    assert 0x201 not in vcpu.tlb_shared and {0x200, 0x600} <= set(vcpu.tlb_shared)
    assert {key[1] for key in vcpu.walk_cache} == tables - {0x201}
    vm.target.check_invariants()


def test_kvm_flush_remote_tlbs_gfn_covers_all_an_spte_at_its_level_maps():
    vm, vcpu = _split_and_walked(range_flush=True)
    vm.kvm.mmu.flush_gfn(0x3ff, PG_LEVEL_2M)        # gfn_round_for_level: [0x200, 0x400)
    assert set(vcpu.tlb_shared) == {0x600}
    assert {key[1] for key in vcpu.walk_cache} == {0x600}


def test_kvm_flush_remote_tlbs_memslot_covers_the_slot():
    vm, vcpu = _split_and_walked(range_flush=True)
    vm.kvm.mmu.flush_memslot(vm.kvm.memslots.by_id[1])
    assert set(vcpu.tlb_shared) == {0x200, 0x201}


def test_a_ranged_flush_aborts_only_a_walk_of_a_gfn_in_its_range():
    vm, _ = _split_and_walked(range_flush=True)
    aborted = []
    for gfn, flushed in ((0x202, 0x203), (0x202, 0x202)):
        vcpu = vm.kvm.vcpus[1]
        walker = vcpu._walk_ept(gfn, AccessKind.READ)
        next(walker)
        epoch = vcpu.flush_epoch
        vm.kvm.mmu.flush_gfn(flushed, PG_LEVEL_4K)
        aborted.append(vcpu.flush_epoch != epoch)
        with pytest.raises(StopIteration):
            while True:
                next(walker)
    assert aborted == [False, True]


def test_a_td_flushes_whole_whatever_the_header_says():
    header = VmHeader(VmType.TDX, 1, range_flush=True)
    target = TdpTarget()
    target.reset(header)
    assert not target.kvm.range_flush and not VmHeader(VmType.DEFAULT, 1).range_flush


@pytest.mark.parametrize("inject", [False, True])
def test_recovery_flushes_the_tables_it_removes(inject):
    """In-place recovery's kvm_flush_remote_tlbs_memslot drops the walk-cache entries of
    every gfn of a replaced table; collapsible-flush-sp-base (1b2dc7360463) flushes the
    table's first gfn only, and 0x201's entry outlives its table."""
    vm, vcpu = _split_and_walked(range_flush=True)
    with faults.injected(["collapsible-flush-sp-base"] if inject else []):
        if inject:
            with pytest.raises(AssertionError, match="walk_cache_matches_sptes: gfn=0x201"):
                vm.do(Recover())
            return
        vm.do(Recover())
    assert vm.leaf(0x201)[0] == PG_LEVEL_2M
    assert not any(0x200 <= gfn < 0x400 for _, gfn in vcpu.walk_cache)


def test_dirty_log_enable_flushes_the_slot_so_every_write_is_logged():
    vm, vcpu = _split_and_walked(range_flush=True)
    vm.write(0x600, 1)                               # a writable translation cached
    vm.do(MemslotSetFlags(1, MemslotFlag.DIRTY_LOG))
    assert 0x600 not in vcpu.tlb_shared and 0x200 in vcpu.tlb_shared
    vm.write(0x600, 2)
    assert vm.do(GetDirtyLog(1)) == DirtyLog((0x600,))



# --- KVM's own sanity checks, raised as named invariants -------------------------------

def test_an_atomic_clear_of_a_mirror_entry_is_kvms_bug_on():
    """__tdp_mmu_set_spte_atomic: KVM_BUG_ON(!is_shadow_present_pte(new_spte)) for a mirror
    entry that is not being frozen (atomic zaps of mirror entries freeze first)."""
    vm = Vm(tdx=True)
    vm.do(MemslotAdd(0, 0x200, 0x200, PRIVATE, 0))
    vm.do(SetAttributes(0x200, 1, True))
    vm.read(0x200, private=True)
    mmu = vm.kvm.mmu
    level, leaf = vm.leaf(0x200, private=True)
    it = mmu.iter(mmu.mirror_root, 0x200, 0x201)
    while it.level != level:
        it.next()
    assert it.old_spte == leaf
    with pytest.raises(InvariantViolation, match="mirror_atomic_nonpresent"):
        run(mmu.set_spte_atomic(it, SHADOW_NONPRESENT_VALUE))


# A TD has no PML: enabling dirty logging write-protects every 4K leaf, and the disable
# rebuilds the 2M leaf read-only (MMU-writable kept) from them; the write racing the disable
# meets that leaf in its slow path and replaces it with a writable one of the same pfn.
_WIDENED_BY_A_FAULT = """vm type=tdx vcpus=1
memslot_add slot=0 base=0x200 npages=0x200 flags=host_huge host_offset=0
access vcpu=0 gpa=0x200000 word=0 kind=read private=0
memslot_set_flags slot=0 flags=dirty_log,host_huge
parallel a=(access vcpu=0 gpa=0x202000 word=0 kind=write value=0x0 private=0) b=(memslot_set_flags slot=0 flags=host_huge) schedule=0x7ff8
"""


def test_a_fault_that_takes_mmu_writable_away_is_kvms_warning(monkeypatch):
    """tdp_mmu_map_handle_target_level: WARN_ON_ONCE(leaf_spte_change_needs_tlb_flush(old,
    new)).  A fault replaces a present leaf only to widen it; with make_spte broken to make
    read-only SPTEs after the first, the fault above takes MMU-writable away and the warning
    is the finding."""
    program = parse_reproducer(_WIDENED_BY_A_FAULT).program
    assert run_program(program, TdpTarget()) is None
    make, made = fault_path.make_spte, []

    def read_only_after_the_first(*args):
        made.append(args)
        spte = make(*args)
        return spte if len(made) == 1 else spte & ~(EPT_SPTE_MMU_WRITABLE | PT_WRITABLE_MASK)
    monkeypatch.setattr(fault_path, "make_spte", read_only_after_the_first)
    finding = run_program(program, TdpTarget())
    assert finding is not None and "fault_leaf_change_needs_flush" in finding.summary("tdp")


def test_a_spurious_fault_that_resolved_another_pfn_is_kvms_warning(monkeypatch):
    """tdp_mmu_map_handle_target_level: WARN_ON_ONCE(fault->pfn != spte_to_pfn(old)) on the
    spurious path (two vCPUs fault one page; the second finds the first's leaf).  With every
    fault after the first resolving another pfn (a host page lookup gone wrong), some
    interleaving of the two reads shows the warning; none does without it."""
    def schedules():
        for schedule in range(64):
            yield parse_reproducer(
                "vm type=default vcpus=2\n"
                "memslot_add slot=0 base=0x200 npages=0x10 flags= host_offset=0\n"
                "parallel a=(access vcpu=0 gpa=0x200000 word=0 kind=read private=0) "
                "b=(access vcpu=1 gpa=0x200000 word=0 kind=read private=0) "
                f"schedule={schedule:#x}\n").program
    assert all(run_program(p, TdpTarget()) is None for p in schedules())
    faultin, calls = fault_path.kvm_mmu_faultin_pfn, []

    def another_pfn_after_the_first(kvm, vcpu, fault):
        result = faultin(kvm, vcpu, fault)
        calls.append(fault.gfn)
        if len(calls) > 1:
            fault.pfn += 1
        return result
    monkeypatch.setattr(fault_path, "kvm_mmu_faultin_pfn", another_pfn_after_the_first)
    found = []
    for program in schedules():
        calls.clear()
        finding = run_program(program, TdpTarget())
        found.append(finding is not None and "spurious_fault_pfn" in finding.summary("tdp"))
    assert any(found)

"""Private memory in a TDX VM: mirror root, secure EPT, accept, merge, conversion."""

from __future__ import annotations

from test_tdp_mmu import PRIVATE, Vm

from mmufuzz.harness import faults

from mmufuzz.harness.ops import (
    ALREADY_ACCEPTED,
    OK,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    SIZE_MISMATCH,
    Accept,
    HostInvalidate,
    MemoryFaultExit,
    MemslotAdd,
    MemslotFlag,
    Ok,
    Recover,
    SetAttributes,
    Split,
    VePending,
    ZapAll,
)
from mmufuzz.harness.tdp import events
from mmufuzz.harness.tdp.events import EVENTS
from mmufuzz.harness.tdp.lpage import pre_set_hugepage_ranges
from mmufuzz.harness.tdp.spte import is_shadow_present_pte


def private_vm(base=0x200, npages=0x400):
    vm = Vm(tdx=True)
    vm.do(MemslotAdd(0, base, npages, PRIVATE, 0))
    vm.do(SetAttributes(0x200, 0x200, True))
    return vm


def accept(vm, gfn, level):
    return vm.do(Accept(0, gfn << 12, level))


def sept_levels(vm, lo, hi):
    return sorted({leaf.level for (level, gfn), leaf in vm.kvm.sept.leaves().items()
                   if lo <= gfn < hi})


def test_accept_2m_maps_a_2m_private_leaf_in_mirror_and_sept():
    vm = private_vm()
    assert vm.read(0x210, private=True) == VePending(0x210000)
    assert accept(vm, 0x200, PG_LEVEL_2M) == OK
    assert vm.leaf(0x210, private=True)[0] == PG_LEVEL_2M
    assert vm.kvm.sept.leaves()[(PG_LEVEL_2M, 0x200)].accepted
    vm.write(0x210, 7, private=True)
    assert vm.read(0x210, private=True) == Ok(7)
    assert accept(vm, 0x200, PG_LEVEL_2M) == ALREADY_ACCEPTED
    assert vm.leaf(0x210) is None   # nothing in the direct root


def test_accept_4k_under_a_pending_2m_leaf_demotes_it_first():
    vm = private_vm()
    vm.read(0x200, private=True)     # ve_pending, but maps the 2M leaf
    assert vm.leaf(0x200, private=True)[0] == PG_LEVEL_2M
    demotes = vm.kvm.events[events.SEPT_DEMOTE]
    assert accept(vm, 0x203, PG_LEVEL_4K) == OK
    assert vm.kvm.events[events.SEPT_DEMOTE] == demotes + 1
    assert vm.leaf(0x203, private=True)[0] == PG_LEVEL_4K
    assert sept_levels(vm, 0x200, 0x400) == [PG_LEVEL_4K]
    assert vm.read(0x203, private=True) == Ok(0)
    assert vm.read(0x204, private=True) == VePending(0x204000)


def test_without_honouring_the_accept_level_a_4k_accept_under_a_2m_leaf_never_ends():
    vm = private_vm()
    vm.read(0x200, private=True)
    with faults.injected({"accept-level-not-honored"}):
        finding = vm.differential.step(Accept(0, 0x203 << 12, PG_LEVEL_4K))
    assert finding.actual.startswith("Hang: no progress")


def test_accept_2m_over_a_4k_table_is_the_modules_size_mismatch_with_nothing_faulted_in():
    vm = private_vm()
    assert accept(vm, 0x201, PG_LEVEL_4K) == OK
    assert accept(vm, 0x200, PG_LEVEL_2M) == SIZE_MISMATCH
    table = vm.table_at_2m(0x200, private=True)
    assert sum(map(is_shadow_present_pte, table.spt)) == 1   # no EPT violation: no fault
    assert vm.read(0x205, private=True) == VePending(0x205000)  # the fault merges, populating
    table = vm.table_at_2m(0x200, private=True)                # the others; PROMOTE refuses
    assert all(map(is_shadow_present_pte, table.spt))           # the mixed states


def test_a_4k_accept_maps_at_the_level_it_reports_and_a_2m_accept_beside_it_maps_2m():
    vm = private_vm()
    vm.do(SetAttributes(0x400, 0x200, True))
    assert accept(vm, 0x400, PG_LEVEL_4K) == OK          # nothing mapped: the fault maps 4K
    assert vm.leaf(0x400, private=True)[0] == PG_LEVEL_4K
    assert accept(vm, 0x200, PG_LEVEL_2M) == OK          # its own level: 2M
    assert vm.leaf(0x200, private=True)[0] == PG_LEVEL_2M


def test_accept_2m_where_guest_memfd_is_4k_is_a_size_mismatch_after_a_4k_fault():
    vm = Vm(tdx=True)
    vm.do(MemslotAdd(0, 0x200, 0x400, MemslotFlag.PRIVATE, 0))
    vm.do(SetAttributes(0x200, 0x200, True))
    assert accept(vm, 0x200, PG_LEVEL_2M) == SIZE_MISMATCH
    assert vm.leaf(0x200, private=True)[0] == PG_LEVEL_4K   # the EPT violation's fault: 4K
    assert vm.read(0x200, private=True) == VePending(0x200000)


def test_a_2m_accept_leaves_a_2m_leaf_and_a_4k_accept_after_it_finds_the_page_accepted():
    vm = private_vm()
    assert accept(vm, 0x200, PG_LEVEL_2M) == OK
    assert accept(vm, 0x201, PG_LEVEL_4K) == ALREADY_ACCEPTED   # MAPPED 2M leaf above: no exit
    assert vm.leaf(0x201, private=True)[0] == PG_LEVEL_2M


def test_fault_path_merges_populated_children_in_place():
    vm = private_vm()
    vm.read(0x200, private=True)
    vm.do(SetAttributes(0x205, 1, False))   # splits the 2M leaf at the edge, zaps 0x205
    assert vm.leaf(0x204, private=True)[0] == PG_LEVEL_4K
    vm.do(SetAttributes(0x205, 1, True))
    assert vm.read(0x205, private=True) == VePending(0x205000)
    assert vm.leaf(0x205, private=True)[0] == PG_LEVEL_2M   # populated 0x205, merged all 512


def test_recover_merges_uniformly_accepted_4k_pages_keeping_contents():
    vm = private_vm()
    accept(vm, 0x200, PG_LEVEL_2M)
    vm.write(0x3ff, 0x99, private=True)
    vm.do(Split(0))
    assert sept_levels(vm, 0x200, 0x400) == [PG_LEVEL_4K]
    vm.do(Recover())
    assert vm.leaf(0x3ff, private=True)[0] == PG_LEVEL_2M
    assert vm.read(0x3ff, private=True) == Ok(0x99)   # merged in place, never zapped


def test_recover_leaves_mixed_accept_states_at_4k_and_never_populates():
    vm = private_vm()
    accept(vm, 0x201, PG_LEVEL_4K)
    vm.do(Recover())
    table = vm.table_at_2m(0x200, private=True)
    assert sum(map(is_shadow_present_pte, table.spt)) == 1
    vm.read(0x202, private=True)
    vm.do(Recover())
    assert vm.leaf(0x201, private=True)[0] == PG_LEVEL_4K


def test_host_events_never_touch_private_leaves():
    vm = private_vm()
    accept(vm, 0x200, PG_LEVEL_2M)
    vm.write(0x200, 5, private=True)
    leaf = vm.leaf(0x200, private=True)
    vm.do(ZapAll())
    vm.do(HostInvalidate(0x200, 0x200))
    assert vm.leaf(0x200, private=True) == leaf
    assert vm.read(0x200, private=True) == Ok(5)


def test_conversion_to_shared_drops_private_state_and_keeps_shared_contents():
    vm = Vm(tdx=True)
    vm.do(MemslotAdd(0, 0x200, 0x400, PRIVATE, 0))
    vm.write(0x200, 0x11)
    vm.do(SetAttributes(0x200, 0x200, True))
    assert vm.read(0x200) == MemoryFaultExit(0x200000, False)
    accept(vm, 0x200, PG_LEVEL_2M)
    vm.write(0x200, 0x22, private=True)
    vm.do(SetAttributes(0x200, 0x200, False))
    assert vm.leaf(0x200, private=True) is None and not vm.kvm.sept.leaves()
    assert vm.read(0x200) == Ok(0x11)
    vm.do(SetAttributes(0x200, 0x200, True))
    assert vm.read(0x200, private=True) == VePending(0x200000)


def test_mixed_flag_follows_conversions():
    vm = private_vm()
    slot = vm.kvm.memslots.by_id[0]
    assert 1 not in slot.lpage_mixed          # 2M range 0x200 is uniformly private
    vm.do(SetAttributes(0x300, 1, False))
    assert 1 in slot.lpage_mixed
    vm.read(0x301, private=True)
    assert vm.leaf(0x301, private=True)[0] == PG_LEVEL_4K
    vm.do(SetAttributes(0x300, 1, True))
    assert 1 not in slot.lpage_mixed


def test_a_conversion_invalidates_the_partly_covered_2m_ranges_around_it():
    """kvm_arch_pre_set_memory_attributes (9129633d568e): head and tail, if in the slot and not mixed."""
    vm = private_vm()                          # slot [0x200, 0x600), [0x200, 0x400) private
    slot = vm.kvm.memslots.by_id[0]
    # one gfn at the end of one 2M range and the start of the next: both ranges
    assert pre_set_hugepage_ranges(slot, 0x3ff, 0x401) == [(0x200, 0x400), (0x400, 0x600)]
    # a whole 2M range is invalidated by the conversion itself, its neighbour only if touched
    assert pre_set_hugepage_ranges(slot, 0x200, 0x400) == []
    assert pre_set_hugepage_ranges(slot, 0x200, 0x401) == [(0x400, 0x600)]
    # a range that would not be huge anyway stays out: mixed, or not wholly in the slot
    vm.do(SetAttributes(0x300, 1, False))
    assert pre_set_hugepage_ranges(slot, 0x3ff, 0x400) == []
    assert pre_set_hugepage_ranges(slot, 0x5ff, 0x600) == [(0x400, 0x600)]
    small = Vm(tdx=True)
    small.do(MemslotAdd(0, 0x200, 0x300, PRIVATE, 0))
    assert pre_set_hugepage_ranges(small.kvm.memslots.by_id[0], 0x410, 0x411) == []


def _mapping_features(vm) -> list:
    """The target's features of the last op but its MMU-state events."""
    return [f for f in vm.target.features() if f not in EVENTS.names]


def test_features_name_the_mapping_an_access_or_accept_left_behind():
    """op x mapping level: the same outcome over a 2M, a 4K or no mapping is other coverage."""
    vm = private_vm()
    vm.read(0x200, private=True)
    features = vm.target.features()
    assert "sept:aug:L2:pending" in features and "spte:L2:mirror:none>leaf" in features
    assert [f for f in features if f not in EVENTS.names] == ["map:access:private:2",
                                                              "sept:access:2:pending"]
    accept(vm, 0x203, PG_LEVEL_4K)
    assert _mapping_features(vm) == ["map:accept:private:1", "sept:accept:1:accepted"]
    vm.read(0x204, private=True)
    assert _mapping_features(vm) == ["map:access:private:1", "sept:access:1:pending"]
    vm.read(0x100)  # no slot there: nothing mapped
    assert _mapping_features(vm) == ["map:access:shared:0"]
    vm.do(ZapAll())
    assert _mapping_features(vm) == []

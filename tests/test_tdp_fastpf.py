"""EPT A/D bits, PML-mode dirty logging and the lockless fast page fault of the tdp target.

A default VM logs dirty pages with PML (enabling and every get clear Dirty
bits; the CPU logs the write that sets one); a TD has no PML and
write-protects, and a write to a write-protected page is fixed by
fast_page_fault without mmu_lock.  Every step runs beside the reference
(``Vm.do``), so each test also checks outcomes and the invariants.
"""

from __future__ import annotations

import pytest

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (
    PG_LEVEL_4K,
    Access,
    AccessKind,
    DirtyLog,
    GetDirtyLog,
    HostInvalidate,
    MemslotAdd,
    MemslotFlag,
    MemslotSetFlags,
    MmioExit,
    Ok,
    Parallel,
)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp import events
from mmufuzz.harness.tdp.spte import (
    ACC_ALL,
    EPT_SPTE_HOST_WRITABLE,
    EPT_SPTE_MMU_WRITABLE,
    PT_WRITABLE_MASK,
    SPTE_DIRTY_MASK,
    is_access_allowed,
    is_dirty_spte,
    is_mmu_writable_spte,
    is_writable_pte,
    make_spte,
    spte_index,
)
from test_tdp_mmu import Vm

LOG = MemslotFlag.DIRTY_LOG


def logging_vm(tdx: bool, flags=LOG, npages=4, vcpus=2) -> Vm:
    vm = Vm(tdx, vcpus)
    vm.do(MemslotAdd(0, 0, npages, flags, 0))
    return vm


def spte_of(vm: Vm, gfn: int) -> int:
    level, spte = vm.leaf(gfn)
    assert level == PG_LEVEL_4K
    return spte


def vm_write(gfn, value, vcpu=0):
    return Access(vcpu, gfn << 12, False, 0, AccessKind.WRITE, value, False)


def counted(vm: Vm, event: int, op):
    """Run ``op`` and return how often it raised ``event``."""
    before = vm.kvm.events[event]
    vm.do(op)
    return vm.kvm.events[event] - before


# --- spte.h --------------------------------------------------------------------------------

def test_a_writable_spte_is_made_mmu_writable_host_writable_and_dirty():
    spte = make_spte(7, PG_LEVEL_4K, ACC_ALL)
    assert is_writable_pte(spte) and is_mmu_writable_spte(spte) and is_dirty_spte(spte)
    assert spte & EPT_SPTE_HOST_WRITABLE
    read_only = make_spte(7, PG_LEVEL_4K, ACC_ALL, host_writable=False)
    assert not read_only & (PT_WRITABLE_MASK | EPT_SPTE_MMU_WRITABLE | EPT_SPTE_HOST_WRITABLE
                            | SPTE_DIRTY_MASK)


def test_is_access_allowed_checks_the_one_permission_the_access_needs():
    spte = make_spte(7, PG_LEVEL_4K, ACC_ALL) & ~PT_WRITABLE_MASK
    assert is_access_allowed(spte, write=False, exec_=False)
    assert is_access_allowed(spte, write=False, exec_=True)
    assert not is_access_allowed(spte, write=True, exec_=False)


# --- PML mode (default VM) -----------------------------------------------------------------

def test_default_vm_uses_pml_and_a_td_write_protects():
    assert Vm(False).kvm.cpu_dirty_log_size and not Vm(True).kvm.cpu_dirty_log_size


def test_pml_enable_clears_dirty_bits_and_keeps_the_pages_writable():
    vm = logging_vm(False, flags=MemslotFlag(0))
    vm.write(1, 5)
    vm.do(MemslotSetFlags(0, LOG))
    spte = spte_of(vm, 1)
    assert is_writable_pte(spte) and not is_dirty_spte(spte)
    assert vm.do(GetDirtyLog(0)) == DirtyLog(())
    assert counted(vm, events.WALK_SET_DIRTY_PML, vm_write(1, 6)) == 1
    assert is_dirty_spte(spte_of(vm, 1))
    assert vm.do(GetDirtyLog(0)) == DirtyLog((1,))


def test_pml_get_clears_dirty_and_a_clean_translation_is_not_cached_writable():
    vm = logging_vm(False)
    vm.write(2, 1)
    assert vm.do(GetDirtyLog(0)) == DirtyLog((2,))
    assert not is_dirty_spte(spte_of(vm, 2)) and is_writable_pte(spte_of(vm, 2))
    assert vm.read(2) == Ok(1)
    pfn, perms = vm.kvm.vcpus[0].tlb_shared[2]
    assert not perms & PT_WRITABLE_MASK  # the read cached a clean, so read-only, translation
    assert counted(vm, events.WALK_SET_DIRTY_PML, vm_write(2, 3)) == 1
    assert vm.kvm.vcpus[0].tlb_shared[2][1] & PT_WRITABLE_MASK
    assert counted(vm, events.WALK_SET_DIRTY_PML, vm_write(2, 4)) == 0  # a TLB hit
    assert vm.do(GetDirtyLog(0)) == DirtyLog((2,))
    assert vm.do(GetDirtyLog(0)) == DirtyLog(())


def test_without_logging_the_cpu_sets_dirty_but_logs_nothing():
    vm = logging_vm(False)
    vm.write(0, 1)
    vm.do(GetDirtyLog(0))
    vm.do(MemslotSetFlags(0, MemslotFlag(0)))
    assert counted(vm, events.WALK_SET_DIRTY, vm_write(0, 2)) == 1


# --- write-protect mode and the fast path (TD) ---------------------------------------------

def test_td_get_write_protects_and_the_fast_path_restores_writable_and_logs():
    vm = logging_vm(True)
    vm.write(1, 1)
    assert vm.do(GetDirtyLog(0)) == DirtyLog((1,))
    spte = spte_of(vm, 1)
    assert not is_writable_pte(spte) and is_mmu_writable_spte(spte)
    assert counted(vm, events.FAST_PF_FIXED, vm_write(1, 2)) == 1
    assert is_writable_pte(spte_of(vm, 1))
    assert vm.do(GetDirtyLog(0)) == DirtyLog((1,))


def test_fast_path_leaves_a_read_only_slot_to_the_slow_path():
    vm = Vm(False)  # (a TD has no read-only memslots: kvm_arch_has_readonly_mem)
    vm.do(MemslotAdd(0, 0, 1, MemslotFlag.READONLY, 0))
    assert vm.read(0) == Ok(0)
    assert counted(vm, events.FAST_PF_FIXED, vm_write(0, 1)) == 0
    assert vm.differential.outcome == MmioExit(0, True)
    assert not is_writable_pte(spte_of(vm, 0))


def test_fast_path_ignoring_mmu_writable_makes_a_read_only_page_writable():
    vm = Vm(False)
    vm.do(MemslotAdd(0, 0, 1, MemslotFlag.READONLY, 0))
    vm.read(0)
    with faults.injected(["fast-pf-ignores-mmu-writable"]):
        finding = vm.differential.step(vm_write(0, 1))
    assert finding is not None and finding.actual == "ok"


def _schedules(vm_factory, program, schedules, inject=()):
    """Outcome of each schedule of the final parallel: None (clean) or the finding."""
    results = {}
    for schedule in schedules:
        vm = vm_factory()
        for op in program[:-1]:
            vm.do(op)
        with faults.injected(list(inject)):
            results[schedule] = vm.differential.step(Parallel.of(program[-1], schedule))
    return results


# The get races a write on another vCPU to a logged page: in PML mode the CPU sets the
# cleared Dirty bit, in write-protect mode (a TD) the write's fast path fixes the leaf.
RACES = {
    False: [vm_write(0, 1), (GetDirtyLog(0), vm_write(0, 2, vcpu=1))],
    True: [vm_write(0, 1), GetDirtyLog(0), (GetDirtyLog(0), vm_write(0, 2, vcpu=1))],
}


@pytest.mark.parametrize("tdx", [False, True], ids=["pml", "write-protect"])
def test_get_racing_a_lockless_dirtying_write_loses_nothing(tdx):
    """Every schedule is clean; taking the bitmap after the re-arm (the order before KVM
    commit edde99ce0529) is caught by some, through the invariants."""
    def factory():
        return logging_vm(tdx, npages=1)
    schedules = range(0, 1 << 9)
    clean = _schedules(factory, RACES[tdx], schedules)
    assert all(finding is None for finding in clean.values())
    caught = _schedules(factory, RACES[tdx], schedules, ["dirty-log-rearm-before-harvest"])
    names = {f.invariant for f in caught.values() if f is not None}
    assert names and names <= {"dirty_state_logged", "dirty_log_covers_writes"}


@pytest.mark.parametrize("rival", ["fast-path", "zap"])
def test_fast_path_loses_its_cmpxchg_to_a_rival_and_retries(rival):
    """Two vCPUs fix the same write-protected leaf, or a host invalidation freezes it: the
    loser's cmpxchg fails and it retries (then finds the leaf writable, or gone)."""
    other = vm_write(0, 3) if rival == "fast-path" else HostInvalidate(0, 1)
    program = [vm_write(0, 1), GetDirtyLog(0), (other, vm_write(0, 2, vcpu=1))]
    lost = 0
    for schedule in range(0, 1 << 9):
        vm = logging_vm(True, npages=1)
        for op in program[:-1]:
            vm.do(op)
        before = vm.kvm.events[events.FAST_PF_CMPXCHG_LOST]
        vm.do(Parallel.of(program[-1], schedule))
        lost += vm.kvm.events[events.FAST_PF_CMPXCHG_LOST] - before
    assert lost > 0


# --- invariants ------------------------------------------------------------------------------

def test_writable_without_mmu_writable_is_an_invariant_violation():
    vm = logging_vm(True)
    vm.write(0, 1)
    _set_leaf(vm, 0, spte_of(vm, 0) & ~EPT_SPTE_MMU_WRITABLE)
    with pytest.raises(InvariantViolation) as error:
        vm.target.check_invariants()
    assert error.value.name == "spte_writable_invariants"


def test_a_dirty_writable_leaf_missing_from_the_log_is_an_invariant_violation():
    vm = logging_vm(False)
    vm.write(0, 1)
    vm.kvm.memslots.by_id[0].dirty.bitmap.clear()
    vm.kvm.memslots.by_id[0].dirty.written.clear()
    with pytest.raises(InvariantViolation) as error:
        vm.target.check_invariants()
    assert error.value.name == "dirty_state_logged"


def test_a_cached_writable_translation_of_a_clean_leaf_is_an_invariant_violation():
    vm = logging_vm(False)
    vm.write(0, 1)
    vm.do(GetDirtyLog(0))
    vm.read(0)
    vcpu = vm.kvm.vcpus[0]
    pfn, perms = vcpu.tlb_shared[0]
    vcpu.tlb_shared[0] = (pfn, perms | PT_WRITABLE_MASK)  # as if the get had not flushed
    with pytest.raises(InvariantViolation) as error:
        vm.target.check_invariants()
    assert error.value.name in ("dirty_state_logged", "tlb_matches_sptes")


def _set_leaf(vm: Vm, gfn: int, value: int) -> None:
    """Overwrite the 4K leaf of ``gfn`` behind the MMU's back."""
    mmu = vm.kvm.mmu
    page = mmu.root(False)
    for level in (4, 3, 2):
        page = mmu.alloc.child(page.spt[spte_index(gfn, level)])
    page.spt[spte_index(gfn, 1)] = value

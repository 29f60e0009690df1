"""The stage2 target: descriptors, the walker, break-before-make, TLBI, teardown, invariants."""

from __future__ import annotations

import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from mmufuzz.fuzz.encoding import parse_reproducer
from mmufuzz.fuzz.runner import run_program
from mmufuzz.fuzz.schedules import bounded_schedules
from mmufuzz.harness import faults
from mmufuzz.harness.ops import AccessKind, VmHeader, VmType
from mmufuzz.harness.stage2 import Stage2PkvmTarget, Stage2Target
from mmufuzz.harness.stage2.pgtable import (
    EAGAIN,
    KVM_PGTABLE_WALK_HANDLE_FAULT,
    KVM_PGTABLE_WALK_SHARED,
    kvm_pgtable_get_leaf,
    kvm_pgtable_stage2_map,
    kvm_pgtable_stage2_relax_perms,
    kvm_pgtable_stage2_split,
    kvm_pgtable_stage2_unmap,
)
from mmufuzz.harness.stage2.pte import (
    KVM_INVALID_PTE_LOCKED,
    KVM_PGTABLE_PROT_R,
    KVM_PGTABLE_PROT_W,
    KVM_PGTABLE_PROT_X,
    KVM_PTE_LEAF_ATTR_HI_S2_XN,
    KVM_PTE_LEAF_ATTR_LO_S2_AF,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R,
    KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W,
    TLBI_TTL_UNKNOWN,
    kvm_init_valid_leaf_pte,
    kvm_pgtable_stage2_pte_prot,
    kvm_pte_table,
    kvm_pte_to_pfn,
    kvm_pte_valid,
    stage2_pte_is_locked,
    stage2_set_prot_attr,
)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp.sched import run

ROOT = Path(__file__).resolve().parents[1]
RW = KVM_PGTABLE_PROT_R | KVM_PGTABLE_PROT_W


def _target(program: str, cls=Stage2Target):
    """A target after running ``program`` (text), invariants checked after every op."""
    parsed = parse_reproducer(program).program
    target = cls()
    target.reset(parsed.header)
    outcomes = []
    for op in parsed.ops:
        outcomes.append(str(target.execute(op)))
        target.check_invariants()
    return target, outcomes


def _kvm(vcpus: int = 1, cls=Stage2Target):
    target = cls()
    target.reset(VmHeader(VmType.DEFAULT, vcpus))
    return target.kvm


HUGE_SLOT = "memslot_add slot=0 base=0x200 npages=0x400 flags=host_huge host_offset=0\n"


def _read(vcpu: int, gfn: int) -> str:
    return f"access vcpu={vcpu} gpa={gfn << 12:#x} word=0 kind=read private=0\n"


# --- descriptors ---------------------------------------------------------------------------

def test_page_and_block_descriptors_differ_in_the_type_bit_only():
    attr = stage2_set_prot_attr(RW)
    page, block = kvm_init_valid_leaf_pte(0x400, attr, 3), kvm_init_valid_leaf_pte(0x400, attr, 2)
    assert page ^ block == 0b10
    assert kvm_pte_valid(block) and not kvm_pte_table(block, 2)
    assert kvm_pte_table(page, 2)  # the page encoding one level up reads as a table
    assert not kvm_pte_table(page, 3)
    assert kvm_pte_to_pfn(block) == 0x400


def test_prot_attributes_round_trip_through_s2ap_and_xn():
    attr = stage2_set_prot_attr(KVM_PGTABLE_PROT_R)
    assert attr & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_R and not attr & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    assert attr & KVM_PTE_LEAF_ATTR_HI_S2_XN and attr & KVM_PTE_LEAF_ATTR_LO_S2_AF
    for prot in (KVM_PGTABLE_PROT_R, RW, RW | KVM_PGTABLE_PROT_X):
        pte = kvm_init_valid_leaf_pte(1, stage2_set_prot_attr(prot), 3)
        assert kvm_pgtable_stage2_pte_prot(pte) == prot


def test_the_locked_value_is_invalid_and_recognised():
    assert not kvm_pte_valid(KVM_INVALID_PTE_LOCKED)
    assert stage2_pte_is_locked(KVM_INVALID_PTE_LOCKED)
    assert not stage2_pte_is_locked(kvm_init_valid_leaf_pte(1, stage2_set_prot_attr(RW), 3))


# --- the walker and its stage-2 walkers ------------------------------------------------------

def test_a_2m_map_installs_a_block_at_level_2_and_a_4k_map_a_page_at_level_3():
    kvm = _kvm()
    assert run(kvm_pgtable_stage2_map(kvm.pgt, 0x200, 512, 0x1000, RW)) == 0
    pte, level = kvm_pgtable_get_leaf(kvm.pgt, 0x2ff)
    assert level == 2 and kvm_pte_to_pfn(pte) == 0x1000
    assert run(kvm_pgtable_stage2_map(kvm.pgt, 0x5, 1, 0x77, RW)) == 0
    pte, level = kvm_pgtable_get_leaf(kvm.pgt, 0x5)
    assert level == 3 and kvm_pte_to_pfn(pte) == 0x77


def test_a_page_map_inside_a_block_breaks_it_into_a_table_holding_one_page():
    kvm = _kvm()
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x200, 512, 0x1000, KVM_PGTABLE_PROT_R))
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x203, 1, 0x1003, RW))
    _, level = kvm_pgtable_get_leaf(kvm.pgt, 0x203)
    assert level == 3
    pte, level = kvm_pgtable_get_leaf(kvm.pgt, 0x204)
    assert level == 3 and pte == 0  # the rest faults back lazily


def test_a_shared_walker_backs_off_a_locked_entry_with_eagain():
    kvm = _kvm()
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x5, 1, 0x77, KVM_PGTABLE_PROT_R))
    table = kvm.pgt.follow(kvm.pgt.follow(kvm.pgt.follow(kvm.pgt.root.ptes[0]).ptes[0]).ptes[0])
    table.ptes[5] = KVM_INVALID_PTE_LOCKED
    flags = KVM_PGTABLE_WALK_SHARED | KVM_PGTABLE_WALK_HANDLE_FAULT
    assert run(kvm_pgtable_stage2_map(kvm.pgt, 0x5, 1, 0x99, RW, flags)) == EAGAIN
    assert table.ptes[5] == KVM_INVALID_PTE_LOCKED


def test_coalescing_frees_the_unlinked_table_after_the_grace_period_only():
    kvm = _kvm()
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x203, 1, 0x1003, RW))
    old = kvm.pgt.follow(kvm.pgt.follow(kvm.pgt.follow(kvm.pgt.root.ptes[0]).ptes[0]).ptes[1])
    reader = kvm.rcu.read_lock()  # a shared walker still inside the old table
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x200, 512, 0x1000, RW, KVM_PGTABLE_WALK_SHARED))
    assert kvm_pgtable_get_leaf(kvm.pgt, 0x203)[1] == 2
    kvm.quiesce()
    assert not old.freed and old.ptes[3] != 0
    kvm.rcu.read_unlock(reader)
    kvm.quiesce()
    assert old.freed


def test_pkvm_frees_the_unlinked_table_at_once():
    kvm = _kvm(cls=Stage2PkvmTarget)
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x203, 1, 0x1003, RW))
    old = kvm.pgt.follow(kvm.pgt.follow(kvm.pgt.follow(kvm.pgt.root.ptes[0]).ptes[0]).ptes[1])
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x200, 512, 0x1000, RW))
    assert old.freed and not kvm.rcu.pending()


def test_freeing_a_table_that_a_live_entry_links_is_reachable_freed_table():
    kvm = _kvm(cls=Stage2PkvmTarget)
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x203, 1, 0x1003, RW))
    parent = kvm.pgt.follow(kvm.pgt.follow(kvm.pgt.root.ptes[0]).ptes[0])
    linked = kvm.pgt.follow(parent.ptes[1])
    with pytest.raises(InvariantViolation) as error:
        kvm.pgt.free_unlinked(linked, 2)  # still linked: a hardware walk may enter it
    assert error.value.name == "reachable_freed_table"
    assert "level 2 entry links it" in error.value.detail


def test_split_replaces_a_block_by_512_pages_with_its_permissions():
    kvm = _kvm()
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x200, 512, 0x1000, KVM_PGTABLE_PROT_R))
    run(kvm_pgtable_stage2_split(kvm.pgt, 0x200, 512))
    for gfn in (0x200, 0x3ff):
        pte, level = kvm_pgtable_get_leaf(kvm.pgt, gfn)
        assert level == 3 and kvm_pte_to_pfn(pte) == 0x1000 + gfn - 0x200
        assert kvm_pgtable_stage2_pte_prot(pte) == KVM_PGTABLE_PROT_R


def test_unmap_frees_emptied_tables_and_keeps_tables_still_in_use():
    kvm = _kvm()
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x5, 1, 0x77, RW))
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x6, 1, 0x78, RW))
    leaf_table = kvm.pgt.follow(kvm.pgt.follow(kvm.pgt.follow(kvm.pgt.root.ptes[0]).ptes[0]).ptes[0])
    run(kvm_pgtable_stage2_unmap(kvm.pgt, 0x5, 1))
    assert not leaf_table.freed and leaf_table.refcount == 2
    run(kvm_pgtable_stage2_unmap(kvm.pgt, 0x6, 1))
    assert leaf_table.freed
    assert kvm.pgt.root.refcount == 1 and kvm.pgt.root.ptes[0] == 0


def test_relax_perms_adds_permissions_in_place_and_invalidates_locally():
    kvm = _kvm(vcpus=2)
    run(kvm_pgtable_stage2_map(kvm.pgt, 0x200, 512, 0x1000, KVM_PGTABLE_PROT_R))
    for vcpu in kvm.vcpus:
        vcpu.s2_tlb[(2, 0x200)] = (0x1000, 1, 0)
    assert run(kvm_pgtable_stage2_relax_perms(kvm.pgt, kvm.vcpus[0], 0x234, RW, 0)) == 0
    pte, level = kvm_pgtable_get_leaf(kvm.pgt, 0x234)
    assert level == 2 and kvm_pgtable_stage2_pte_prot(pte) == RW
    assert not kvm.vcpus[0].s2_tlb and kvm.vcpus[1].s2_tlb  # nsh: this CPU only


# --- TLBI and the hardware model ------------------------------------------------------------------

def test_tlbi_by_ipa_honours_the_level_hint_and_unknown_means_every_level():
    kvm = _kvm()
    vcpu = kvm.vcpus[0]
    vcpu.s2_tlb = {(3, 0x201): (1, 1, 0), (2, 0x400): (2, 1, 0)}
    vcpu.tlbi_range(0x201, 1, 2)
    assert (3, 0x201) in vcpu.s2_tlb
    vcpu.tlbi_range(0x201, 1, 3)
    assert (3, 0x201) not in vcpu.s2_tlb
    vcpu.tlbi_range(0x4ff, 1, TLBI_TTL_UNKNOWN)
    assert not vcpu.s2_tlb


def test_a_tlb_holding_two_sizes_for_one_ipa_is_a_break_before_make_violation():
    kvm = _kvm()
    vcpu = kvm.vcpus[0]
    vcpu.s2_tlb = {(3, 0x201): (0x1001, 1, 0), (2, 0x200): (0x1000, 1, 0)}
    with pytest.raises(InvariantViolation) as caught:
        vcpu.s2_lookup(0x201)
    assert caught.value.name == "break_before_make"


def test_a_tlb_entry_beside_a_block_of_another_size_fails_the_invariant():
    target, _ = _target("vm type=default vcpus=1\n" + HUGE_SLOT + _read(0, 0x200))
    vcpu = target.kvm.vcpus[0]
    ((level, base),) = vcpu.s2_tlb
    assert level == 2
    vcpu.s2_tlb[(3, base + 1)] = (0, 1, 0)
    del vcpu.s2_tlb[(level, base)]
    with pytest.raises(InvariantViolation) as caught:
        target.check_invariants()
    assert caught.value.name == "break_before_make"


def test_a_hardware_walk_starts_from_its_walk_cache():
    target, _ = _target("vm type=default vcpus=1\n" + HUGE_SLOT.replace("host_huge", "")
                        + _read(0, 0x201))
    vcpu = target.kvm.vcpus[0]
    assert (3, 0x200) in vcpu.s2_walk
    vcpu.s2_walk[(3, 0x200)].ptes[1] = 0  # behind KVM's back: the cached table is used
    vcpu.s2_tlb.clear()
    assert run(vcpu.walk_s2(0x201, AccessKind.READ)) == (3, False)


# --- mmu.c paths through ops ----------------------------------------------------------------------

def test_a_fault_maps_a_block_where_the_thp_allows_and_logging_maps_pages():
    target, _ = _target("vm type=default vcpus=1\n" + HUGE_SLOT + _read(0, 0x201))
    assert kvm_pgtable_get_leaf(target.kvm.pgt, 0x201)[1] == 2
    target, _ = _target("vm type=default vcpus=1\n"
                        + HUGE_SLOT.replace("host_huge", "host_huge,dirty_log") + _read(0, 0x201))
    pte, level = kvm_pgtable_get_leaf(target.kvm.pgt, 0x201)
    assert level == 3 and not pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W  # a read maps read-only


def test_enabling_dirty_logging_write_protects_blocks_and_a_write_breaks_one_lazily():
    program = ("vm type=default vcpus=1\n" + HUGE_SLOT + _read(0, 0x201)
               + "memslot_set_flags slot=0 flags=host_huge,dirty_log\n")
    target, _ = _target(program)
    pte, level = kvm_pgtable_get_leaf(target.kvm.pgt, 0x201)
    assert level == 2 and not pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
    target, outcomes = _target(program + "access vcpu=0 gpa=0x202000 word=0 kind=write "
                               "value=0x7 private=0\nget_dirty_log slot=0\n")
    assert outcomes[-1] == "dirty_log(0x202)"
    assert kvm_pgtable_get_leaf(target.kvm.pgt, 0x202)[1] == 3
    assert kvm_pgtable_get_leaf(target.kvm.pgt, 0x201) == (0, 3)


def test_a_fault_over_a_table_coalesces_it_into_a_block():
    program = ("vm type=default vcpus=2\n" + HUGE_SLOT.replace("host_huge", "host_huge,dirty_log")
               + _read(0, 0x201) + _read(1, 0x202)
               + "memslot_set_flags slot=0 flags=host_huge\n" + _read(0, 0x203))
    target, _ = _target(program)
    assert kvm_pgtable_get_leaf(target.kvm.pgt, 0x201)[1] == 2
    assert all(not vcpu.s2_tlb.keys() - {(2, 0x200)} for vcpu in target.kvm.vcpus)


def test_the_mmu_notifier_unmaps_and_invalidates_before_the_host_moves_the_page():
    target, outcomes = _target("vm type=default vcpus=1\n" + HUGE_SLOT
                               + "access vcpu=0 gpa=0x200000 word=0 kind=write value=0x2a "
                               "private=0\nhost_invalidate base=0x200 npages=0x1\n"
                               + _read(0, 0x200))
    assert outcomes[-1] == "ok(0x2a)"
    assert kvm_pgtable_get_leaf(target.kvm.pgt, 0x200)[1] == 3  # the THP was split by the move


# --- faults: each one's mechanism, beside the regression that pins its symptom ------------------

def test_block_before_break_leaves_the_old_pages_in_the_tlb():
    program = ("vm type=default vcpus=1\n" + HUGE_SLOT.replace("host_huge", "host_huge,dirty_log")
               + _read(0, 0x201) + "memslot_set_flags slot=0 flags=host_huge\n" + _read(1, 0x202))
    program = program.replace("vcpus=1", "vcpus=2")
    with faults.injected(["stage2-block-before-break"]), \
            pytest.raises(InvariantViolation) as caught:
        _target(program)
    assert caught.value.name == "break_before_make"
    _target(program)


# --- capabilities --------------------------------------------------------------------------------

@pytest.mark.parametrize("line, reason", [
    ("accept vcpu=0 gpa=0x200000 level=4k", "op 2: accept is not supported by this target"),
    ("set_attributes base=0x200 npages=0x1 private=1",
     "op 2: set_attributes is not supported by this target"),
    ("access vcpu=0 gpa=0x200000 word=0 kind=read private=1",
     "op 2: a private access is not supported by this target (arm64 has no TDX)"),
])
def test_private_ops_are_refused_with_a_one_line_reason(line, reason):
    program = parse_reproducer("vm type=default vcpus=1\n" + HUGE_SLOT + line + "\n").program
    assert Stage2Target.capabilities.refusal(program) == reason
    tdx = parse_reproducer("vm type=tdx vcpus=1\n" + HUGE_SLOT).program
    assert Stage2Target.capabilities.refusal(tdx) == \
        "header: vm type=tdx is not supported by this target"


def test_replay_refuses_a_tdx_program_with_exit_2(tmp_path):
    path = tmp_path / "tdx.repro"
    path.write_text("vm type=tdx vcpus=1\n" + HUGE_SLOT)
    done = subprocess.run([sys.executable, "-m", "mmufuzz.fuzz.cli", "replay", str(path),
                           "--target", "stage2"], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("header: vm type=tdx is not supported by this target")


# --- parallel: every bounded schedule of racing stage-2 paths runs clean -------------------------

RACES = {
    "two faults coalescing one table": ("access vcpu=0 gpa=0x202000 word=0 kind=read private=0",
                                        ("access vcpu=1 gpa=0x203000 word=0 kind=write value=0x1 "
                                         "private=0")),
    "a fault against the notifier": ("access vcpu=0 gpa=0x202000 word=0 kind=read private=0",
                                     "host_invalidate base=0x200 npages=0x1"),
    "a fault against eager split": ("access vcpu=1 gpa=0x300000 word=0 kind=fetch private=0",
                                    "split slot=0"),
    "a coalescing recover against a memslot delete": ("recover", "memslot_delete slot=0"),
}
PREFIX = ("vm type=default vcpus=2\n" + HUGE_SLOT.replace("host_huge", "host_huge,dirty_log")
          + _read(1, 0x201) + "access vcpu=0 gpa=0x300000 word=0 kind=read private=0\n"
          + "memslot_set_flags slot=0 flags=host_huge\n")


@pytest.mark.parametrize("cls", [Stage2Target, Stage2PkvmTarget])
@pytest.mark.parametrize("race", sorted(RACES))
def test_every_bounded_schedule_of_a_race_runs_clean(race, cls):
    a, b = RACES[race]
    text = PREFIX + f"parallel a=({a}) b=({b}) schedule=0x0\n"
    program = parse_reproducer(text).program
    target = cls()
    assert run_program(program, target) is None
    # The one-preemption schedules come first: each point where one side can stop.
    schedules = list(islice(bounded_schedules(*target.taken), 48))
    assert len(schedules) == 48
    for schedule in schedules:
        variant = parse_reproducer(text.replace("schedule=0x0", f"schedule={schedule:#x}")).program
        finding = run_program(variant, target)
        assert finding is None, (hex(schedule), finding.summary(cls.name))


def test_snapshot_restore_continues_exactly_as_a_rerun():
    program = parse_reproducer(PREFIX + _read(0, 0x205) + "recover\n" + _read(1, 0x3ff)).program
    target = Stage2Target()
    target.reset(program.header)
    for op in program.ops[:4]:
        target.execute(op)
    snap = target.snapshot()
    first = [str(target.execute(op)) for op in program.ops[4:]]
    target.restore(snap)
    again = [str(target.execute(op)) for op in program.ops[4:]]
    target.check_invariants()
    assert first == again and first[-1] == "ok(0x0)"


def test_features_name_the_stage2_level_an_access_left_and_the_switches_of_a_pair():
    target, _ = _target("vm type=default vcpus=2\n" + HUGE_SLOT + _read(0, 0x201))
    assert target.features() == ["map:access:shared:2"]
    pair = parse_reproducer("vm type=default vcpus=2\nparallel a=(" + _read(0, 0x3ff).strip()
                            + ") b=(host_invalidate base=0x200 npages=0x200) schedule=0x5\n")
    target.execute(pair.program.ops[0])
    features = target.features()
    assert any(">" in f for f in features)  # parked > resumed yield points
    assert features[-1].startswith("a.map:access:shared:")

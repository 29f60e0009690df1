"""Manual dirty-log protect, initially-set bitmaps and ``clear_dirty_log`` (SEMANTICS §G).

The reference's rules first (kvm_clear_dirty_log_protect's checks, a get that
only reports, bitmaps that start full), then every model target against them,
then the mechanism the guest cannot see: with initially-set bitmaps a 2M leaf
survives the enable and the clear must write-protect it.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from mmufuzz.fuzz.encoding import decode, encode, format_program, parse_reproducer
from mmufuzz.fuzz.mutator import mutate
from mmufuzz.fuzz.runner import run_program
from mmufuzz.harness import faults
from mmufuzz.harness.ops import (EINVAL, OK, PG_LEVEL_2M, ClearDirtyLog, DirtyLog, ManualProtect,
                                 VmHeader, VmType)
from mmufuzz.harness.target import InvariantViolation, make_target
from mmufuzz.reference.model import Reference

MODEL_TARGETS = ("tdp", "shadow", "stage2")


def program(text: str, mode: str = "on"):
    return parse_reproducer(f"vm type=default vcpus=1 manual_protect={mode}\n" + text).program


def reference_outcomes(prog) -> list:
    ref = Reference(prog.header)
    return [ref.run(op) for op in prog.ops]


# A logging slot of 0x50 pages: one full word and a partial one that ends the slot.
SLOT = "memslot_add slot=0 base=0x100 npages=0x50 flags=dirty_log host_offset=0\n"


@pytest.mark.parametrize("first, npages, allowed", [
    (0x0, 0x50, True),    # the whole slot, partial last word
    (0x40, 0x10, True),   # the partial word alone, to the end
    (0x0, 0x40, True),    # one full word
    (0x0, 0x0, True),     # nothing
    (0x40, 0x0, True),    # nothing, from a word inside
    (0x50, 0x0, False),   # the end, but not a multiple of 64
    (0x10, 0x40, False),  # first not a multiple of 64
    (0x0, 0x10, False),   # npages not a multiple of 64, short of the end
    (0x0, 0x51, False),   # past the end
    (0x80, 0x0, False),   # first past the end
    (0x40, 0x40, False),  # past the end from a valid first
])
def test_clear_checks_follow_kvm_clear_dirty_log_protect(first, npages, allowed):
    prog = program(SLOT + f"clear_dirty_log slot=0 first={first:#x} npages={npages:#x}\n")
    expected = OK if allowed else EINVAL
    assert reference_outcomes(prog)[-1] == expected
    for name in MODEL_TARGETS:
        assert run_program(prog, make_target(name)) is None, name


def test_clear_of_a_missing_or_unlogged_slot_is_einval():
    prog = program("clear_dirty_log slot=0 first=0x0 npages=0x0\n"
                   "memslot_add slot=1 base=0x0 npages=0x40 flags= host_offset=0\n"
                   "clear_dirty_log slot=1 first=0x0 npages=0x40\n")
    assert reference_outcomes(prog) == [EINVAL, OK, EINVAL]


def test_manual_get_reports_until_a_clear_and_writes_after_it_are_logged_again():
    prog = program(SLOT + """\
access vcpu=0 gpa=0x101000 word=0 kind=write value=0x1 private=0
access vcpu=0 gpa=0x148000 word=0 kind=write value=0x2 private=0
get_dirty_log slot=0
get_dirty_log slot=0
clear_dirty_log slot=0 first=0x40 npages=0x10
get_dirty_log slot=0
clear_dirty_log slot=0 first=0x0 npages=0x40
get_dirty_log slot=0
access vcpu=0 gpa=0x148000 word=0 kind=write value=0x3 private=0
get_dirty_log slot=0
""")
    outcomes = reference_outcomes(prog)
    assert outcomes[3] == outcomes[4] == DirtyLog((0x101, 0x148))
    assert outcomes[6] == DirtyLog((0x101,))
    assert outcomes[8] == DirtyLog(())
    assert outcomes[10] == DirtyLog((0x148,))
    for name in MODEL_TARGETS:
        assert run_program(prog, make_target(name)) is None, name


def test_without_manual_protect_get_clears_and_clear_still_works():
    prog = program(SLOT + """\
access vcpu=0 gpa=0x101000 word=0 kind=write value=0x1 private=0
get_dirty_log slot=0
get_dirty_log slot=0
access vcpu=0 gpa=0x102000 word=0 kind=write value=0x1 private=0
clear_dirty_log slot=0 first=0x0 npages=0x50
get_dirty_log slot=0
""", mode="off")
    outcomes = reference_outcomes(prog)
    assert outcomes[2:4] == [DirtyLog((0x101,)), DirtyLog(())]
    assert outcomes[6] == DirtyLog(())
    for name in MODEL_TARGETS:
        assert run_program(prog, make_target(name)) is None, name


def test_initially_set_starts_full_on_add_and_on_enable_and_a_move_keeps_the_log():
    prog = program("""\
memslot_add slot=0 base=0x100 npages=0x3 flags=dirty_log host_offset=0
memslot_add slot=1 base=0x200 npages=0x2 flags= host_offset=0
memslot_set_flags slot=1 flags=dirty_log
get_dirty_log slot=0
get_dirty_log slot=1
clear_dirty_log slot=0 first=0x0 npages=0x3
memslot_set_flags slot=1 flags=
memslot_set_flags slot=1 flags=dirty_log
memslot_move slot=1 base=0x300
get_dirty_log slot=1
get_dirty_log slot=0
""", mode="init_set")
    outcomes = reference_outcomes(prog)
    assert outcomes[3:5] == [DirtyLog((0x100, 0x101, 0x102)), DirtyLog((0x200, 0x201))]
    assert outcomes[9:] == [DirtyLog((0x300, 0x301)), DirtyLog(())]
    for name in MODEL_TARGETS:
        assert run_program(prog, make_target(name)) is None, name


def test_a_manual_get_may_report_a_touched_gfn_and_must_keep_reporting_it():
    """A read may leave its gfn logged (make_spte maps it writable): once a manual get has
    shown it, it is in the bitmap, and the next get without a clear must show it too."""
    prog = program(SLOT + "access vcpu=0 gpa=0x101000 word=0 kind=read private=0\n")
    ref = Reference(prog.header)
    for op in prog.ops:
        ref.run(op)
    get = parse_reproducer("vm type=default vcpus=1\nget_dirty_log slot=0\n").program.ops[0]
    both = ref.copy()
    assert ref.step(get, DirtyLog(())) is None and both.step(get, DirtyLog((0x101,))) is None
    assert ref.step(get, DirtyLog((0x101,))) is None  # not shown: it may still be logged
    assert both.step(get, DirtyLog(())) is not None     # shown: it must be shown again


# --- the mechanism: initially-set keeps 2M leaves; the clear write-protects them ----------

HUGE = """\
memslot_add slot=0 base=0x200 npages=0x200 flags=host_huge host_offset=0
access vcpu=0 gpa=0x200000 word=0 kind=write value=0x1 private=0
memslot_set_flags slot=0 flags=dirty_log,host_huge
"""


def _tdp_leaf_level(target, gfn: int):
    for mirror, head, level, spte in _leaves(target):
        if not mirror and head <= gfn < head + (512 if level == PG_LEVEL_2M else 1):
            return level, spte
    return None


def _leaves(target):
    from mmufuzz.harness.tdp.invariants import take_snapshot
    return take_snapshot(target.kvm).leaves


def _run(target, prog):
    target.reset(prog.header)
    return [target.execute(op) for op in prog.ops]


@pytest.mark.parametrize("mode, huge_after_enable", [("off", False), ("init_set", True)])
def test_enable_keeps_the_2m_leaf_only_when_initially_set(mode, huge_after_enable):
    from mmufuzz.harness.tdp.spte import PT_WRITABLE_MASK
    target = make_target("tdp")
    _run(target, program(HUGE, mode))
    level, spte = _tdp_leaf_level(target, 0x200)
    assert (level == PG_LEVEL_2M) is huge_after_enable
    if huge_after_enable:
        assert spte & PT_WRITABLE_MASK  # nothing was write-protected: every bit is set
    target.check_invariants()


def test_clear_write_protects_the_2m_leaf_and_the_next_write_is_logged():
    from mmufuzz.harness.tdp.spte import PT_WRITABLE_MASK
    prog = program(HUGE + "clear_dirty_log slot=0 first=0x0 npages=0x200\n", "init_set")
    target = make_target("tdp")
    _run(target, prog)
    level, spte = _tdp_leaf_level(target, 0x3ff)
    assert not spte & PT_WRITABLE_MASK
    target.check_invariants()
    write = parse_reproducer("vm type=default vcpus=1\naccess vcpu=0 gpa=0x3ff000 word=0 "
                             "kind=write value=0x5 private=0\nget_dirty_log slot=0\n").program.ops
    assert [target.execute(op) for op in write] == [OK, DirtyLog((0x3ff,))]
    assert _tdp_leaf_level(target, 0x3ff)[0] == 1  # the write fault mapped 4K


@pytest.mark.parametrize("name", MODEL_TARGETS)
def test_the_injected_fault_loses_the_write_and_the_invariant_names_it(name):
    prog = program(HUGE + """\
clear_dirty_log slot=0 first=0x0 npages=0x200
access vcpu=0 gpa=0x3ff000 word=0 kind=write value=0x5 private=0
get_dirty_log slot=0
""", "init_set")
    assert run_program(prog, make_target(name)) is None
    with faults.injected(["clear-dirty-keeps-huge"]):
        guest_only = run_program(prog, make_target(name), invariants=False)
        checked = run_program(prog, make_target(name))
    if name != "tdp":  # the fault is x86 TDP MMU code; the others clear their own way
        assert guest_only is None and checked is None
        return
    assert guest_only.kind == "divergence" and guest_only.op_index == 5
    assert checked.invariant == "dirty_log_write_protected" and checked.op_index == 3


def test_dirty_log_write_protected_fails_on_a_writable_leaf_over_a_clear_bit():
    target = make_target("tdp")
    _run(target, program(SLOT + "access vcpu=0 gpa=0x101000 word=0 kind=write value=0x1 "
                                "private=0\n"))
    target.check_invariants()
    state = target.kvm.memslots.by_id[0].dirty
    state.bitmap.discard(0x1)  # as if a clear had cleared it and forgotten to protect
    state.written.discard(0x1)
    with pytest.raises(InvariantViolation) as error:
        target.check_invariants()
    assert error.value.name == "dirty_log_write_protected" and "gfn=0x101" in str(error.value)


# --- encodings -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(ManualProtect))
def test_the_header_mode_round_trips_through_text_and_bytes(mode):
    prog = dataclasses.replace(program(SLOT + "clear_dirty_log slot=0 first=0x40 npages=0x10\n"),
                               header=VmHeader(VmType.DEFAULT, 2, mode))
    text = format_program(prog)
    assert ("manual_protect=" in text) is (mode is not ManualProtect.OFF)
    assert parse_reproducer(text).program == prog
    assert decode(encode(prog)) == prog


def test_decoded_headers_use_every_mode_and_mutation_can_switch_it():
    modes = {decode(bytes([first])).header.manual_protect for first in range(256)}
    assert modes == set(ManualProtect)
    assert sum(decode(bytes([first, 0])).header.manual_protect is ManualProtect.OFF
               for first in range(256)) == 192
    rng = random.Random(3)
    prog = program(SLOT, "off")
    seen = {mutate(prog, rng).header.manual_protect for _ in range(300)}
    assert seen == set(ManualProtect)
    assert any(isinstance(op, ClearDirtyLog) for seed in range(200)
               for op in decode(random.Random(seed).randbytes(64)).ops)


def _writable_2m(name: str, target) -> list:
    """The writable flags of the target's 2M leaves, in its own page-table format."""
    if name == "stage2":
        from mmufuzz.harness.stage2.invariants import _BLOCK_2M, take_snapshot
        from mmufuzz.harness.stage2.pte import KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W
        return [bool(pte & KVM_PTE_LEAF_ATTR_LO_S2_S2AP_W)
                for (level, _), pte in take_snapshot(target.kvm).leaves.items()
                if level == _BLOCK_2M]
    from mmufuzz.harness.shadow.invariants import _live
    from mmufuzz.harness.shadow.spte import is_last_spte, is_shadow_present_pte, is_writable_pte
    return [is_writable_pte(spte) for sp, entries in _live(target.kvm) for _, spte in entries
            if sp.level == PG_LEVEL_2M and is_shadow_present_pte(spte)
            and is_last_spte(spte, sp.level)]


@pytest.mark.parametrize("name", ["shadow", "stage2"])
def test_other_mmus_keep_the_2m_leaf_until_a_clear_write_protects_it(name):
    """arm64's commit_memory_region and x86's shadow MMU also leave the 2M leaf writable when
    logging starts initially-set; their clears write-protect it (any page of it will do)."""
    target = make_target(name)
    _run(target, program(HUGE, "init_set"))
    assert _writable_2m(name, target) == [True]
    target.check_invariants()
    _run(target, program(HUGE + "clear_dirty_log slot=0 first=0x40 npages=0x40\n", "init_set"))
    assert _writable_2m(name, target) == [False]
    target.check_invariants()

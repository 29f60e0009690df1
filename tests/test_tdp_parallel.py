"""``parallel``: two to four ops interleaved at the yield points, for many schedules.

Each pair is replayed under many schedules from the same starting program;
every pair of outcomes must be explained by ``a;b`` or ``b;a`` and every
invariant must hold once both sides (and the RCU callbacks) are done.  The
last tests race three and four actors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_tdp_mmu import HUGE, PRIVATE, Vm

from mmufuzz.harness.ops import (
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    Accept,
    Access,
    AccessKind,
    HostInvalidate,
    MemslotAdd,
    MemslotDelete,
    MemslotFlag,
    Parallel,
    Recover,
    SetAttributes,
    Split,
    ZapAll,
)
from mmufuzz.harness.tdp import fault
from mmufuzz.harness.tdp.events import EVENTS

SCHEDULES = range(0, 1 << 9, 3)


def read(gfn, vcpu=0, private=False):
    return Access(vcpu, gfn << 12, False, 0, AccessKind.READ, None, private)


def write(gfn, value, vcpu=0, private=False):
    return Access(vcpu, gfn << 12, False, 0, AccessKind.WRITE, value, private)


def sweep(setup, a, b):
    """Run ``setup`` then ``parallel a b`` under every schedule; return the outcomes seen."""
    seen = set()
    for schedule in SCHEDULES:
        vm = setup()
        seen.add(vm.do(Parallel(a, b, schedule)))
        vm.do(read(0x200, vcpu=0))
    return seen


def shared_vm(flags=HUGE):
    vm = Vm()
    vm.do(MemslotAdd(0, 0x200, 0x400, flags, 0))
    vm.do(write(0x201, 0x5, vcpu=1))
    return vm


def test_two_vcpus_faulting_the_same_2m_range():
    outcomes = sweep(shared_vm, write(0x200, 1, vcpu=0), read(0x201, vcpu=1))
    assert len(outcomes) >= 1


@pytest.mark.parametrize("host_op", [ZapAll(), Recover(), Split(0), HostInvalidate(0x200, 1),
                                     HostInvalidate(0x201, 0x200), MemslotDelete(0)])
def test_access_against_host_work(host_op):
    sweep(shared_vm, write(0x201, 7, vcpu=0), host_op)
    sweep(lambda: shared_vm(MemslotFlag(0)), read(0x201, vcpu=0), host_op)


def test_fault_racing_an_invalidation_retries():
    stale = []
    original = fault.is_page_fault_stale

    def spy(kvm, f):
        result = original(kvm, f)
        stale.append(result)
        return result
    fault.is_page_fault_stale = spy
    try:
        sweep(lambda: shared_vm(MemslotFlag(0)), read(0x300, vcpu=0), HostInvalidate(0x300, 1))
    finally:
        fault.is_page_fault_stale = original
    assert True in stale   # some schedule made the fault retry instead of mapping


def test_memslot_add_racing_an_mmio_fault():
    def empty():
        vm = Vm()
        vm.do(read(0x300))
        return vm
    sweep(empty, read(0x300, vcpu=1), MemslotAdd(0, 0x300, 0x10, MemslotFlag(0), 0))


def test_private_access_racing_conversion_and_recover():
    def tdx():
        vm = Vm(tdx=True)
        vm.do(MemslotAdd(0, 0x200, 0x400, PRIVATE, 0))
        vm.do(SetAttributes(0x200, 0x200, True))
        vm.do(read(0x201, private=True))
        vm.do(Split(0))
        return vm
    sweep(tdx, read(0x205, private=True), SetAttributes(0x205, 1, False))
    sweep(tdx, read(0x205, private=True), Recover())


def _steps(setup, op) -> int:
    """How many yield points ``op`` passes running alone from ``setup()``'s state."""
    return sum(1 for _ in setup().kvm.run(op))


@pytest.mark.parametrize("other", [HostInvalidate(0x201, 1), ZapAll(), Split(0), Recover(),
                                   MemslotDelete(0), read(0x300, vcpu=1)],
                         ids=["host_invalidate", "zap_all", "split", "recover",
                              "memslot_delete", "access"])
def test_every_interleaving_of_two_small_ops_is_linearizable(other):
    """All 2^n schedules of n = both ops' steps: each outcome pair is a;b or b;a (Vm.do)."""
    access = write(0x201, 7, vcpu=0)
    steps = _steps(shared_vm, access) + _steps(shared_vm, other)
    assert steps <= 11, "keep the ops small: the sweep is exhaustive"
    interleavings = set()
    for schedule in range(1 << steps):
        vm = shared_vm()
        vm.do(Parallel(access, other, schedule))
        interleavings.add(tuple(vm.target.features()))
        vm.do(read(0x201, vcpu=0))
    assert len(interleavings) > 2  # the schedules really interleave the two ops differently


def test_a_pair_names_the_state_its_sides_started_from():
    """Walk depth and the largest level each side's fault may map: a race's starting point."""
    vm = Vm(tdx=True)
    vm.do(MemslotAdd(0, 0x200, 0x400, PRIVATE, 0))
    vm.do(SetAttributes(0x200, 0x200, True))
    vm.do(Parallel(read(0x400, vcpu=1), ZapAll(), 0))
    assert vm.target.pair_start == "access:shared:walk0:max2|zap_all"
    vm.do(Accept(0, 0x200000, PG_LEVEL_4K))  # a 4K table with one leaf under 0x200-0x3ff
    vm.do(Parallel(read(0x202, private=True), Accept(1, 0x203000, PG_LEVEL_4K), 0))
    assert vm.target.pair_start == "accept.4k:private:walk2:max2|access:private:walk2:max2"
    vm.do(Parallel(read(0x100), read(0x200, vcpu=1, private=True), 0))  # no slot at 0x100
    assert vm.target.pair_start == "access:private:leaf1:max2|access:shared:walk3:max0"
    # 0x400 is shared: a private access there exits, it maps nothing.
    vm.do(Parallel(read(0x400, private=True), Accept(1, 0x210000, PG_LEVEL_4K), 0))
    assert vm.target.pair_start == "accept.4k:private:leaf1:max2|access:private:walk3:max0"
    # An accept names its level: a 2M accept of a range races a fault there another way.
    vm.do(Parallel(read(0x400, private=True), Accept(1, 0x400000, PG_LEVEL_2M), 0))
    assert vm.target.pair_start == "accept.2m:private:walk3:max0|access:private:walk3:max0"


def test_sequential_ops_report_no_context_switches():
    vm = shared_vm()
    vm.do(write(0x300, 1, vcpu=0))
    vm.do(ZapAll())
    assert [f for f in vm.target.features() if f not in EVENTS.names] == []


def test_ops_report_the_mmu_state_events_they_caused():
    """What the op did to the MMU, per level: line coverage runs the same zap code for both."""
    vm = shared_vm()  # its first access mapped one 2M leaf
    mapped = vm.target.features()
    assert "spte:L2:direct:none>leaf" in mapped and "walk:absent:L4" in mapped
    vm.do(write(0x300, 1, vcpu=0))
    assert vm.target.features() == ["walk:fill:L2", "map:access:shared:2"]  # no SPTE changed
    vm.do(ZapAll())
    zapped = vm.target.features()
    assert "spte:L2:direct:leaf>none" in zapped and "spte:L4:direct:table>none" in zapped
    assert vm.target.features() == []  # reported once: the next op starts from zero
    vm.do(read(0x300, vcpu=0))
    assert "spte:L2:direct:none>leaf" in vm.target.features()


# --- more than two actors -------------------------------------------------------------

def test_a_third_actor_reaches_an_mmio_spte_installed_over_a_present_leaf(monkeypatch):
    """A fault that found no memslot is parked; a slot is added there and another vCPU's
    fault maps the gfn; the first fault resumes and installs its MMIO SPTE over the present
    leaf (tdp_mmu_map_handle_target_level with !fault->slot).  No pair of the three ops
    reaches that, under any of its bounded schedules; the three do, and run clean."""
    import itertools

    from mmufuzz.fuzz.runner import make_target, run_program
    from mmufuzz.fuzz.schedules import bounded_schedules
    from mmufuzz.harness.ops import Program, VmHeader, VmType
    from mmufuzz.harness.tdp.spte import is_shadow_present_pte

    over_present = []
    original = fault._map_target_level

    def spy(kvm, f, it):
        over_present.append(f.slot is None and is_shadow_present_pte(it.old_spte))
        return (yield from original(kvm, f, it))
    monkeypatch.setattr(fault, "_map_target_level", spy)
    header = VmHeader(VmType.DEFAULT, 2)
    sides = (read(0x200, vcpu=0), MemslotAdd(0, 0x200, 0x200, MemslotFlag(0), 0),
             read(0x200, vcpu=1))
    target = make_target("tdp")

    def reaching(sides) -> tuple:
        """(schedules, how many reach it) over the bounded schedules of ``sides``."""
        target.reset(header)
        target.execute(Parallel.of(sides, 0))
        schedules = list(bounded_schedules(*target.taken))
        reached = 0
        for schedule in schedules:
            over_present.clear()
            program = Program(header, (Parallel.of(sides, schedule), read(0x200, vcpu=0)))
            assert run_program(program, target) is None
            reached += any(over_present)
        return len(schedules), reached
    for pair in itertools.combinations(sides, 2):
        assert reaching(pair)[1] == 0
    schedules, reached = reaching(sides)
    assert schedules > 1000 and reached >= 50


def test_three_and_four_actor_programs_run_clean_and_alike_in_every_process():
    """Random decoded programs with a parallel of three or four actors, each with a few of
    its bounded schedules: zero findings, and the same outcomes, steps and switch coverage
    under another PYTHONHASHSEED (``tests/test_soak.py`` runs thousands)."""
    import subprocess
    import sys
    code = "import test_tdp_parallel as t; print(t.many_actor_digest(60))"
    here = str(Path(__file__).parent)
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env={"PYTHONHASHSEED": seed, "PYTHONPATH": here}).stdout
               for seed in ("0", "77")}
    (digest,) = digests
    programs, runs, arities, _ = digest.split()
    assert int(programs) == 60 and int(runs) >= 200 and arities == "3,4"


def many_actor_digest(count: int) -> str:
    """``programs runs arities sha``: ``count`` decoded programs with a parallel of three or
    more actors, and four bounded schedules of each such parallel, run on tdp; asserts none
    has a finding; the digest covers every outcome, step count and switch feature."""
    import dataclasses
    import hashlib
    import random

    from mmufuzz.fuzz.encoding import decode
    from mmufuzz.fuzz.runner import make_target, run_program
    from mmufuzz.fuzz.schedules import bounded_schedules

    target, digest, runs, arities, seed = make_target("tdp"), hashlib.sha256(), 0, set(), 0
    programs = 0
    while programs < count:
        seed += 1
        rng = random.Random(seed)
        program = decode(rng.randbytes(rng.randrange(300)))
        many = [i for i, op in enumerate(program.ops)
                if isinstance(op, Parallel) and len(op.sides) > 2]
        if not many:
            continue
        programs += 1
        index = many[0]
        arities.add(len(program.ops[index].sides))
        target.reset(program.header)
        for op in program.ops[:index + 1]:
            target.execute(op)
        schedules = list(bounded_schedules(*target.taken))
        variants = [program] + [program.with_ops(program.ops[:index] + (dataclasses.replace(
            program.ops[index], schedule=s),) + program.ops[index + 1:])
            for s in rng.sample(schedules, min(4, len(schedules)))]
        for variant in variants:
            runs += 1
            assert run_program(variant, target) is None, (seed, variant)
            target.reset(variant.header)
            for op in variant.ops:
                digest.update(f"{target.execute(op)}|{target.taken}|{target.features()}".encode())
    return f"{programs} {runs} {','.join(map(str, sorted(arities)))} {digest.hexdigest()}"

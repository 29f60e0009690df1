"""The differential runner: findings, signatures and the parallel oracle."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (EINVAL, Access, AccessKind, DirtyLog, FlushTlb, MemslotAdd,
                                 MemslotDelete, MemslotFlag, MmioExit, Ok, Parallel, PairOutcome,
                                 Program, VmHeader, VmType, ZapAll)
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.fuzz.corpus import injected_faults
from mmufuzz.fuzz.encoding import load_reproducer, parse_reproducer
from mmufuzz.fuzz.runner import Differential, Finding, ReferenceTarget, make_target, run_program

HEADER = VmHeader(VmType.DEFAULT, 2)
SLOT = MemslotAdd(0, 0x100, 0x10, MemslotFlag(0), 0)


def write(gpa, value, vcpu=0):
    return Access(vcpu, gpa, False, 0, AccessKind.WRITE, value, False)


def read(gpa, vcpu=0):
    return Access(vcpu, gpa, False, 0, AccessKind.READ, None, False)


class Planted(ReferenceTarget):
    """The reference with one planted mistake: ``mistake(op, outcome)`` rewrites outcomes."""

    name = "planted"

    def __init__(self, mistake=None, raise_on=None):
        self.mistake, self.raise_on = mistake, raise_on

    def execute(self, op):
        if self.raise_on is not None and isinstance(op, self.raise_on[0]):
            raise self.raise_on[1]
        outcome = super().execute(op)
        return self.mistake(op, outcome) if self.mistake else outcome


def test_reference_target_runs_clean():
    program = Program(HEADER, (SLOT, write(0x100000, 7), read(0x100000), read(0x200000)))
    assert run_program(program, ReferenceTarget()) is None


def test_wrong_value_is_a_divergence_at_that_op():
    def stale_read(op, outcome):
        return Ok(0) if isinstance(op, Access) and op.kind is AccessKind.READ else outcome

    program = Program(HEADER, (SLOT, write(0x100000, 7), read(0x100000)))
    finding = run_program(program, Planted(stale_read))
    assert finding == Finding("divergence", 2, "access", expected="ok(0x7)", actual="ok(0x0)",
                              expected_kind="ok", actual_kind="ok")


def test_invariant_violation_and_crash_are_findings():
    program = Program(HEADER, (SLOT, read(0x100000)))
    violation = Planted(raise_on=(Access, InvariantViolation("nonpresent_value", "gfn=0x100")))
    finding = run_program(program, violation)
    assert (finding.kind, finding.op_index, finding.invariant) == ("invariant", 1,
                                                                   "nonpresent_value")
    crash = run_program(program, Planted(raise_on=(Access, KeyError(3))))
    assert (crash.kind, crash.actual_kind) == ("crash", "KeyError")


def test_signature_ignores_addresses_and_values():
    a = Finding("divergence", 3, "access", "ok(0x1)", "ok(0x2)", "ok", "ok")
    b = Finding("divergence", 9, "access", "ok(0x5)", "mmio_exit(0x0, read)", "ok", "mmio_exit")
    c = Finding("divergence", 1, "access", "ok(0x7)", "ok(0x0)", "ok", "ok")
    assert a.signature == c.signature != b.signature
    assert len(a.signature) == 8 and int(a.signature, 16) >= 0


def test_signature_is_the_same_in_every_process():
    code = ("from mmufuzz.fuzz.runner import Finding;"
            "print(Finding('divergence', 0, 'access', '', '', 'ok', 'ok').signature)")
    seen = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed},
                           capture_output=True, text=True, check=True).stdout
            for seed in ("0", "1", "12345")}
    assert seen == {Finding("divergence", 0, "access", "", "", "ok", "ok").signature + "\n"}


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_parallel_pair_is_linearizable_in_either_order(order):
    par = Parallel(write(0x100000, 1, vcpu=0), read(0x100000, vcpu=1), 0)
    reads = Ok(1) if order == "ab" else Ok(0)

    def pair(op, outcome):
        return PairOutcome(outcome.a, reads) if isinstance(op, Parallel) else outcome

    program = Program(HEADER, (SLOT, par, read(0x100000)))
    assert run_program(program, Planted(pair)) is None


def test_parallel_pair_that_no_order_explains_diverges():
    par = Parallel(write(0x100000, 1, vcpu=0), read(0x100000, vcpu=1), 0)

    def impossible(op, outcome):
        return PairOutcome(outcome.a, Ok(5)) if isinstance(op, Parallel) else outcome

    finding = run_program(Program(HEADER, (SLOT, par)), Planted(impossible))
    assert (finding.kind, finding.op_index, finding.op_kind) == ("divergence", 1, "parallel")
    assert (finding.side_kind, finding.expected_kind, finding.actual_kind) == \
        ("access", "ok", "ok")


def test_a_pair_that_diverges_is_signed_by_its_side_as_if_it_ran_alone():
    """The same stale read, alone or racing a flush, is one signature; a pair whose
    other side diverges (a write that fails) is another."""
    def stale_read(op, outcome):
        if isinstance(op, Parallel):
            return PairOutcome(stale_read(op.a, outcome.a), stale_read(op.b, outcome.b))
        return Ok(0) if isinstance(op, Access) and op.kind is AccessKind.READ \
            and type(outcome) is Ok else outcome

    def failed_write(op, outcome):
        if isinstance(op, Parallel):
            return PairOutcome(failed_write(op.a, outcome.a), failed_write(op.b, outcome.b))
        return MmioExit(op.addr, True) if isinstance(op, Access) and op.value else outcome

    alone = Program(HEADER, (SLOT, write(0x100000, 7), read(0x100000)))
    paired = Program(HEADER, (SLOT, write(0x100000, 7),
                              Parallel(read(0x100000, vcpu=1), FlushTlb(0), 0)))
    other_side = Program(HEADER, (SLOT, Parallel(read(0x100000, vcpu=1),
                                                 write(0x100000, 7), 0)))
    a = run_program(alone, Planted(stale_read))
    b = run_program(paired, Planted(stale_read))
    c = run_program(other_side, Planted(failed_write))
    assert (a.op_kind, b.op_kind, c.op_kind) == ("access", "parallel", "parallel")
    assert a.signature == b.signature != c.signature
    assert c.actual_kind == "mmio_exit" and b.actual == "(ok(0x0); ok)"


class RaisesInTwoPlaces(ReferenceTarget):
    """The same exception from one helper of another module (the standard library's
    ``ipaddress``, here), reached from two functions: a read and a write path."""

    def execute(self, op):
        if isinstance(op, Access):
            return self._write(op) if op.value is not None else self._read(op)
        return super().execute(op)

    def _read(self, op):
        return ipaddress.ip_address(f"read {op.addr}")

    def _write(self, op):
        return ipaddress.ip_address(f"write {op.addr}")


def test_a_crash_or_violation_during_an_op_is_split_by_where_it_was_raised():
    """One exception class raised by one helper, reached from two functions: two sites,
    two signatures; the campaign's wrapper around the target changes nothing."""
    from mmufuzz.fuzz.worker import CampaignTarget
    on_read = run_program(Program(HEADER, (SLOT, read(0x100000))), RaisesInTwoPlaces())
    on_write = run_program(Program(HEADER, (SLOT, write(0x100000, 1))), RaisesInTwoPlaces())
    wrapped = run_program(Program(HEADER, (SLOT, read(0x100000))),
                          CampaignTarget(RaisesInTwoPlaces()))
    assert on_read.site == "ipaddress.ip_address < test_runner.RaisesInTwoPlaces._read"
    assert on_write.site == "ipaddress.ip_address < test_runner.RaisesInTwoPlaces._write"
    assert on_read.signature != on_write.signature
    assert wrapped == on_read and wrapped.signature == on_read.signature


def test_a_violation_found_by_the_checks_after_an_op_has_no_site():
    """The checker raising says nothing of which code broke the structure: no site,
    and the signature of kind, op kind and invariant name alone (as recorded before sites)."""
    class BrokenAfterRead(ReferenceTarget):
        def check_invariants(self):
            raise InvariantViolation("nonpresent_value", "gfn=0x100")

    finding = run_program(Program(HEADER, (SLOT, read(0x100000))), BrokenAfterRead())
    assert (finding.kind, finding.op_kind, finding.site) == ("invariant", "memslot_add", "")
    assert finding.signature == Finding("invariant", 0, "memslot_add",
                                        invariant="nonpresent_value").signature


def test_parallel_with_host_work_keeps_state_of_the_order_taken():
    par = Parallel(read(0x200000), ZapAll(), 3)

    def mmio(op, outcome):
        return PairOutcome(MmioExit(0x200000, False), outcome.b) if isinstance(op, Parallel) \
            else outcome

    program = Program(HEADER, (SLOT, par, write(0x100000, 2), read(0x100000)))
    assert run_program(program, Planted(mmio)) is None


def test_parallel_answered_with_a_single_outcome_diverges():
    par = Parallel(write(0x100000, 1, vcpu=0), read(0x100000, vcpu=1), 0)

    def unpaired(op, outcome):
        return outcome.a if isinstance(op, Parallel) else outcome

    finding = run_program(Program(HEADER, (SLOT, par)), Planted(unpaired))
    assert (finding.kind, finding.op_index, finding.expected_kind) == ("divergence", 1, "pair")
    assert finding.expected == "(ok; ok(0x1))" and finding.actual == "ok"


def test_commuting_parallels_keep_both_orders_of_an_earlier_race():
    """Candidates are deduplicated before the cap, so a later legal outcome is not lost."""
    text = """vm type=default vcpus=2
memslot_add slot=0 base=0x200 npages=0x1 flags=dirty_log host_offset=0
parallel a=(access vcpu=0 gpa=0x200000 word=0 kind=read private=0) b=(get_dirty_log slot=0) schedule=0x0
parallel a=(flush_tlb vcpu=0) b=(flush_tlb vcpu=1) schedule=0x0
parallel a=(flush_tlb vcpu=0) b=(flush_tlb vcpu=1) schedule=0x0
parallel a=(flush_tlb vcpu=0) b=(flush_tlb vcpu=1) schedule=0x0
get_dirty_log slot=0
"""
    program = parse_reproducer(text).program

    def read_raced_the_get(op, outcome):
        return DirtyLog((0x200,)) if op == program.ops[-1] else outcome

    assert run_program(program, Planted(read_raced_the_get)) is None


def _programs_with_faults():
    """Every seed and regression program, with the faults its header asks for."""
    root = Path(__file__).resolve().parent.parent / "corpus"
    for path in sorted(root.glob("*/*.repro")):
        repro = load_reproducer(path)
        yield path.name, repro.program, injected_faults(repro.meta.get("inject", "none"))


@pytest.mark.parametrize("target_name", ["tdp", "reference"])
def test_a_run_resumed_from_a_checkpoint_is_the_whole_run(target_name):
    """Outcomes, findings and (tdp) coverage features after a checkpoint are those of
    rerunning every op before it, on a fresh target, and one checkpoint serves many runs."""
    def step(run, op):
        """A finding or None, and what a campaign reads after the op."""
        finding = run.step(op)
        features = run.target.features() if hasattr(run.target, "features") else None
        return finding, (repr(run.outcome), features)

    def rest(run, program):
        trace = []
        for op in program.ops[run.index:]:
            finding, seen = step(run, op)
            trace.append(seen)
            if finding is not None:
                return trace, finding
        return trace, None
    resumed = 0
    for name, program, inject in _programs_with_faults():
        with faults.injected(inject):
            for index in range(len(program.ops)):
                whole = Differential(program.header, make_target(target_name))
                if any(step(whole, op)[0] for op in program.ops[:index]):
                    break  # the finding comes before: nothing after it to compare
                checkpoint = whole.checkpoint()
                expected = rest(whole, program)
                for _ in range(2):
                    run = Differential(program.header, make_target(target_name), checkpoint=checkpoint)
                    assert rest(run, program) == expected, (name, index)
                    resumed += 1
    assert resumed > 300


def test_a_pair_judged_again_from_its_checkpoint_is_judged_as_afresh():
    """The verdicts a checkpoint remembers for its pair: every schedule of a pair with
    several outcomes, run twice from one checkpoint, ends in the candidates (and the
    findings) of a run from scratch."""
    from mmufuzz.fuzz.schedules import bounded_schedules
    from mmufuzz.reference.model import Reference
    two = VmHeader(VmType.DEFAULT, 2)
    pair = Parallel(write(0x100000, 1), read(0x100000, vcpu=1), 0)
    program = Program(two, (SLOT, pair, read(0x100000)))
    whole = Differential(two, make_target("tdp"))
    assert whole.step(SLOT) is None
    checkpoint = whole.checkpoint()
    for schedule in list(bounded_schedules(12, 12))[:40]:
        variant = program.with_ops((SLOT, Parallel(pair.a, pair.b, schedule), program.ops[2]))
        fresh = Differential(two, make_target("tdp"))
        expected = [fresh.step(op) for op in variant.ops], fresh.candidates
        for _ in range(2):
            resumed = Differential(two, make_target("tdp"), checkpoint=checkpoint)
            got = [None] + [resumed.step(op) for op in variant.ops[1:]], resumed.candidates
            assert got == expected, schedule
    assert len(checkpoint.judged) >= 2  # the pair ended in more than one way
    assert all(isinstance(state, Reference) for kept in checkpoint.judged.values()
               for state in kept)


# --- more than two actors -----------------------------------------------------------

THREE = VmHeader(VmType.DEFAULT, 3)
SLOT_1 = MemslotAdd(1, 0x300, 0x1, MemslotFlag(0), 0)


def _orders_explaining(header, prefix, pair, actual) -> int:
    """How many orders of ``pair``'s sides, run one after another after ``prefix``, give
    exactly the outcomes ``actual``."""
    import itertools
    from mmufuzz.reference.model import Reference
    count = 0
    for order in itertools.permutations(range(len(pair.sides))):
        state = Reference(header)
        for op in prefix:
            state.run(op)
        count += all(state.step(pair.sides[i], actual.sides[i]) is None for i in order)
    return count


def test_three_actors_whose_outcomes_only_one_order_of_six_explains():
    """A slot added, read and deleted concurrently: the read saw the slot and the delete
    found it, so the add went first, the read second and the delete last."""
    pair = Parallel(SLOT_1, read(0x300000, vcpu=1), 0, c=MemslotDelete(1))
    run = Differential(THREE, ReferenceTarget())
    assert run.step(SLOT) is None and run.step(pair) is None
    assert run.outcome == PairOutcome(Ok(), Ok(0), Ok())
    assert _orders_explaining(THREE, (SLOT,), pair, run.outcome) == 1
    assert len(run.candidates) == 1
    # The read exited: it ran before the add or after the delete (two orders, one state).
    exits = PairOutcome(Ok(), MmioExit(0x300000, False), Ok())
    assert _orders_explaining(THREE, (SLOT,), pair, exits) == 2
    run = Differential(THREE, Planted(lambda op, o: exits if isinstance(op, Parallel) else o))
    assert run.step(SLOT) is None and run.step(pair) is None and len(run.candidates) == 1
    # No order makes the add fail: nothing else adds slot 1.  The first failing step met,
    # order a, b, c from the first candidate, names the finding.
    failed = PairOutcome(EINVAL, Ok(0), Ok())
    finding = run_program(Program(THREE, (SLOT, pair)),
                          Planted(lambda op, o: failed if isinstance(op, Parallel) else o))
    assert (finding.kind, finding.op_kind, finding.side_kind) == ("divergence", "parallel",
                                                                  "memslot_add")


def test_four_actors_keep_every_state_their_orders_leave_and_later_ops_prune_them():
    """Two writes of one word, a read and a flush: the read's value says which write it
    followed, the later read which write was last."""
    four = VmHeader(VmType.DEFAULT, 4)
    pair = Parallel.of((write(0x100000, 1), write(0x100000, 2, vcpu=1), read(0x100000, vcpu=2),
                        FlushTlb(3)), 0)
    actual = PairOutcome(Ok(), Ok(), Ok(2), Ok())
    # b;c with a before b or after c, the flush anywhere: 2 * 4 orders of the 24.
    assert _orders_explaining(four, (SLOT,), pair, actual) == 8

    def racing(op, outcome):
        return actual if isinstance(op, Parallel) else outcome
    run = Differential(four, Planted(racing))
    assert run.step(SLOT) is None and run.step(pair) is None
    assert len(run.candidates) == 2  # the word holds 2 (a first) or 1 (a last)
    program = Program(four, (SLOT, pair, read(0x100000)))

    def reading(value):
        return Planted(lambda op, o: Ok(value) if op == read(0x100000) else racing(op, o))
    for last in (2, 1):  # either candidate explains the later read
        assert run_program(program, reading(last)) is None
    finding = run_program(program, reading(0))  # neither does
    assert (finding.kind, finding.op_index) == ("divergence", 2)


def test_a_parallel_outcome_of_the_wrong_arity_is_a_divergence():
    pair = Parallel(SLOT_1, read(0x300000, vcpu=1), 0, c=MemslotDelete(1))
    finding = run_program(Program(THREE, (SLOT, pair)), Planted(
        lambda op, o: PairOutcome(o.a, o.b) if isinstance(op, Parallel) else o))
    assert (finding.kind, finding.op_kind, finding.actual_kind) == ("divergence", "parallel",
                                                                    "pair")
    assert finding.expected == "(ok; ok(0x0); ok)"

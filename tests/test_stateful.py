"""The Hypothesis engine: clean on a correct target, and it finds a planted divergence."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from mmufuzz.harness import target as harness_target
from mmufuzz.harness.ops import (OP_NAMES, Access, AccessKind, MmioExit, Parallel, Split, VmHeader,
                                 VmType)
from mmufuzz.fuzz.encoding import parse_reproducer
from mmufuzz.fuzz.runner import ReferenceTarget, run_program
from mmufuzz.fuzz.stateful import FindingError, Known, build_op, machine_for

FAST = settings(max_examples=60, stateful_step_count=25, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


class MmioWriteAsRead(ReferenceTarget):
    """Planted divergence: an MMIO exit of a write is reported as a read."""

    def execute(self, op):
        outcome = super().execute(op)
        if isinstance(outcome, MmioExit) and outcome.write:
            return MmioExit(outcome.gpa, False)
        return outcome


def test_machine_runs_clean_on_the_reference():
    run_state_machine_as_test(machine_for("reference"), settings=FAST)


class DefaultVmsWithoutSplit(ReferenceTarget):
    """A target that runs default VMs only and no ``split``, and says so."""

    capabilities = harness_target.Capabilities({VmType.DEFAULT}, set(OP_NAMES) - {Split})
    headers: list = []
    ops: list = []

    def reset(self, header):
        self.headers.append(header)
        super().reset(header)

    def execute(self, op):
        self.ops.extend((op.a, op.b) if isinstance(op, Parallel) else (op,))
        return super().execute(op)


def test_machine_draws_only_programs_its_target_can_run(monkeypatch):
    """As a campaign does, by the target's Capabilities: bench's Hypothesis baseline on
    stage2, shadow or kvm must not stop at the first TDX header."""
    monkeypatch.setitem(harness_target.TARGETS, "restricted", f"{__name__}:DefaultVmsWithoutSplit")
    run_state_machine_as_test(machine_for("restricted"), settings=FAST)
    assert DefaultVmsWithoutSplit.headers and DefaultVmsWithoutSplit.ops
    assert {h.type for h in DefaultVmsWithoutSplit.headers} == {VmType.DEFAULT}
    assert not any(isinstance(op, Split) for op in DefaultVmsWithoutSplit.ops)


def test_machine_finds_a_planted_divergence(monkeypatch):
    monkeypatch.setitem(harness_target.TARGETS, "planted", f"{__name__}:MmioWriteAsRead")
    with pytest.raises(FindingError) as caught:
        run_state_machine_as_test(machine_for("planted"),
                                  settings=settings(FAST, max_examples=500))
    error = caught.value
    assert error.finding.kind == "divergence" and error.finding.actual_kind == "mmio_exit"
    # The reported program replays to the same finding from its text alone.
    replayed = parse_reproducer(str(error).split("\n", 1)[1]).program
    assert run_program(replayed, MmioWriteAsRead()).signature == error.finding.signature


def test_known_gfns_resolve_against_the_program_so_far():
    header = VmHeader(VmType.DEFAULT, 2)
    raw = (Access, (5, Known(1), False, 0, AccessKind.WRITE, 7, False))
    op = build_op(raw, header, (0x10, 0x20))
    assert op == Access(1, 0x20 << 12, False, 0, AccessKind.WRITE, 7, False)

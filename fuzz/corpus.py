"""Reproducer files on disk: finding, replay, regression expectations.

A reproducer file is self-contained: its header comments name the target,
the injected fault and the expectation, so replaying it needs nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmufuzz.harness import faults
from mmufuzz.harness.target import TargetRefused, capabilities
from mmufuzz.fuzz.encoding import Reproducer, ReproError, format_program
from mmufuzz.fuzz.runner import Finding, make_target, run_program

DEFAULT_TARGET = "tdp"
NO_FAULT = "none"
# Header comments that describe one replay's result; a new replay writes its own.
_RESULT_META = ("finding", "signature", "expected", "actual", "result")


def reproducer_files(paths) -> list[Path]:
    """The ``*.repro`` files named by ``paths``, directories expanded in sorted order."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.rglob("*.repro")))
        else:
            files.append(path)
    return files


def injected_faults(name: str | None) -> tuple:
    """The fault names an ``inject`` value means (``none`` or empty: no fault)."""
    if not name or name == NO_FAULT:
        return ()
    return tuple(n.strip() for n in name.split(","))


@dataclass(frozen=True)
class Replay:
    """The result of replaying one reproducer."""

    repro: Reproducer
    target: str
    inject: str
    finding: Finding | None

    def report(self) -> str:
        """The reproducer with ``>>>`` at the failing op and expected vs actual."""
        meta = {k: v for k, v in self.repro.meta.items() if k not in _RESULT_META}
        meta["target"], meta["inject"] = self.target, self.inject or NO_FAULT
        if self.finding is None:
            return format_program(self.repro.program, None, meta) + "# result: clean\n"
        meta["finding"] = self.finding.summary(self.target)
        meta["signature"] = self.finding.signature
        text = format_program(self.repro.program, self.finding.op_index, meta)
        if self.finding.kind == "divergence":
            text += f"# expected: {self.finding.expected}\n# actual:   {self.finding.actual}\n"
        else:
            text += f"# {self.finding.kind}: {self.finding.actual}\n"
        return text


def replay(repro: Reproducer, target: str | None = None, inject: str | None = None) -> Replay:
    """Run a reproducer on its target (or ``target``) with its fault (or ``inject``)."""
    target = target or repro.meta.get("target", DEFAULT_TARGET)
    inject = repro.meta.get("inject", NO_FAULT) if inject is None else inject
    names = injected_faults(inject)
    system = make_target(target)
    reason = capabilities(system).refusal(repro.program)
    if reason is not None:
        raise TargetRefused(f"target {target} cannot run this program: {reason}")
    with faults.injected(names):
        finding = run_program(repro.program, system)
    return Replay(repro, target, ",".join(names) or NO_FAULT, finding)


@dataclass(frozen=True)
class RegressionCheck:
    """One way to replay a regression file and what it must give."""

    name: str
    inject: str
    diverges: bool


def regression_checks(repro: Reproducer, path: str) -> list[RegressionCheck]:
    """The replays a regression file asks for (DESIGN §5).

    ``# expect: divergence`` with ``# inject: F``: with F it must diverge with
    the recorded signature, and without any fault it must run clean.
    ``# expect: clean``: it must run clean as written.
    """
    expect = repro.meta.get("expect")
    inject = repro.meta.get("inject", NO_FAULT)
    if expect == "clean":
        return [RegressionCheck("clean", inject, False)]
    if expect != "divergence":
        raise ReproError(path, 0, "expect", f"'# expect:' must be divergence or clean, not {expect!r}")
    if not injected_faults(inject):
        return [RegressionCheck("diverges", NO_FAULT, True)]
    return [RegressionCheck(f"inject={inject}", inject, True),
            RegressionCheck("no-fault", NO_FAULT, False)]


def check_regression(repro: Reproducer, check: RegressionCheck) -> str | None:
    """Replay one regression check; return None if it holds, else the failure report."""
    result = replay(repro, inject=check.inject)
    if not check.diverges:
        if result.finding is None:
            return None
        return "expected a clean run, got a finding:\n" + result.report()
    if result.finding is None:
        return "expected a finding, the run was clean:\n" + result.report()
    recorded = repro.meta.get("signature")
    if recorded and recorded != result.finding.signature:
        return (f"expected signature {recorded}, got {result.finding.signature}:\n"
                + result.report())
    return None


"""Reproducer files on disk: finding, replay, regression expectations.

A reproducer file is self-contained: its header comments name the target,
the injected fault and the expectation, so replaying it needs nothing else.
It is also untrusted data (it arrives in bug reports and pull requests): its
``# target:`` may name only a registered target or ``reference``, never code
to import; only the command line may do that (``--target module:factory``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmufuzz.harness import faults
from mmufuzz.harness.target import TARGETS, TargetRefused, capabilities
from mmufuzz.fuzz.encoding import Reproducer, ReproError, excerpt, format_program
from mmufuzz.fuzz.runner import Finding, make_target, run_program

DEFAULT_TARGET = "tdp"
NO_FAULT = "none"
# Header comments that describe one replay's result; a new replay writes its own.
_RESULT_META = ("finding", "signature", "expected", "actual", "result")


def reproducer_files(paths) -> list[Path]:
    """The ``*.repro`` files named by ``paths``, directories expanded in sorted order.

    A directory without any is an error: a replay that checked nothing must not pass.
    """
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.rglob("*.repro"))
            if not found:
                raise ReproError(path, 0, None, "no reproducer (*.repro) in this directory")
            files.extend(found)
        else:
            files.append(path)
    return files


def injected_faults(name: str | None) -> tuple:
    """The fault names an ``inject`` value means (``none`` or empty: no fault)."""
    if not name or name == NO_FAULT:
        return ()
    return tuple(n.strip() for n in name.split(","))


def file_targets() -> list[str]:
    """The target names a file may give: the registered ones and ``reference``."""
    return sorted(TARGETS) + ["reference"]


def check_file_target(name: str, error) -> str:
    """``name`` if a file may name that target, else ``error(message)`` is raised.

    A file naming anything else (``os:abort``, a module path) is refused, never imported.
    """
    if name in file_targets():
        return name
    hint = " (code is loaded only from the command line: --target)" if ":" in name else ""
    raise error(f"unknown target {excerpt(name)}{hint}; a file may name only "
                f"{', '.join(file_targets())}")


def replay_settings(repro: Reproducer, target: str | None = None,
                    inject: str | None = None) -> tuple[str, tuple]:
    """The target and fault names a replay of ``repro`` uses, checked.

    ``target`` and ``inject`` come from the command line and win; otherwise the
    file's ``# target:`` and ``# inject:`` comments are used, and a bad one is a
    ReproError naming the file, the comment's line and the field.
    """
    if target is None:
        target = check_file_target(repro.meta.get("target", DEFAULT_TARGET),
                                   lambda message: repro.error("target", message))
    if inject is None:
        inject = repro.meta.get("inject", NO_FAULT)
        try:
            names = faults.check(injected_faults(inject))
        except faults.UnknownFault as error:
            raise repro.error("inject", str(error)) from None
    else:
        names = faults.check(injected_faults(inject))
    return target, tuple(sorted(names))


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
    """Run a reproducer on its target (or ``target``) with its fault (or ``inject``).

    A program the target cannot run raises TargetRefused (bad input, not a finding).
    """
    target, names = replay_settings(repro, target, inject)
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
    _, names = replay_settings(repro)
    inject = ",".join(names) or NO_FAULT
    if expect == "clean":
        return [RegressionCheck("clean", inject, False)]
    if expect != "divergence":
        raise ReproError(path, repro.meta_lines.get("expect", 0), "expect",
                         f"'# expect:' must be divergence or clean, not "
                         f"{excerpt(expect) if expect is not None else 'missing'}")
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


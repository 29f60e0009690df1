"""Minimization quality: what ``fuzz.minimize`` makes of a real finding, against known minima.

For each fault the raw finding of an mmufuzz campaign is minimized (child
side, :func:`minimize_one`, timed in the child) and its length compared with
the hand-written minimal reproducer in ``bench/minimal/FAULT.repro`` and, when
the project keeps one, ``corpus/regressions/FAULT.repro``.  A hand-written
minimum is only trusted after :func:`check_minimal` has replayed it: it must
fail with its fault injected and run clean without.

A fault can show several symptoms (signatures), and their minima differ:
``huge-over-table-no-flush`` has one through a TD's EPT walk cache (another
signature) beside its main one.
A minimized finding is compared with the hand minimum of its own signature when
one is known: ``FAULT.repro`` is the fault's main one, ``FAULT.SYMPTOM.repro``
those of its other signatures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mmufuzz.fuzz.atomic import write_atomic
from mmufuzz.fuzz.corpus import NO_FAULT, injected_faults, replay
from mmufuzz.fuzz.encoding import ReproError, load_reproducer
from mmufuzz.fuzz.minimize import minimize, report

MINIMAL_DIR = Path(__file__).resolve().parent / "minimal"
REGRESSIONS = MINIMAL_DIR.parent.parent / "corpus" / "regressions"


def minimize_one(emit: Callable, raw: str, target: str, inject: str, max_seconds: float,
                 output: str) -> None:
    """Minimize the reproducer at ``raw``; write the result to ``output``."""
    repro = load_reproducer(raw)
    result = minimize(repro.program, target, injected_faults(inject),
                      repro.meta.get("signature"), max_seconds=max_seconds)
    write_atomic(Path(output), report(result, target, inject))
    emit({"event": "result", "original_ops": result.original_ops,
          "ops": len(result.program.ops), "runs": result.runs, "seconds": result.seconds,
          "reproducible": result.reproducible, "flaky": result.flaky,
          "signature": result.signature})


@dataclass(frozen=True)
class KnownMinimal:
    """A hand-known minimal reproducer and whether it behaves as its header says."""

    path: Path
    ops: int
    signature: Optional[str]
    verified: bool
    problem: str = ""


def check_minimal(path: Path, target: str) -> KnownMinimal:
    """Replay ``path`` with its ``# inject:`` fault (must fail) and without (must be clean)."""
    try:
        repro = load_reproducer(path)
    except ReproError as error:
        return KnownMinimal(path, 0, None, False, str(error))
    inject = repro.meta.get("inject", NO_FAULT)
    faulty = replay(repro, target, inject).finding
    clean = replay(repro, target, NO_FAULT).finding
    problem = ("does not fail with the fault" if faulty is None
               else f"fails without the fault: {clean.summary(target)}" if clean is not None
               else "")
    return KnownMinimal(path, len(repro.program.ops), faulty.signature if faulty else None,
                        not problem, problem)


def hand_minima(fault: str) -> list:
    """The hand-written minima of ``fault``: the main one first, then one per other symptom."""
    main = MINIMAL_DIR / f"{fault}.repro"
    return ([main] if main.exists() else []) + sorted(MINIMAL_DIR.glob(f"{fault}.*.repro"))


def known_minimal(fault: str, target: str, signature: Optional[str] = None,
                  regressions: Path = REGRESSIONS) -> dict:
    """What is known about ``fault``'s minimum: the checked hand-written one, the regression's.

    The hand-written one is that of ``signature`` if one is verified to show
    it, else the fault's main one.  Computed when the report is drawn, not
    when the bench measures: these are files of the project, and replaying
    them takes milliseconds.
    """
    known = {}
    checked = [check_minimal(path, target) for path in hand_minima(fault)]
    if checked:
        hand = next((c for c in checked if c.verified and c.signature == signature), checked[0])
        known.update(hand_ops=hand.ops, hand_verified=hand.verified,
                     hand_problem=hand.problem, hand_signature=hand.signature)
    regression = regressions / f"{fault}.repro"
    if regression.exists():
        try:
            known["regression_ops"] = len(load_reproducer(regression).program.ops)
        except ReproError:
            pass
    return known


def with_known_minima(rows: list, target: str) -> list:
    """The minimization rows with the known minima and, where both exist, the ratio."""
    completed = []
    for row in rows:
        row = {**row, **known_minimal(row["fault"], target, row.get("signature"))}
        if row.get("hand_verified") and row.get("reproducible"):
            row["ratio"] = row["ops"] / row["hand_ops"]
        completed.append(row)
    return completed

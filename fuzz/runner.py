"""Differential execution of one program: reference vs target, op by op.

This is the fuzzer's hot path.  For each op the target executes and the
reference judges the outcome; the first disallowed outcome, broken invariant or
target exception ends the run with a :class:`Finding`.

The reference may allow several outcomes (SEMANTICS §B) and, for ``parallel``,
several resulting states, one per order of its sides (§H).  The runner
therefore keeps a short list of candidate reference states consistent with
everything the target did so far; outside ``parallel`` the list holds exactly
one state.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from typing import Optional

from mmufuzz.harness.ops import OUTCOME_NAMES, Parallel, PairOutcome, Program, op_name, outcome_kind
from mmufuzz.harness.target import (InvariantViolation, Target, UnknownTarget,
                            make_target as make_harness_target)
from mmufuzz.reference.model import Expect, Reference

# SEMANTICS §H: the candidate set of a parallel oracle is capped: at the 24 orders of a
# four-actor parallel, so that one parallel run from one state never loses an order.
MAX_CANDIDATES = 24
# The differential harness itself: its frames are never a finding's site.
_HARNESS_PACKAGE = __name__.rpartition(".")[0] + "."


@dataclass(frozen=True)
class Finding:
    """Why a program failed: where, what the reference allowed, what the target did.

    ``kind`` is ``divergence``, ``invariant`` or ``crash``.  ``expected_kind`` and
    ``actual_kind`` are outcome kinds (for a crash, the exception class name;
    for a ``parallel`` that diverged, those of the side that diverged, whose op
    kind is ``side_kind``).  ``site`` names the target's function that raised a
    crash or an invariant violation while the op ran (empty for a violation
    found by the checks after the op).  They make the signature
    (:attr:`signature`), which is stable across runs and minimization because
    it names no address, value or index.
    """

    kind: str
    op_index: int
    op_kind: str
    expected: str = ""
    actual: str = ""
    expected_kind: str = ""
    actual_kind: str = ""
    invariant: str = ""
    side_kind: str = ""
    site: str = ""

    @property
    def signature(self) -> str:
        """Eight hex digits of a hashlib digest (never ``hash()``: PYTHONHASHSEED).

        The digest of kind, op kind (a diverging pair's: its diverging side's),
        outcome kinds and invariant name, and the site where there is one; a
        finding without a site keeps the signature it had before sites were
        part of it (docs/campaigns.md says what a signature merges and splits).
        """
        fields = [self.kind, self.side_kind or self.op_kind, self.expected_kind,
                  self.actual_kind, self.invariant] + ([self.site] if self.site else [])
        return hashlib.sha256("|".join(fields).encode()).hexdigest()[:8]

    def summary(self, target: str) -> str:
        """One line for reports: ``divergence at op 3 (access): reference X, tdp Y``."""
        where = f"{self.kind} at op {self.op_index} ({self.op_kind})"
        if self.kind == "divergence":
            return f"{where}: reference {self.expected}, {target} {self.actual}"
        return f"{where}: {target} {self.actual}"


class ReferenceTarget:
    """The reference run as a system under test: a self-check of the pipeline."""

    name = "reference"

    def reset(self, header) -> None:
        self._ref = Reference(header)

    def execute(self, op):
        if isinstance(op, Parallel):
            return PairOutcome(*map(self._ref.run, op.sides))
        return self._ref.run(op)

    def check_invariants(self) -> None:
        """The reference has no structure to break."""

    def snapshot(self):
        return self._ref.copy()

    def restore(self, snapshot) -> None:
        self._ref = snapshot.copy()


def make_target(name: str) -> Target:
    """A registered harness target, ``reference`` (which only ``fuzz/`` may build), or an
    out-of-tree target given as ``module:factory`` (tests plant targets this way).

    ``module:factory`` imports and runs code: ``name`` must come from the command
    line or the caller's own code, never from a file (a reproducer's ``# target:``
    goes through :func:`mmufuzz.fuzz.corpus.check_file_target` first).
    """
    if name == "reference":
        return ReferenceTarget()
    if ":" in name:
        module, _, factory = name.partition(":")
        try:
            return getattr(importlib.import_module(module), factory)()
        except (ImportError, AttributeError) as error:
            raise UnknownTarget(f"cannot load target {name!r}: {error}") from None
    return make_harness_target(name)


def _judge(candidates: list, op, actual):
    """Advance every candidate state that admits ``actual``.

    Returns ``(survivors, why)``: when none survives, ``why`` is ``(expect,
    op, actual)`` of the first candidate's failing step (for a ``parallel``,
    the side that failed), for the report and the signature.
    """
    if not isinstance(op, Parallel):
        if len(candidates) == 1:
            expect = candidates[0].step(op, actual)
            return (candidates if expect is None else []), (expect, op, actual)
        survivors, first = [], None
        for state in candidates:
            expect = state.step(op, actual)
            if expect is None:
                if state not in survivors:  # two orders may converge again
                    survivors.append(state)
            elif first is None:
                first = (expect, op, actual)
        return survivors, first
    return _judge_parallel(candidates, op, actual)


def _judge_parallel(candidates: list, op: Parallel, actual):
    """Linearizability: the sides' outcomes must be explained by running them one after
    another, in some order, from some candidate (SEMANTICS §H).

    The orders are explored as a tree, side ``a`` first: an order that fails
    at its k-th side cuts every order that starts the same way, and a state
    reached by two orders is kept once.  The first failure met (in the order
    ``a, b, ...`` from the first candidate, where it can) is the one reported.
    """
    sides = op.sides
    if not isinstance(actual, PairOutcome) or len(actual.sides) != len(sides):
        trial = candidates[0].copy()
        return [], (Expect(((PairOutcome(*map(trial.run, sides)), None),)), op, actual)
    survivors, first = [], None
    for state in candidates:
        # A racing access may log its gfn before any side's turn, so a get among the
        # sides may already report it (Reference.settle): settle before as well as after.
        start = state.copy()
        start.settle(op, actual, state)
        first = _orders(start, state, tuple(range(len(sides))), True, op, actual, survivors,
                        first)
    return survivors[:MAX_CANDIDATES], first


def _orders(state, before, left: tuple, owned: bool, op: Parallel, actual, survivors: list,
            first):
    """Every order of the sides ``left`` of ``op`` from ``state``, which is this search's own
    (``owned``: a trial of an earlier side, which its last order may use up) or a
    candidate (never changed: a checkpoint's are shared); the states every side
    admitted go to ``survivors``.  Returns ``first``, or the first failure met if
    it is None.

    (A module function, not a closure of :func:`_judge_parallel`: a recursive
    closure holds itself, and every judged ``parallel`` left that cycle, and the
    states it held, to the garbage collector.)
    """
    sides, outcomes = op.sides, actual.sides
    last = len(left) - 1
    for position, index in enumerate(left):
        trial = state if owned and position == last else state.copy()
        expect = trial.step(sides[index], outcomes[index])
        if expect is not None:
            if first is None:
                first = (expect, sides[index], outcomes[index])
            continue
        # A racing fault may log its gfn between any two sides (Reference.settle).
        trial.settle(op, actual, before)
        rest = left[:position] + left[position + 1:]
        if rest:
            first = _orders(trial, before, rest, True, op, actual, survivors, first)
            continue
        if trial not in survivors:
            survivors.append(trial)
    return first


def _judge_remembered(judged: dict, candidates: list, op: Parallel, actual):
    """:func:`_judge` of the ``parallel`` at a checkpoint, whose ``candidates`` are the
    checkpoint's: the survivors of an outcome judged before are copied from ``judged``.

    Only verdicts with survivors are kept: a divergence is judged afresh, so its
    report names the very op that ran.
    """
    try:
        key = (op.sides, actual)
        kept = judged.get(key)
    except TypeError:  # an outcome that cannot be a key (a planted target's): judge it
        return _judge(candidates, op, actual)
    if kept is not None:
        return [state.copy() for state in kept], None
    survivors, why = _judge(candidates, op, actual)
    if survivors:
        judged[key] = [state.copy() for state in survivors]
    return survivors, why


@dataclass(frozen=True)
class Checkpoint:
    """A :class:`Differential` between two ops: the target's snapshot, the candidate
    reference states and the index of the next op (see :meth:`Differential.checkpoint`).

    ``judged`` remembers how the reference judged a ``parallel`` at ``index``:
    (its sides, the target's outcome) -> the surviving candidates.  Schedule
    exploration runs many variants of one pair from a checkpoint, each with
    another schedule; the reference's verdict depends on the candidates, the
    sides and the outcome only (SEMANTICS §H: any order of the sides), and
    most schedules end in an outcome an earlier variant had, so its survivors
    are copied instead of every order of the sides being run again.
    """

    target: object
    candidates: tuple
    index: int
    judged: dict = field(default_factory=dict, compare=False, repr=False)


class Differential:
    """One program's differential execution, an op at a time.

    Holds the target and the candidate reference states consistent with
    everything the target did so far.  :func:`run_program` drives it over a
    whole program; the Hypothesis engine (``fuzz.stateful``) drives it op by op.
    """

    def __init__(self, header, target: Target, *, invariants: bool = True,
                 checkpoint: Optional[Checkpoint] = None):
        """Start a run of a program with ``header``, or, with ``checkpoint``, continue one.

        Continuing is equivalent to rerunning the ops before the checkpoint, at
        the cost of a restore: schedule exploration runs many variants of one
        pair from one prefix.
        """
        self.target, self.invariants = target, invariants
        if checkpoint is None:
            target.reset(header)
            self.candidates, self.index = [Reference(header)], 0
        else:
            target.restore(checkpoint.target)
            # The checkpoint's states, copied only once an op is judged on them: the pair at
            # the checkpoint is judged on copies (its remembered verdicts, or every order of
            # its sides), which is all most schedule variants judge there.
            self.candidates, self.index = list(checkpoint.candidates), checkpoint.index
        self._borrowed = checkpoint is not None
        self._checkpoint = checkpoint
        self.outcome = None  # the target's outcome of the last op (None: it raised)

    def checkpoint(self) -> Checkpoint:
        """Where this run stands, to continue from (the target must support snapshots)."""
        return Checkpoint(self.target.snapshot(), tuple(c.copy() for c in self.candidates),
                          self.index)

    def step(self, op):
        """Run one op on the target, judge it; return a Finding or None.

        Execute, judge the outcome, then check invariants, so a broken invariant
        that also shows to the guest is reported as the divergence the user
        sees.  Only the target's exceptions become findings; an exception in the
        reference is a bug in mmufuzz and propagates.
        """
        index, self.index = self.index, self.index + 1
        self.outcome = None
        try:
            actual = self.outcome = self.target.execute(op)
        except Exception as error:
            return _failure(index, op, error, during_op=True)
        if self._checkpoint is not None and index == self._checkpoint.index and type(op) is Parallel:
            # Neither changes the states it is given: a pair is judged on copies.
            self.candidates, why = _judge_remembered(self._checkpoint.judged, self.candidates,
                                                     op, actual)
        else:
            if self._borrowed:
                self.candidates = [c.copy() for c in self.candidates]
            self.candidates, why = _judge(self.candidates, op, actual)
        self._borrowed = False
        if not self.candidates:
            expect, failed, failed_actual = why
            return Finding("divergence", index, op_name(op), expected=str(expect),
                           actual=str(actual), expected_kind=outcome_kind(expect.canonical),
                           actual_kind=OUTCOME_NAMES.get(type(failed_actual), "invalid"),
                           side_kind=op_name(failed) if failed is not op else "")
        if self.invariants:
            try:
                self.target.check_invariants()
            except Exception as error:
                return _failure(index, op, error, during_op=False)
        return None


def run_program(program: Program, target: Target, *, invariants: bool = True,
                checkpoint: Optional[Checkpoint] = None):
    """Run ``program`` on ``target`` and the reference; return the first Finding or None.

    With ``checkpoint``, taken in a run of a program with the same ops up to
    its index, only the ops from there on run.
    """
    run = Differential(program.header, target, invariants=invariants, checkpoint=checkpoint)
    step = run.step
    for op in program.ops[run.index:]:
        finding = step(op)
        if finding is not None:
            return finding
    return None


def _failure(index: int, op, error: Exception, during_op: bool) -> Finding:
    """The finding for an exception the target raised while running ``op`` (``during_op``)
    or while checking its invariants after it."""
    site = _site(error.__traceback__) if during_op else ""
    if isinstance(error, InvariantViolation):
        return Finding("invariant", index, op_name(op), actual=str(error), invariant=error.name,
                       site=site)
    return Finding("crash", index, op_name(op), actual=f"{type(error).__name__}: {error}",
                   actual_kind=type(error).__name__, site=site)


def _site(traceback) -> str:
    """Where a target raised: ``module.function`` of the innermost frame, and of the
    innermost frame of another module (the caller that reached the raising module).

    Only the target's and the reference's frames count, never mmufuzz.fuzz's (a
    campaign wraps the target, a replay does not); no line numbers, so an edit
    elsewhere in a file keeps the site.  The caller is what tells apart two bugs
    that trip one shared check (a read of a freed page from the TLB or from a walk).
    """
    frames = []
    while traceback is not None:
        module = traceback.tb_frame.f_globals.get("__name__", "?")
        if not module.startswith(_HARNESS_PACKAGE):
            frames.append((module, traceback.tb_frame.f_code.co_qualname))
        traceback = traceback.tb_next
    if not frames:
        return ""
    innermost = frames[-1]
    caller = next((f for f in reversed(frames) if f[0] != innermost[0]), None)
    return " < ".join(f"{m}.{q}" for m, q in filter(None, (innermost, caller)))

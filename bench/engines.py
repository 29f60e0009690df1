"""The engines mmufuzz's campaigns are compared with (child side).

Each runs the same differential oracle on the same target with the same fault
as a campaign does; only the way programs are chosen differs:

- ``seeds``: the shipped seeds (``corpus/seeds``), each run once as a campaign
  worker runs an input, and nothing else: what a campaign knows before it
  fuzzes at all.
- ``random``: random bytes of a random length up to the campaign's
  ``-max_len``, through the same total decoder, with no coverage feedback;
  each input runs as a campaign worker runs it (:meth:`fuzz.worker.Worker.run`,
  invariants sampled the same way).
- ``hypothesis``: the Hypothesis state machine over the op vocabulary
  (:func:`mmufuzz.fuzz.stateful.machine_for`), generation only (no shrinking, no
  example database, no deadline), seeded per run.

Each reports ``{"event": "started", "cpu": ...}`` before its first program
(its start-up ends there), then ``{"event": "finding", ...}`` at its first
finding that needs the fault (:func:`fault_needed`), with its CPU time, its
execs and the program, and exits; the parent stops it when its budget is spent.
"""

from __future__ import annotations

import random
import time
from typing import Callable, Optional

import hypothesis
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis.stateful import get_state_machine_test

from mmufuzz.harness import faults
from mmufuzz.harness.ops import Program
from mmufuzz.fuzz.campaign import MAX_LEN, CampaignConfig, seed_files
from mmufuzz.fuzz.corpus import NO_FAULT, injected_faults, replay
from mmufuzz.fuzz.encoding import Reproducer, encode, format_program, load_reproducer
from mmufuzz.fuzz.runner import Finding
from mmufuzz.fuzz.stateful import FindingError, machine_for
from mmufuzz.fuzz.worker import Worker

# Hypothesis stops on its own after max_examples; the cap must stop it first.
UNBOUNDED_EXAMPLES = 10**9


def fault_needed(program: Program, target: str, inject: str = NO_FAULT) -> bool:
    """True if ``program`` runs clean without any fault: its finding is the fault's doing.

    A finding the target also shows with no fault injected is a bug of the
    target itself, not a detection of the injected fault; it does not count.
    Nor does one that a replay with the fault (``inject``, when named) does not
    show: a crash of the harness in a campaign (a state a snapshot restore got
    wrong, say) would otherwise count as every fault found.
    """
    if inject != NO_FAULT and replay(Reproducer(program), target, inject).finding is None:
        return False
    return replay(Reproducer(program), target, NO_FAULT).finding is None


def _finding_record(finding: Finding, program: Program, target: str, **counts) -> dict:
    """The first finding: what it is, the program (so the parent can check it), CPU and counts."""
    return {"event": "finding", "signature": finding.signature,
            "summary": finding.summary(target), "repro": format_program(program),
            "cpu": time.process_time(), **counts}


def _started(emit: Callable) -> None:
    emit({"event": "started", "cpu": time.process_time()})


# A baseline stopped at its cap is asked nothing more: its last progress record says how
# many programs the budget bought.
PROGRESS_CPU_SECONDS = 1.0


class Progress:
    """Emits ``{"event": "progress", "execs", "ops", "cpu"}`` at most once a CPU second."""

    def __init__(self, emit: Callable):
        self.emit, self.due = emit, time.process_time() + PROGRESS_CPU_SECONDS

    def __call__(self, execs: int, ops: int) -> None:
        now = time.process_time()
        if now >= self.due:
            self.emit({"event": "progress", "execs": execs, "ops": ops, "cpu": now})
            self.due = now + PROGRESS_CPU_SECONDS


def _counted(emit: Callable, worker: Worker, program: Program, finding: Finding, target: str,
             inject: str) -> bool:
    """Report a finding of ``worker``'s if it needs the fault; True if it did."""
    if inject == NO_FAULT or fault_needed(program, target, inject):
        emit(_finding_record(finding, program, target, execs=worker.execs, ops=worker.ops))
        return True
    emit({"event": "fault-free finding", "signature": finding.signature})
    return False


def random_input(rng: random.Random) -> bytes:
    """The random baseline's input: random bytes of a random length up to ``-max_len``."""
    return rng.randbytes(rng.randint(1, MAX_LEN))


def random_engine(emit: Callable, target: str, inject: str, seed: int) -> None:
    """Random bytes -> decode -> differential run, until the first finding the fault causes."""
    rng = random.Random(seed)
    worker = Worker(CampaignConfig(target, inject))
    progress = Progress(emit)
    _started(emit)
    while True:
        program, finding = worker.run(random_input(rng))
        if finding is not None and _counted(emit, worker, program, finding, target, inject):
            return
        progress(worker.execs, worker.ops)


def seeds_engine(emit: Callable, target: str, inject: str, seed: int) -> None:
    """Each shipped seed once, as a campaign worker runs it; ``seed`` changes nothing."""
    programs = [load_reproducer(path).program for path in seed_files()]
    worker = Worker(CampaignConfig(target, inject))
    _started(emit)
    for program in programs:
        ran, finding = worker.run(encode(program))
        if finding is not None and _counted(emit, worker, ran, finding, target, inject):
            return
    emit({"event": "exhausted", "execs": worker.execs, "ops": worker.ops})


def _finding_in(error: BaseException) -> Optional[FindingError]:
    """The FindingError Hypothesis raised, possibly inside an exception group."""
    if isinstance(error, FindingError):
        return error
    for inner in getattr(error, "exceptions", ()):
        found = _finding_in(inner)
        if found is not None:
            return found
    return None


def counted_machine(target: str, counts: dict, progress: Callable):
    """``machine_for(target)`` that adds each example it ran to ``counts`` (execs, ops).

    ``teardown`` runs after every example, the failing one too, so the counts
    are those of a campaign worker: programs run and the ops in them.
    """
    base = machine_for(target)

    def teardown(self):
        counts["execs"] += 1
        counts["ops"] += len(getattr(self, "ops", ()))
        progress(counts["execs"], counts["ops"])
        base.teardown(self)

    return type(base.__name__, (base,), {"teardown": teardown})


def hypothesis_engine(emit: Callable, target: str, inject: str, seed: int) -> None:
    """The stateful machine's test, generate phase only, until it fails."""
    counts = {"execs": 0, "ops": 0}
    test = get_state_machine_test(counted_machine(target, counts, Progress(emit)), settings=settings(
        phases=[Phase.generate], database=None, deadline=None,
        max_examples=UNBOUNDED_EXAMPLES, suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet))
    test = hypothesis.seed(seed)(test)
    _started(emit)
    with faults.injected(injected_faults(inject)):
        try:
            test()
            emit({"event": "exhausted", **counts})
            return
        except Exception as error:  # the test fails exactly when the target does
            found = _finding_in(error)
            if found is None:
                raise
    if inject != NO_FAULT and not fault_needed(found.program, target, inject):
        # Hypothesis stops at its first failure: it found the target's own bug, not the fault.
        emit({"event": "stopped at a fault-free finding", "signature": found.finding.signature})
        return
    emit(_finding_record(found.finding, found.program, target, **counts))

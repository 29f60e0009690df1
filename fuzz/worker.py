"""One libFuzzer worker: run each input differentially, record findings, report progress.

libFuzzer owns the loop; :meth:`Worker.test_one_input` is its callback.  It
decodes the bytes (total: no input is wasted), runs the program on the target
and the reference, and on a finding either records it in the campaign
directory and carries on (under ``mmufuzz fuzz``: a finding is not a crash) or,
standalone under OSS-Fuzz/ClusterFuzzLite, raises :class:`FindingError` so the
infrastructure reports it as a crash.

Memory stays flat: the one target instance is reset per input and the
reference is rebuilt per input.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shlex
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

from mmufuzz.harness import faults
from mmufuzz.harness.ops import Access, Parallel, PairOutcome, op_name, outcome_kind
from mmufuzz.harness.target import capabilities
from mmufuzz.fuzz.campaign import CAMPAIGN_ENV, CampaignConfig, FindingStore, Layout
from mmufuzz.fuzz.atomic import write_atomic
from mmufuzz.fuzz.corpus import DEFAULT_TARGET, NO_FAULT, Replay, injected_faults
from mmufuzz.fuzz.encoding import Reproducer, decode, encode
from mmufuzz.fuzz.mutator import collisions
from mmufuzz.fuzz.opmix import OpMix
from mmufuzz.fuzz.runner import Checkpoint, Differential, Finding, make_target, run_program
from mmufuzz.fuzz.schedules import TAIL, ScheduleExplorer

HEARTBEAT_SECONDS = 1.0
# What one guest op counts for on the clock of an exec-bounded run's schedule explorer
# (about an op's cost, so that its share and per-input cap mean what they mean in seconds).
OP_SECONDS = 1e-4
_JOB_LOG = re.compile(r"fuzz-(\d+)\.log$")


class FindingError(Exception):
    """A finding surfaced as a crash, for libFuzzer setups without a campaign directory."""


class CampaignTarget:
    """The target as a campaign runs it: outcome features out, invariant checks sampled.

    Features: each op's kind (with an access's read/write/fetch, gpa/gva and
    shared/private, a parallel's two sides) and outcome kind: coverage of the
    *guest-visible* behaviour the MMU produced, which line coverage of
    ``harness/`` cannot tell apart (the same lines return ``ok`` and
    ``mmio_exit``).  A target adds its own through an optional ``features()``
    (``harness.target.Target``: the context switches of a ``parallel``, the
    MMU-state events of the op), which line coverage cannot see either; they
    are keys here, never read.  ``sink(key)`` feeds a feature to libFuzzer.
    (Consecutive (op, outcome) pairs were features too, until they were
    measured: 53% of all keys, they grew the corpus with op sequences, not MMU
    states; ``docs/levers.md``.)
    For a target that tells (``taken`` and ``pair_start``), each ``parallel``
    is noted with the steps its sides took and the state it started from (a
    feature too), for schedule exploration (:mod:`mmufuzz.fuzz.schedules`).  While
    :meth:`quiet`, ops feed nothing and their code coverage is muted
    (``muted``): a schedule variant's coverage is not its input's.

    Invariant checks cost several times an op, so a campaign checks after
    every op only on some inputs and after the last op on the others
    (:meth:`begin`); a finding is then rerun with every check, as replay does.
    """

    def __init__(self, target, sink: Optional[Callable[[str], int]] = None,
                 muted: Callable = contextlib.nullcontext):
        """``muted()``: a context in which the code coverage of what runs is not the
        input's (the hit record's :meth:`~mmufuzz.fuzz.instrument.HitRecord.muted`)."""
        self.target, self.sink, self.muted = target, sink, muted
        self.name = target.name
        self._features = getattr(target, "features", None) if sink is not None else None
        self._explorable = hasattr(target, "taken")
        self.forkable = hasattr(target, "snapshot")
        self.executed = 0
        self._check_from = 0
        # (op index, steps each side took, its start state) of each parallel
        # of this program: the candidates for schedule exploration.
        self.parallels: list = []
        self._quiet = False
        self._observed = True  # (see :meth:`unobserved`)

    def begin(self, ops: int, every_op: bool) -> None:
        """Set how the next program checks invariants: after every op, or only after its last."""
        self._check_from = 0 if every_op else ops

    def reset(self, header) -> None:
        self.target.reset(header)
        self.executed = 0
        self.parallels = []

    def snapshot(self):
        return self.target.snapshot(), self.executed

    def restore(self, snapshot) -> None:
        target, self.executed = snapshot
        self.target.restore(target)
        self.parallels = []

    @contextlib.contextmanager
    def quiet(self):
        """Run ops without feeding the sink, their code coverage muted.

        libFuzzer credits every counter hit during a callback to that
        callback's input, so the explorer's work (schedule variants and
        collisions) runs quiet: fed, the interleavings a variant reached
        would keep its input in the corpus for behaviour the input does not
        have.  (Under the hit record muted code still counts, into slots that
        are restored; atheris's calls trace all code.)
        """
        self._quiet = True
        try:
            with self.muted():
                yield
        finally:
            self._quiet = False

    @contextlib.contextmanager
    def unobserved(self):
        """Run ops whose features and ``parallel`` notes nobody reads: a schedule variant's.

        The variant runs quiet, and its pair is never offered again (its
        schedules are the explorer's own).  A target that tells (``observed``,
        ``harness.target.Target``) then skips what it makes only for them: the
        pair's start state and its context switches, a sixth of a variant's pair.
        """
        observable = hasattr(self.target, "observed")
        if observable:
            self.target.observed = False
        self._observed = False
        try:
            yield
        finally:
            self._observed = True
            if observable:
                self.target.observed = True

    def execute(self, op):
        self.executed += 1
        outcome = self.target.execute(op)
        pair = type(op) is Parallel and self._explorable and self._observed
        if pair:
            self.parallels.append((self.executed - 1, tuple(self.target.taken),
                                   self.target.pair_start))
        if self.sink is None or self._quiet:
            return outcome
        keys = [f"{_op_feature(op)}->{_outcome_feature(outcome)}"]
        if self._features is not None:
            keys += [f"target:{feature}" for feature in self._features()]
        if pair:
            keys.append(f"pair:{self.target.pair_start}")
        for key in keys:
            self.sink(key)
        return outcome

    def check_invariants(self) -> None:
        if self.executed >= self._check_from:
            self.target.check_invariants()


def _op_feature(op) -> str:
    if isinstance(op, Parallel):
        return f"parallel({','.join(map(_op_feature, op.sides))})"
    if isinstance(op, Access):
        return (f"access.{op.kind.value}.{'gva' if op.virtual else 'gpa'}"
                f"{'.private' if op.private else ''}")
    return op_name(op)


def _outcome_feature(outcome) -> str:
    if isinstance(outcome, PairOutcome):
        return f"({','.join(map(_outcome_feature, outcome.sides))})"
    try:
        return outcome_kind(outcome)
    except KeyError:
        return "invalid"


class CounterSink:
    """Maps feature keys to extra libFuzzer counters, one counter per distinct key.

    ``reserve`` and ``trace`` are atheris's counter hooks; a counter's hit
    count is bucketed by libFuzzer, so "seen once" and "seen many times in one
    input" are different features, as for branch coverage.

    Counters are reserved :data:`BLOCK` at a time.  atheris hands libFuzzer
    the counters reserved since the last exec as a module of their own, and
    libFuzzer keeps at most 4096 modules (``TracePC::Modules``, a fixed array
    that it fills past its end): a campaign that met new feature keys in more
    than 4096 execs died of a segmentation fault in libFuzzer (twice in a
    default campaign, after 45k and 17k execs).
    """

    BLOCK = 1024

    def __init__(self, reserve: Callable[[], int], trace: Callable[[int], None]):
        self.reserve, self.trace = reserve, trace
        self.counters: dict[str, int] = {}
        self._spare: list = []  # reserved, not yet given to a key (next one last)

    def __call__(self, key: str) -> None:
        counter = self.counters.get(key)
        if counter is None:
            if not self._spare:
                self._spare = [self.reserve() for _ in range(self.BLOCK)][::-1]
            counter = self.counters[key] = self._spare.pop()
        self.trace(counter)


class KnownCrashes:
    """Program prefixes that made the target raise (a livelock's step cap is one), and how.

    A target is deterministic, so a program whose ops up to the one that raised
    are those of a known crash raises there again, the same way: such a
    program is answered from memory instead of being run.  A livelocking input
    costs the target's whole step cap (tdp: 200,000 steps, a tenfold drop in a
    campaign's rate while its mutants kept coming back); its mutants mostly
    keep the prefix, and are skipped.  Only crashes: an invariant broken at an
    op is seen there only when the invariants are checked after it (sampled),
    and a divergence costs no more than any input.  Holds the newest
    :data:`CAPACITY` crashes.
    """

    CAPACITY = 256

    def __init__(self):
        self._findings: dict = {}  # (header, ops up to the raising one) -> Finding
        self._lengths: dict = {}  # prefix length -> how many known prefixes have it

    def lookup(self, program) -> Optional[Finding]:
        """The finding of a known crash whose prefix ``program`` starts with, or None."""
        for length in self._lengths:
            if length <= len(program.ops):
                finding = self._findings.get((program.header, program.ops[:length]))
                if finding is not None:
                    return finding
        return None

    def remember(self, program, finding: Optional[Finding]) -> None:
        """Keep ``finding`` of ``program``, run with invariants checked after every op.

        (A crash at an op of a run with sampled checks may hide an invariant
        broken before it, which every check would have reported instead; the
        prefix of a crash with every check passes them all, so it crashes the
        same way sampled or not.)
        """
        if finding is None or finding.kind != "crash":
            return
        key = (program.header, program.ops[:finding.op_index + 1])
        if key in self._findings:
            return
        if len(self._findings) >= self.CAPACITY:
            oldest = next(iter(self._findings))
            del self._findings[oldest]
            self._lengths[len(oldest[1])] -= 1
            if not self._lengths[len(oldest[1])]:
                del self._lengths[len(oldest[1])]
        self._findings[key] = finding
        self._lengths[len(key[1])] = self._lengths.get(len(key[1]), 0) + 1


class Worker:
    """The state of one fuzzing process: target, counters, and where findings go."""

    def __init__(self, config: CampaignConfig, layout: Optional[Layout] = None,
                 sink: Optional[CounterSink] = None, exec_bounded: bool = False,
                 muted: Callable = contextlib.nullcontext):
        """``exec_bounded``: the run stops after a number of inputs (libFuzzer's ``-runs``).

        Its schedule explorer then budgets by guest ops run instead of by
        seconds, so that with a fixed ``-seed`` the whole run is the same under
        any machine load: which variants run is all that wall-clock changes.
        ``muted()``: a context in which the code coverage of what runs is not
        the input's (the hit record's :meth:`~mmufuzz.fuzz.instrument.HitRecord.muted`);
        the explorer's work runs in it (:meth:`CampaignTarget.quiet`).
        """
        self.config, self.layout, self.sink = config, layout, sink
        self.inject = injected_faults(config.inject)
        system = make_target(config.target)
        self.target = CampaignTarget(system, sink, muted)
        # Only programs the target can run: decoded bytes are bent to its capabilities.
        allowed = capabilities(system)
        self.restrict = (lambda program: program) if allowed.everything else allowed.restrict
        self.mix = OpMix.of(allowed)  # what the mutator draws fresh ops from
        self.store = FindingStore(layout.findings) if layout else None
        self.execs = self.ops = 0
        self.crashes = KnownCrashes()
        clock = (lambda: self.ops * OP_SECONDS) if exec_bounded else time.monotonic
        self.explorer = ScheduleExplorer(clock=clock) if sink is not None else None
        self.started = time.time()
        self._next_heartbeat = 0.0

    @classmethod
    def from_environment(cls, sink=None, exec_bounded: bool = False,
                         muted: Callable = contextlib.nullcontext) -> "Worker":
        """Under ``mmufuzz fuzz`` the campaign directory is in the environment; else defaults."""
        root = os.environ.get(CAMPAIGN_ENV)
        if not root:
            return cls(CampaignConfig(DEFAULT_TARGET, NO_FAULT), None, sink, exec_bounded, muted)
        layout = Layout(Path(root))
        return cls(CampaignConfig.load(layout.config), layout, sink, exec_bounded, muted)

    def _checks_every_op(self, data: bytes) -> bool:
        """Deterministic per input, so a rerun of the same bytes makes the same choice."""
        rate = self.config.invariant_rate
        return rate >= 1 or (zlib.crc32(data) % 1000) < rate * 1000

    def run(self, data: bytes):
        """Decode and run one input; return ``(program, finding)``.

        Under coverage, the program's ``parallel`` ops are queued for
        schedule exploration, and so are its collisions if it showed a
        feature no input had before; the explorer then takes its share of time
        (:mod:`mmufuzz.fuzz.schedules`), its variants run quiet
        (:meth:`CampaignTarget.quiet`); a finding there is a variant of this
        or an earlier input, and comes back as that variant program.
        """
        program = self.restrict(decode(data))
        every_op = self._checks_every_op(data)
        with faults.injected(self.inject):
            known = len(self.sink.counters) if self.sink is not None else 0
            finding = self._run_program(program, every_op)
            if finding is None and self.explorer is not None:
                self._offer(program, data, every_op)
                if len(self.sink.counters) > known:
                    self.explorer.offer_collisions(collisions(program, TAIL),
                                                   lambda variant: self._collide(variant, every_op))
                with self.target.quiet():
                    explored = self.explorer.work()
                if explored is not None:
                    program, finding = explored
                    every_op = False  # it may come from an input that checked after its last op
            if finding is not None and not every_op:
                # Replay checks invariants after every op: report what a replay will see.
                finding = self._run_program(program, True)
        self.execs += 1
        return program, finding

    def _run_program(self, program, every_op: bool, checkpoint: Optional[Checkpoint] = None):
        """Run ``program`` (from ``checkpoint``); a known crash's prefix is not run again."""
        known = self.crashes.lookup(program)
        if known is not None:
            return known
        self.target.begin(len(program.ops), every_op)
        finding = run_program(program, self.target, checkpoint=checkpoint)
        self.ops += self.target.executed - (checkpoint.index if checkpoint else 0)
        if every_op:
            self.crashes.remember(program, finding)
        return finding

    def _offer(self, program, data: bytes, every_op: bool) -> None:
        """Queue the ``parallel`` ops of ``program`` (encoded: ``data``), which just ran."""
        self.explorer.offer(program, self.target.parallels,
                            lambda *pair: self._pair_runner(*pair, every_op),
                            random.Random(zlib.crc32(data)))

    def _collide(self, program, every_op: bool):
        """Run a collision of a new input; its pair goes to schedule exploration."""
        program = self.restrict(program)
        finding = self._run_program(program, every_op)
        if finding is None:
            self._offer(program, encode(program), every_op)
        return finding

    def _pair_runner(self, program, index: int, every_op: bool):
        """What runs the schedule variants of ``program``'s parallel at ``index``.

        Where the target can snapshot, the ops before the pair run once and
        every variant resumes from their checkpoint (a variant's prefix is
        the program's); else each variant runs whole.
        """
        checkpoint = None
        if self.target.forkable:
            run = Differential(program.header, self.target, invariants=False)
            for op in program.ops[:index]:
                if run.step(op) is not None:  # only an unsampled check could hide one
                    break
            else:
                checkpoint = run.checkpoint()
            self.ops += self.target.executed
        def run(variant):
            with self.target.unobserved():
                return self._run_program(variant, every_op, checkpoint)
        return run

    def test_one_input(self, data: bytes) -> None:
        """libFuzzer's callback."""
        program, finding = self.run(data)
        if finding is not None:
            # A finding of schedule exploration is a variant: its own bytes are its raw input.
            raw = data if program == decode(data) else encode(program)
            self.on_finding(raw, program, finding)
        if time.monotonic() >= self._next_heartbeat:
            self.heartbeat()

    def on_finding(self, data: bytes, program, finding: Finding) -> None:
        """Record the finding once per signature, or raise it where no campaign collects it."""
        if self.store is None:
            raise FindingError(self.report(program, finding))
        if not self.store.has(finding.signature):
            self.store.record(data, self.report(program, finding), finding.signature)

    def report(self, program, finding: Finding) -> str:
        """The raw finding as a reproducer: header, ``>>>`` marker, expected vs actual."""
        repro = Reproducer(program, None, {"expect": "divergence"})
        return Replay(repro, self.config.target, self.config.inject, finding).report()

    def heartbeat(self) -> None:
        """Publish this worker's counters for the campaign's progress line."""
        self._next_heartbeat = time.monotonic() + HEARTBEAT_SECONDS
        if self.layout is None:
            return
        status = {"pid": os.getpid(), "execs": self.execs, "ops": self.ops,
                  "features": len(self.sink.counters) if self.sink else 0,
                  "started": self.started, "updated": time.time()}
        write_atomic(self.layout.workers / f"{os.getpid()}.json", json.dumps(status) + "\n")

    def libfuzzer_argv(self, argv: list) -> list:
        """The argv for ``atheris.Setup``: a re-executable argv[0], one seed per libFuzzer job.

        libFuzzer's ``-jobs`` re-runs ``argv[0]`` through the shell, so it must
        be a command that starts this interpreter on this module, whatever the
        install.  All jobs get the same flags; job N (whose log is
        ``fuzz-N.log``) fuzzes with ``-seed`` plus N so they do not repeat
        each other.
        """
        if self.layout is None:
            return argv
        argv = [shlex.join([sys.executable, "-m", "mmufuzz.fuzz.fuzz_mmu"])] + argv[1:]
        job = _libfuzzer_job()
        return [f"-seed={int(a.split('=', 1)[1]) + job}" if a.startswith("-seed=") else a
                for a in argv]


def _libfuzzer_job() -> int:
    """The job number libFuzzer gave this process (its output goes to ``fuzz-N.log``)."""
    try:
        match = _JOB_LOG.search(os.readlink("/proc/self/fd/1"))
    except OSError:
        return 0
    return int(match.group(1)) if match else 0

#!/usr/bin/env python3
"""libFuzzer entry point (atheris): the OSS-Fuzz / ClusterFuzzLite fuzz target.

Standalone (``python -m mmufuzz.fuzz.fuzz_mmu [libFuzzer flags] [CORPUS...]``, or the
binary OSS-Fuzz builds from this file) it fuzzes the default target (tdp, no
fault) and reports a finding as a crash.  Started by ``mmufuzz fuzz`` (the
campaign directory is in ``$MMUFUZZ_CAMPAIGN``) it fuzzes that campaign's
target and fault, records findings and keeps going.

Coverage comes from atheris's block finder run over the branches (not the
comparisons) of ``harness`` and ``reference`` (what the program exercised in
the MMU and the model; the invariant checks and SPTE bit helpers left out)
plus one extra libFuzzer counter per feature (:class:`mmufuzz.fuzz.worker.CampaignTarget`:
op outcomes, and what the target reports of the MMU's state).  By default the
blocks, those of comprehensions and generator expressions included, count
their hits inline into a :class:`~mmufuzz.fuzz.instrument.HitRecord` handed to
libFuzzer once per input, about twice as cheap as atheris's call per block
(``docs/levers.md``); the schedule explorer's variants run with the record
muted.  ``MMUFUZZ_COVERAGE=calls`` selects atheris's own instrumentation (a
call per block, comprehensions not seen), for comparison.
The encoder, mutator and runner are not instrumented: their branches say
nothing about the system under test.  The instrumented code is cached
between processes (:mod:`mmufuzz.fuzz.instrument`), so a worker starts in a fraction
of the time instrumenting takes.

With ``MMUFUZZ_GUIDANCE=off`` in the environment (read here and nowhere else)
the worker is the campaign's *unguided ablation*: the same seeds, mutator,
schedule explorer, decoder and limits, but nothing is instrumented and the
outcome features are computed (the explorer still hears of new ones) without
ever reaching libFuzzer, so libFuzzer has no coverage at all.  Its corpus is
then the seeds alone (``-keep_seed=1``: with no coverage nothing else is ever
kept), which it mutates for as long as the campaign runs.  ``mmufuzz bench``
measures what guidance is worth against it.
"""

import contextlib
import ctypes
import itertools
import os
import sys

import atheris

from mmufuzz.fuzz.instrument import (RECORD_SUPPORTED, HitRecord, instrument_branches,
                                     reserve_counter, trace_branch)
from mmufuzz.fuzz.lifeline import hold_on

GUIDANCE_ENV = "MMUFUZZ_GUIDANCE"


def at_libfuzzer_exit(callback):
    """Call ``callback`` when libFuzzer ends the run normally (a limit reached).

    libFuzzer leaves with C ``exit()``, which skips Python's ``atexit``; a C
    exit handler still runs.  Returns the handler: the caller keeps it alive.
    """
    handler = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: callback())
    ctypes.CDLL(None).__cxa_atexit(handler, None, None)
    return handler


# Not instrumented: the invariant checks are the oracle, not the system under test, and
# whether they run after every op or only after the last is sampled per input, so their
# branches would partly reward that sample; spte.py is spte.h's bit helpers, run on every
# SPTE touched, whose few branches repeat their callers'.  Instrumenting them cost a
# quarter of the instrumented run time, for no more edges or features in 60-s campaigns.
# pgalloc.py is table-page bookkeeping: its branches are poison and double-free checks (the
# oracle again) and the scans of a table's used entries for snapshots and checkpoints.
# "record" (the default): the hit record; "calls": atheris's call per block (see the
# module's docstring).
COVERAGE_ENV = "MMUFUZZ_COVERAGE"
COVERAGE_MODES = ("record", "calls")

NOT_INSTRUMENTED = {"mmufuzz.harness.tdp.invariants", "mmufuzz.harness.tdp.pgalloc", "mmufuzz.harness.tdp.spte"}


def guided() -> bool:
    """False when the environment asks for the unguided ablation (``MMUFUZZ_GUIDANCE=off``)."""
    value = os.environ.get(GUIDANCE_ENV, "on")
    if value not in ("on", "off"):
        raise SystemExit(f"fuzz_mmu: error: {GUIDANCE_ENV}={value!r}: must be 'on' or 'off'")
    return value == "on"


def coverage_mode() -> str:
    """How blocks are counted: ``MMUFUZZ_COVERAGE``, ``record`` unless it says ``calls``
    (``calls`` also where the record's bytecode does not exist, before Python 3.11)."""
    value = os.environ.get(COVERAGE_ENV, "record")
    if value not in COVERAGE_MODES:
        raise SystemExit(f"fuzz_mmu: error: {COVERAGE_ENV}={value!r}: must be "
                         f"{' or '.join(repr(m) for m in COVERAGE_MODES)}")
    return value if RECORD_SUPPORTED else "calls"


def unguided_sink(sink_class):
    """A sink that numbers and counts features as the guided one does, and traces nothing."""
    return sink_class(itertools.count().__next__, lambda counter: None)


def main(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    hold_on()  # under ``mmufuzz fuzz``: die with the supervisor
    guidance = guided()
    record = HitRecord() if guidance and coverage_mode() == "record" else None
    instrumenting = instrument_branches({"mmufuzz.harness", "mmufuzz.reference"}, NOT_INSTRUMENTED,
                                        record=record) if guidance else contextlib.nullcontext()
    # Everything that imports harness/ or reference/ (the target too) happens in here.
    with instrumenting as cache:
        from mmufuzz.fuzz.mutator import custom_crossover, custom_mutator
        from mmufuzz.fuzz.worker import CounterSink, Worker
        # Counters come from atheris's functions as they are when called: Setup, below,
        # replaces them, and counters reserved through the pre-fuzz ones never reach libFuzzer.
        if not guidance:
            sink = unguided_sink(CounterSink)
        elif record is None:
            sink = CounterSink(reserve_counter, trace_branch)
        else:
            sink = CounterSink(record.reserve, record.hit)
        worker = Worker.from_environment(
            sink, exec_bounded=any(arg.startswith("-runs=") for arg in argv[1:]),
            **({} if record is None else {"muted": record.muted}))
    if guidance:
        print(f"INFO: instrumented modules: {cache.hits} from {cache.folder}, "
              f"{cache.misses} anew; coverage by {'calls' if record is None else 'hit record'}",
              file=sys.stderr)
    else:
        print("INFO: guidance off: no instrumentation, no features given to libFuzzer",
              file=sys.stderr)
        argv.append("-keep_seed=1")
    test_one_input = worker.test_one_input
    if record is not None:
        def test_one_input(data: bytes) -> None:
            try:
                worker.test_one_input(data)
            finally:
                record.fold()

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        return custom_mutator(data, max_size, seed, atheris.Mutate, worker.mix)

    atheris.Setup(worker.libfuzzer_argv(argv), test_one_input,
                  custom_mutator=mutate, custom_crossover=custom_crossover)
    final_heartbeat = at_libfuzzer_exit(worker.heartbeat)  # noqa: F841 (kept alive until exit)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

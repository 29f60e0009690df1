"""The throughput phase's ``coverage`` loop: a campaign worker's work under the hit record.

A module of its own, importing nothing of ``harness/`` or ``reference/`` at
its top, because instrumentation is an import hook: a module imported before
:func:`~mmufuzz.fuzz.instrument.instrument_branches` is entered runs
uninstrumented.  A campaign worker (``fuzz/fuzz_mmu.py``) enters it before it
imports anything that imports the target or the reference, and so must this
loop, or it times a cheaper program than a campaign runs (it once
instrumented ``harness/tdp`` alone: 244 functions against a worker's 371).
The measurement child (:mod:`mmufuzz.bench.child`) imports only the module
of the kind it runs, for the same reason.
"""

from __future__ import annotations

import ctypes
import time
from typing import Callable


def coverage_loop(emit: Callable, corpus: str, target: str, seconds: float) -> None:
    """The differential loop under the hit record and with the schedule explorer.

    As a ``MMUFUZZ_COVERAGE=record`` worker runs an input, without libFuzzer:
    harness and reference instrumented with the hit record (the worker's own
    exclusions), outcome features fed to its counters, one fold per input into
    a stand-in for atheris's counter array, and the explorer's variants run
    with the record muted, as in a campaign.  The explorer is exec-bounded (its
    budget counts guest ops, not seconds), so the same corpus explores the
    same variants under any load.  CPU seconds (``time.process_time``) and ops
    are split between the inputs and the explorer's variants (its ``work``,
    which runs them, is timed apart).  The result names how many modules were
    instrumented, so a report can tell it is a campaign's worth.
    """
    from mmufuzz.fuzz.fuzz_mmu import NOT_INSTRUMENTED
    from mmufuzz.fuzz.instrument import HitRecord, instrument_branches
    array = ctypes.create_string_buffer(1 << 20)
    record = HitRecord(counters=(ctypes.addressof(array), len(array)))
    with instrument_branches({"mmufuzz.harness", "mmufuzz.reference"}, NOT_INSTRUMENTED,
                             record=record) as cache:
        from mmufuzz.bench.throughput import corpus_inputs
        from mmufuzz.fuzz.campaign import CampaignConfig
        from mmufuzz.fuzz.corpus import NO_FAULT
        from mmufuzz.fuzz.worker import CounterSink, Worker
        worker = Worker(CampaignConfig(target, NO_FAULT), None,
                        CounterSink(record.reserve, record.hit), exec_bounded=True,
                        muted=record.muted)
    explorer = {"ops": 0, "cpu_seconds": 0.0}
    work = worker.explorer.work

    def timed_work():
        ops, started = worker.ops, time.process_time()
        try:
            return work()
        finally:
            explorer["cpu_seconds"] += time.process_time() - started
            explorer["ops"] += worker.ops - ops

    worker.explorer.work = timed_work
    inputs = corpus_inputs(corpus)
    if not inputs:
        raise ValueError("empty workload: the campaign left no corpus")
    execs = 0
    started = time.process_time()
    while not execs or time.process_time() - started < seconds:  # one pass at least
        for data in inputs:
            worker.run(data)
            record.fold()
        execs += len(inputs)
    cpu = time.process_time() - started
    emit({"event": "result", "execs": execs, "ops": worker.ops - explorer["ops"],
          "seconds": cpu - explorer["cpu_seconds"], "explorer_ops": explorer["ops"],
          "explorer_seconds": explorer["cpu_seconds"], "explorer_runs": worker.explorer.runs,
          "cpu_seconds": cpu, "instrumented_modules": cache.hits + cache.misses})

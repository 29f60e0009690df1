"""Throughput: guest ops/s and programs/s of the three ways mmufuzz runs a program.

All three run the same workload, the corpus a no-fault campaign built, so
their ratios say what each layer costs:

- ``replay``: the target alone (decoded programs, no reference, no invariants);
- ``differential``: what a campaign worker does per input without libFuzzer
  (decode, :func:`mmufuzz.fuzz.runner.run_program` against the reference, invariants
  sampled as campaigns sample them: :meth:`fuzz.worker.Worker.run`);
- ``coverage``: the differential loop of a campaign worker under the cheap
  coverage and with its schedule explorer (:mod:`mmufuzz.bench.coverage_loop`);
- ``campaign``: a real ``mmufuzz fuzz`` (coverage instrumentation, libFuzzer,
  mutation), read back from its ``stats.jsonl``.

A guest op is one top-level op executed (a ``parallel`` counts once), as the
campaign counts them.  The loops here are the child side; the campaign's rate
is computed from its stats by :func:`campaign_rate`.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import time
from pathlib import Path
from typing import Callable

from mmufuzz.fuzz.campaign import CampaignConfig
from mmufuzz.fuzz.corpus import NO_FAULT
from mmufuzz.fuzz.encoding import decode
from mmufuzz.fuzz.runner import make_target
from mmufuzz.fuzz.worker import Worker
from mmufuzz.harness.target import capabilities

PROFILE_TOP = 12
# Where self time goes, by package: the first prefix of the file path that matches.
PROFILE_PACKAGES = (("harness/tdp/invariants", "tdp invariant checks"),
                    ("harness/tdp/", "tdp target (MMU + hardware model)"),
                    ("harness/kvm/", "kvm target (ioctls, guest commands)"),
                    ("reference/", "reference model"),
                    ("fuzz/encoding", "decoder"),
                    ("fuzz/", "runner and worker"),
                    ("harness/", "harness (ops, faults)"))


def corpus_inputs(corpus: str) -> list:
    """The corpus files' bytes, in name order (a fixed workload)."""
    return [p.read_bytes() for p in sorted(Path(corpus).iterdir()) if p.is_file()]


def timed_loop(inputs: list, run_one: Callable, seconds: float) -> dict:
    """Run ``run_one`` over ``inputs`` round-robin for about ``seconds``; it returns ops run."""
    if not inputs:
        raise ValueError("empty workload: the campaign left no corpus")
    execs = ops = 0
    started = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        for item in inputs:
            ops += run_one(item)
        execs += len(inputs)
        elapsed = time.perf_counter() - started
    return {"event": "result", "execs": execs, "ops": ops, "seconds": elapsed}


def _replay_one(target) -> Callable:
    def run(program) -> int:
        target.reset(program.header)
        done = 0
        try:
            for op in program.ops:
                target.execute(op)
                done += 1
        except Exception:  # a crash ends the program, as it ends a differential run
            pass
        return done
    return run


def _differential_one(target: str) -> Callable:
    worker = Worker(CampaignConfig(target, NO_FAULT))

    def run(data: bytes) -> int:
        before = worker.ops
        worker.run(data)
        return worker.ops - before
    return run


def replay_loop(emit: Callable, corpus: str, target: str, seconds: float) -> None:
    """The target alone: programs decoded beforehand and bent to what the target runs, as a
    worker bends them (a target that refuses some ops, as ``kvm`` does, would otherwise
    spend the loop on programs it stops at), no reference, no invariant checks."""
    system = make_target(target)
    restrict = capabilities(system).restrict
    programs = [restrict(decode(data)) for data in corpus_inputs(corpus)]
    emit(timed_loop(programs, _replay_one(system), seconds))


def differential_loop(emit: Callable, corpus: str, target: str, seconds: float) -> None:
    """A campaign worker's per-input work, without libFuzzer and without coverage."""
    emit(timed_loop(corpus_inputs(corpus), _differential_one(target), seconds))


def profile_loop(emit: Callable, corpus: str, target: str, seconds: float) -> None:
    """The differential loop under cProfile: self time by package and the top functions."""
    inputs, run = corpus_inputs(corpus), _differential_one(target)
    profiler = cProfile.Profile()
    profiler.runcall(timed_loop, inputs, run, seconds)
    stats = pstats.Stats(profiler).stats
    total = sum(entry[2] for entry in stats.values()) or 1.0
    packages: dict = {}
    functions = []
    for (path, line, name), (_, calls, tottime, cumtime, _) in stats.items():
        where = _short_path(path)
        package = next((label for prefix, label in PROFILE_PACKAGES if where.startswith(prefix)),
                       "Python runtime and stdlib")
        packages[package] = packages.get(package, 0.0) + tottime
        functions.append((tottime, f"{where}:{line}({name})", calls, cumtime))
    functions.sort(key=lambda f: (-f[0], f[1]))
    emit({"event": "result",
          "packages": sorted(([k, v / total] for k, v in packages.items()),
                             key=lambda kv: (-kv[1], kv[0])),
          "functions": [{"function": name, "share": tottime / total, "calls": calls,
                         "cumulative_share": cumtime / total}
                        for tottime, name, calls, cumtime in functions[:PROFILE_TOP]]})


def _short_path(path: str) -> str:
    """``harness/tdp/mmu.py`` for a file of this project, the file name otherwise."""
    for root in ("harness/", "reference/", "fuzz/"):
        index = path.rfind("/" + root)
        if index >= 0:
            return path[index + 1:]
    return path.rsplit("/", 1)[-1]


def campaign_rate(stats: Path) -> dict:
    """Steady-state execs/s and ops/s of a campaign from its ``stats.jsonl``.

    Measured from the first line in which a worker had reported to the final
    line, so the start-up (imports, instrumentation, seed loading) is left out,
    as it is from the loops above.  A campaign too short to have two such
    lines (stats come every 10 s) is measured from its launch instead, and
    says so with ``with_startup``.
    """
    records = [json.loads(line) for line in Path(stats).read_text().splitlines() if line]
    running = [r for r in records if r["workers"] and r["execs"]]
    if not running:
        raise ValueError(f"{stats}: no worker ever reported")
    end = running[-1]
    start = running[0] if len(running) >= 2 else {"execs": 0, "ops": 0, "run_seconds": 0.0}
    return {"execs": end["execs"] - start["execs"], "ops": end["ops"] - start["ops"],
            "seconds": end["run_seconds"] - start["run_seconds"], "workers": end["workers"],
            "with_startup": len(running) < 2, "cov": end["cov"], "ft": end["ft"],
            "features": end["features"], "corpus": end["corpus"]}

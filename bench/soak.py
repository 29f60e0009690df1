"""The clean soak: random programs with ``parallel`` ops against the fault-free target.

A false positive costs a user more than a missed bug: a campaign that cries
wolf on correct code is switched off.  The soak measures how often the
differential oracle (linearizability of every pair included) objects to
correct code: random bytes through the campaign's decoder, as the random
baseline makes them, keeping only programs with at least one ``parallel``
op, each run with invariants checked after every op (stricter than a
campaign's sampling).  Any finding is a false positive of mmufuzz or a bug
of the target; its reproducer is kept for the reader.

:func:`soak` (the parent) gives each of ``jobs`` children (:func:`soak_one`,
seeds 1..jobs) an equal share of the programs and adds up what they report.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable

from mmufuzz.harness.ops import Parallel
from mmufuzz.fuzz.atomic import write_atomic
from mmufuzz.fuzz.encoding import decode, format_program
from mmufuzz.fuzz.runner import make_target, run_program
from mmufuzz.bench.engines import random_input
from mmufuzz.bench.procs import MeasurementFailed, run_child, run_parallel

# Reproducers a child reports in full; past these it only counts findings.
KEPT_FINDINGS = 5


def soak_one(emit: Callable, target: str, seed: int, programs: int) -> None:
    """Run ``programs`` random programs that have ``parallel`` ops; report counts and findings.

    ``ops`` counts the ops run: a program stops at its finding.
    """
    rng = random.Random(seed)
    system = make_target(target)
    run = parallel_ops = ops = findings = 0
    while run < programs:
        program = decode(random_input(rng))
        count = sum(isinstance(op, Parallel) for op in program.ops)
        if not count:
            continue
        finding = run_program(program, system)
        run, parallel_ops = run + 1, parallel_ops + count
        ops += len(program.ops) if finding is None else finding.op_index + 1
        if finding is not None:
            findings += 1
            if findings <= KEPT_FINDINGS:
                emit({"event": "finding", "signature": finding.signature,
                      "summary": finding.summary(target),
                      "reproducer": format_program(program, finding.op_index,
                                                   {"target": target, "expect": "divergence"})})
    emit({"event": "result", "programs": run, "parallel_ops": parallel_ops, "ops": ops,
          "findings": findings})


def soak(target: str, programs: int, jobs: int, out: Path) -> dict:
    """``programs`` programs over ``jobs`` children; totals, and the kept findings in ``out``."""
    shares = [programs // jobs + (seed <= programs % jobs) for seed in range(1, jobs + 1)]

    def one(seed: int) -> tuple:
        log = out / "work" / "logs" / f"soak-seed{seed}.log"
        run = run_child("soak", {"target": target, "seed": seed, "programs": shares[seed - 1]},
                        log)
        if run.returncode != 0 or not run.records or run.result()["event"] != "result":
            raise MeasurementFailed(f"soak seed {seed} failed (exit {run.returncode}): see {log}")
        return seed, run

    shutil.rmtree(out / "soak", ignore_errors=True)  # an earlier run's reproducers
    totals = {"programs": 0, "parallel_ops": 0, "ops": 0, "findings": 0, "seconds": 0.0,
              "reproducers": []}
    for seed, run in run_parallel(one, list(range(1, jobs + 1)), jobs):
        seconds, result = run.records[-1]
        for key in ("programs", "parallel_ops", "ops", "findings"):
            totals[key] += result[key]
        totals["seconds"] = max(totals["seconds"], seconds)
        for index, (_, record) in enumerate(r for r in run.records if r[1]["event"] == "finding"):
            path = out / "soak" / f"seed{seed}-{index}-{record['signature']}.repro"
            write_atomic(path, record["reproducer"])
            totals["reproducers"].append({"signature": record["signature"],
                                          "summary": record["summary"], "path": str(path)})
    return totals

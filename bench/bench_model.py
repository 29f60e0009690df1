"""Guest ops per CPU-second of the tdp model on a fixed workload, and a fingerprint of it.

The workload is the soak's generator (``decode`` of seeded random bytes, as
``tests/test_soak.py`` makes them): ``--programs`` of any kind and as many
with at least one ``parallel``, decoded before the clock starts.  Three loops
run over it, each timed in CPU seconds (``time.process_time``, so other
processes on a loaded machine cost less than they would in wall-clock time):

- ``target``: the target alone (reset, execute every op; no reference, no checks);
- ``last-check``: :func:`fuzz.runner.run_program` with invariants checked after
  the last op only (``invariants=False`` plus one check), what most campaign
  inputs do;
- ``every-check``: ``run_program`` checking invariants after every op, as the soak
  and replay do;
- ``explore``: what schedule exploration runs: for every ``parallel`` of every
  program, its first :data:`EXPLORED` bounded schedules (one preemption, then
  two), each a variant that resumes from a checkpoint before the pair and runs
  the pair and the ``TAIL`` ops after it
  (invariants after its last op).  Only the variants' ops are counted.

The fingerprint is a SHA-256 of every outcome, every ``parallel``'s step counts
and every finding of the workload: a change that only speeds the model up
leaves it as it was.  Run it on two checkouts back to back (the other one by
``PYTHONPATH=CHECKOUT``) to compare them on the same load:

    python bench/bench_model.py [--programs N] [--repeat R] [--corpus DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
from itertools import islice
from pathlib import Path

from mmufuzz.fuzz.encoding import decode
from mmufuzz.fuzz.runner import Differential, make_target, run_program
from mmufuzz.fuzz.schedules import _variants, bounded_schedules
from mmufuzz.harness.ops import Parallel

# Schedules run per ``parallel`` by the ``explore`` loop.
EXPLORED = 8


def soak_programs(count: int) -> list:
    """``count`` soak programs of any kind, then ``count`` with a ``parallel`` (seeds 0..)."""
    programs, with_parallel, seed = [], [], 0
    while len(with_parallel) < count:
        rng = random.Random(seed)
        program = decode(rng.randbytes(rng.randrange(400)))
        if len(programs) < count:
            programs.append(program)
        if any(isinstance(op, Parallel) for op in program.ops):
            with_parallel.append(program)
        seed += 1
    return programs + with_parallel


def corpus_programs(folder: str) -> list:
    """The decoded inputs of a campaign corpus, in name order."""
    return [decode(p.read_bytes()) for p in sorted(Path(folder).iterdir()) if p.is_file()]


def _target_only(target, programs, digest) -> int:
    ops = 0
    for program in programs:
        target.reset(program.header)
        for op in program.ops:
            try:
                outcome = target.execute(op)
            except Exception as error:  # a crash ends the program
                outcome = f"{type(error).__name__}: {error}"
            ops += 1
            if digest is not None:
                digest.update(repr(outcome).encode())
                if type(op) is Parallel:
                    digest.update(repr(getattr(target, "taken", None)).encode())
            if type(outcome) is str:
                break
    return ops


def _differential(target, programs, digest, every_op: bool) -> int:
    ops = 0
    for program in programs:
        finding = run_program(program, target, invariants=every_op)
        if finding is None and not every_op:
            try:
                target.check_invariants()
            except Exception as error:
                finding = f"{type(error).__name__}: {error}"
        ops += len(program.ops) if finding is None or type(finding) is str \
            else finding.op_index + 1
        if digest is not None:
            digest.update(repr(finding).encode())
    return ops


def _explore(target, programs, digest) -> int:
    ops = 0
    for program in programs:
        for index, pair in enumerate(program.ops):
            if type(pair) is not Parallel:
                continue
            run = Differential(program.header, target, invariants=False)
            if any(run.step(op) is not None for op in program.ops[:index]):
                break  # a finding before the pair: nothing after it is explored
            checkpoint = run.checkpoint()
            if run.step(pair) is not None:
                break
            for variant in islice(_variants(program, index, bounded_schedules(*target.taken)),
                                  EXPLORED):
                finding = run_program(variant, target, invariants=False, checkpoint=checkpoint)
                if finding is None:
                    try:
                        target.check_invariants()
                    except Exception as error:
                        finding = f"{type(error).__name__}: {error}"
                ops += (len(variant.ops) if finding is None or type(finding) is str
                        else finding.op_index + 1) - index
                if digest is not None:
                    digest.update(repr((finding, target.taken)).encode())
    return ops


LOOPS = {"target": _target_only,
         "last-check": lambda t, p, d: _differential(t, p, d, False),
         "every-check": lambda t, p, d: _differential(t, p, d, True),
         "explore": _explore}


def measure(programs: list, repeat: int, target_name: str = "tdp") -> dict:
    """Per loop: guest ops, CPU seconds and ops per CPU-second (best of ``repeat``); fingerprint."""
    target = make_target(target_name)
    digest = hashlib.sha256()
    results = {}
    for name, loop in LOOPS.items():
        best = None
        for attempt in range(repeat):
            started = time.process_time()
            ops = loop(target, programs, digest if attempt == 0 else None)
            seconds = time.process_time() - started
            if best is None or seconds < best[1]:
                best = (ops, seconds)
        results[name] = {"ops": best[0], "cpu_seconds": best[1], "ops_per_cpu_s": best[0] / best[1]}
    results["fingerprint"] = digest.hexdigest()[:16]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--corpus", help="a campaign corpus instead of the soak generator")
    args = parser.parse_args()
    programs = corpus_programs(args.corpus) if args.corpus else soak_programs(args.programs)
    result = measure(programs, args.repeat)
    print(f"{len(programs)} programs, fingerprint {result.pop('fingerprint')}")
    for name, row in result.items():
        print(f"  {name:12s} {row['ops']:8d} ops {row['cpu_seconds']:7.2f} CPU-s "
              f"{row['ops_per_cpu_s']:9.0f} ops/CPU-s")


if __name__ == "__main__":
    main()

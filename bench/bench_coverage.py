"""What coverage instrumentation costs, atheris's call per block against the hit record.

Three processes run the same fixed workload (``bench_model``'s soak programs,
or a campaign corpus) through the loop most campaign inputs take
(``last-check``: the differential run, invariants checked after the last op),
with ``harness`` and ``reference`` imported as a campaign worker imports them:

- ``none``: not instrumented;
- ``calls``: atheris's instrumentation, a ``_trace_branch`` call per block;
- ``record``: :class:`mmufuzz.fuzz.instrument.HitRecord`, an inline count per
  block (comprehensions' too) and one fold per program into a counter array
  standing in for atheris's.

Each reports guest ops per CPU-second (``time.process_time``; the machine's
other load costs CPU time too, so compare the rows of one run) and, in a
second, untimed pass, which blocks the workload reached.  Blocks are matched
across the processes by where they are in the source (file, function,
position and order of the instrumented instruction), as counter numbers are
not stable between processes; a block the calls reach and the record does not
is a block lost.  Blocks run only at import (module bodies) are not counted.

    python bench/bench_coverage.py [--programs N] [--corpus DIR]

``libFuzzer`` is not running here: atheris's ``_trace_branch`` then counts into
a pending list rather than the counter array, at the same call cost.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dis
import gc
import json
import subprocess
import sys
import tempfile
import time
import types
from itertools import compress, count
from pathlib import Path

import atheris

from mmufuzz.fuzz.instrument import HitRecord, instrument_branches

MODES = ("none", "calls", "record")
_MARK = "__ATHERIS_INSTRUMENTED__"


def _instrumented_code() -> list:
    """Every instrumented code object a live function holds, nested code included."""
    found, stack = [], [f.__code__ for f in gc.get_objects()
                        if isinstance(f, types.FunctionType) and _MARK in f.__code__.co_consts]
    seen = set()
    while stack:
        code = stack.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        found.append(code)
        stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return found


def block_locations(callee) -> dict:
    """counter -> (file, function, position, ordinal) of every block counted through ``callee``
    (the atheris module for calls, the record's list for a record)."""
    where = {}
    for code in _instrumented_code():
        ordinal = 0
        instructions = list(dis.get_instructions(code))
        for i, instruction in enumerate(instructions):
            if instruction.opname == "LOAD_CONST" and instruction.argval is callee:
                counter = next(x.argval for x in instructions[i + 1:]
                               if x.opname == "LOAD_CONST" and type(x.argval) is int)
                position = tuple(-1 if x is None else x for x in instruction.positions)
                where[counter] = (Path(code.co_filename).name, code.co_qualname, position,
                                  ordinal)
                ordinal += 1
    return where


def child(mode: str, programs: int, corpus: str, cache: str) -> dict:
    """One process's measurement (see the module's docstring)."""
    # For the record, a stand-in for atheris's counter array, which libFuzzer allocates.
    array = ctypes.create_string_buffer(1 << 20)
    record = (HitRecord(counters=(ctypes.addressof(array), len(array))) if mode == "record"
              else None)
    from mmufuzz.fuzz.fuzz_mmu import NOT_INSTRUMENTED
    # The target's package is imported when it is made: that too under the hook.
    with (contextlib.nullcontext() if mode == "none" else
          instrument_branches({"mmufuzz.harness", "mmufuzz.reference"}, NOT_INSTRUMENTED,
                              Path(cache), record)):
        from mmufuzz.bench import bench_model
        from mmufuzz.fuzz.runner import make_target
        target = make_target("tdp")
    workload = (bench_model.corpus_programs(corpus) if corpus
                else bench_model.soak_programs(programs))
    loop = bench_model.LOOPS["last-check"]

    def run_all(each=None) -> int:
        ops = 0
        for program in workload:
            ops += loop(target, [program], None)
            if each is not None:
                each()
            if record is not None:
                record.fold()
        return ops

    started = time.process_time()
    ops = run_all()
    seconds = time.process_time() - started
    reached = set()
    if mode == "record":
        where = block_locations(record.hits)
        run_all(lambda: reached.update(compress(count(), record.hits)))
    elif mode == "calls":
        where = block_locations(atheris)
        atheris._trace_branch = reached.add  # instrumented code looks it up on every call
        run_all()
    else:
        where = {}
    return {"mode": mode, "ops": ops, "cpu_seconds": seconds, "blocks": len(where),
            "reached": sorted(map(list, (where[c] for c in reached if c in where)))}


def compare(results: dict) -> dict:
    """Rates relative to no instrumentation, and the blocks each scheme reached that the other did not."""
    def blocks(mode: str) -> set:  # JSON made the (file, function, position, ordinal) lists
        return {(f, q, tuple(p), o) for f, q, p, o in results[mode]["reached"]}

    calls, record = blocks("calls"), blocks("record")
    base = results["none"]["ops"] / results["none"]["cpu_seconds"]
    rows = {mode: {"ops_per_cpu_s": r["ops"] / r["cpu_seconds"],
                   "slowdown": base / (r["ops"] / r["cpu_seconds"]),
                   "blocks": r["blocks"], "reached": len(r["reached"])}
            for mode, r in results.items()}
    return {"rows": rows, "lost": sorted(calls - record), "gained": sorted(record - calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=300)
    parser.add_argument("--corpus", default="")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.programs, args.corpus, args.cache)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        for mode in MODES:
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--programs",
                                   str(args.programs), "--corpus", args.corpus,
                                   "--cache", cache],
                                  capture_output=True, text=True, check=True)
            results[mode] = json.loads(done.stdout)
    summary = compare(results)
    for mode, row in summary["rows"].items():
        print(f"{mode:7s} {row['ops_per_cpu_s']:9.0f} ops/CPU-s  {row['slowdown']:5.2f}x "
              f"slower than none  blocks reached {row['reached']} of {row['blocks']}")
    print(f"blocks lost (reached by calls, not by the record): {len(summary['lost'])}")
    for block in summary["lost"]:
        print(f"  {block}")
    print(f"blocks gained (comprehensions and the like): {len(summary['gained'])}")


if __name__ == "__main__":
    main()

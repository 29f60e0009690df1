"""Soak: many random decoded programs on the tdp target, zero findings (``pytest -m slow``).

Not in CI (minutes to hours); run before a release or after touching harness/tdp:

    MMUFUZZ_SOAK=100000 python3 -m pytest -m slow tests/test_soak.py -s

Each program is ``decode`` of seeded random bytes, so a failure names a seed
that reproduces it anywhere.
"""

from __future__ import annotations

import os
import random
from concurrent.futures import ProcessPoolExecutor

import pytest

from harness.ops import Parallel
from fuzz.encoding import decode, format_program
from fuzz.runner import make_target, run_program

PROGRAMS = int(os.environ.get("MMUFUZZ_SOAK", "100000"))
CHUNK = 500


def _program(seed: int, parallel_only: bool):
    rng = random.Random(seed)
    while True:
        program = decode(rng.randbytes(rng.randrange(400)))
        if not parallel_only or any(isinstance(op, Parallel) for op in program.ops):
            return program


def _run_chunk(first: int, parallel_only: bool):
    """(programs run, ops run, the first failing seed's report or None)."""
    target, ops = make_target("tdp"), 0
    for seed in range(first, first + CHUNK):
        program = _program(seed, parallel_only)
        ops += len(program.ops)
        finding = run_program(program, target)
        if finding is not None:
            report = format_program(program, finding.op_index, {"seed": seed})
            return seed - first + 1, ops, f"{finding.summary('tdp')}\n{report}"
    return CHUNK, ops, None


@pytest.mark.slow
@pytest.mark.parametrize("parallel_only", [False, True], ids=["any", "with-parallel"])
def test_random_programs_run_clean(parallel_only):
    starts = range(0, PROGRAMS, CHUNK)
    programs = ops = 0
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for done, chunk_ops, failure in pool.map(_run_chunk, starts,
                                                 [parallel_only] * len(starts)):
            programs, ops = programs + done, ops + chunk_ops
            assert failure is None, failure
    print(f"\n{programs} programs, {ops} ops, zero findings")

"""Soak: many random decoded programs on each target, zero findings (``pytest -m slow``).

Not in CI (minutes to hours); run before a release or after touching a target:

    MMUFUZZ_SOAK=100000 python3 -m pytest -m slow tests/test_soak.py -s

Each program is ``decode`` of seeded random bytes, so a failure names a seed
that reproduces it anywhere.  The ``explored`` mode also reruns each program
with some of every ``parallel``'s bounded schedules (:mod:`mmufuzz.fuzz.schedules`),
as a campaign's schedule exploration does: a variant counts as a program.  The
``many-actors`` mode does the same with programs that have a ``parallel`` of three
or four actors.
"""

from __future__ import annotations

import dataclasses
import os
import random
from concurrent.futures import ProcessPoolExecutor

import pytest

from mmufuzz.harness.ops import Parallel
from mmufuzz.fuzz.encoding import decode, format_program
from mmufuzz.fuzz.runner import make_target, run_program
from mmufuzz.fuzz.schedules import bounded_schedules
from mmufuzz.harness.target import capabilities

PROGRAMS = int(os.environ.get("MMUFUZZ_SOAK", "100000"))
CHUNK = 500
EXPLORED_PER_PARALLEL = 16  # bounded schedules tried per parallel in the explored mode


def _program(seed: int, mode: str):
    """The first decoded program of ``seed``'s bytes that ``mode`` keeps: any program, one
    with a ``parallel``, or (``many-actors``) one with a ``parallel`` of three or four."""
    rng = random.Random(seed)
    least = {"any": 0, "many-actors": 3}.get(mode, 2)
    while True:
        program = decode(rng.randbytes(rng.randrange(400)))
        if not least or any(isinstance(op, Parallel) and len(op.sides) >= least
                            for op in program.ops):
            return program


def _variants(program, target, rng: random.Random):
    """``program`` with each parallel's schedule replaced by some of its bounded schedules."""
    for index, op in enumerate(program.ops):
        if not isinstance(op, Parallel):
            continue
        target.reset(program.header)
        for earlier in program.ops[:index + 1]:
            target.execute(earlier)
        schedules = list(bounded_schedules(*target.taken))
        for schedule in rng.sample(schedules, min(EXPLORED_PER_PARALLEL, len(schedules))):
            yield program.with_ops(program.ops[:index] + (dataclasses.replace(
                op, schedule=schedule),) + program.ops[index + 1:])


def _run_chunk(first: int, mode: str, name: str = "tdp", count: int = CHUNK):
    """(programs run, ops run, the first failing seed's report or None).

    Each program is bent to what target ``name`` runs (``Capabilities.restrict``).
    """
    target, ops, runs = make_target(name), 0, 0
    restrict = capabilities(target).restrict
    for seed in range(first, first + count):
        program = restrict(_program(seed, mode))
        programs = [program]
        if mode in ("explored", "many-actors"):
            programs += list(_variants(program, target, random.Random(seed)))
        for variant in programs:
            runs += 1
            ops += len(variant.ops)
            finding = run_program(variant, target)
            if finding is not None:
                report = format_program(variant, finding.op_index, {"seed": seed})
                return runs, ops, f"{finding.summary(name)}\n{report}"
    return runs, ops, None


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tdp", "shadow"])
@pytest.mark.parametrize("mode", ["any", "with-parallel", "explored", "many-actors"])
def test_random_programs_run_clean(mode, name):
    starts = range(0, PROGRAMS, CHUNK)
    programs = ops = 0
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for done, chunk_ops, failure in pool.map(_run_chunk, starts, [mode] * len(starts),
                                                 [name] * len(starts)):
            programs, ops = programs + done, ops + chunk_ops
            assert failure is None, failure
    print(f"\n{programs} programs, {ops} ops, zero findings")

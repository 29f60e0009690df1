"""Preemption-bounded exploration of a ``parallel`` op's schedules.

A race window is usually one yield point wide: one side must be preempted
exactly between, say, freezing an SPTE and writing its final value, and the
other must run through the window before it resumes.  A schedule drawn from
the input bytes hits such a window about once in ``2 * steps_a * steps_b``
tries, and only when the rest of the program is right too.

Most concurrency bugs need one or two preemptions (Musuvathi and Qadeer,
"Iterative context bounding for systematic testing of multithreaded
programs", PLDI 2007), and an MMU op takes a handful of steps, so every
schedule of a pair with at most two preemptions is a few dozen to a few
hundred runs.  A campaign worker spends a bounded share of its time here, on
the ``parallel`` ops whose run showed behaviour the worker had not seen (a new
coverage feature): the pair is doing something new, so its other
interleavings are the likeliest new races; the other pairs get their
one-preemption schedules while the budget lasts.  Every variant is an
ordinary program with one schedule changed (and its tail cut), so a finding
replays from its reproducer.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from typing import Callable, Iterator

from harness.ops import PAGES_PER_2M, SCHEDULE_LIMIT, Parallel, Program, op_gfns

HORIZON = SCHEDULE_LIMIT.bit_length() - 1  # schedule bits; after them the sides alternate
# Share of a worker's time that may go to exploration, and the most one input gets.
SHARE = 0.5
MAX_SECONDS_PER_INPUT = 1.0
TAIL = 3  # ops a variant keeps after its parallel


def one_preemption(b_first: bool, k: int) -> int:
    """The first side takes ``k`` steps, the other runs until done (within the horizon)."""
    ones = (1 << HORIZON) - 1
    if b_first:
        return ((1 << k) - 1) | 1 << (HORIZON - 1)
    return (ones >> k) << k


def two_preemptions(b_first: bool, k: int, m: int) -> int:
    """The first side takes ``k`` steps, the other ``m``, then the first runs until done."""
    ones = (1 << HORIZON) - 1
    if b_first:
        return ((1 << k) - 1) | (ones >> (k + m)) << (k + m)
    return ((1 << m) - 1) << k | 1 << (HORIZON - 1)


def _one_preemptions(b_first: bool, steps: int) -> list:
    """One-preemption schedules of the side that goes first and took ``steps``, earliest first.

    Its last step is the one that finishes it, so it can be preempted after
    1 .. steps-1 of them; steps past the horizon are out of a schedule's reach.
    """
    return [one_preemption(b_first, k) for k in range(1, min(steps, HORIZON - 1))]


def _alternate(first: list, second: list) -> list:
    """``first[0], second[0], first[1], ...``, the longer list's rest at the end."""
    return [s for pair in itertools.zip_longest(first, second) for s in pair if s is not None]


def bounded_schedules(taken_a: int, taken_b: int) -> Iterator[int]:
    """Every distinct schedule with one preemption, then with two; earliest preemptions first.

    ``taken_a`` and ``taken_b`` are the steps each side took in a run.
    """
    yield from _alternate(_one_preemptions(False, taken_a), _one_preemptions(True, taken_b))
    limit = HORIZON - 1
    firsts = ((False, min(taken_a, limit), min(taken_b, limit)),
              (True, min(taken_b, limit), min(taken_a, limit)))
    for total in range(2, limit):
        for b_first, n_first, n_second in firsts:
            for k in range(max(1, total - n_second + 1), min(n_first, total)):
                yield two_preemptions(b_first, k, total - k)


def sampled_preemptions(taken_a: int, taken_b: int, rng: random.Random) -> list:
    """The one-preemption schedules in a random order that alternates the preempted side.

    Either side is as likely to be the one preempted first, however long the
    other runs (a side spinning on a frozen SPTE takes hundreds of steps,
    which would otherwise crowd out the other side's few preemption points).
    """
    orders = [_one_preemptions(False, taken_a), _one_preemptions(True, taken_b)]
    for order in orders:
        rng.shuffle(order)
    if rng.random() < 0.5:
        orders.reverse()
    return _alternate(*orders)


class ScheduleExplorer:
    """A worker's schedule exploration, within its share of the worker's time.

    A ``parallel`` with new behaviour gets every schedule with up to two
    preemptions, any other whose sides can conflict a sample of the
    one-preemption ones, as long as the budget lasts.  A variant runs the
    program up to the ``parallel`` and :data:`TAIL` ops after it: a race
    shows at the pair or soon after, and cutting the rest keeps variants cheap.

    The budget is time, not runs: a variant costs what its program costs,
    and one slow program explored 100 times must not stall the worker
    (libFuzzer would report a slow unit).  Which variants run therefore
    depends on the machine, but every finding is a complete program that
    replays on its own.
    """

    def __init__(self, share: float = SHARE, per_input: float = MAX_SECONDS_PER_INPUT,
                 clock: Callable[[], float] = time.monotonic):
        self.share, self.per_input, self.clock = share, per_input, clock
        self.started = clock()
        self.spent = 0.0
        self.runs = 0

    def explore(self, program: Program, parallels: list, run: Callable[[Program], object],
                rng: random.Random):
        """Run variants of ``program`` with a parallel's schedule replaced by bounded ones.

        ``parallels`` lists ``(index, taken, novel)``: the op index of each
        parallel, the steps its sides took, and whether it showed new
        behaviour.  Novel pairs go first, in order, through every schedule
        with up to two preemptions; then the pairs whose sides can conflict
        (:func:`conflicting`) through their one-preemption schedules in an
        order ``rng`` draws (:func:`sampled_preemptions`), so that
        explorations the budget cuts short still sample the whole range.  ``run`` executes a program and returns
        its finding or None.  Returns ``(variant, finding)`` for the first
        variant with a finding, else None.
        """
        start = self.clock()
        deadline = start + min(self.per_input,
                               self.share * (start - self.started) - self.spent + self.per_input)
        plan = [(index, list(bounded_schedules(*taken))) for index, taken, novel in parallels
                if novel]
        for index, taken, novel in parallels:
            if not novel and conflicting(program.ops[index]):
                plan.append((index, sampled_preemptions(*taken, rng)))
        try:
            for index, schedules in plan:
                pair, ops = program.ops[index], program.ops
                for schedule in schedules:
                    if self.clock() >= deadline:
                        return None
                    if schedule == pair.schedule:
                        continue
                    self.runs += 1
                    variant = program.with_ops(ops[:index] + (
                        dataclasses.replace(pair, schedule=schedule),) + ops[index + 1:index + 1 + TAIL])
                    finding = run(variant)
                    if finding is not None:
                        return variant, finding
            return None
        finally:
            self.spent += self.clock() - start


def conflicting(pair: Parallel) -> bool:
    """The sides can race: they name the same 2M frame, or one names no memory (host work
    such as ``zap_all`` or a memslot change reaches every frame)."""
    frames = [{gfn // PAGES_PER_2M for gfn in op_gfns(side)} for side in (pair.a, pair.b)]
    return not frames[0] or not frames[1] or bool(frames[0] & frames[1])

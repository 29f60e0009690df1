"""Preemption-bounded exploration of a ``parallel`` op's schedules.

A race window is usually one yield point wide: one side must be preempted
exactly between, say, freezing an SPTE and writing its final value, and the
other must run through the window before it resumes.  A schedule drawn from
the input bytes hits such a window about once in ``2 * steps_a * steps_b``
tries, and only when the rest of the program is right too.

Most concurrency bugs need one or two preemptions (Musuvathi and Qadeer,
"Iterative context bounding for systematic testing of multithreaded
programs", PLDI 2007), and an MMU op takes a handful of steps: a pair has a
few dozen schedules with one preemption and a few hundred with two.  A
campaign worker spends a bounded share of its time here, shared out evenly
among the kinds of pairs (:func:`pair_kind`: the target's ``pair_start`` and
how many steps each side took): a pair of a kind never raced before is the
likeliest new race and goes first, and after that each kind gets its turn
however often programs reach it, because the kind says how deep each side
goes and how much it does, not which entries they touch.  Every
variant is an ordinary program with one schedule changed (and its tail cut),
so a finding replays from its reproducer.  Where the target can snapshot, the
ops before the pair run once and each variant resumes from that checkpoint: it
runs the pair and its tail only.  The pairs come from the programs the worker
runs, and from the collisions of each input that showed new behaviour: its
ops run in parallel with the ops that can race them, pairing by pairing.

A ``parallel`` of three or four actors (a "pair" below is any ``parallel``)
is explored the same way over every actor: each one preempted after k steps,
the others then running in each order, and a sample of the schedules where
the actor that preempted it is preempted in turn.  With two actors these are
the schedules two-actor exploration always ran, in the same order.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
import time
from typing import Callable, Iterator

from mmufuzz.harness.ops import (PAGES_PER_2M, Parallel, Program, op_gfns, schedule_horizon,
                                 schedule_of)

# Share of a worker's time that may go to exploration, and the most one input gets.
SHARE = 0.65
MAX_SECONDS_PER_INPUT = 1.0
TAIL = 3  # ops a variant keeps after its parallel
CAPACITY = 256  # pairs each queue keeps
TWO_PREEMPTION_SAMPLE = 32  # two-preemption schedules explored per pair
# Relative shares of the exploration time of its sources: the one-preemption queue, the
# two-preemption queue, the collisions' pairings, their triples.
SOURCE_WEIGHTS = (8, 8, 4, 1)
_PAIRINGS, _TRIPLES = 2, 3  # the sources that are not queues of pairs
_SOURCES = range(len(SOURCE_WEIGHTS))


def preemptions(runs, actors: int) -> int:
    """The schedule in which each actor of ``runs`` (``(actor, steps)``, in turn) takes its
    steps, and the last one runs on to the horizon (until done: picking a finished actor
    steps the next).  A run of ``a``'s to the horizon ends in one step of ``b``, since
    a number's last digit is never 0 (its step would go to whoever's turn it is).

    With two actors: ``[(0, k), (1, 0)]`` is ``a`` preempted after ``k`` steps by ``b``,
    which runs until done; ``[(0, k), (1, m), (0, 0)]`` preempts ``b`` after ``m`` in turn.
    """
    horizon = schedule_horizon(actors)
    digits = [actor for actor, steps in runs[:-1] for _ in range(steps)][:horizon]
    digits += [runs[-1][0]] * (horizon - len(digits))
    if digits[-1] == 0:
        digits[-1] = 1
    return schedule_of(digits, actors)


def _rests(actors: int, exclude) -> list:
    """The orders in which the actors not in ``exclude`` may run after the preemptions."""
    return list(itertools.permutations(a for a in range(actors) if a not in exclude))


def _one_preemption_choices(first: int, taken) -> list:
    """``(first, k, rest)`` of each one-preemption schedule of actor ``first``, which took
    ``taken[first]`` steps, earliest preemption first: it is preempted after k steps,
    then every other actor runs in turn (for the steps it took; the last until done), in
    every order ``rest``.

    Its last step is the one that finishes it, so it can be preempted after
    1 .. steps-1 of them; steps past the horizon are out of a schedule's reach.
    A choice is built into its schedule (:func:`_one_preemption`) only when it is
    drawn: most pairs a worker queues are cut short or dropped before their last.
    """
    actors = len(taken)
    limit = min(taken[first], schedule_horizon(actors) - 1)
    rests = _rests(actors, (first,))
    return [(first, k, rest) for k in range(1, limit) for rest in rests]


def _one_preemption(taken, choice: tuple) -> int:
    first, k, rest = choice
    return preemptions([(first, k)] + [(other, taken[other]) for other in rest], len(taken))


def _one_preemptions(first: int, taken) -> list:
    """The one-preemption schedules of actor ``first`` (:func:`_one_preemption_choices`)."""
    return [_one_preemption(taken, choice) for choice in _one_preemption_choices(first, taken)]


def _alternate(*lists) -> list:
    """``lists[0][0], lists[1][0], ..., lists[0][1], ...``, the longer lists' rest at the end."""
    return [s for turn in itertools.zip_longest(*lists) for s in turn if s is not None]


def _two_preemption_choices(taken) -> Iterator[tuple]:
    """``(first, k, second, m, rest)`` of every two-preemption schedule, earliest first."""
    actors = len(taken)
    limit = schedule_horizon(actors) - 1
    steps = [min(t, limit) for t in taken]
    pairs = list(itertools.permutations(range(actors), 2))
    for total in range(2, limit):
        for first, second in pairs:
            rests = _rests(actors, (second,))
            for k in range(max(1, total - steps[second] + 1), min(steps[first], total)):
                for rest in rests:
                    yield first, k, second, total - k, rest


def _two_preemptions(taken, choice: tuple) -> int:
    first, k, second, m, rest = choice
    runs = [(first, k), (second, m)] + [(a, taken[a] - (k if a == first else 0)) for a in rest]
    return preemptions(runs, len(taken))


def two_preemption_schedules(*taken: int) -> Iterator[int]:
    """Every distinct schedule with two preemptions, earliest preemptions first.

    ``taken`` is the steps each actor took in a run.  An actor ``x`` is
    preempted after k steps by ``y``, which is preempted after m; then ``x``
    and the others run in turn (``x`` for the rest of its steps, the others
    for theirs, the last until done), in every order.
    """
    return (_two_preemptions(taken, choice) for choice in _two_preemption_choices(taken))


def bounded_schedules(*taken: int) -> Iterator[int]:
    """Every distinct schedule with one preemption, then with two; earliest preemptions first."""
    yield from _alternate(*(_one_preemptions(first, taken) for first in range(len(taken))))
    yield from two_preemption_schedules(*taken)


def sampled_preemptions(taken, rng: random.Random) -> Iterator[int]:
    """The one-preemption schedules in a random order that alternates the preempted actor.

    Each actor is as likely to be the one preempted first, however long the
    others run (a side spinning on a frozen SPTE takes hundreds of steps,
    which would otherwise crowd out the other side's few preemption points).
    The order is drawn now; each schedule is built when it is drawn.
    """
    orders = [_one_preemption_choices(first, taken) for first in range(len(taken))]
    for order in orders:
        rng.shuffle(order)
    if rng.random() < 0.5:
        orders.reverse()
    if len(orders) > 2:  # (two actors: the reversal alone makes either first)
        turn = rng.randrange(len(orders))
        orders = orders[turn:] + orders[:turn]
    return (_one_preemption(taken, choice) for choice in _alternate(*orders))


def sampled_two_preemptions(taken, rng: random.Random,
                            count: int = TWO_PREEMPTION_SAMPLE) -> Iterator[int]:
    """``count`` of the two-preemption schedules, drawn when first asked for.

    There are about ``2 * taken_a * taken_b`` of them for a pair (more for
    more actors): all of them for every pair would leave no time for any but
    the first few pairs, while a sample per pair reaches many pairs, and a
    state seen again gets another sample.
    """
    choices = list(_two_preemption_choices(taken))  # (the schedules are built when drawn)
    for choice in rng.sample(choices, min(count, len(choices))):
        yield _two_preemptions(taken, choice)


def _variants(program: Program, index: int, schedules) -> Iterator[Program]:
    """``program`` up to its ``parallel`` at ``index`` and :data:`TAIL` ops after it, the
    parallel's schedule replaced by each of ``schedules`` (but its own)."""
    pair, ops = program.ops[index], program.ops
    for schedule in schedules:
        if schedule != pair.schedule:
            yield program.with_ops(ops[:index] + (Parallel.of(pair.sides, schedule),)
                                   + ops[index + 1:index + 1 + TAIL])


class ScheduleExplorer:
    """A worker's race exploration: two queues of pairs and two of collisions, served within
    a share of its time.

    :meth:`offer` queues the ``parallel`` ops of each program the worker ran:
    pairs of a kind (:func:`pair_kind`) no program ran before and pairs whose
    sides can conflict (:func:`conflicting`) go on both queues, their
    one-preemption schedules, a few dozen, on one, and a sample of their
    two-preemption schedules on the other.  Each queue serves first the pair
    whose kind it has explored fewest pairs of, then pairs whose sides can
    conflict; then the one-preemption queue serves the kind the campaign met
    first, and the two-preemption queue the newest pair.  New kinds come
    faster than their schedules run (about 800 in a 60-s campaign, of which
    each queue begins about 250), and newest first alone starved a kind met
    early and seldom offered again: in a traced miss the merge race's kind came
    at 2.9 s and had its two-preemption sample, which missed, and never its
    one-preemption turn, which finds it.  Met-first on one queue, one kind
    after another, took that race from 13 seeds in 20 to 17 (median 21 s;
    ``docs/faults.md``), while the newest pairs still go first on the other.
    (Serving the states programs reach least, instead, put a state behind
    every rarer one once a few programs had reached it: a 60-s campaign that
    missed the merge race held ten pairs from its state in its corpus, nine of
    which race.  In a 60-s campaign nearly
    every pair explored is its state's first; serving the pairs that can
    conflict first, among those, took a table freed under a walker from 5 to 9
    seeds in 10 (``docs/campaigns.md``).  Weighting by the number of
    schedules, to prefer short pairs, lost races: a side spinning on a frozen
    SPTE has hundreds of steps, and as many equivalent places to be
    preempted.)  :meth:`work` runs variants from the queues and the collisions'
    pairings and triples (below), the one furthest below its share of the time
    (:data:`SOURCE_WEIGHTS`) first, until the budget is spent; work cut short
    is the next its source serves.  Deferring is what makes the budget count: new
    behaviour comes in bursts (at the start of a campaign, after a
    breakthrough) faster than its schedules can be run, and a pair that cannot
    be explored at once waits instead of being skipped.  A queue a quarter
    over its capacity drops the pairs it would serve last.

    :meth:`offer_collisions` queues the collisions of an input that showed
    new behaviour (:func:`mmufuzz.fuzz.mutator.collisions`: each of its guest ops in
    parallel with each op that can race it, then with each two): its
    pairings and its triples, two more sources of work, each served oldest
    input first (the seeds' first).  Each pairing that runs offers its pair
    like any program; each triple's pair is explored at once, its
    one-preemption schedules within the triples' own share.  A race may need
    one pairing among the dozens a program allows, which random mutation
    draws rarely.  In 60-s campaigns (seeds 1-15) the collisions took a
    fault racing a 4K accept from 6 seeds to 13.  They take time from the
    schedule queues and add states to share it, which a larger share for
    exploration (65%, was 50%) makes up for in part: a table freed under a
    walker went from 12 seeds to 11 (``docs/faults.md``).

    The triples have a share of their own because the pairings never run
    out: served input by input with them, an input's hundreds of triples
    held back the pairings of the inputs behind it (a merge race a seed's
    pairing finds went from 3 seeds in 3 to 2), and served after the
    pairings of every waiting input, no triple ever ran (in five traced 30-
    to 80-s campaigns the pairings had come to the inputs run 118th to 521st
    when they ended).  Races that need a third party then came only from
    mutants that happen to build such a ``parallel``, late and seldom in a
    guided campaign, whose corpus spreads its mutations thin: a walker
    reading a table freed while a memslot is added under two vCPUs (a seed's
    first triples) was found in 3 seeds of 5 guided (median 52.6 s), 5 of 5
    unguided (13.2 s), and with the triples' own share in under a second in
    every seed of both (``docs/levers.md``, runs J-N).  Their pairs are not
    queued: a triple runs once and offers a pair of a kind mostly new, and
    on the one-preemption queue, kinds in the order met, the seeds' triples'
    kinds went ahead of a later seed's pairings.  Queued at the pairings'
    share, they pushed the merge race's kind (a pairing of seed 03; traced,
    seed 1) from the 169th kind met to the 252nd, out of reach of a 40-s
    campaign, and the race came 1.4-2.4x later at every share tried (the
    pairings', a half, a quarter).  Explored in their own turn they take
    their share (a quarter of the pairings', :data:`SOURCE_WEIGHTS`) and no
    queue's order: the merge race came as early as before.

    A variant runs the program up to the ``parallel`` and :data:`TAIL` ops
    after it: a race shows at the pair or soon after, and cutting the rest
    keeps variants cheap.  The budget is time, not runs: a variant costs what
    its program costs, and one slow program explored 100 times must not stall
    the worker (libFuzzer would report a slow unit).  Which variants run
    therefore depends on the machine, but every finding is a complete program
    that replays on its own.
    """

    def __init__(self, share: float = SHARE, per_input: float = MAX_SECONDS_PER_INPUT,
                 capacity: int = CAPACITY, clock: Callable[[], float] = time.monotonic):
        self.share, self.per_input, self.capacity, self.clock = share, per_input, capacity, clock
        self.started = clock()
        self.spent = 0.0
        self.runs = 0
        # The one- and two-preemption work: heaps of (explored, apart, order, kind, work),
        # ``work`` yielding each variant with what runs it, ``explored`` the count of the
        # kind's pairs the queue had begun when the entry was (re)pushed, ``order`` (met,
        # -arrival) on the one-preemption queue and -arrival on the other; each with how
        # many pairs of each kind it began.
        self._queues: tuple[list, list] = ([], [])
        self._explored: tuple[dict, dict] = ({}, {})
        # The collisions of new inputs, oldest input first, each yielding programs with what
        # runs them: the pairings and the triples (their pairs' variants after them).
        self._collisions: tuple = (collections.deque(), collections.deque())
        # Per source (one-preemption, two-preemption, pairings, triples): the work it cut
        # short (or None) and the time it has had.
        self._cut_short: list = [None] * len(_SOURCES)
        self._spent = [0.0] * len(_SOURCES)
        self._seen: dict = {}  # pair kind -> pairs offered of it
        self._met: dict = {}  # pair kind -> the arrival number of its first pair
        self._arrivals = 0
        self._serving = None  # the source whose work is running
        self._adopted: list = []  # (variants, run) of the pair of the triple that just ran

    def offer(self, program: Program, parallels: list, start: Callable, rng: random.Random) -> None:
        """Queue the ``parallel`` ops of ``program``, which just ran.

        ``parallels`` lists ``(index, taken, state)``: the op index of each
        parallel, the steps its sides took, and the state it started from
        (the target's ``pair_start``).  ``start(program,
        index)``, called when the pair's first variant is due, returns what
        runs its variants: a callable that takes a variant and returns its
        finding or None (it may set up what the variants share, such as a
        checkpoint before the pair).  ``rng`` orders the one-preemption
        schedules (:func:`sampled_preemptions`), so that a pair the budget
        cuts short has still sampled the whole range, and draws the
        two-preemption sample (:func:`sampled_two_preemptions`).  The pairs of
        a program the triples' source runs (a triple) are not queued: their
        one-preemption variants run next, in that source's turn.
        """
        if self._serving == _TRIPLES:  # a triple's pair: explored in the triples' turn
            self._adopted += [(_variants(program, index, sampled_preemptions(taken, rng)),
                               _Runner(start, program, index)) for index, taken, _ in parallels]
            return
        for index, taken, start_state in parallels:
            kind = pair_kind(start_state, taken)
            seen = self._seen[kind] = self._seen.get(kind, 0) + 1
            apart = not conflicting(program.ops[index])
            if seen > 1 and apart:
                continue
            self._arrivals += 1
            met = self._met.setdefault(kind, self._arrivals)
            later = random.Random(rng.getrandbits(32))  # draws when the pair's turn comes
            runner = _Runner(start, program, index)  # one per pair: both queues share it
            for queue, schedules, order in (
                    (0, sampled_preemptions(taken, rng), (met, -self._arrivals)),
                    (1, sampled_two_preemptions(taken, later), -self._arrivals)):
                pairs = self._queues[queue]
                work = ((variant, runner) for variant in _variants(program, index, schedules))
                heapq.heappush(pairs, (self._explored[queue].get(kind, 0), apart, order, kind,
                                       work))
                if len(pairs) > self.capacity + self.capacity // 4:
                    self._trim(queue)

    # A queue's order: pairs of the kinds it explored least first, then those whose sides
    # can conflict, then (one-preemption) the kind the campaign met first, its newest pair,
    # or (two-preemption) the newest pair.  Explored counts only grow, so an entry's key is
    # at worst too small: it is brought up to date when it comes to the top (or at a trim).

    def _current(self, queue: int, entry: tuple) -> tuple:
        """``entry`` keyed by its kind's explored count now."""
        explored = self._explored[queue].get(entry[3], 0)
        return entry if entry[0] == explored else (explored,) + entry[1:]

    def _trim(self, queue: int) -> None:
        """Drop the pairs ``queue`` would serve last, down to its capacity.

        Trimming a quarter over capacity at a time keeps offers O(log n).
        """
        pairs = self._queues[queue]
        pairs[:] = heapq.nsmallest(self.capacity, (self._current(queue, e) for e in pairs))

    def offer_collisions(self, collisions, run: Callable) -> None:
        """Queue the collisions of an input that showed new behaviour, to run with ``run``.

        ``collisions`` (:func:`mmufuzz.fuzz.mutator.collisions`) holds the input's
        pairings and its triples, each drawn when its turn comes; ``run`` takes
        one program and returns its finding or None, and offers its
        ``parallel`` (:meth:`offer`: a triple's is explored right after it, a
        pairing's queued).  The pairings and the triples are sources of their
        own (an input has a few dozen pairings and hundreds of triples, and
        neither may hold the other back: see the class), each serving the
        oldest input first.  While :attr:`capacity` inputs wait on a source, a
        new one is not queued there.
        """
        pairings = ((pairing, run) for pairing in collisions.pairings)
        for inputs, work in zip(self._collisions,
                                (pairings, self._explored_triples(collisions.triples, run))):
            if len(inputs) < self.capacity:
                inputs.append(work)

    def _explored_triples(self, triples, run) -> Iterator[tuple]:
        """``(program, run)`` of each of ``triples``, then of the one-preemption variants
        of its pair, which :meth:`offer` adopted while it ran."""
        for triple in triples:
            yield triple, run
            adopted, self._adopted = self._adopted, []
            for variants, runner in adopted:
                yield from ((variant, runner) for variant in variants)

    def _waiting(self, source: int) -> bool:
        if self._cut_short[source] is not None:
            return True
        if source >= _PAIRINGS:
            return bool(self._collisions[source - _PAIRINGS])
        return bool(self._queues[source])

    def _next(self, source: int) -> tuple:
        """The work ``source`` serves now, taken off it: an iterator of ``(variant, run)``."""
        work, self._cut_short[source] = self._cut_short[source], None
        if work is not None:
            return work
        if source >= _PAIRINGS:
            return self._collisions[source - _PAIRINGS].popleft()
        pairs = self._queues[source]
        entry = heapq.heappop(pairs)
        while (current := self._current(source, entry)) is not entry:
            entry = heapq.heappushpop(pairs, current)  # its kind was explored since
        self._explored[source][entry[3]] = entry[0] + 1
        return entry[-1]

    def work(self):
        """Run queued variants while the budget lasts.

        The budget: at most :attr:`share` of the worker's time so far, and
        :attr:`per_input` per call.  It accrues as the worker runs, so a
        campaign starts with its seeds and first mutants, which find the
        shallow bugs, rather than with exploring the first seed's pairs.
        Returns ``(variant, finding)`` for the first variant with a finding
        (its pair is done), else None.
        """
        start = self.clock()
        deadline = start + min(self.per_input, self.share * (start - self.started) - self.spent)
        try:
            while self.clock() < deadline:
                waiting = [source for source in _SOURCES if self._waiting(source)]
                if not waiting:
                    return None
                source = min(waiting, key=lambda s: self._spent[s] / SOURCE_WEIGHTS[s])
                work = self._next(source)
                began = self.clock()
                self._serving = source
                try:
                    for variant, run in work:
                        self.runs += 1
                        finding = run(variant)
                        if finding is not None:
                            return variant, finding
                        if self.clock() >= deadline:
                            self._cut_short[source] = work  # it resumes where it stopped
                            break
                finally:
                    self._serving = None
                    self._spent[source] += self.clock() - began
            return None
        finally:
            self.spent += self.clock() - start


def pair_kind(start_state: str, taken) -> tuple:
    """What the explorer shares its time by: the pair's start state and the magnitude
    (the bit length, as libFuzzer buckets hit counts) of the steps each side took.

    The start state says how deep each side goes; how many steps a side took
    says how much it did there.  A zap_all that removes one table with no
    yield between the free and the flush has no window for a walker, one that
    goes on to the table's siblings has: same start state, other steps
    (``docs/faults.md``).  Keyed by start state alone, the first such pair
    to arrive spent its state's turn, and a later one that could race waited
    behind every state not yet explored.
    """
    return (start_state, *sorted(steps.bit_length() for steps in taken))


class _Runner:
    """Runs one pair's variants; set up (``start``) when the first of them is due."""

    def __init__(self, start: Callable, program: Program, index: int):
        self._start, self._program, self._index = start, program, index
        self._run = None

    def __call__(self, variant: Program):
        if self._run is None:
            self._run = self._start(self._program, self._index)
            self._start = self._program = None  # what the variants need, _run holds
        return self._run(variant)


def conflicting(pair: Parallel) -> bool:
    """Two of the sides can race: they name the same 2M frame, or one names no memory
    (host work such as ``zap_all`` or a memslot change reaches every frame)."""
    frames = [{gfn // PAGES_PER_2M for gfn in op_gfns(side)} for side in pair.sides]
    return any(not x or not y or bool(x & y) for x, y in itertools.combinations(frames, 2))

"""Preemption-bounded schedule exploration: the schedules, the budget, and a race it finds."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import random
from pathlib import Path

from mmufuzz.harness import faults
from mmufuzz.harness.ops import Parallel
from mmufuzz.harness.tdp.sched import interleave
from mmufuzz.fuzz.campaign import CampaignConfig
from mmufuzz.fuzz.corpus import NO_FAULT
from mmufuzz.fuzz import mutator
from mmufuzz.fuzz.encoding import encode, load_reproducer, parse_reproducer
from mmufuzz.fuzz.runner import make_target, run_program
from mmufuzz.fuzz.schedules import (TAIL, ScheduleExplorer, bounded_schedules, conflicting,
                            preemptions, sampled_preemptions, sampled_two_preemptions,
                            two_preemption_schedules)
from mmufuzz.fuzz.worker import CounterSink, Worker

REGRESSIONS = Path(__file__).resolve().parent.parent / "corpus" / "regressions"


def _trace(steps_a: int, steps_b: int, schedule: int) -> str:
    """Who took each step when sides of ``steps_a`` and ``steps_b`` steps interleave.

    A side's last step is the one that finishes it (the code after its last yield).
    """
    log = []

    def side(name, steps):
        for _ in range(steps - 1):
            log.append(name)
            yield
        log.append(name)
    interleave([side("a", steps_a), side("b", steps_b)], schedule)
    return "".join(log)


def test_bounded_schedules_are_every_one_and_two_preemption_interleaving_once():
    steps = {"a": 6, "b": 4}
    schedules = list(bounded_schedules(steps["a"], steps["b"]))
    traces = [_trace(steps["a"], steps["b"], s) for s in schedules]
    assert len(traces) == len(set(traces))
    expected_one, expected_two = set(), set()
    for first, second in ("ab", "ba"):
        n1, n2 = steps[first], steps[second]
        for k in range(1, n1):
            expected_one.add(first * k + second * n2 + first * (n1 - k))
            for m in range(1, n2):
                expected_two.add(first * k + second * m + first * (n1 - k) + second * (n2 - m))
    # Every interleaving with one preemption, then every one with two.
    assert set(traces[:len(expected_one)]) == expected_one
    assert set(traces[len(expected_one):]) == expected_two


def _regression(name: str):
    """The regression's program with its race's schedule made sequential: no finding."""
    program = load_reproducer(REGRESSIONS / f"{name}.repro").program
    index = next(i for i, op in enumerate(program.ops) if isinstance(op, Parallel))
    ops = program.ops
    calm = program.with_ops(ops[:index] + (dataclasses.replace(ops[index], schedule=0),)
                            + ops[index + 1:])
    with faults.injected({name}):
        assert run_program(calm, make_target("tdp")) is None
    return calm, index


def _running_explorer(**options):
    """An explorer 10 s into its worker's life, and its clock (a one-element list).

    Half of 10 s accrued: the per-call limit (1 s) is the budget; the clock
    stands still unless a test moves it.
    """
    now = [0.0]
    explorer = ScheduleExplorer(clock=lambda: now[0], **options)
    now[0] = 10.0
    return explorer, now


def test_exploration_finds_a_race_that_needs_one_exact_preemption():
    program, index = _regression("merge-frozen-child")
    target = make_target("tdp")
    target.reset(program.header)
    for op in program.ops[:index + 1]:
        target.execute(op)

    def run(variant):
        with faults.injected({"merge-frozen-child"}):
            return run_program(variant, make_target("tdp"))
    explorer, _ = _running_explorer()
    explorer.offer(program, [(index, tuple(target.taken), target.pair_start)], lambda *pair: run,
                   random.Random(0))
    variant, finding = explorer.work()
    assert finding.invariant == "tdx_seamcall_failed"
    assert variant.ops[index].schedule != program.ops[index].schedule
    with faults.injected({"merge-frozen-child"}):  # the variant alone reproduces it
        assert run_program(variant, make_target("tdp")).signature == finding.signature


def test_exploration_stops_at_its_share_of_the_time_and_resumes_a_pair_it_cut_short():
    now = [0.0]
    explorer = ScheduleExplorer(share=0.5, per_input=1.0, clock=lambda: now[0])
    program, index = _regression("free-before-flush")
    schedules = []

    def run(variant):
        schedules.append(variant.ops[index].schedule)
        now[0] += 0.25

    def work_at(time):
        now[0] = time
        before = len(schedules)
        explorer.work()
        return len(schedules) - before
    explorer.offer(program, [(index, (40, 40), "state")], lambda *pair: run, random.Random(0))
    assert work_at(0.0) == 0  # nothing accrued yet
    assert work_at(2.0) == 4  # half of 2 s
    assert work_at(3.5) == 3  # half of 3.5 s, minus 1 s spent
    assert work_at(10.0) == 4  # 3.25 s accrued, capped by the per-call limit (1 s)
    # Cut short three times, the pair resumed where it stopped: no schedule ran twice.
    assert len(set(schedules)) == len(schedules) == 11


def test_a_worker_explores_a_parallel_from_a_new_state_and_reports_the_variant():
    program, index = _regression("merge-frozen-child")
    reserved = []
    sink = CounterSink(lambda: reserved.append(len(reserved)) or reserved[-1], lambda c: None)
    worker = Worker(CampaignConfig("tdp", "merge-frozen-child", invariant_rate=1.0), sink=sink)
    worker.explorer, _ = _running_explorer()
    found, finding = worker.run(encode(program))
    assert finding is not None and finding.invariant == "tdx_seamcall_failed"
    assert found.ops[index].schedule != program.ops[index].schedule
    assert worker.explorer.runs > 0
    # Without coverage (replay, the bench's plain loops) nothing is explored.
    plain = Worker(CampaignConfig("tdp", "merge-frozen-child", invariant_rate=1.0))
    assert plain.run(encode(program))[1] is None and plain.explorer is None


def test_schedule_variants_feed_no_coverage_to_the_input_that_queued_them():
    data = encode(_regression("merge-frozen-child")[0])

    def features_fed(explore: bool) -> tuple:
        traced = collections.Counter()
        sink = CounterSink(itertools.count().__next__, lambda counter: traced.update((counter,)))
        worker = Worker(CampaignConfig("tdp", NO_FAULT), sink=sink)
        worker.explorer = _running_explorer()[0] if explore else None
        for _ in range(2):  # nothing a variant reached leaks into the next input either
            assert worker.run(data)[1] is None
        assert not explore or worker.explorer.runs > 0
        return sink.counters, traced
    assert features_fed(explore=True) == features_fed(explore=False)


def test_schedule_variants_run_muted_so_their_code_coverage_is_not_the_inputs():
    runs_muted = []

    @contextlib.contextmanager
    def muted():  # stands for the hit record's: counts the variants run inside it
        before = worker.explorer.runs
        yield
        runs_muted.append(worker.explorer.runs - before)
    worker = Worker(CampaignConfig("tdp", NO_FAULT),
                    sink=CounterSink(itertools.count().__next__, lambda counter: None),
                    muted=muted)
    worker.explorer = _running_explorer()[0]
    assert worker.run(encode(_regression("merge-frozen-child")[0]))[1] is None
    assert sum(runs_muted) == worker.explorer.runs > 0


def _program_with_three_pairs():
    """Pairs on two 2M frames, on one 2M frame, and against host work; a tail of flushes."""
    return parse_reproducer("""vm type=default vcpus=2
    memslot_add slot=0 base=0x0 npages=0x400 flags=host_huge host_offset=0
    parallel a=(access vcpu=0 gpa=0x0 word=0 kind=read private=0) b=(access vcpu=1 gpa=0x200000 word=0 kind=read private=0) schedule=0x0
    parallel a=(access vcpu=0 gpa=0x0 word=0 kind=read private=0) b=(access vcpu=1 gpa=0x1000 word=0 kind=read private=0) schedule=0x0
    parallel a=(access vcpu=0 gpa=0x0 word=0 kind=read private=0) b=(zap_all) schedule=0x0
    flush_tlb vcpu=0
    flush_tlb vcpu=0
    flush_tlb vcpu=0
    flush_tlb vcpu=0""").program


def _explored_pairs(program, now=None):
    """A variant runner for an explorer: the op index of the parallel each variant changed.

    With ``now``, a one-element clock, each variant takes 10 ms.
    """
    explored = []

    def run(variant):
        index = next(i for i, (x, y) in enumerate(zip(variant.ops, program.ops)) if x != y)
        explored.append(index)
        assert len(variant.ops) == min(len(program.ops), index + 1 + TAIL)
        if now is not None:
            now[0] += 0.01
    return explored, run


def test_only_novel_or_conflicting_pairs_are_explored_and_variants_keep_a_short_tail():
    program = _program_with_three_pairs()
    assert [conflicting(op) for op in program.ops[1:4]] == [False, True, True]
    explorer, _ = _running_explorer()
    explored, run = _explored_pairs(program)

    def explore(states):
        explored.clear()
        explorer.offer(program, [(i, (3, 3), state) for i, state in zip((1, 2, 3), states)],
                       lambda *pair: run, random.Random(0))
        explorer.work()
        return explored
    # From a new state, every pair: every schedule with up to two preemptions.
    every = len(list(bounded_schedules(3, 3)))
    assert sorted(explore(["a", "b", "c"])) == sorted([1, 2, 3] * every)
    # From a state seen before, the pair on two different 2M frames is left alone.
    assert set(explore(["a", "a", "a"])) == {2, 3}


def _serving(program, **options):
    """``explore(*offers)``: the op indexes of the pairs an explorer runs, variant by variant,
    in a fresh second of budget after the ``offers`` (each a list of ``(index, taken,
    state)``) of ``program``."""
    explorer, now = _running_explorer(**options)
    explored, run = _explored_pairs(program, now)

    def explore(*offers):
        explored.clear()
        for pairs in offers:
            explorer.offer(program, pairs, lambda *pair: run, random.Random(0))
        now[0] += 1.0
        explorer.work()
        return explored
    return explore


def test_the_least_explored_state_goes_first_then_pairs_that_can_conflict():
    program = _program_with_three_pairs()  # the pair at 1 is on two 2M frames: apart
    explore = _serving(program, capacity=2)
    one = len(list(sampled_preemptions((3, 3), random.Random(0))))
    two = len(list(two_preemption_schedules(3, 3)))
    # New states: conflicting pairs before apart ones; the queues hold two, so the pair
    # each serves last is dropped.  The one-preemption queue serves the kind met first
    # ("a"), the two-preemption queue the newest pair ("b"); the sources take turns by
    # the time each has had.
    assert explore([(2, (3, 3), "a"), (3, (3, 3), "b"), (1, (3, 3), "c")]) == (
        [2] * one + [3] * two + [3] * one + [2] * two)
    # A state explored once waits behind one never explored, apart, older, and however
    # often programs reach it.  (The one-preemption queue, behind on time, runs both of
    # its pairs first.)
    assert explore([(1, (3, 3), "d")], [(3, (3, 3), "b")] * 5) == (
        [1] * one + [3] * one + [1] * two + [3] * two)


def test_the_one_preemption_queue_serves_kinds_in_the_order_the_campaign_met_them():
    """However many newer kinds arrive, and however often: none starves on that queue."""
    program = _program_with_three_pairs()
    explore = _serving(program, capacity=4)
    one = len(list(sampled_preemptions((3, 3), random.Random(0))))
    two = len(list(two_preemption_schedules(3, 3)))
    newer = [[(3, (3, 3), f"new{i % 3}")] for i in range(12)]
    served = explore([(2, (3, 3), "first")], *newer)
    # The two-preemption queue, its turn second, serves the newest pair.
    assert served[:one + two] == [2] * one + [3] * two


def test_a_pair_whose_side_took_steps_of_another_magnitude_is_a_state_of_its_own():
    program = _program_with_three_pairs()
    explore = _serving(program)
    explore([(3, (3, 3), "b")])
    # From the explored start state, a pair whose second side took 8 steps (not 3) goes
    # before a newer one whose sides took 3 steps again, which waits as "b" was explored.
    served = explore([(3, (3, 8), "b"), (2, (3, 3), "b")])
    one, two = len(list(sampled_preemptions((3, 8), random.Random(0)))), len(list(
        two_preemption_schedules(3, 8)))
    assert served[:one] == [3] * one and served.count(3) == one + two
    assert served.index(2) > served.index(3)
    # Steps of the same magnitude (2 and 3: bit length 2) are the same kind of pair.
    assert explore([(3, (2, 3), "b"), (2, (3, 3), "c")])[0] == 2


def test_a_two_preemption_sample_is_distinct_schedules_of_the_full_set():
    full = set(two_preemption_schedules(20, 9))
    sample = list(sampled_two_preemptions((20, 9), random.Random(3), count=32))
    assert len(sample) == len(set(sample)) == 32 and set(sample) <= full
    assert set(sampled_two_preemptions((3, 3), random.Random(3), count=32)) == set(
        two_preemption_schedules(3, 3))  # fewer than the count: all of them


def test_sampled_preemptions_are_the_one_preemption_schedules_alternating_the_preempted_side():
    schedules = list(sampled_preemptions((40, 3), random.Random(1)))
    assert sorted(schedules) == sorted([preemptions([(0, k), (1, 0)], 2) for k in range(1, 40)]
                                       + [preemptions([(1, k), (0, 0)], 2) for k in (1, 2)])
    # b (3 steps: 2 preemption points) is preempted first in one of the first two runs,
    # and in both of the first four: the long side does not crowd it out.
    b_first = [_trace(40, 3, s).startswith("b") for s in schedules]
    assert sum(b_first[:4]) == 2 and b_first[0] != b_first[1]


def test_a_pairs_variants_resume_from_one_run_of_the_ops_before_it():
    program, index = _regression("free-before-flush")
    worker = Worker(CampaignConfig("tdp", NO_FAULT),
                    sink=CounterSink(itertools.count().__next__, lambda counter: None))
    worker.explorer, _ = _running_explorer()  # a clock standing still: every variant runs
    # Only this pair's variants: the input's first ops may also be raced with each other
    # (collisions), each with its own prefix run, which is not what this test counts.
    worker.explorer.offer_collisions = lambda programs, run: None
    tdp = worker.target.target
    runs = {"first op": 0, "pair": 0}
    execute = tdp.execute

    def counting(op):
        runs["first op"] += op == program.ops[0]  # (the first op occurs once)
        runs["pair"] += isinstance(op, Parallel)
        return execute(op)
    tdp.execute = counting
    assert worker.run(encode(program))[1] is None
    variants = worker.explorer.runs
    assert variants > 20 and runs["pair"] == 1 + variants
    assert runs["first op"] == 2  # the input's run, and the checkpoint's


def test_variants_run_unobserved_and_run_as_they_would_observed():
    """A schedule variant's pair start state and context switches are never read, so the
    target does not make them; the variant runs step for step as it would observed."""
    program, index = _regression("free-before-flush")
    worker = Worker(CampaignConfig("tdp", NO_FAULT),
                    sink=CounterSink(itertools.count().__next__, lambda counter: None))
    worker.explorer, _ = _running_explorer()
    worker.explorer.offer_collisions = lambda programs, run: None
    tdp = worker.target.target
    seen = []  # (observed, pair_start, switches noted, taken, outcome) of every pair run
    execute = tdp.execute

    def noting(op):
        outcome = execute(op)
        if isinstance(op, Parallel):
            seen.append((tdp.observed, tdp.pair_start, len(tdp._switches), tuple(tdp.taken),
                         outcome, op.schedule))
        return outcome
    tdp.execute = noting
    assert worker.run(encode(program))[1] is None
    assert tdp.observed and worker.target._observed  # back on after the variants
    first, variants = seen[0], seen[1:]
    assert first[0] and first[1] and first[2] and len(variants) == worker.explorer.runs > 20
    assert all(not observed and start == "" and switches == 0
               for observed, start, switches, *_ in variants)
    # Each variant observed, from scratch: the same steps and outcome.
    target = make_target("tdp")
    for *_, taken, outcome, schedule in variants[:8]:
        variant = dataclasses.replace(program.ops[index], schedule=schedule)
        target.reset(program.header)
        for op in program.ops[:index]:
            target.execute(op)
        assert target.execute(variant) == outcome and tuple(target.taken) == taken
        assert target.pair_start


def test_a_worker_races_the_ops_of_a_new_input_that_has_no_parallel():
    """The merge race from sequential ops: the input's collisions pair the private read
    with the 4K accept, and schedule exploration of that pair finds the race."""
    program = parse_reproducer("""vm type=tdx vcpus=2
    memslot_add slot=0 base=0x0 npages=0x400 flags=private,host_huge host_offset=0
    set_attributes base=0x200 npages=0x200 private=1
    access vcpu=0 gpa=0x200000 word=0 kind=read private=1
    accept vcpu=1 gpa=0x200000 level=2m
    accept vcpu=1 gpa=0x200000 level=4k""").program
    sink = CounterSink(itertools.count().__next__, lambda c: None)
    worker = Worker(CampaignConfig("tdp", "merge-frozen-child", invariant_rate=1.0), sink=sink)
    worker.explorer, _ = _running_explorer()
    found, finding = worker.run(encode(program))
    assert finding is not None and finding.invariant == "tdx_seamcall_failed"
    pair = next(op for op in found.ops if isinstance(op, Parallel))
    assert {type(pair.a).__name__, type(pair.b).__name__} == {"Access", "Accept"}
    assert run_program(program, make_target("tdp")) is None  # the input alone is clean


def test_the_triples_of_new_inputs_share_the_time_with_the_pairings_of_later_ones():
    """Pairings and triples are two sources, each served oldest input first: a later
    input's pairings do not hold back the triples of an earlier one (a seed's)."""
    text = """vm type=default vcpus=1
    memslot_add slot=0 base=0x200 npages=0x200 flags=host_huge host_offset=0
    access vcpu=0 gpa=0x201000 word=0 kind=read private=0
    zap_all
    recover
    split slot=0"""
    first = parse_reproducer(text).program
    second = first.with_ops(first.ops[:3])  # a later input: two pairings, one triple
    ran = []
    explorer, now = _running_explorer()

    def runner(name):
        def run(program):
            actors = max(len(op.sides) for op in program.ops if isinstance(op, Parallel))
            ran.append((name, actors))
            now[0] += 0.01  # every collision takes the same time
        return run
    for name, program in (("first", first), ("second", second)):
        explorer.offer_collisions(mutator.collisions(program, TAIL), runner(name))
    assert explorer.work() is None  # everything runs within the second allowed
    # The read races the slot's memslot_add (it names base 0x200, in the read's frame) and
    # the host ops that name no memory: four partners in 'first' (four pairings, C(4, 2)
    # triples), two in 'second' (two pairings, one triple).  Each source runs an input's
    # collisions whole, and the one further behind on time goes next: the pairings of
    # 'second' wait for the triples of 'first'.
    assert ran == [("first", 2)] * 4 + [("first", 3)] * 6 + [("second", 2)] * 2 \
        + [("second", 3)]


def test_a_triples_pair_is_explored_in_the_triples_turn_and_never_queued():
    """A triple runs, then its pair's one-preemption variants, then the next triple; only
    the pairings' pairs reach the queues (and get their two-preemption samples there)."""
    first = parse_reproducer("""vm type=default vcpus=1
    memslot_add slot=0 base=0x200 npages=0x200 flags=host_huge host_offset=0
    access vcpu=0 gpa=0x201000 word=0 kind=read private=0
    zap_all
    recover""").program  # the read with three partners: three pairings, three triples
    explorer, _ = _running_explorer()
    ran = []  # ("collision" or "variant", actors, which collision)

    def actors(program):
        return max(len(op.sides) for op in program.ops if isinstance(op, Parallel))

    def collide(program):
        number = sum(1 for event in ran if event[0] == "collision")
        ran.append(("collision", actors(program), number))
        index = next(i for i, op in enumerate(program.ops) if isinstance(op, Parallel))
        taken = (3,) * actors(program)
        explorer.offer(program, [(index, taken, f"state{number}")],
                       lambda *pair: lambda variant: ran.append(("variant", actors(variant),
                                                                 number)),
                       random.Random(number))
    explorer.offer_collisions(mutator.collisions(first, TAIL), collide)
    assert explorer.work() is None  # the clock stands still: everything runs
    one = len(list(sampled_preemptions((3, 3, 3), random.Random(0))))
    pairs = len(list(sampled_preemptions((3, 3), random.Random(0)))) \
        + len(list(sampled_two_preemptions((3, 3), random.Random(0))))
    triples = [i for i, event in enumerate(ran) if event[:2] == ("collision", 3)]
    assert len(triples) == 3 and [event[:2] for event in ran[:3]] == [("collision", 2)] * 3
    for at in triples:  # each triple's variants right after it, three actors each
        number = ran[at][2]
        assert ran[at + 1:at + 1 + one] == [("variant", 3, number)] * one
    assert sum(1 for event in ran if event[:2] == ("variant", 3)) == 3 * one
    for number in range(3):  # each pairing's pair: queued, both samples run
        assert ran.count(("variant", 2, number)) == pairs

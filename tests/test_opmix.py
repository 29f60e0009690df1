"""The op mix: a target's declared ops and weights steer the kinds the mutator generates."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from mmufuzz.fuzz import mutator
from mmufuzz.fuzz.encoding import decode, encode, load_reproducer, opcode_table
from mmufuzz.fuzz.opmix import DEFAULT, OpMix, apportion
from mmufuzz.harness.ops import OP_NAMES, Accept, FlushTlb, Parallel, SetAttributes, op_name
from mmufuzz.harness.target import EVERYTHING, Capabilities, capabilities, make_target

SEED = load_reproducer(Path(__file__).parent.parent / "corpus" / "seeds"
                       / "01_memslot_basic.repro").program


def inserted_kinds(mix: OpMix, draws: int) -> Counter:
    """The op names ``insert_op`` adds to a seed, over ``draws`` draws."""
    rng = random.Random(3)
    seen: Counter = Counter()
    for _ in range(draws):
        grown = mutator.insert_op(SEED, rng, mix)
        seen.update(op_name(op) for op in (Counter(grown.ops) - Counter(SEED.ops)).elements())
    return seen


def test_a_target_that_declares_nothing_gets_the_decoders_table():
    assert DEFAULT.table == opcode_table()
    assert OpMix.of(EVERYTHING).table == opcode_table()
    assert all(DEFAULT.recode(byte) == byte or opcode_table()[DEFAULT.recode(byte)]
               == opcode_table()[byte] for byte in range(256))


def test_the_default_mix_inserts_exactly_what_random_bytes_decode_to():
    """Today's behaviour, draw for draw: the same rng gives the same op."""
    for seed in range(50):
        rng, reference = random.Random(seed), random.Random(seed)
        grown = mutator.insert_op(SEED, rng)
        index = reference.randint(0, len(SEED.ops))
        prefix = encode(SEED.with_ops(SEED.ops[:index]))
        op = decode(prefix + reference.randbytes(mutator.FRESH_OP_BYTES)).ops[index]
        assert grown.ops == SEED.ops[:index] + (op,) + SEED.ops[index:]


def test_apportion_sums_to_256_keeps_every_kind_and_follows_the_weights():
    counts = apportion({"a": 1, "b": 1000, "c": 3, "d": 0})
    assert sum(counts.values()) == 256 and counts["d"] == 0
    assert counts["a"] >= 1 and counts["c"] >= 1 and counts["b"] > 240
    assert apportion({"x": 3, "y": 1}) == {"x": 192, "y": 64}
    with pytest.raises(ValueError):
        apportion({"x": 0})


def test_ops_a_target_does_not_run_are_never_generated():
    caps = Capabilities(ops=set(OP_NAMES) - {Accept, SetAttributes, Parallel})
    mix = OpMix.of(caps)
    assert {"accept", "set_attributes", "parallel"}.isdisjoint(mix.counts())
    seen = inserted_kinds(mix, 600)
    assert {"accept", "set_attributes", "parallel"}.isdisjoint(seen)
    assert len(seen) == len(OP_NAMES) - 3  # every other kind still comes


def test_declared_weights_replace_the_decoders_and_steer_insert_op():
    caps = Capabilities(weights={"flush_tlb": 64, "parallel": 60})
    mix = OpMix.of(caps)
    counts = mix.counts()
    assert sum(counts.values()) == 256
    # 64 and 60 of a total of 256 - 4 - 30 + 64 + 60 = 346, and the arities split as before.
    assert counts["flush_tlb"] == 47 and counts["parallel"] in (44, 45)  # three roundings
    arity = Counter(actors for kind, actors in mix.table if kind is Parallel)
    assert arity[2] > arity[3] > arity[4] > 0
    seen = inserted_kinds(mix, 1000)
    default = inserted_kinds(DEFAULT, 1000)
    assert seen["flush_tlb"] > 5 * default["flush_tlb"]
    assert 0.12 < seen["flush_tlb"] / sum(seen.values()) < 0.25  # 47/256 = 0.18


def test_weights_must_name_ops_the_target_runs():
    with pytest.raises(ValueError, match="accept"):
        Capabilities(ops=set(OP_NAMES) - {Accept}, weights={"accept": 3})
    with pytest.raises(ValueError):
        Capabilities(weights={"flush_tlb": -1})


@pytest.mark.parametrize("name", ["shadow", "stage2"])
def test_shipped_targets_mix_only_ops_they_run(name):
    caps = capabilities(make_target(name))
    mix = OpMix.of(caps)
    assert set(mix.counts()) == {OP_NAMES[cls] for cls in caps.ops}
    decoder = DEFAULT.counts()
    for op, weight in caps.weights.items():  # a kind declared heavier is drawn more often
        assert (mix.counts()[op] > decoder[op]) == (weight > decoder[op])


def test_campaign_worker_draws_from_its_targets_mix():
    from mmufuzz.fuzz.campaign import CampaignConfig
    from mmufuzz.fuzz.corpus import NO_FAULT
    from mmufuzz.fuzz.worker import Worker
    worker = Worker(CampaignConfig("shadow", NO_FAULT))
    assert worker.mix.table == OpMix.of(capabilities(make_target("shadow"))).table
    assert worker.mix.counts()["flush_tlb"] > DEFAULT.counts()["flush_tlb"]
    assert FlushTlb in {kind for kind, _ in worker.mix.table}

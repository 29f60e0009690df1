"""The structure-aware mutator: valid by construction, each edit does what it says, generic."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (Invlpg, ManualProtect, OP_NAMES, Parallel, Program, VmHeader,
                                 VmType, op_gfns, op_name, op_vcpu)
from mmufuzz.fuzz import mutator
from mmufuzz.fuzz.encoding import MAX_OPS, decode, encode, format_program, load_reproducer, parse_reproducer

SEEDS = [load_reproducer(p).program
         for p in sorted((Path(__file__).parent.parent / "corpus" / "seeds").glob("*.repro"))]


def valid(program: Program) -> bool:
    """Canonical for the byte encoding and accepted by the text parser."""
    return (len(program.ops) <= MAX_OPS and decode(encode(program)) == program
            and parse_reproducer(format_program(program)).program == program)


@pytest.mark.parametrize("mutation", [f for f, _ in mutator.MUTATIONS], ids=lambda f: f.__name__)
def test_every_mutation_keeps_programs_valid(mutation):
    rng = random.Random(mutation.__name__)
    changed = 0
    for round_ in range(150):
        program = SEEDS[round_ % len(SEEDS)]
        candidate = mutation(program, rng)
        if candidate is not None:
            assert valid(candidate), format_program(candidate)
            changed += candidate != program
    # remap_pte acts only on the four seeds with guest page tables (49 of the 150 rounds)
    assert changed > (45 if mutation is mutator.remap_pte else 50)


def test_stacked_mutations_stay_valid_and_reach_every_op_kind():
    rng = random.Random(7)
    seen = Counter()
    for round_ in range(300):
        program = SEEDS[round_ % len(SEEDS)]
        for _ in range(4):
            program = mutator.mutate(program, rng)
        assert valid(program)
        seen.update(op_name(op) for op in program.ops)
    assert set(seen) == set(OP_NAMES.values())


def test_insert_adds_one_op_and_keeps_the_others_in_order():
    rng = random.Random(1)
    program = SEEDS[0]
    for _ in range(50):
        grown = mutator.insert_op(program, rng)
        assert len(grown.ops) == len(program.ops) + 1
        rest = list(grown.ops)
        for op in program.ops:  # the old ops are a subsequence of the new ones
            rest = rest[rest.index(op) + 1:]


def test_delete_duplicate_and_swap_rearrange_existing_ops():
    rng = random.Random(2)
    program = SEEDS[1]
    for _ in range(50):
        shorter = mutator.delete_op(program, rng)
        assert len(shorter.ops) == len(program.ops) - 1
        assert not Counter(shorter.ops) - Counter(program.ops)
        longer = mutator.duplicate_op(program, rng)
        assert Counter(longer.ops) - Counter(program.ops) in [Counter({op: 1})
                                                              for op in program.ops]
        swapped = mutator.swap_ops(program, rng)
        assert Counter(swapped.ops) == Counter(program.ops)


def test_reselect_and_nudge_change_one_op_only():
    rng = random.Random(3)
    program = SEEDS[2]
    for mutation in (mutator.reselect_field, mutator.nudge_field):
        for _ in range(50):
            changed = mutation(program, rng)
            if changed is None:
                continue
            diff = [i for i, (a, b) in enumerate(zip(program.ops, changed.ops)) if a != b]
            assert len(changed.ops) == len(program.ops) and len(diff) <= 1


def test_pair_ops_joins_neighbours_on_different_vcpus_and_splits_pairs():
    rng = random.Random(4)
    joined = split = 0
    for _ in range(200):
        program = SEEDS[rng.randrange(len(SEEDS))]
        candidate = mutator.pair_ops(program, rng)
        if candidate is None:
            continue
        pairs_before = sum(isinstance(op, Parallel) for op in program.ops)
        pairs_after = sum(isinstance(op, Parallel) for op in candidate.ops)
        joined += pairs_after > pairs_before
        split += pairs_after < pairs_before
    assert joined and split


def test_collide_races_a_guest_op_with_an_op_on_its_2m_frame_on_another_vcpu():
    text = """vm type=tdx vcpus=1
    memslot_add slot=0 base=0x200 npages=0x200 flags=private,host_huge host_offset=0
    set_attributes base=0x200 npages=0x200 private=1
    accept vcpu=0 gpa=0x200000 level=4k
    access vcpu=0 gpa=0x201000 word=0 kind=read private=1
    access vcpu=0 gpa=0x600000 word=0 kind=read private=0
    zap_all"""
    program = parse_reproducer(text).program
    rng = random.Random(5)
    seen = Counter()
    for _ in range(300):
        candidate = mutator.collide(program, rng)
        index = next(i for i, op in enumerate(candidate.ops) if isinstance(op, Parallel))
        pair = candidate.ops[index]
        assert valid(candidate)
        assert candidate.header.vcpus == (2 if op_vcpu(pair.b) is not None else 1)
        assert program.ops[index] == pair.a  # the guest op stays in place, the partner joins
        assert candidate.ops[:index] + candidate.ops[index + 1:] == \
            program.ops[:index] + program.ops[index + 1:]
        frames = {g // 512 for g in op_gfns(pair.a)}
        assert not op_gfns(pair.b) or {g // 512 for g in op_gfns(pair.b)} == frames
        seen[op_name(pair.b)] += 1
        seen["fresh page"] += not (op_gfns(pair.b) & set().union(
            *map(op_gfns, program.ops))) and bool(op_gfns(pair.b))
    assert {"accept", "access", "set_attributes", "zap_all", "fresh page"} <= set(seen)


def test_collisions_pair_each_guest_op_with_each_op_that_can_race_it_once():
    text = """vm type=tdx vcpus=1
    memslot_add slot=0 base=0x0 npages=0x400 flags=private,host_huge host_offset=0
    accept vcpu=0 gpa=0x200000 level=4k
    access vcpu=0 gpa=0x201000 word=0 kind=read private=1
    access vcpu=0 gpa=0x201000 word=0 kind=read private=1
    access vcpu=0 gpa=0x600000 word=0 kind=read private=0
    zap_all"""
    program = parse_reproducer(text).program
    every = list(mutator.collisions(program, tail=1))
    arity = [len(next(op for op in c.ops if isinstance(op, Parallel)).sides) for c in every]
    assert arity == sorted(arity)  # every pairing before the first triple
    pairs = every[:arity.count(2)]
    found = []
    for candidate in pairs:
        index = next(i for i, op in enumerate(candidate.ops) if isinstance(op, Parallel))
        pair = candidate.ops[index]
        assert valid(candidate) and candidate.header.vcpus == (1 if op_vcpu(pair.b) is None else 2)
        assert pair.a == program.ops[index] and pair.schedule == 0
        assert candidate.ops[:index] == program.ops[:index]
        assert candidate.ops[index + 1:] == program.ops[index + 1:index + 2]  # the tail kept
        found.append((index, op_name(pair.b), op_gfns(pair.b) and min(op_gfns(pair.b))))
    # The slot is named by its base, in another frame; the two equal reads pair once each.
    assert found == [(1, "access", 0x201), (1, "zap_all", set()),
                     (2, "accept", 0x200), (2, "access", 0x201), (2, "zap_all", set()),
                     (3, "accept", 0x200), (3, "access", 0x201), (3, "zap_all", set()),
                     (4, "zap_all", set())]


def test_collisions_then_race_each_guest_op_with_two_partners_and_grow_parallels():
    text = """vm type=default vcpus=1
    memslot_add slot=0 base=0x200 npages=0x200 flags=host_huge host_offset=0
    memslot_set_flags slot=0 flags=dirty_log,host_huge
    access vcpu=0 gpa=0x201000 word=0 kind=read private=0
    parallel a=(access vcpu=0 gpa=0x202000 word=0 kind=read private=0) b=(zap_all) schedule=0x5
    memslot_set_flags slot=0 flags=host_huge
    recover"""
    program = parse_reproducer(text).program
    found = []
    for candidate in mutator.collisions(program, tail=0):
        index = next(i for i, op in enumerate(candidate.ops) if isinstance(op, Parallel))
        grown = candidate.ops[index]
        assert valid(candidate) and grown.schedule == 0
        assert candidate.ops[:index] == program.ops[:index] and len(candidate.ops) == index + 1
        original = program.ops[index]
        before = original.sides if isinstance(original, Parallel) else (original,)
        assert grown.sides[:len(before)] == before
        found.append((index, tuple(op_name(side) for side in grown.sides[len(before):])))
    # The memslot ops name the slot's base gfn 0x200, in the frame of both accesses; the
    # two flag changes are distinct ops; a parallel is no partner, a guest op in one is.
    flags, add = "memslot_set_flags", "memslot_add"
    assert found[:9] == [(2, (add,)), (2, (flags,)), (2, (flags,)), (2, ("recover",)),
                         (3, (add,)), (3, (flags,)), (3, (flags,)), (3, ("access",)),
                         (3, ("recover",))]
    # Then two partners: the fault, the flag change and recover race as three actors, and
    # the existing pair grows to four.
    assert (2, (flags, "recover")) in found[9:] and (3, (flags, "recover")) in found[9:]
    assert all(len(f[1]) == 2 for f in found[9:])
    assert len(found) == 9 + 6 + 10  # C(4, 2) and C(5, 2)


def test_header_change_never_drops_a_vcpu_in_use():
    rng = random.Random(5)
    program = SEEDS[0]  # uses vcpus 0 and 1
    headers = {mutator.change_header(program, rng).header for _ in range(100)}
    assert all(h.vcpus >= 2 for h in headers)
    assert {h.type for h in headers} == {VmType.DEFAULT, VmType.TDX}


def test_a_header_change_of_the_dirty_log_mode_always_picks_another_mode():
    rng = random.Random(8)
    for program in SEEDS:
        changed = [mutator.change_header(program, rng).header for _ in range(200)]
        modes = {h.manual_protect for h in changed if h.manual_protect != program.header.manual_protect}
        assert modes == set(ManualProtect) - {program.header.manual_protect}
        # every other change keeps the mode: a draw of the mode field never keeps it
        kept = sum(h.manual_protect == program.header.manual_protect for h in changed)
        assert 100 < kept < 160  # type, range flushes and vCPUs: 70% of the draws


def test_collisions_keep_pairings_and_triples_apart():
    program = SEEDS[1]
    every = list(mutator.collisions(program, tail=1))
    apart = mutator.collisions(program, tail=1)
    pairings, triples = list(apart.pairings), list(apart.triples)
    assert every == pairings + triples and pairings and triples
    arity = {len(next(op for op in c.ops if isinstance(op, Parallel)).sides) for c in pairings}
    assert arity == {2}


def test_splice_joins_a_prefix_and_a_suffix_in_a_vm_fitting_both():
    rng = random.Random(6)
    first, second = SEEDS[5], SEEDS[6]  # 1 vcpu and 2 vcpus
    for _ in range(50):
        child = mutator.splice(first, second, rng)
        assert child.header == VmHeader(first.header.type, 2)
        cut = next((i for i in range(len(child.ops) + 1)
                    if child.ops[:i] == first.ops[:i] and
                    child.ops[i:] == second.ops[len(second.ops) - (len(child.ops) - i):]), None)
        assert cut is not None and valid(child)


def test_custom_mutator_is_deterministic_canonical_and_within_max_size():
    data = encode(SEEDS[3])
    for seed in range(200):
        out = mutator.custom_mutator(data, 120, seed)
        assert out == mutator.custom_mutator(data, 120, seed)
        assert len(out) <= 120 and encode(decode(out)) == out
        data = out if seed % 3 else data


def test_custom_mutator_mixes_in_libfuzzers_byte_mutation_sometimes():
    calls = []

    def byte_mutate(data, max_size):
        calls.append(max_size)
        return bytes(reversed(data))

    for seed in range(400):
        out = mutator.custom_mutator(encode(SEEDS[0]), 4096, seed, byte_mutate)
        assert encode(decode(out)) == out
    assert 0.05 < len(calls) / 400 < 0.3


def test_encode_within_keeps_the_longest_op_prefix_that_fits():
    program = SEEDS[3]
    full = encode(program)
    for size in (1, 5, len(full) // 2, len(full) - 1, len(full)):
        out = mutator.encode_within(program, size)
        head = decode(out)
        assert len(out) <= size and head.ops == program.ops[:len(head.ops)]
        if len(head.ops) < len(program.ops):
            assert len(encode(Program(program.header, program.ops[:len(head.ops) + 1]))) > size


def test_crossover_output_is_canonical_and_fits():
    out = mutator.custom_crossover(encode(SEEDS[1]), encode(SEEDS[2]), 64, 9)
    assert len(out) <= 64 and encode(decode(out)) == out


def test_remap_pte_changes_a_written_entry_later_and_invalidates_a_gva_it_maps():
    program = parse_reproducer("""vm type=default vcpus=2
write_pte vcpu=1 table=0x1 index=0 target=0x2 flags=p,rw
write_pte vcpu=1 table=0x2 index=0 target=0x3 flags=p,rw
write_pte vcpu=1 table=0x3 index=2 target=0x4 flags=p,rw
write_pte vcpu=1 table=0x4 index=5 target=0xa flags=p,rw
paging vcpu=1 root=0x1
access vcpu=1 gva=0x405000 word=0 kind=read private=0
""").program
    rng = random.Random(11)
    kinds = Counter()
    for _ in range(200):
        changed = mutator.remap_pte(program, rng)
        at = next((i for i, (a, b) in enumerate(zip(program.ops, changed.ops)) if a != b),
                  len(program.ops))
        write, flush = changed.ops[at:at + 2]
        assert changed.ops[:at] + changed.ops[at + 2:] == program.ops
        source = next(op for op in program.ops[:at][::-1]
                      if op_name(op) == "write_pte" and (op.table, op.index) == (write.table, write.index))
        assert write.vcpu == source.vcpu and write != source
        # the entry's gva, as the tables written before it link it up to the root
        gva = {1: 0, 2: 0, 3: 2 << 21, 4: 2 << 21 | 5 << 12}[write.table]
        assert flush == Invlpg(vcpu=1, gva=gva)
        kinds["unmapped" if not write.flags else "protected" if write.target == source.target
              else "remapped"] += 1
    assert min(kinds.values()) > 20 and len(kinds) == 3


def test_fuzz_package_knows_no_fault_by_name():
    sources = {p.name: p.read_text() for p in (Path(mutator.__file__).parent).glob("*.py")}
    for name in faults.CATALOG:
        assert not [file for file, text in sources.items() if name in text], name

"""The byte and text encodings: totality, canonical fixpoints, round trips, exact text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmufuzz.harness.ops import (OP_NAMES, Access, AccessKind, FlushTlb, Invlpg, MemslotAdd,
                                 MemslotDelete, MemslotFlag, Paging, Parallel, Program, Recover, VmHeader, VmType, ZapAll,
                                 PTE_ADDR_MASK, domain, schedule_digits)
from mmufuzz.fuzz.encoding import (MAX_OPS, ReproError, conform, decode, encode, format_op, format_program,
                           load_reproducer, parse_reproducer)
from mmufuzz.fuzz.stateful import domain_strategy
from mmufuzz.fuzz import encoding

SEEDS = sorted((Path(__file__).parent.parent / "corpus" / "seeds").glob("*.repro"))


@given(st.binary(max_size=600))
@settings(max_examples=500, deadline=None)
def test_decode_is_total_and_encode_decode_is_a_fixpoint(data):
    program = decode(data)
    assert len(program.ops) <= MAX_OPS
    canonical = encode(program)
    assert decode(canonical) == program
    assert encode(decode(canonical)) == canonical


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_every_decoded_program_is_valid_text(data):
    program = decode(data)
    assert parse_reproducer(format_program(program)).program == program


def test_decode_spends_no_bytes_past_the_end():
    assert decode(b"") == Program(VmHeader(VmType.DEFAULT, 1), ())
    assert decode(b"\x07") == Program(VmHeader(VmType.TDX, 4), ())


@pytest.mark.parametrize("path", SEEDS, ids=[p.name for p in SEEDS])
def test_seeds_round_trip_through_bytes_and_text(path):
    program = load_reproducer(path).program
    assert decode(encode(program)) == program
    assert parse_reproducer(format_program(program)).program == program


# --- text round trip for every op kind, from the field domains --------------

def simple_ops(cls, vcpus):
    names = [f.name for f in dataclasses.fields(cls)]
    return st.builds(lambda *values: conform(cls(*values), VmHeader(VmType.TDX, vcpus)),
                     *[domain_strategy(domain(cls, n)) for n in names])


SIMPLE = [cls for cls in OP_NAMES if cls is not Parallel]


@pytest.mark.parametrize("cls", SIMPLE, ids=[OP_NAMES[c] for c in SIMPLE])
@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_text_print_parse_round_trip_for_every_op_kind(cls, data):
    op = data.draw(simple_ops(cls, 4))
    program = Program(VmHeader(VmType.TDX, 4), (op,))
    text = format_program(program, marker=0, meta={"expect": "clean", "target": "tdp"})
    parsed = parse_reproducer(text)
    assert (parsed.program, parsed.marker) == (program, 0)
    assert parsed.meta == {"expect": "clean", "target": "tdp"}


@given(data=st.data())
@settings(max_examples=100, deadline=None)
def test_text_round_trip_for_parallel(data):
    a = data.draw(st.sampled_from(SIMPLE).flatmap(lambda c: simple_ops(c, 4)))
    b = data.draw(st.sampled_from(SIMPLE).flatmap(lambda c: simple_ops(c, 4)))
    header = VmHeader(VmType.DEFAULT, 4)
    op = conform(Parallel(a, b, data.draw(st.integers(0, 2**64 - 1))), header)
    program = Program(header, (op,))
    assert parse_reproducer(format_program(program)).program == program


# --- the exact text -----------------------------------------------------------

def test_canonical_text_uses_hex_for_addresses_and_decimal_for_indices():
    op = Access(1, 0x200000, True, 7, AccessKind.WRITE, 0x2a, False)
    assert format_op(op) == "access vcpu=1 gva=0x200000 word=7 kind=write value=0x2a private=0"
    add = MemslotAdd(3, 0x200, 0x200, MemslotFlag.PRIVATE | MemslotFlag.HOST_HUGE, 17)
    assert format_op(add) == ("memslot_add slot=3 base=0x200 npages=0x200 "
                              "flags=private,host_huge host_offset=17")
    assert format_op(Parallel(ZapAll(), add, 5)) == f"parallel a=(zap_all) b=({format_op(add)}) " \
                                                    "schedule=0x5"


def test_fields_in_any_order_decimal_or_hex_comments_and_marker():
    text = """# mmufuzz reproducer v1
# target: tdp   inject: none   signature: 0badc0de
vm vcpus=2 type=default   # two vCPUs
>>> access private=0 kind=read word=0x3 gpa=4096 vcpu=1  # the read
# expect: clean
"""
    repro = parse_reproducer(text)
    assert repro.program.ops == (Access(1, 0x1000, False, 3, AccessKind.READ, None, False),)
    assert repro.marker == 0
    assert repro.meta == {"target": "tdp", "inject": "none", "signature": "0badc0de",
                          "expect": "clean"}


@pytest.mark.parametrize("range_flush", [False, True])
def test_range_flush_is_printed_only_when_set_and_survives_text_and_bytes(range_flush):
    program = Program(VmHeader(VmType.DEFAULT, 2, range_flush=range_flush), (ZapAll(),))
    text = format_program(program)
    assert ("range_flush=1" in text) is range_flush
    assert parse_reproducer(text).program == program
    assert decode(encode(program)) == program


def test_an_absent_range_flush_is_off_and_a_bad_one_is_refused():
    assert parse_reproducer("vm type=tdx vcpus=1\nzap_all\n").program.header == \
        VmHeader(VmType.TDX, 1)
    with pytest.raises(ReproError, match="range_flush"):
        parse_reproducer("vm type=default vcpus=1 range_flush=2\nzap_all\n")


def test_meta_keeps_a_finding_line_with_colons_whole():
    text = ("# finding: divergence at op 3 (access): reference ok(0x0), tdp ok(0x1)\n"
            "vm type=default vcpus=1\n")
    assert parse_reproducer(text).meta["finding"] == \
        "divergence at op 3 (access): reference ok(0x0), tdp ok(0x1)"


def test_parallel_of_one_vcpu_twice_is_rejected():
    text = ("vm type=default vcpus=2\nparallel a=(flush_tlb vcpu=1) b=(invlpg vcpu=1 gva=0x0) "
            "schedule=0x0\n")
    with pytest.raises(ReproError, match=r"<string>:2: field 'b': a and b both run on vcpu 1"):
        parse_reproducer(text)


def test_error_inside_a_parenthesised_op_names_the_field_and_side():
    text = "vm type=default vcpus=2\nparallel a=(memslot_delete slot=99) b=(zap_all) schedule=0\n"
    with pytest.raises(ReproError, match=r":2: field 'slot': .*out of range.*\(in 'a'\)"):
        parse_reproducer(text)


def test_write_pte_ps_needs_2m_aligned_target():
    text = "vm type=default vcpus=1\nwrite_pte vcpu=0 table=0x1 index=0 target=0x201 flags=p,ps\n"
    with pytest.raises(ReproError, match="field 'target': ps needs a 2M-aligned target"):
        parse_reproducer(text)


@pytest.mark.parametrize("schedule", [0x2007f, 0x3f0, 0x6, 0x80000001])
def test_run_shaped_schedules_cost_two_bytes(schedule):
    """One side parked for k steps while the other runs m: two bytes, not an 8-byte literal."""
    program = Program(VmHeader(VmType.DEFAULT, 1), (Parallel(ZapAll(), ZapAll(), schedule),))
    data = encode(program)
    assert decode(data) == program
    assert len(data) == 1 + 1 + 1 + 1 + 2  # header, parallel, both sides, schedule


# --- untrusted text: what editors and mail clients do to a file ----------------------

def test_a_utf8_byte_order_mark_is_accepted():
    text = "\ufeff# mmufuzz reproducer v1\nvm type=default vcpus=1\nzap_all\n"
    assert parse_reproducer(text).program.ops == (ZapAll(),)


def test_lines_are_numbered_by_newlines_only():
    """U+2028 (and \\x1c-\\x1e) are line breaks to ``str.splitlines`` but not to an editor."""
    text = "# a comment \u2028 with a separator\nvm type=default vcpus=1\nfrobnicate\n"
    with pytest.raises(ReproError, match=r"<string>:3: unknown op 'frobnicate'"):
        parse_reproducer(text)
    crlf = "vm type=default vcpus=1\r\nzap_all\r\nfrobnicate\r\n"
    with pytest.raises(ReproError, match=r"<string>:3: unknown op 'frobnicate'"):
        parse_reproducer(crlf)


def test_tabs_separate_words_like_spaces():
    text = "vm\ttype=default\tvcpus=1\nmemslot_delete\tslot=3\t# tabbed\nzap_all\t\n"
    assert parse_reproducer(text).program.ops == (MemslotDelete(3), ZapAll())


def test_nesting_is_bounded_by_the_grammar_not_by_the_stack(monkeypatch):
    """Depth is checked on the keyword before a side's fields are parsed: no recursion."""
    monkeypatch.setattr(encoding, "MAX_CODE_CHARS", 10 ** 7)
    op = "zap_all"
    for _ in range(5000):
        op = f"parallel a=({op}) b=(recover) schedule=0x0"
    with pytest.raises(ReproError, match=r":2: a parallel cannot contain a parallel \(in 'a'\)"):
        parse_reproducer(f"vm type=default vcpus=1\n{op}\n")


def test_errors_quote_an_excerpt_not_the_whole_line():
    keyword = "z" * 4000
    with pytest.raises(ReproError) as error:
        parse_reproducer(f"vm type=default vcpus=1\n{keyword}\n")
    assert "... (4000 characters)" in str(error.value) and len(str(error.value)) < 200


def test_a_long_gap_still_separates_comment_pairs():
    """Two or more spaces separate ``key: value`` pairs, however many there are."""
    text = "# target:" + " " * 200_000 + "tdp   inject: none\nvm type=default vcpus=1\n"
    assert parse_reproducer(text).meta == {"target": "tdp", "inject": "none"}


# --- more than two actors -------------------------------------------------------------

def test_two_actor_bytes_are_what_they_were_before_there_were_more():
    """The canonical bytes of a program with pairs only are those the two-actor format wrote
    (taken from it), so every stored input and seed decodes as it did."""
    program = Program(VmHeader(VmType.TDX, 2), (
        MemslotAdd(0, 0x200, 0x200, MemslotFlag.HOST_HUGE, 0),
        Parallel(Access(0, 0x200000, False, 0, AccessKind.WRITE, 0x2a, False), ZapAll(), 0x2007f),
        Parallel(FlushTlb(1), Recover(), 0x1234567890abcdef)))
    data = bytes.fromhex("03000003040800e25600000300010200c80d09e2b801d2ffefcdab9078563412")
    assert encode(program) == data and decode(data) == program


def test_three_and_four_actors_round_trip_through_bytes_and_text():
    import random
    rng = random.Random(5)
    arities = {2: 0, 3: 0, 4: 0}
    for _ in range(400):
        program = decode(rng.randbytes(rng.randrange(200)))
        for op in program.ops:
            if isinstance(op, Parallel):
                arities[len(op.sides)] += 1
        assert decode(encode(program)) == program
        assert encode(decode(encode(program))) == encode(program)
        text = format_program(program)
        assert parse_reproducer(text).program == program
        assert format_program(parse_reproducer(text).program) == text
    assert min(arities.values()) >= 20, arities


@pytest.mark.parametrize("actors", [3, 4])
def test_a_run_shaped_schedule_of_n_actors_is_its_order_and_run_lengths(actors):
    """Selector: order (mod N!) and first run (quotient); a byte for each later run; then
    the first actor one step more: N bytes, never a literal."""
    orders = encoding._ORDERS[actors]
    order = orders[-1]  # d c b a, or c b a
    first, later = encoding._RUN_LIMITS[actors]
    lengths = [first] + [later] * (actors - 1)
    selector = (first - 1) * len(orders) + len(orders) - 1
    data = bytes([selector] + [later - 1] * (actors - 1))
    dom = domain(Parallel, "schedule")
    schedule = encoding._decode_schedule(encoding._Reader(data), dom, actors)
    expected = [actor for actor, n in zip(order, lengths) for _ in range(n)] + [order[0]]
    assert schedule_digits(schedule, actors) == expected
    out = bytearray()
    encoding._encode_schedule(out, schedule, dom, actors)
    assert bytes(out) == data


def test_the_decoder_makes_pairs_triples_and_quadruples_by_opcode():
    header = bytes([0b110])  # default VM, 4 vCPUs
    zap = bytes([encoding._FIRST_SIMPLE_OPCODE[(ZapAll, 0)]])
    for actors in (2, 3, 4):
        opcode = encoding._FIRST_OPCODE[(Parallel, actors)]
        program = decode(header + bytes([opcode]) + zap * actors + bytes([0x80]))
        (op,) = program.ops
        assert op == Parallel.of([ZapAll()] * actors, 0)
        assert format_op(op) == "parallel " + " ".join(
            f"{name}=(zap_all)" for name in "abcd"[:actors]) + " schedule=0x0"


def test_conform_moves_a_side_to_a_free_vcpu_or_drops_it():
    reads = [Access(1, 0, False, 0, AccessKind.READ, None, False)] * 3
    three = Parallel.of(reads, 0x15)  # a b c
    assert [side.vcpu for side in conform(three, VmHeader(VmType.DEFAULT, 4)).sides] == [1, 2, 3]
    two = conform(three, VmHeader(VmType.DEFAULT, 2))
    assert [side.vcpu for side in two.sides] == [1, 0] and two.schedule == 0b10  # c went
    assert conform(three, VmHeader(VmType.DEFAULT, 1)) == dataclasses.replace(reads[0], vcpu=0)


def test_n_actor_text_rules():
    vm = "vm type=default vcpus=3\n"
    text = vm + "parallel schedule=0x15 c=(zap_all) a=(flush_tlb vcpu=0) b=(flush_tlb vcpu=1)\n"
    op = parse_reproducer(text).program.ops[0]
    assert format_op(op) == ("parallel a=(flush_tlb vcpu=0) b=(flush_tlb vcpu=1) c=(zap_all) "
                             "schedule=0x15")
    for line, error in (
            ("parallel a=(zap_all) b=(recover) d=(zap_all) schedule=0x0", "field 'd': d= needs c="),
            ("parallel a=(flush_tlb vcpu=2) b=(zap_all) c=(flush_tlb vcpu=2) schedule=0x0",
             "field 'c': a and c both run on vcpu 2"),
            ("parallel a=(zap_all) b=(zap_all) c=(zap_all) d=(zap_all) e=(zap_all) schedule=0x0",
             "field 'e': unknown field for parallel \\(its actors are a, b, c, d\\)")):
        with pytest.raises(ReproError, match=f"<string>:2: {error}"):
            parse_reproducer(vm + line + "\n")


def _last_op_with(prefix_text: str, op_bytes: bytes):
    """The op ``op_bytes`` decodes to after the ops of the reproducer text ``prefix_text``."""
    prefix = parse_reproducer(prefix_text).program
    return decode(encode(prefix) + op_bytes).ops[len(prefix.ops)]


_TABLES = """vm type=default vcpus=1
memslot_add slot=0 base=0x0 npages=0x20 flags= host_offset=0
write_pte vcpu=0 table=0x1 index=0 target=0x2 flags=p,rw
write_pte vcpu=0 table=0x2 index=0 target=0x3 flags=p,rw
write_pte vcpu=0 table=0x3 index=1 target=0x4 flags=p,rw
paging vcpu=0 root=0x1
access vcpu=0 gva=0x7000 word=0 kind=read private=0
write_pte vcpu=0 table=0x4 index=5 target=0x10 flags=p
"""


def test_a_gva_field_reuses_what_the_latest_pte_write_maps_then_earlier_gvas():
    """Operand reuse: the upper selectors of a gva field draw from the gvas the latest ops
    used, most recent first; a PTE write's gvas are the walks through its entry (root 1,
    entry 0 at levels 4 and 3, entry 1 at level 2, entry 5 at level 1)."""
    invlpg = bytes([encoding.opcode((Invlpg, 0)), 0])
    assert _last_op_with(_TABLES, invlpg + bytes([encoding.REUSE_SELECTOR])).gva \
        == 1 << 21 | 5 << 12
    assert _last_op_with(_TABLES, invlpg + bytes([encoding.REUSE_SELECTOR + 1])).gva == 0x7000
    # Below the reuse selectors: the pool, as before.
    assert _last_op_with(_TABLES, invlpg + bytes([0])).gva == 0


def test_a_self_map_entry_maps_the_gvas_of_every_path_through_it():
    text = _TABLES + "write_pte vcpu=0 table=0x1 index=1 target=0x1 flags=p,rw\n" \
                     "write_pte vcpu=0 table=0x1 index=2 target=0x9 flags=p,rw\n"
    context = encoding._Context(parse_reproducer(text).program.header)
    for op in parse_reproducer(text).program.ops:
        context.note(op)
    # Root 1 at level 4 maps entry 2 at 2 << 39; through the self-map (entry 1) table 1 is
    # also a level-3, level-2 and level-1 table.
    assert context.recent["gva"][:4] == [2 << 39, 1 << 39 | 2 << 30,
                                         1 << 39 | 1 << 30 | 2 << 21,
                                         1 << 39 | 1 << 30 | 1 << 21 | 2 << 12]


def test_a_gfn_field_reuses_the_latest_ops_gfns():
    paging = bytes([encoding.opcode((Paging, 0)), 0])
    roots = [_last_op_with(_TABLES, paging + bytes([encoding.REUSE_SELECTOR + i])).root
             for i in range(4)]
    assert roots == [0x4, 0x10, 0x1, 0x3]  # the last write_pte's table and target, then the
    # paging op's root, then the write_pte's before it (the gfns already listed move up)


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_reused_operands_round_trip_through_bytes(tail):
    """A program whose ops reuse operands encodes to bytes that decode to it again."""
    program = decode(encode(parse_reproducer(_TABLES).program) + tail)
    assert decode(encode(program)) == program


def test_a_fresh_invlpg_after_a_pte_write_names_the_gva_it_maps_one_time_in_16():
    """Of the 256 values of a fresh invlpg's gva selector, at least 16 name the gva the
    latest PTE write maps (one in about 80 when every gva came from the pool)."""
    invlpg = bytes([encoding.opcode((Invlpg, 0)), 0])
    gvas = [_last_op_with(_TABLES, invlpg + bytes([s])).gva for s in range(256)]
    assert gvas.count(1 << 21 | 5 << 12) >= 16


def _write_after_tables(value: int) -> bytes:
    """The bytes of _TABLES and then a guest write of ``value`` to table 0x4's word 3."""
    text = _TABLES + f"access vcpu=0 gpa=0x4000 word=3 kind=write value={value:#x} private=0\n"
    return encode(parse_reproducer(text).program)


def test_a_written_value_is_a_page_table_entry_naming_a_gfn_the_latest_ops_used():
    """The upper selectors of a write's value make an entry: a gfn the latest ops named
    (0x4, 0x10, 0x1, ...), NX from the selector, bits 0-7 from the next byte; such an entry
    costs two bytes, not a literal's nine, and decodes back to itself."""
    dom = domain(Access, "value")
    gfns = [0x4, 0x10, 0x1]
    read = lambda *data: encoding._decode_value(encoding._Reader(bytes(data)), dom, gfns)
    assert read(encoding.REUSE_SELECTOR, 0x21) == 0x4021
    assert read(encoding.REUSE_SELECTOR + 3, 0xE1) == 1 << 63 | 0x10000 | 0xE1
    assert {read(s, f) & ~encoding._PTE_BITS for s in range(0x80, 0xFF) for f in (0, 0xFF)} \
        == {0}
    assert {(read(s, 0) & PTE_ADDR_MASK) >> 12 for s in range(0x80, 0xFF)} == set(gfns)
    # No gfn named yet, or a lower selector: the constants, as before.
    assert encoding._decode_value(encoding._Reader(bytes([0x80])), dom, []) \
        == encoding._VALUES[0x80 % len(encoding._VALUES)]
    assert read(1) == 0x1
    entry = 1 << 63 | 0x10000 | 0xA3  # after _TABLES: gfn 0x10 is the second most recent
    assert len(_write_after_tables(entry)) == len(_write_after_tables(0)) + 1
    assert decode(_write_after_tables(entry)).ops[-1].value == entry
    literal = 0x10000 | 1 << 8  # bit 8 is not among the entry's bytes: a literal
    assert len(_write_after_tables(literal)) == len(_write_after_tables(0)) + 8

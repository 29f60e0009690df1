"""Structure-aware mutation of programs: libFuzzer's custom mutator and crossover.

libFuzzer's byte flips mostly land in selector bytes and shift every later op,
so on their own they rarely make the small structural edits that matter to an
MMU (one more access after a zap, the same op on another vCPU, two ops turned
into a ``parallel``).  This module mutates :class:`Program` objects instead:
``decode`` -> mutate -> ``encode``.

Every mutation is valid by construction: new ops and new field values are
produced by decoding bytes *in the context of the ops before them*, so they
come from the encoding's interesting pools (slot bounds, 2M frames, gfns used
earlier) and pass its cross-field fix-ups; whole-op edits (delete, duplicate,
swap, splice) keep ops that were valid for the header; a numeric nudge goes
through :func:`mmufuzz.fuzz.encoding.conform`.  Nothing here knows a bug: every choice
is generic.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Callable, Iterator, Optional

from mmufuzz.harness.ops import (ACTORS_MAX, PAGE_SHIFT, PAGES_PER_2M, SIDE_NAMES, Invlpg,
                                 Parallel, Program, PteFlag, VmHeader, VmType, WritePte, domain,
                                 gpa_field, op_gfns, op_vcpu)
from mmufuzz.fuzz.encoding import (LITERAL, MAX_OPS, conform, decode, encode, mapped_gvas,
                                   opcode)
from mmufuzz.fuzz.opmix import DEFAULT, OpMix

# Random bytes behind a freshly generated op: enough for a parallel with literals.
FRESH_OP_BYTES = 40
# Chance that one custom-mutator call hands the input to libFuzzer's byte mutator.
BYTE_MUTATION_RATE = 0.15
# Stacked structural mutations per call: 1 + a geometric number of extra ones.
EXTRA_MUTATION_RATE = 0.3
ATTEMPTS = 8

ByteMutate = Callable[[bytes, int], bytes]


# --- helpers ------------------------------------------------------------------

def _prefix_bytes(program: Program, index: int) -> bytes:
    """The canonical bytes of the header and ``program.ops[:index]``."""
    return encode(program.with_ops(program.ops[:index]))


def _decode_after(prefix: bytes, index: int, op_bytes: bytes):
    """The op ``op_bytes`` decodes to after the ``index`` ops of ``prefix``, or None."""
    decoded = decode(prefix + op_bytes)
    return decoded.ops[index] if len(decoded.ops) > index else None


def encode_within(program: Program, max_size: int) -> bytes:
    """Canonical bytes of ``program``, cut to its longest op prefix that fits ``max_size``.

    The encoding is sequential (each op's bytes depend only on the ops before
    it), so the bytes of an op prefix are a prefix of the bytes: decoding the
    first ``max_size`` bytes keeps every complete op, and the possibly padded
    last one is dropped if it does not fit.
    """
    data = encode(program)
    if len(data) <= max_size:
        return data
    head = decode(data[:max_size])
    data = encode(head)
    if len(data) <= max_size:
        return data
    return encode(head.with_ops(head.ops[:-1]))


# --- mutations: each returns a candidate program or None ----------------------

def insert_op(program: Program, rng: random.Random, mix: OpMix = DEFAULT) -> Optional[Program]:
    """Insert a fresh op of a kind drawn from ``mix``, its fields from the pools of the ops
    before it."""
    if len(program.ops) >= MAX_OPS:
        return None
    index = rng.randint(0, len(program.ops))
    fresh = bytearray(rng.randbytes(FRESH_OP_BYTES))
    fresh[0] = mix.recode(fresh[0])
    op = _decode_after(_prefix_bytes(program, index), index, bytes(fresh))
    if op is None:
        return None
    return program.with_ops(program.ops[:index] + (op,) + program.ops[index:])


def delete_op(program: Program, rng: random.Random) -> Optional[Program]:
    """Drop one op."""
    if not program.ops:
        return None
    index = rng.randrange(len(program.ops))
    return program.with_ops(program.ops[:index] + program.ops[index + 1:])


def duplicate_op(program: Program, rng: random.Random) -> Optional[Program]:
    """Repeat one op somewhere later (the same access after something changed)."""
    if not program.ops or len(program.ops) >= MAX_OPS:
        return None
    source = rng.randrange(len(program.ops))
    index = rng.randint(source + 1, len(program.ops))
    ops = program.ops
    return program.with_ops(ops[:index] + (ops[source],) + ops[index:])


def swap_ops(program: Program, rng: random.Random) -> Optional[Program]:
    """Exchange two ops, usually neighbours (reordering is what races are made of)."""
    if len(program.ops) < 2:
        return None
    i = rng.randrange(len(program.ops) - 1)
    j = i + 1 if rng.random() < 0.5 else rng.randrange(i + 1, len(program.ops))
    ops = list(program.ops)
    ops[i], ops[j] = ops[j], ops[i]
    return program.with_ops(ops)


def reselect_field(program: Program, rng: random.Random) -> Optional[Program]:
    """Re-pick one field of one op: most often another value of its interesting pool.

    Works on the op's bytes in context: one selector byte gets a new small
    index (a pool pick), any byte, or the literal escape.
    """
    if not program.ops:
        return None
    index = rng.randrange(len(program.ops))
    prefix = _prefix_bytes(program, index)
    data = bytearray(_prefix_bytes(program, index + 1)[len(prefix):])
    if len(data) < 2:
        return None
    position = rng.randrange(1, len(data))
    data[position] = rng.choice((rng.randrange(16), rng.randrange(256), LITERAL))
    op = _decode_after(prefix, index, bytes(data))
    if op is None:
        return None
    return program.with_ops(program.ops[:index] + (op,) + program.ops[index + 1:])


def _edit_field(program: Program, rng: random.Random, kinds: tuple,
                new_value: Callable) -> Optional[Program]:
    """Replace one field whose domain kind is in ``kinds``, of one op or one side of a pair."""
    if not program.ops:
        return None
    index = rng.randrange(len(program.ops))
    op = program.ops[index]
    side = rng.choice(SIDE_NAMES[:len(op.sides)] + (None,)) if isinstance(op, Parallel) else None
    target = getattr(op, side) if side else op
    names = [f.name for f in dataclasses.fields(target)
             if domain(type(target), f.name).kind in kinds and getattr(target, f.name) is not None]
    if not names:
        return None
    name = rng.choice(names)
    value = new_value(getattr(target, name), domain(type(target), name), rng)
    changed = dataclasses.replace(target, **{name: value})
    if side:
        changed = dataclasses.replace(op, **{side: changed})
    changed = conform(changed, program.header)
    return program.with_ops(program.ops[:index] + (changed,) + program.ops[index + 1:])


def _nudged(value: int, dom, rng: random.Random) -> int:
    """A neighbour of an int field: one unit, one 2M frame, a bit flip, or a bound."""
    unit = dom.align * rng.choice((1, 1, 512))
    step = rng.randrange(4)
    if step == 0:
        value += unit
    elif step == 1:
        value -= unit
    elif step == 2:
        value ^= dom.align << rng.randrange(max(1, (dom.hi // dom.align).bit_length() - 1))
    else:
        value = rng.choice((dom.lo, dom.hi - dom.align))
    return min(max(value, dom.lo), dom.hi - 1) // dom.align * dom.align


def _recast(value, dom, rng: random.Random):
    """Another value of a choice field: a flipped bool, any enum member, one flag toggled."""
    if dom.kind == "bool":
        return not value
    choices = list(dom.choices.values())
    return rng.choice(choices) if dom.kind == "enum" else value ^ rng.choice(choices)


def nudge_field(program: Program, rng: random.Random) -> Optional[Program]:
    """Move one numeric field to a neighbour (off-by-one pages, the next 2M frame, ...)."""
    return _edit_field(program, rng, ("int",), _nudged)


def recast_field(program: Program, rng: random.Random) -> Optional[Program]:
    """Give one choice field (enum, flag set, bool) another value: read -> fetch, 4k -> 2m, ..."""
    return _edit_field(program, rng, ("enum", "flags", "bool"), _recast)


def pair_ops(program: Program, rng: random.Random) -> Optional[Program]:
    """Join two neighbouring ops into a ``parallel``, join the op after a ``parallel`` to it
    as one more actor, or split a ``parallel`` into its sides."""
    if not program.ops:
        return None
    index = rng.randrange(len(program.ops))
    ops = program.ops
    joinable = index + 1 < len(ops) and not isinstance(ops[index + 1], Parallel)
    if isinstance(ops[index], Parallel):
        pair = ops[index]
        if joinable and len(pair.sides) < ACTORS_MAX and rng.random() < 0.5:
            grown = _join(pair.sides, ops[index + 1], pair.schedule)
            return grown and program.with_ops(ops[:index] + (grown,) + ops[index + 2:])
        if len(ops) + len(pair.sides) - 1 > MAX_OPS:
            return None
        sides = list(pair.sides)
        if len(sides) == 2:
            sides = sides if rng.random() < 0.5 else sides[::-1]
        else:
            rng.shuffle(sides)
        return program.with_ops(ops[:index] + tuple(sides) + ops[index + 1:])
    if not joinable:
        return None
    pair = _join((ops[index],), ops[index + 1], _random_schedule(rng))
    return pair and program.with_ops(ops[:index] + (pair,) + ops[index + 2:])


def _join(sides: tuple, op, schedule: int) -> Optional[Parallel]:
    """The ``parallel`` of ``sides`` and ``op``, or None if ``op`` runs on a side's vCPU."""
    vcpu = op_vcpu(op)
    if vcpu is not None and vcpu in map(op_vcpu, sides):
        return None
    return Parallel.of(sides + (op,), schedule)


def remap_pte(program: Program, rng: random.Random) -> Optional[Program]:
    """Change a guest PTE the program wrote, later, and invalidate what it mapped: one edit.

    A guest kernel changes a mapping (mprotect, munmap, mremap, a copy-on-write
    break, iounmap) by rewriting an existing PTE and then running ``invlpg``
    on each gva it mapped: x86 lets a changed translation be used until it is
    invalidated, so the pair is the unit of every mapping change.  Drawn as
    two fresh ops, the pair needs the same table and index, then an invlpg
    of a gva that entry maps, at a position between them: a few in 10,000
    mutations.  Here the entry is one an earlier ``write_pte`` named; its new
    value is a fresh target and flags (remap), one flag toggled (protect), or
    not present (unmap); the invlpg names a gva the entry maps, as the ops
    before it tell (:func:`mmufuzz.fuzz.encoding.mapped_gvas`), on the vCPU that wrote it.
    """
    ops = program.ops
    writes = [i for i, op in enumerate(ops) if type(op) is WritePte]
    if not writes or len(ops) + 2 > MAX_OPS:
        return None
    source = rng.choice(writes)
    old = ops[source]
    index = rng.randint(source + 1, len(ops))
    how = rng.randrange(3)
    if how == 0:
        fresh = bytes([opcode((WritePte, 0))]) + rng.randbytes(FRESH_OP_BYTES)
        new = _decode_after(_prefix_bytes(program, index), index, fresh)
        if type(new) is not WritePte:
            return None
        new = dataclasses.replace(new, vcpu=old.vcpu, table=old.table, index=old.index)
    elif how == 1:
        new = dataclasses.replace(old, flags=_recast(old.flags, domain(WritePte, "flags"), rng))
    else:
        new = dataclasses.replace(old, flags=PteFlag(0))
    new = conform(new, program.header)
    changed = program.with_ops(ops[:index] + (new,) + ops[index:])
    gvas = mapped_gvas(changed, index)
    if not gvas:
        return changed
    flush = conform(Invlpg(vcpu=new.vcpu, gva=rng.choice(gvas)), program.header)
    return changed.with_ops(changed.ops[:index + 1] + (flush,) + changed.ops[index + 1:])


def _fault_frame(op) -> int:
    """The first gfn of the 2M frame a guest op faults on."""
    gfn = getattr(op, gpa_field(op)) >> PAGE_SHIFT
    return gfn - gfn % PAGES_PER_2M


def _guest_side(op):
    """The guest op faulting on a gpa that ``op`` is or, for a ``parallel`` that can take
    one more actor, its first such side; else None."""
    if isinstance(op, Parallel):
        if len(op.sides) == ACTORS_MAX:
            return None
        return next((side for side in op.sides if gpa_field(side)), None)
    return op if gpa_field(op) else None


def _frame_partners(ops: tuple, index: int) -> dict:
    """The ops that can race the guest op at ``index`` (a ``parallel``'s guest side), by
    kind: every other op that names only its 2M frame, or no memory at all (like
    ``zap_all``); races need shared state."""
    frame = _fault_frame(_guest_side(ops[index]))
    partners: dict = {}
    for i, op in enumerate(ops):
        if i != index and not isinstance(op, Parallel) \
                and all(g - g % PAGES_PER_2M == frame for g in op_gfns(op)):
            partners.setdefault(type(op), []).append(op)
    return partners


def _collision(program: Program, index: int, partners: tuple, schedule: int) -> Program:
    """``program`` with ``partners`` run in parallel with its op at ``index`` (more actors,
    if that is a ``parallel``), each guest op on a vCPU of its own (the VM gets more if
    needed)."""
    ops = program.ops
    sides = ops[index].sides if isinstance(ops[index], Parallel) else (ops[index],)
    sides += partners
    header = program.header
    guests = sum(op_vcpu(side) is not None for side in sides)
    if guests > header.vcpus:
        header = dataclasses.replace(header, vcpus=guests)
    pair = conform(Parallel.of(sides, schedule), header)
    return Program(header, ops[:index] + (pair,) + ops[index + 1:])


def collide(program: Program, rng: random.Random) -> Optional[Program]:
    """Run a guest op concurrently with a conflicting op (syzkaller's "collide").

    The op is a guest access or accept by gpa, or a ``parallel`` of fewer
    than four actors with one, which gets the partner as one more actor
    (races of three: two faults and a memslot change, a fault, a zap and a
    conversion): the MMU's concurrent paths are the faults they take.  Its
    partner is another op of the program that can race it
    (:func:`_frame_partners`).  Each kind of partner is equally likely,
    however many ops of a kind the program has.  Half the time a guest
    partner moves to a page of the frame no op has named yet, so that
    vCPUs fault, accept or convert fresh pages side by side.
    """
    ops = program.ops
    guests = [i for i, op in enumerate(ops) if _guest_side(op)]
    if not guests:
        return None
    index = rng.choice(guests)
    partners = _frame_partners(ops, index)
    if not partners:
        return None
    partner = rng.choice(rng.choice(list(partners.values())))
    field = gpa_field(partner)
    if field and rng.random() < 0.5:
        frame = _fault_frame(_guest_side(ops[index]))
        named = set().union(*map(op_gfns, ops))
        fresh = [g for g in range(frame, frame + PAGES_PER_2M) if g not in named]
        if fresh:
            gfn = fresh[0] if rng.random() < 0.5 else rng.choice(fresh)
            partner = dataclasses.replace(partner, **{field: gfn << PAGE_SHIFT})
    return _collision(program, index, (partner,), _random_schedule(rng))


@dataclasses.dataclass(frozen=True)
class Collisions:
    """The collisions of one program (:func:`collisions`): every pairing, then every
    triple; iterating gives them in that order.

    The two are kept apart so that the schedule explorer can run the
    pairings of every waiting input before the triples of any
    (:meth:`mmufuzz.fuzz.schedules.ScheduleExplorer.offer_collisions`): an input has
    a few dozen pairings and hundreds of triples.
    """

    pairings: Iterator[Program]
    triples: Iterator[Program]

    def __iter__(self) -> Iterator[Program]:
        return itertools.chain(self.pairings, self.triples)


def collisions(program: Program, tail: int) -> Collisions:
    """Every :func:`collide` of ``program`` without a moved page, in a fixed order, each
    cut ``tail`` ops after its ``parallel``; then the same with two partners at once.

    AFL runs deterministic stages on each new input; this is ours for races:
    each guest op (or ``parallel`` with a guest side and room for more
    actors) with each distinct op that can race it, schedule 0 (the schedule
    explorer varies it).  A race may need the one pairing among dozens that a
    random collide rarely draws: in a seed that accepts a range at 2M and
    then at 4K, only the fault paired with the 4K accept races.  Some races
    need a third party (a fault walking a table while one op changes what
    the range may map and another acts on it), so after every pairing come
    the triples: each guest op with each two distinct ops that can race it
    (a ``parallel`` of two with room for both gets four actors).  Both are
    drawn lazily, so a campaign reaches them when it has time.
    """
    return Collisions(_with_partners(program, tail, 1), _with_partners(program, tail, 2))


def _with_partners(program: Program, tail: int, more: int) -> Iterator[Program]:
    """Each guest op of ``program`` in parallel with each ``more`` distinct ops that can
    race it (:func:`collisions`)."""
    ops = program.ops
    for index, op in enumerate(ops):
        if _guest_side(op) is None:
            continue
        actors = len(op.sides) if isinstance(op, Parallel) else 1
        if actors + more > ACTORS_MAX:
            continue
        kinds = _frame_partners(ops, index).values()
        partners = tuple(dict.fromkeys(p for kind in kinds for p in kind))
        cut = program.with_ops(ops[:index + 1 + tail])
        for group in itertools.combinations(partners, more):
            yield _collision(cut, index, group, 0)


def _random_schedule(rng: random.Random) -> int:
    """A schedule for a new ``parallel``: short or long random bit patterns."""
    return rng.getrandbits(rng.choice((4, 8, 64)))


def change_header(program: Program, rng: random.Random) -> Optional[Program]:
    """Switch the VM type, switch to another dirty-log mode, switch range flushes, or add a
    vCPU (removing one is valid only if it is unused).

    The header options each select whole paths of a target (a TD's private
    memory, manual-protect dirty logging, ranged TLB flushes), and a corpus
    inherits its seeds' headers: this edit is how the rest of the corpus gets
    there.  A new dirty-log mode is always another one than the program's.
    """
    header = program.header
    roll = rng.random()
    if roll < 0.3:
        kind = VmType.TDX if header.type is VmType.DEFAULT else VmType.DEFAULT
        return Program(dataclasses.replace(header, type=kind), program.ops)
    if roll < 0.6:
        modes = [mode for mode in domain(VmHeader, "manual_protect").choices.values()
                 if mode is not header.manual_protect]
        return Program(dataclasses.replace(header, manual_protect=rng.choice(modes)),
                       program.ops)
    if roll < 0.8:
        return Program(dataclasses.replace(header, range_flush=not header.range_flush),
                       program.ops)
    used = max((_max_vcpu(op) for op in program.ops), default=-1)
    vcpus = rng.randint(used + 1 if used >= 0 else 1, domain(VmHeader, "vcpus").hi - 1)
    return Program(dataclasses.replace(header, vcpus=vcpus), program.ops)


def _max_vcpu(op) -> int:
    if isinstance(op, Parallel):
        return max(map(_max_vcpu, op.sides))
    vcpu = op_vcpu(op)
    return -1 if vcpu is None else vcpu


# Weighted: field edits dominate, as in libFuzzer's own mutator mix.  A header change
# weighs 3 (it was 1, one mutation in 27: a seed met a given dirty-log mode in about one
# of its mutations in 400, and no corpus input but a mutant of one reaches that mode).
MUTATIONS = (
    (insert_op, 4), (delete_op, 3), (duplicate_op, 2), (swap_ops, 2),
    (reselect_field, 5), (nudge_field, 3), (recast_field, 3), (pair_ops, 1), (collide, 3),
    (change_header, 3), (remap_pte, 2),
)
_FUNCTIONS = tuple(f for f, _ in MUTATIONS)
_WEIGHTS = tuple(w for _, w in MUTATIONS)


def mutate(program: Program, rng: random.Random, mix: OpMix = DEFAULT) -> Program:
    """One structural mutation of ``program``: a valid program that differs if it can;
    a fresh op's kind is drawn from ``mix``."""
    for _ in range(ATTEMPTS):
        mutation = rng.choices(_FUNCTIONS, _WEIGHTS)[0]
        candidate = insert_op(program, rng, mix) if mutation is insert_op \
            else mutation(program, rng)
        if candidate is not None and candidate != program:
            return candidate
    return program


def splice(first: Program, second: Program, rng: random.Random) -> Program:
    """A prefix of ``first`` followed by a suffix of ``second``, in a VM fitting both."""
    header = dataclasses.replace(first.header,
                                 vcpus=max(first.header.vcpus, second.header.vcpus))
    cut_first = rng.randint(0, len(first.ops))
    cut_second = rng.randint(0, len(second.ops))
    # Every op of either side is valid in the wider VM: vCPU numbers stay below its count.
    return Program(header, (first.ops[:cut_first] + second.ops[cut_second:])[:MAX_OPS])


# --- libFuzzer's entry points ---------------------------------------------------

def custom_mutator(data: bytes, max_size: int, seed: int,
                   byte_mutate: Optional[ByteMutate] = None, mix: OpMix = DEFAULT) -> bytes:
    """``LLVMFuzzerCustomMutator``: canonical bytes of a mutated program, at most ``max_size``.

    With ``byte_mutate`` (``atheris.Mutate``), a fraction of calls use
    libFuzzer's own byte mutations instead: they find encodings no structural
    edit reaches (a literal escape, a different op stream after a shifted byte).
    Fresh ops are drawn from ``mix``, the campaign target's (:mod:`mmufuzz.fuzz.opmix`).
    """
    rng = random.Random(seed)
    if byte_mutate is not None and rng.random() < BYTE_MUTATION_RATE:
        return encode_within(decode(byte_mutate(data, max_size)), max_size)
    program = decode(data)
    program = mutate(program, rng, mix)
    while rng.random() < EXTRA_MUTATION_RATE:
        program = mutate(program, rng, mix)
    return encode_within(program, max_size)


def custom_crossover(first: bytes, second: bytes, max_size: int, seed: int) -> bytes:
    """``LLVMFuzzerCustomCrossOver``: splice two corpus programs."""
    program = splice(decode(first), decode(second), random.Random(seed))
    return encode_within(program, max_size)

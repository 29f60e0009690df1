"""Staged test-case reduction that preserves a finding's signature (DESIGN §6).

A fuzzer's raw finding is a few dozen ops of noise around a handful that
matter.  Reproducibility is checked first: a finding that does not come back
on every replay is reported as flaky and never "minimized" into noise.  Then
the stages run cheapest first and repeat to a fixpoint:

1. cut every op after the failing one;
2. slice: keep only the ops the failing op depends on (shared slot, vCPU or
   2M frame, transitively; VM-wide ops always stay), tried as one candidate;
3. drop single ops, last to first (most ops are unrelated to the failure);
4. ddmin over the remaining ops (removes groups that only matter together);
5. take private memory out as a whole: no ``set_attributes`` or ``accept``,
   no private slots or accesses, in a default VM if the finding keeps there
   (one at a time, each of these breaks the private path the others build);
6. drop an op that relocates memory (a slot move) while moving the later ops'
   addresses back to where the memory was;
7. drop each side of a ``parallel`` that is a failing no-op (an ``einval``
   or ``unsupported`` op that changes nothing, like an overlapping
   ``memslot_add`` or ``set_attributes npages=0``); of a pair only the other
   side stays.  If the finding was at a pair that became a plain op, its
   signature names the remaining op's kind instead (the one change of
   signature the minimizer makes);
8. simplify fields toward the smallest value of their domain (0, fewer pages,
   4k instead of 2m, vcpu 0, no flags, schedule 0), and a ``parallel`` toward
   fewer actors: one side alone, or all but one (:meth:`Parallel.without`
   keeps the order the schedule ran the others in);
9. move an op earlier where that lets another op go (a smaller program in
   another order, which deletions alone never reach);
10. renumber slots and vCPUs densely from 0 and shrink the VM's vCPU count.

Every candidate stays valid by construction (:func:`mmufuzz.fuzz.encoding.conform`),
is accepted only if it keeps the signature, and results are cached per program,
so no program runs twice.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

from mmufuzz.harness import faults
from mmufuzz.harness.ops import (ADDRESS_FIELDS, GFN_FIELDS, PAGE_SHIFT, PAGES_PER_2M, SIDE_NAMES,
                                 Accept, Access, MemslotAdd, MemslotFlag, Parallel, Program,
                                 SetAttributes, VmType, domain, op_gfns, op_name, op_vcpu,
                                 outcome_kind)
from mmufuzz.fuzz.corpus import Replay
from mmufuzz.fuzz.encoding import Reproducer, conform
from mmufuzz.fuzz.runner import Finding, make_target, run_program
from mmufuzz.reference.model import Reference

REPRO_RUNS = 3
MAX_ROUNDS = 16
# A range op names at most this many 2M frames in a slice; wider ranges touch "everything".
MAX_SLICE_FRAMES = 64
# Reordering is tried on programs of at most this many ops (about 12^3 / 2 candidates).
MAX_REORDER_OPS = 12


@dataclass(frozen=True)
class Minimized:
    """The outcome of a reduction.

    ``program`` is the smallest program found that still fails with
    ``signature`` (the input itself when the finding did not reproduce every
    time); ``reproduced`` of ``attempts`` replays of the input gave
    ``original_signature``; ``finding`` is the minimized program's (or a
    failing replay's).  The two signatures differ only when the failing op was
    a ``parallel`` whose no-op side went (stage 7).
    """

    program: Program
    finding: Optional[Finding]
    signature: Optional[str]
    original_ops: int
    reproduced: int
    attempts: int
    runs: int
    seconds: float
    original_signature: Optional[str] = None

    @property
    def flaky(self) -> bool:
        """The signature came back on some replays but not all."""
        return 0 < self.reproduced < self.attempts

    @property
    def reproducible(self) -> bool:
        """The signature came back on every replay: the program was minimized."""
        return self.reproduced == self.attempts


class _Oracle:
    """Does a candidate still fail with the wanted signature?  Cached per program."""

    def __init__(self, run: Callable[[Program], Optional[Finding]], signature: str,
                 deadline: Optional[float]):
        self.run, self.signature, self.deadline = run, signature, deadline
        self.cache: dict[Program, Optional[Finding]] = {}
        self.runs = 0

    def finding(self, program: Program) -> Optional[Finding]:
        if program not in self.cache:
            self.runs += 1
            self.cache[program] = self.run(program)
        return self.cache[program]

    def fails(self, program: Program) -> bool:
        """True if ``program`` keeps the signature."""
        return self.matches(program, lambda finding: finding.signature == self.signature)

    def matches(self, program: Program, wanted: Callable[[Finding], bool]) -> bool:
        """True if ``program`` fails with a finding ``wanted`` accepts; past the deadline,
        only known answers count."""
        if program not in self.cache and self.deadline is not None \
                and time.monotonic() > self.deadline:
            return False
        finding = self.finding(program)
        return finding is not None and wanted(finding)


# --- stages: each takes a failing program and returns a failing program ---------

def _cut_after_failure(program: Program, oracle: _Oracle) -> Program:
    cut = program.with_ops(program.ops[:oracle.finding(program).op_index + 1])
    return cut if cut != program and oracle.fails(cut) else program


def _resources(op, slot_ranges: dict) -> Optional[frozenset]:
    """What an op touches: slots, vCPUs and 2M frames; None for VM-wide ops."""
    if isinstance(op, Parallel):
        sides = [_resources(side, slot_ranges) for side in op.sides]
        return None if None in sides else frozenset().union(*sides)
    tokens = set()
    vcpu = op_vcpu(op)
    if vcpu is not None:
        tokens.add(("vcpu", vcpu))
    slot = getattr(op, "slot", None)
    spans = [slot_ranges[slot]] if slot in slot_ranges else []
    if slot is not None:
        tokens.add(("slot", slot))
    npages = getattr(op, "npages", None) or 1
    spans += [(gfn, npages) for gfn in sorted(op_gfns(op))]
    for base, count in spans:
        frames = _frames(base, count)
        if frames is None:
            return None
        tokens |= frames
    return frozenset(tokens) if tokens else None


def _frames(base: int, npages: int) -> Optional[frozenset]:
    first, last = base // PAGES_PER_2M, (base + npages - 1) // PAGES_PER_2M
    if last - first >= MAX_SLICE_FRAMES:
        return None
    return frozenset(("frame", f) for f in range(first, last + 1))


def _slice(program: Program, oracle: _Oracle) -> Program:
    """Keep the ops the failing op transitively shares a resource with, in one try."""
    slot_ranges, touched = {}, []
    for op in program.ops:
        touched.append(_resources(op, slot_ranges))
        if hasattr(op, "slot") and hasattr(op, "base"):  # memslot_add, memslot_move
            npages = getattr(op, "npages", None) or slot_ranges.get(op.slot, (0, 1))[1]
            slot_ranges[op.slot] = (op.base, npages)
    if not touched or touched[-1] is None:
        return program
    needed = set(touched[-1])
    keep = [True] * len(program.ops)
    for index in range(len(program.ops) - 2, -1, -1):
        if touched[index] is None:
            continue
        if touched[index] & needed:
            needed |= touched[index]
        else:
            keep[index] = False
    candidate = program.with_ops((op for op, k in zip(program.ops, keep) if k))
    return candidate if candidate != program and oracle.fails(candidate) else program


def _drop_single_ops(program: Program, oracle: _Oracle) -> Program:
    index = len(program.ops) - 1
    while index >= 0:
        candidate = program.with_ops(program.ops[:index] + program.ops[index + 1:])
        if oracle.fails(candidate):
            program = candidate
        index -= 1
    return program


def _ddmin(program: Program, oracle: _Oracle) -> Program:
    """Zeller's ddmin over the op list, complements only (subsets rarely keep a finding)."""
    ops = list(program.ops)
    chunks = 2
    while len(ops) >= 2:
        size = -(-len(ops) // chunks)
        for start in range(0, len(ops), size):
            complement = ops[:start] + ops[start + size:]
            if oracle.fails(program.with_ops(complement)):
                ops = complement
                chunks = max(chunks - 1, 2)
                break
        else:
            if chunks >= len(ops):
                break
            chunks = min(chunks * 2, len(ops))
    return program.with_ops(ops)


def _relocated(op, source: int, image: int):
    """``op`` with every location in the 2M span from gfn ``source`` moved to start at ``image``."""
    if isinstance(op, Parallel):
        return Parallel.of([_relocated(side, source, image) for side in op.sides], op.schedule)
    changes = {}
    for names, shift in ((GFN_FIELDS, 0), (ADDRESS_FIELDS, PAGE_SHIFT)):
        for name in names:
            value = getattr(op, name, None)
            if value is not None and source <= value >> shift < source + PAGES_PER_2M:
                changes[name] = value + ((image - source) << shift)
    return dataclasses.replace(op, **changes) if changes else op


def _drop_relocated(program: Program, index: int, oracle: _Oracle) -> Optional[Program]:
    """Op ``index`` dropped and the later ops moved from where it put memory back to where it was.

    Sources are the locations the dropped op names (a slot move's new base);
    images are the locations ops before it name (the slot's old base).
    """
    ops = program.ops[:index] + program.ops[index + 1:]
    images = sorted(set().union(*map(op_gfns, program.ops[:index])))
    for source in sorted(op_gfns(program.ops[index])):
        for image in images:
            if source != image:
                later = (conform(_relocated(op, source, image), program.header)
                         for op in ops[index:])
                candidate = program.with_ops(ops[:index] + tuple(later))
                if oracle.fails(candidate):
                    return candidate
    return None


def _drop_and_relocate(program: Program, oracle: _Oracle) -> Program:
    """Drop an op together with the address change it forced on every later op.

    Removes what a single drop cannot: an op that relocates memory (a slot
    move) and the move of later accesses to where the memory went.
    """
    for index in range(len(program.ops) - 2, -1, -1):
        program = _drop_relocated(program, index, oracle) or program
    return program


def _shared(op):
    """``op`` with private memory taken out; None for an op that only serves it."""
    if isinstance(op, Parallel):
        shared = [_shared(side) for side in op.sides]
        if all(side is None for side in shared):
            return None
        result = Parallel.of([old if new is None else new for new, old in zip(shared, op.sides)],
                             op.schedule)
        for index in reversed(range(len(shared))):
            if shared[index] is None:
                result = result.without(index)  # the sides that stay keep their order
        return result
    if isinstance(op, (SetAttributes, Accept)):
        return None
    if isinstance(op, Access) and op.private:
        return dataclasses.replace(op, private=False)
    if isinstance(op, MemslotAdd) and op.flags & MemslotFlag.PRIVATE:
        return dataclasses.replace(op, flags=op.flags & ~MemslotFlag.PRIVATE)
    return op


def _shared_only(program: Program, oracle: _Oracle) -> Program:
    """The program on shared memory alone, in a default VM if it fails there too."""
    ops = tuple(op for op in map(_shared, program.ops) if op is not None)
    if ops == program.ops:
        return program
    for vm_type in (VmType.DEFAULT, program.header.type):
        candidate = Program(dataclasses.replace(program.header, type=vm_type), ops)
        if oracle.fails(candidate):
            return candidate
    return program


_FAILING = ("einval", "unsupported")


def _failing_noop(state: Reference, op) -> bool:
    """True if ``op`` fails (einval, unsupported) from ``state`` and changes nothing."""
    trial = state.copy()
    return outcome_kind(trial.run(op)) in _FAILING and trial == state


def _unwrap_noop_sides(program: Program, oracle: _Oracle) -> Program:
    """Drop each side of a ``parallel`` that is a failing no-op; a pair becomes its other side.

    Such a side is no actor in disguise: the reference, run to just before the
    parallel, says it fails and changes nothing.  The candidate must fail the
    same way; when the failing op is the pair itself and it becomes a plain op,
    the same way means the same finding at the remaining op (its kind, and its
    own outcome instead of the pair's), and the oracle takes that finding's
    signature on.
    """
    state = Reference(program.header)
    for index, op in enumerate(program.ops):
        side = len(op.sides) - 1 if isinstance(op, Parallel) else -1
        while isinstance(op, Parallel) and side >= 0:
            if not _failing_noop(state, op.sides[side]):
                side -= 1
                continue
            keep = conform(op.without(side), program.header)
            candidate = program.with_ops(program.ops[:index] + (keep,) + program.ops[index + 1:])
            original = oracle.finding(program)
            if original.op_index != index or isinstance(keep, Parallel):
                same = oracle.fails
            else:
                def same(program, original=original, keep=keep):
                    return oracle.matches(program, lambda found: _same_at(original, found, keep))
            if same(candidate):
                program, op = candidate, keep
                oracle.signature = oracle.finding(candidate).signature
            side -= 1
        for part in (op.sides if isinstance(op, Parallel) else (op,)):
            state.run(part)
    return program


def _same_at(pair: Finding, found: Finding, keep) -> bool:
    """``found``, at op ``keep`` that replaced a pair, is the finding ``pair`` was at the pair."""
    return (found.op_index == pair.op_index and found.op_kind == op_name(keep)
            and (found.kind, found.expected_kind, found.invariant)
            == (pair.kind, pair.expected_kind, pair.invariant)
            and pair.actual_kind in ("pair", found.actual_kind))


def _simpler_values(value, dom) -> list:
    """Candidate replacements for one field value, simplest first, all inside the domain."""
    if dom.kind == "int":
        if value is None:
            return []
        lo = -(-dom.lo // dom.align) * dom.align
        candidates = [lo, value // 2 // dom.align * dom.align]
        if value > dom.align * PAGES_PER_2M:
            frame = dom.align * PAGES_PER_2M
            candidates.append(value // frame * frame)
        return sorted({c for c in candidates if lo <= c < value})
    if dom.kind == "bool":
        return [False] if value else []
    if dom.kind == "flags":
        return [value & ~flag for flag in dom.choices.values() if value & flag]
    if dom.kind == "enum":
        ordered = list(dom.choices.values())
        return ordered[:ordered.index(value)]
    if dom.kind == "root":
        return [] if value is None else sorted({0, value // 2} - {value})
    if dom.kind == "op":
        return []
    raise ValueError(f"no simplification for domain kind {dom.kind!r}")


def _simpler_ops(op) -> list:
    """Simpler variants of one op, one change each; a ``parallel`` first tries each side
    alone, then without one of its actors (the last first), then simpler sides."""
    variants = []
    if isinstance(op, Parallel):
        sides = op.sides
        variants += dict.fromkeys(sides + tuple(op.without(i) for i in reversed(range(len(sides)))))
        for name, side in zip(SIDE_NAMES, sides):
            variants += [dataclasses.replace(op, **{name: simpler})
                         for simpler in _simpler_ops(side)]
    for item in dataclasses.fields(op):
        for simpler in _simpler_values(getattr(op, item.name), domain(type(op), item.name)):
            variants.append(dataclasses.replace(op, **{item.name: simpler}))
    return variants


def _simplify_fields(program: Program, oracle: _Oracle) -> Program:
    """Per op, take the first simpler variant that keeps the signature, until none does."""
    ops = list(program.ops)
    for index in range(len(ops)):
        improved = True
        while improved:
            improved = False
            for variant in _simpler_ops(ops[index]):
                variant = conform(variant, program.header)
                if variant == ops[index]:
                    continue
                trial = ops[:index] + [variant] + ops[index + 1:]
                if oracle.fails(program.with_ops(trial)):
                    ops, improved = trial, True
                    break
    return program.with_ops(ops)


def _move_earlier_and_drop(program: Program, oracle: _Oracle) -> Program:
    """An op moved earlier, if that lets other ops go: shorter, or unchanged.

    Deletions stop at a program no single op of which can go (1-minimal), but
    a smaller one may be the same ops in another order: a table built by an
    access to a slot-less gfn before the slot exists, instead of by a mapping
    the slot's own ops make and later split.  A move alone is never taken
    (no progress, and it could undo another move); only when, after it, an op
    can be dropped.  Tried on short programs only: the candidates grow as the
    cube of the length.
    """
    ops = program.ops
    if len(ops) > MAX_REORDER_OPS:
        return program
    for index in range(1, len(ops)):
        for position in range(index):
            moved = program.with_ops(
                ops[:position] + (ops[index],) + ops[position:index] + ops[index + 1:])
            if oracle.fails(moved):
                shorter = _drop_single_ops(moved, oracle)
                if len(shorter.ops) < len(ops):
                    return shorter
    return program


def _renumber(program: Program, oracle: _Oracle) -> Program:
    """Slots and vCPUs renumbered densely in order of first use; fewer vCPUs in the VM."""
    maps = {"slot": {}, "vcpu": {}}

    def rename(op):
        if isinstance(op, Parallel):
            return Parallel.of(map(rename, op.sides), op.schedule)
        changes = {}
        for name, mapping in maps.items():
            if hasattr(op, name):
                changes[name] = mapping.setdefault(getattr(op, name), len(mapping))
        return dataclasses.replace(op, **changes)

    ops = tuple(rename(op) for op in program.ops)
    header = dataclasses.replace(program.header, vcpus=max(1, len(maps["vcpu"])))
    candidate = Program(header, ops)
    if candidate != program and oracle.fails(candidate):
        return candidate
    return program


STAGES = (_cut_after_failure, _slice, _drop_single_ops, _ddmin, _shared_only,
          _drop_and_relocate, _unwrap_noop_sides, _simplify_fields, _move_earlier_and_drop,
          _renumber)


def minimize(program: Program, target: str, inject=(), signature: Optional[str] = None,
             repro_runs: int = REPRO_RUNS, max_seconds: Optional[float] = None) -> Minimized:
    """Reduce ``program`` keeping its finding's signature on ``target`` with ``inject``.

    ``signature`` defaults to that of the first failing replay.  With
    ``max_seconds``, reduction stops trying new candidates after that long and
    returns the smallest program found so far.
    """
    started = time.monotonic()
    system = make_target(target)

    def run(candidate: Program) -> Optional[Finding]:
        with faults.injected(inject):
            return run_program(candidate, system)

    replays = [run(program) for _ in range(repro_runs)]
    failing = [f for f in replays if f is not None]
    signature = signature or (failing[0].signature if failing else None)
    matching = [f for f in failing if f.signature == signature]
    if len(matching) < repro_runs:
        return Minimized(program, matching[0] if matching else (failing or [None])[0], signature,
                         len(program.ops), len(matching), repro_runs, repro_runs,
                         time.monotonic() - started, signature)

    deadline = None if max_seconds is None else started + max_seconds
    oracle = _Oracle(run, signature, deadline)
    original_ops = len(program.ops)
    oracle.cache[program] = matching[0]
    for _ in range(MAX_ROUNDS):
        before = program
        for stage in STAGES:
            program = stage(program, oracle)
        if program == before:
            break
    return Minimized(program, oracle.finding(program), oracle.signature, original_ops, repro_runs,
                     repro_runs, oracle.runs + repro_runs, time.monotonic() - started, signature)


def report(result: Minimized, target: str, inject: str) -> str:
    """The readable reproducer of a reduction: header, ``>>>`` marker, expected vs actual.

    A reproducible result says how it was reduced and ``# expect: divergence``,
    so it can go to ``corpus/regressions`` as is; a flaky or unreproduced one
    carries the input unchanged and says so instead.
    """
    if result.reproducible:
        meta = {"minimized": f"{result.original_ops} -> {len(result.program.ops)} ops, "
                             f"{result.runs} runs, {result.seconds:.1f} s",
                "expect": "divergence"}
    elif result.signature is None:
        meta = {"not-reproduced": f"no finding in {result.attempts} replays"}
    else:
        key = "flaky" if result.flaky else "not-reproduced"
        meta = {key: f"signature {result.signature} came back in {result.reproduced} of "
                     f"{result.attempts} replays"}
    return Replay(Reproducer(result.program, None, meta), target, inject, result.finding).report()

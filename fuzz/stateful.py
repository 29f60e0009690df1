"""The Hypothesis engine: a RuleBasedStateMachine over the op vocabulary.

A second, independent generator of programs.  Where the byte decoder reads
fields from libFuzzer's bytes, this draws them with Hypothesis strategies built
from each field's :class:`~harness.ops.Domain`, biased toward the gfns the
program already used, and runs every op through the same differential oracle
(:class:`mmufuzz.fuzz.runner.Differential`).  The test suite uses it to check that a
target never diverges; ``bench`` uses it as the Hypothesis baseline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from mmufuzz.harness.ops import (ACTORS_MAX, ADDRESS_FIELDS, GFN_FIELDS, OP_NAMES, PAGE_SHIFT,
                                 SCHEDULE_LIMIT, ManualProtect, Parallel, Program, VmHeader, VmType,
                                 domain)
from mmufuzz.fuzz.encoding import conform, format_program
from mmufuzz.fuzz.runner import Differential, make_target
from mmufuzz.harness.target import capabilities

# Gfns every program finds interesting: 2M frames and their neighbours.
GFNS = (0x0, 0x1, 0x1ff, 0x200, 0x201, 0x3ff, 0x400, 0x600, 0x800)
SMALL_GFN = 0x1000
SIMPLE_OPS = tuple(cls for cls in OP_NAMES if cls is not Parallel)


class FindingError(AssertionError):
    """A program the target failed on, with the finding."""

    def __init__(self, program: Program, finding):
        super().__init__(f"{finding.summary('target')}\n"
                         f"{format_program(program, finding.op_index)}")
        self.program, self.finding = program, finding


@dataclass(frozen=True)
class Known:
    """A gfn field's value still to be chosen: the index-th gfn the program made interesting."""

    index: int


def field_strategy(cls, name: str):
    """Values for one field: its domain; gfns and addresses may be :class:`Known`."""
    dom = domain(cls, name)
    if name in GFN_FIELDS or name in ADDRESS_FIELDS:
        gfns = st.builds(Known, st.integers(0, 63)) | st.integers(0, SMALL_GFN)
        return st.none() | gfns if dom.kind == "root" else gfns
    if name == "npages":
        return st.sampled_from((1, 0x1ff, 0x200, 0x201, 0x400)) | st.integers(dom.lo, 0x800)
    return domain_strategy(dom)


def domain_strategy(dom):
    """Every legal value of a field domain (simple kinds: not ``op``)."""
    if dom.kind == "int":
        values = st.integers(-(-dom.lo // dom.align), (dom.hi - 1) // dom.align).map(
            lambda v: v * dom.align)
        return st.none() | values if dom.optional else values
    if dom.kind == "bool":
        return st.booleans()
    if dom.kind == "enum":
        return st.sampled_from(list(dom.choices.values()))
    if dom.kind == "flags":
        flags = list(dom.choices.values())
        return st.lists(st.sampled_from(flags), unique=True).map(
            lambda chosen: sum(chosen, flags[0] & 0))
    if dom.kind == "root":
        return st.none() | st.integers(dom.lo, dom.hi - 1)
    raise AssertionError(f"no strategy for domain kind {dom.kind!r}")


def _raw_op(cls):
    """``(cls, field values)``; values may still hold Known gfns."""
    return st.tuples(st.just(cls), st.tuples(*[field_strategy(cls, f.name)
                                               for f in dataclasses.fields(cls)]))


# Built once: strategies are costly to construct and validate, cheap to draw from.
_SIMPLE = st.one_of(*[_raw_op(cls) for cls in SIMPLE_OPS])
RAW_OPS = st.one_of(_SIMPLE, _SIMPLE, _SIMPLE,
                    st.tuples(st.just(Parallel), st.tuples(
                        st.lists(_SIMPLE, min_size=2, max_size=ACTORS_MAX),
                        st.integers(0, SCHEDULE_LIMIT - 1))))


def build_op(raw, header: VmHeader, known: tuple):
    """The op a drawn ``(cls, values)`` means for ``header`` and the ``known`` gfns."""
    cls, values = raw
    if cls is Parallel:
        sides, schedule = values
        return conform(Parallel.of([build_op(side, header, known) for side in sides], schedule),
                       header)
    resolved = []
    for item, value in zip(dataclasses.fields(cls), values):
        if type(value) is Known:
            value = known[value.index % len(known)]
        if item.name in ADDRESS_FIELDS:
            value <<= PAGE_SHIFT
        resolved.append(value)
    return conform(cls(*resolved), header)


class DifferentialMachine(RuleBasedStateMachine):
    """Runs drawn ops on ``target_name`` and the reference; fails on the first finding.

    Programs are bent to the target's capabilities as a campaign's are
    (:meth:`~mmufuzz.harness.target.Capabilities.restrict`): a drawn header of a
    VM type the target cannot run becomes one it can, and a drawn op it cannot
    run is not run.
    """

    target_name = "tdp"

    @initialize(header=st.builds(VmHeader, st.sampled_from(VmType), st.integers(1, 4),
                                 st.sampled_from(ManualProtect), st.booleans()))
    def start(self, header):
        target = make_target(self.target_name)
        self.restrict = capabilities(target).restrict
        self.header, self.ops = self.restrict(Program(header, ())).header, []
        self.known = GFNS
        self.differential = Differential(self.header, target)

    @rule(data=st.data())
    def step(self, data):
        op = build_op(data.draw(RAW_OPS, label="op"), self.header, self.known)
        runnable = self.restrict(Program(self.header, (op,))).ops
        if not runnable:
            return
        op, = runnable
        self.ops.append(op)
        finding = self.differential.step(op)
        if finding is not None:
            raise FindingError(Program(self.header, tuple(self.ops)), finding)
        for side in op.sides if isinstance(op, Parallel) else (op,):
            base = getattr(side, "base", None)
            if base is not None and base not in self.known:
                self.known = self.known + (base, base + getattr(side, "npages", 1) - 1)


def machine_for(target: str):
    """A DifferentialMachine subclass that runs ``target``."""
    return type(f"DifferentialMachine_{target}", (DifferentialMachine,), {"target_name": target})

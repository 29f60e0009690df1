"""The Target protocol: what every system under test implements.

The runner drives a target one op at a time and compares each outcome with the
reference; it never looks inside.  A new system under test is a new package in
``harness/`` implementing this protocol plus one line in :data:`TARGETS`.
"""

from __future__ import annotations

import dataclasses
import importlib
from itertools import compress, count
from typing import Optional, Protocol

from mmufuzz.harness.ops import OP_NAMES, Outcome, Parallel, Program, VmHeader, VmType, op_name


class InvariantViolation(Exception):
    """A named structural invariant of a target does not hold.

    ``name`` is stable (it is part of a finding's signature); ``detail`` says
    where, in the house style ``gfn=0x.. level=.. old=.. new=..``.
    """

    def __init__(self, name: str, detail: str = ""):
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail


class TargetRefused(ValueError):
    """A program asks for what its target cannot run (a TDX VM on a host without TDX).

    Not a finding: replay reports it as bad input (exit 2) with this one-line reason.
    """


class Capabilities:
    """The programs a target can run: its VM types and its op kinds.

    A host without TDX cannot run a TDX program, and running one anyway would
    either fail or pass vacuously.  :meth:`refusal` names the first thing a
    program asks for that the target cannot do (replay refuses the program with
    it); :meth:`restrict` bends any program into one the target can run, by a
    fixed rule, so a campaign on that target generates only such programs
    without ``fuzz/`` knowing anything of the target.  A target with finer
    limits (a field value, an address range) subclasses this and overrides
    :meth:`op_refusal`.

    ``weights`` (op name -> weight) says which op kinds the target is about:
    a campaign's mutator draws the ops it generates from the decoder's mix
    with these weights in place of the decoder's (on its scale: 256 opcodes
    of weight one each; ``parallel`` weighs its arities together), and never
    an op kind outside ``ops`` (:mod:`mmufuzz.fuzz.opmix`).  A target that
    declares none gets the decoder's mix.
    """

    def __init__(self, vm_types=frozenset(VmType), ops=frozenset(OP_NAMES), weights=None):
        self.vm_types = frozenset(vm_types)
        self.ops = frozenset(ops)
        self.weights = dict(weights or {})
        unknown = set(self.weights) - {OP_NAMES[cls] for cls in self.ops}
        if unknown or any(not isinstance(w, int) or w < 0 for w in self.weights.values()):
            raise ValueError(f"weights must be whole numbers >= 0 for ops the target runs: "
                             f"{sorted(unknown) or self.weights}")
        # The VM type a refused header becomes: the first allowed one, in a fixed order.
        self._fallback = next(t for t in VmType if t in self.vm_types)

    @property
    def everything(self) -> bool:
        return self.vm_types == frozenset(VmType) and self.ops == frozenset(OP_NAMES)

    def header_refusal(self, header: VmHeader) -> Optional[str]:
        if header.type not in self.vm_types:
            return f"vm type={header.type.value} is not supported by this target"
        return None

    def op_refusal(self, op, header: VmHeader) -> Optional[str]:
        """Why this target cannot run ``op`` (a ``parallel``'s sides are asked on their own)."""
        if type(op) not in self.ops:
            return f"{op_name(op)} is not supported by this target"
        return None

    def _refusal(self, op, header: VmHeader) -> Optional[str]:
        reason = self.op_refusal(op, header)
        if reason is None and isinstance(op, Parallel):
            reason = next(filter(None, (self._refusal(side, header) for side in op.sides)), None)
        return reason

    def refusal(self, program: Program) -> Optional[str]:
        """The first reason this target cannot run ``program`` ("op N: ..."), or None."""
        reason = self.header_refusal(program.header)
        if reason is not None:
            return f"header: {reason}"
        for index, op in enumerate(program.ops):
            reason = self._refusal(op, program.header)
            if reason is not None:
                return f"op {index + 1}: {reason}"
        return None

    def restrict(self, program: Program) -> Program:
        """``program`` bent into one this target runs: the header's VM type replaced by an
        allowed one, refused ops dropped, a ``parallel`` without the sides this target
        cannot run, or, if it cannot run a ``parallel``, reduced to its first side it can."""
        header = program.header
        if self.header_refusal(header) is not None:
            header = dataclasses.replace(header, type=self._fallback)
        ops = []
        for op in program.ops:
            if isinstance(op, Parallel) and self._refusal(op, header) is not None:
                for index in reversed(range(len(op.sides))):
                    if self._refusal(op.sides[index], header) is not None:
                        op = op.without(index)
                        if not isinstance(op, Parallel):
                            break
                if isinstance(op, Parallel) and self._refusal(op, header) is not None:
                    op = next((s for s in op.sides if self._refusal(s, header) is None), None)
            if op is not None and self._refusal(op, header) is None:
                ops.append(op)
        return Program(header, tuple(ops))


EVERYTHING = Capabilities()


class Target(Protocol):
    """A system under test.

    ``execute`` may raise :class:`InvariantViolation` when it notices a broken
    invariant mid-op (a walker reading a freed table, say); any other exception
    is a crash finding.
    """

    name: str
    capabilities: Capabilities  # optional: a target without it runs every program

    def reset(self, header: VmHeader) -> None:
        """Forget everything and create the VM the program header describes."""

    def execute(self, op) -> Outcome:
        """Run one op and return its guest-visible outcome."""

    def check_invariants(self) -> None:
        """Raise :class:`InvariantViolation` if any structural invariant is broken."""

    # Optional: ``features() -> list[str]``, coverage of the last op that the
    # guest cannot see: interleaving (which yield points of a parallel's two
    # sides were switched between) and MMU-state events (:class:`StateEvents`:
    # what the op did to the MMU's state, which line coverage cannot tell
    # apart).  Campaigns feed each to libFuzzer as a counter of its own,
    # knowing nothing of what it means.
    # Optional, together: ``taken``, the steps each side of the last ``parallel``
    # took, and ``pair_start``, a string naming the state its sides started from.
    # Campaigns explore that pair's other schedules, pairs from the states they
    # have seen least first (fuzz/schedules.py).
    # Optional: ``observed``, a bool the campaign sets false while it runs ops
    # whose ``features()`` and ``pair_start`` it will not read (schedule
    # variants); the target may skip making them meanwhile, nothing else.
    # Optional, together: ``snapshot() -> object``, the whole state after the last
    # op, and ``restore(snapshot)``, which makes the target continue from it
    # exactly as if the ops before it had been rerun (the same snapshot may be
    # restored many times).  Schedule exploration then runs a pair's variants
    # from one prefix instead of rerunning it for each.


class StateEvents:
    """The MMU-state events a target names, counted per op, for its ``features()``.

    Line coverage says which code ran, not what it did to the MMU: the same
    lines zap a 4K leaf and a 2M one, fill a TLB from a 4K leaf or a 1G one,
    retry a fault for a stale sequence count or for a slot being deleted.
    A target names its events once; its code counts one where it happens
    (``counts[i] += 1`` into a plain list from :meth:`counts`, which it keeps
    with the rest of its state, so a snapshot carries it), and its
    ``features()`` hands the names of those the last op raised to the
    campaign with :meth:`drain`.
    """

    def __init__(self, names):
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError("event names must be distinct")
        self._zeros = [0] * len(self.names)

    def counts(self) -> list:
        """A fresh list of counts, one slot per event, all zero."""
        return list(self._zeros)

    def drain(self, counts: list) -> list:
        """The names of the events ``counts`` holds, in index order; ``counts`` back to zero."""
        if not any(counts):
            return []
        raised = [self.names[i] for i in compress(count(), counts)]
        counts[:] = self._zeros
        return raised


def capabilities(target) -> Capabilities:
    """What ``target`` can run (everything, for a target that does not say)."""
    return getattr(target, "capabilities", EVERYTHING)


# name -> "module:factory"; imported lazily so that a broken or heavy target
# costs nothing to the others.
TARGETS: dict[str, str] = {
    "tdp": "mmufuzz.harness.tdp:TdpTarget",
    "kvm": "mmufuzz.harness.kvm:KvmTarget",
    "stage2": "mmufuzz.harness.stage2:Stage2Target",
    "stage2-pkvm": "mmufuzz.harness.stage2:Stage2PkvmTarget",
    "shadow": "mmufuzz.harness.shadow:ShadowTarget",
}


class UnknownTarget(ValueError):
    """A target name not in :data:`TARGETS`."""


def make_target(name: str) -> Target:
    """Instantiate the target registered as ``name``."""
    try:
        module, factory = TARGETS[name].split(":")
    except KeyError:
        raise UnknownTarget(f"unknown target {name!r} (known: {', '.join(sorted(TARGETS))})") from None
    return getattr(importlib.import_module(module), factory)()

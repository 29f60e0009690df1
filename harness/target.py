"""The Target protocol: what every system under test implements.

The runner drives a target one op at a time and compares each outcome with the
reference; it never looks inside.  A new system under test is a new package in
``harness/`` implementing this protocol plus one line in :data:`TARGETS`.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from mmufuzz.harness.ops import Outcome, VmHeader


class InvariantViolation(Exception):
    """A named structural invariant of a target does not hold.

    ``name`` is stable (it is part of a finding's signature); ``detail`` says
    where, in the house style ``gfn=0x.. level=.. old=.. new=..``.
    """

    def __init__(self, name: str, detail: str = ""):
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail


class Target(Protocol):
    """A system under test.

    ``execute`` may raise :class:`InvariantViolation` when it notices a broken
    invariant mid-op (a walker reading a freed table, say); any other exception
    is a crash finding.
    """

    name: str

    def reset(self, header: VmHeader) -> None:
        """Forget everything and create the VM the program header describes."""

    def execute(self, op) -> Outcome:
        """Run one op and return its guest-visible outcome."""

    def check_invariants(self) -> None:
        """Raise :class:`InvariantViolation` if any structural invariant is broken."""

    # Optional: ``features() -> list[str]``, coverage of the last op that the
    # guest cannot see (e.g. interleaving: which yield points of a parallel's
    # two sides were switched between).  Campaigns feed them to libFuzzer.
    # Optional, together: ``taken``, the steps each side of the last ``parallel``
    # took, and ``pair_start``, a string naming the state its sides started from.
    # Campaigns explore that pair's other schedules, pairs from the states they
    # have seen least first (fuzz/schedules.py).
    # Optional, together: ``snapshot() -> object``, the whole state after the last
    # op, and ``restore(snapshot)``, which makes the target continue from it
    # exactly as if the ops before it had been rerun (the same snapshot may be
    # restored many times).  Schedule exploration then runs a pair's variants
    # from one prefix instead of rerunning it for each.


# name -> "module:factory"; imported lazily so that a broken or heavy target
# costs nothing to the others.
TARGETS: dict[str, str] = {
    "tdp": "mmufuzz.harness.tdp:TdpTarget",
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

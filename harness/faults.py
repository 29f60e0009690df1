"""The fault switch: injectable real-world MMU bugs (``--inject NAME``).

Each catalog entry names a bug from KVM history (``../shared/FAULTS.md``) and
is switched on by a tiny local branch in a target, ``if faults.active(NAME):``.
The active set is the project's only global mutable state: targets consult it
on their hot paths, so it is a plain frozenset lookup.  Nothing in ``fuzz/``
may consult the catalog to steer generation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    """One injectable bug: where it lives, where it comes from, what goes wrong."""

    name: str
    target: str
    source: str
    description: str
    concurrent: bool = False


CATALOG: dict[str, Fault] = {}

_active: frozenset = frozenset()


class UnknownFault(ValueError):
    """A fault name not in :data:`CATALOG`."""


def active(name: str) -> bool:
    """True while fault ``name`` is injected."""
    return name in _active


def check(names) -> frozenset:
    """Validate fault names against the catalog; return them as a set."""
    names = frozenset(n for n in names if n)
    unknown = sorted(names - CATALOG.keys())
    if unknown:
        known = ", ".join(sorted(CATALOG)) or "none"
        raise UnknownFault(f"unknown fault {', '.join(unknown)!s} (known: {known})")
    return names


@contextlib.contextmanager
def injected(names):
    """Inject the named faults for the duration of the ``with`` block."""
    global _active
    previous, _active = _active, check(names)
    try:
        yield
    finally:
        _active = previous

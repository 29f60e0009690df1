"""Snapshots of a VM between two ops, restored many times: schedule exploration's checkpoints.

A snapshot is a pickle of the VM's object graph (between ops no generator is
alive, so the graph is plain data) with two kinds of objects kept out of it:

- long lists of ints, a table's 512 entries and a VM's event counts above all,
  are kept as a copy and restored with one C-level list copy each, instead of
  an opcode per entry: the copy holds the very int objects the entries held,
  so a table's ``SHADOW_NONPRESENT_VALUE`` entries stay that one object (its
  scans count it by identity);
- :class:`Shared` values (nothing changes them once built: the invariant
  checks' records of a table) are handed to every restored copy as they are,
  so a variant's check reuses the records of every table it left unchanged;
- classes and enum members, which pickle names by module and attribute and
  looks up again at every load (an enum member through its class's call, a
  Python-level ``__call__``), are handed over as they are too: a snapshot
  never leaves the process that took it.

An object the graph reaches twice is restored once, as pickle does.
"""

from __future__ import annotations

import enum
import io
import pickle
from dataclasses import dataclass

# A list of ints at least this long is kept out of the pickle (a shorter one costs less
# in it than the call that would restore it).
_LONG = 32


class Shared:
    """Base of values that nothing changes once built: a snapshot shares them, never copies."""

    __slots__ = ()


# What a snapshot shares rather than pickles (see the module's docstring), and the kinds
# of the objects most often pickled, which are none of it.
_SHARED = (Shared, type, enum.Enum)
_PLAIN = frozenset((int, str, tuple, dict, bool, type(None), set))


@dataclass(frozen=True)
class Snapshot:
    """The pickle and what it keeps out of band: each a shared value, or a list's items as
    a tuple (a tuple of ints is no work for the garbage collector, however long it lives)."""

    data: bytes
    kept: tuple


def dumps(root) -> Snapshot:
    """The snapshot of the object graph of ``root``."""
    kept, ids = [], {}
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, pickle.HIGHEST_PROTOCOL)

    def persistent_id(obj):
        """The index in ``kept`` of a long list of ints or a shared value, else None.

        Called for every object pickled: the common case (an int, a str) returns first.
        """
        kind = type(obj)
        if kind is list:
            if len(obj) < _LONG:
                return None
        elif kind in _PLAIN or not isinstance(obj, _SHARED):
            return None
        pid = ids.get(id(obj))
        if pid is None:
            if kind is list and not all(type(value) is int for value in obj):
                return None
            pid = ids[id(obj)] = len(kept)
            kept.append(tuple(obj) if kind is list else obj)
        return pid

    pickler.persistent_id = persistent_id
    pickler.dump(root)
    return Snapshot(buffer.getvalue(), tuple(kept))


def loads(snapshot: Snapshot):
    """A new object graph equal to the one ``snapshot`` was taken of.

    Every kept value is referenced from the pickle (``dumps`` keeps only what
    it meets), so each is made ready beforehand and looked up by a C-level
    ``list.__getitem__``, not a Python call per reference.
    """
    unpickler = pickle.Unpickler(io.BytesIO(snapshot.data))
    unpickler.persistent_load = [list(value) if type(value) is tuple else value
                                 for value in snapshot.kept].__getitem__
    return unpickler.load()

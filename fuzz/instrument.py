"""Branch instrumentation of the system under test, cached between processes.

atheris instruments a module's bytecode as it is imported.  For ``harness``
and ``reference`` that is most of a worker's start-up, paid again by every
campaign and every ``--jobs`` worker, and it is the same work each time.
Python keeps compiled bytecode in ``__pycache__``; this keeps the
*instrumented* bytecode the same way, in the user's cache directory
(``bench/bench_startup.py``: a worker up and through its first exec in
0.77 s cold, 0.24 s warm, on a 2-core EPYC).

Two things make instrumented code more than a function of its source:

- It holds its libFuzzer counters' numbers as constants, and atheris hands
  counters out in sequence (``_reserve_counter``).  Each module is therefore
  bracketed by two reserved marker counters.  The first is part of the cache
  key, so a cached module is used only where the sequence stands where it
  stood when the module was instrumented; the cache records how many counters
  the module took, and a hit reserves exactly those, so the second marker,
  and every module after, lands where a fresh instrumentation would put it.
- It holds the atheris module itself as a constant (the callee of every
  branch hook), which marshal cannot store: the stored code has a placeholder
  there, put back on load.

A cache that cannot be read or written (another user's, a read-only home)
costs the instrumentation, nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import marshal
import os
import struct
import sys
import types
from pathlib import Path
from typing import Callable, Optional

import atheris
from atheris import import_hook
from atheris.instrument_bytecode import patch_code

from fuzz.atomic import write_atomic

# Stands for the atheris module in stored code; no source string of ours looks like it.
_ATHERIS_PLACEHOLDER = "<mmufuzz instrument: the atheris module>"
# An entry: the key's SHA-256, the module's counter count, then the marshalled code.
_HEADER = struct.Struct("<32sI")


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mmufuzz/instrumented`` (``~/.cache`` when unset), as pip and others do."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmufuzz" / "instrumented"


def _replace_consts(code: types.CodeType, matches: Callable[[object], bool],
                    new: object) -> types.CodeType:
    """``code`` with every constant that ``matches``, in it and its nested code, set to ``new``."""
    consts = tuple(new if matches(const)
                   else _replace_consts(const, matches, new) if isinstance(const, types.CodeType)
                   else const
                   for const in code.co_consts)
    return code.replace(co_consts=consts)


def freeze(code: types.CodeType) -> bytes:
    """Instrumented ``code`` as bytes (marshal, with the atheris module as a placeholder)."""
    return marshal.dumps(_replace_consts(code, lambda c: c is atheris, _ATHERIS_PLACEHOLDER))


def thaw(data: bytes) -> types.CodeType:
    """The code :func:`freeze` stored, calling into this process's atheris."""
    return _replace_consts(marshal.loads(data),
                           lambda c: isinstance(c, str) and c == _ATHERIS_PLACEHOLDER, atheris)


class InstrumentedCache:
    """One file per module, ``NAME.atheris``, holding its latest instrumentation."""

    def __init__(self, folder: Path):
        self.folder = folder
        # What else instrumented code depends on: the bytecode format and atheris's rewriting.
        self._salt = (f"{importlib.util.MAGIC_NUMBER.hex()} atheris "
                      f"{importlib.metadata.version('atheris')} branches only")
        self.hits = self.misses = 0

    def key(self, path: str, source: bytes, first_marker: int) -> bytes:
        digest = hashlib.sha256(f"{self._salt} {path} {first_marker}\n".encode())
        digest.update(source)
        return digest.digest()

    def load(self, fullname: str, key: bytes) -> Optional[tuple]:
        """``(counters, code)`` stored under ``key``, or None."""
        try:
            data = (self.folder / f"{fullname}.atheris").read_bytes()
            stored_key, counters = _HEADER.unpack_from(data)
            if stored_key != key:
                return None
            return counters, thaw(data[_HEADER.size:])
        except (OSError, struct.error, ValueError, EOFError, TypeError):
            return None

    def store(self, fullname: str, key: bytes, counters: int, code: types.CodeType) -> None:
        with contextlib.suppress(OSError):
            write_atomic(self.folder / f"{fullname}.atheris",
                         _HEADER.pack(key, counters) + freeze(code))


class _CachedSourceFileLoader(import_hook.AtherisSourceFileLoader):
    """atheris's source loader, instrumenting branches through the cache."""

    def __init__(self, name: str, path: str, cache: InstrumentedCache):
        super().__init__(name, path, trace_dataflow=False)
        self._cache = cache

    def get_code(self, fullname: str) -> Optional[types.CodeType]:
        code = importlib.machinery.SourceFileLoader.get_code(self, fullname)
        if code is None:
            return None
        first_marker = atheris._reserve_counter()
        key = self._cache.key(self.path, self.get_data(self.path), first_marker)
        cached = self._cache.load(fullname, key)
        if cached is not None:
            self._cache.hits += 1
            counters, instrumented = cached
            for _ in range(counters + 1):  # the module's, then the closing marker
                atheris._reserve_counter()
            return instrumented
        self._cache.misses += 1
        instrumented = patch_code(code, trace_dataflow=False)
        closing_marker = atheris._reserve_counter()
        self._cache.store(fullname, key, closing_marker - first_marker - 1, instrumented)
        return instrumented


class _CachedMetaPathFinder(import_hook.AtherisMetaPathFinder):
    """atheris's finder, with its plain source-file loader swapped for the cached one."""

    def __init__(self, packages: set, exclude: set, cache: InstrumentedCache):
        super().__init__(packages, exclude, enable_loader_override=True, trace_dataflow=False)
        self._cache = cache

    def find_spec(self, fullname, path, target=None):
        spec = super().find_spec(fullname, path, target)
        if spec is not None and type(spec.loader) is import_hook.AtherisSourceFileLoader:
            spec.loader = _CachedSourceFileLoader(spec.loader.name, spec.loader.path,
                                                  self._cache)
        return spec


@contextlib.contextmanager
def instrument_branches(packages: set, exclude: set, folder: Optional[Path] = None):
    """Imports of ``packages`` (but not the ``exclude`` modules) instrumented, branches only.

    ``atheris.instrument_imports`` also turns every comparison into a call
    that records its operands (data-flow tracing).  libFuzzer uses those only
    for its value profile, which campaigns leave off, and as words for its own
    byte mutations, which run on few inputs (the custom mutator's
    ``BYTE_MUTATION_RATE``) and whose bytes decode to pooled values anyway; so
    it is off here.  Yields the cache (its ``hits`` and ``misses``).
    """
    cache = InstrumentedCache(folder or cache_dir())
    finder = _CachedMetaPathFinder(set(packages), set(exclude), cache)
    # Where atheris's HookManager puts its finder: after the built-in and frozen importers.
    position = 0
    while position < len(sys.meta_path) and sys.meta_path[position] in (
            importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter):
        position += 1
    sys.meta_path.insert(position, finder)
    try:
        yield cache
    finally:
        sys.meta_path.remove(finder)

"""Branch instrumentation of the system under test, cached between processes.

atheris instruments a module's bytecode as it is imported.  For ``harness``
and ``reference`` that is most of a worker's start-up, paid again by every
campaign and every ``--jobs`` worker, and it is the same work each time.
Python keeps compiled bytecode in ``__pycache__``; this keeps the
*instrumented* bytecode the same way, in the user's cache directory
(``bench/bench_startup.py``: a worker up and through its first exec in
0.69 s cold, 0.16 s warm, on a 2-core EPYC; a hit does not even compile).

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

atheris numbers a module's blocks within its counter range in an order that
changes from process to process; cached code is one such numbering, and now
every worker that takes it agrees on it.

A cache that cannot be read or written (another user's, a read-only home,
no home at all, a frozen build whose atheris has no source files to key on)
costs the instrumentation, nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import marshal
import os
import struct
import sys
import types
from pathlib import Path
from typing import Callable, Optional

import atheris
from atheris import import_hook, instrument_bytecode, version_dependent

from mmufuzz.fuzz.atomic import write_atomic

# Stands for the atheris module in stored code; no source string of ours looks like it.
_ATHERIS_PLACEHOLDER = "<mmufuzz instrument: the atheris module>"
# An entry: its key, the SHA-256 of its body, the module's counter count; then the body,
# the marshalled code.
_HEADER = struct.Struct("<32s32sI")


def cache_dir() -> Optional[Path]:
    """``$XDG_CACHE_HOME/mmufuzz/instrumented`` (``~/.cache`` when unset), as pip and others do."""
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no home directory to be found
        return None
    return Path(base) / "mmufuzz" / "instrumented"


def _salt() -> Optional[str]:
    """What instrumented code depends on besides its source, or None if that cannot be read.

    The bytecode format, the optimization level (``-O`` drops asserts, and
    ``.pyc`` files are kept per level too), and atheris's rewriting: the text
    of its two modules that do it, which a version number would not tell
    apart for an atheris built from a checkout.
    """
    rewriting = hashlib.sha256()
    try:
        for module in (instrument_bytecode, version_dependent):
            rewriting.update(Path(module.__file__).read_bytes())
    except (OSError, TypeError):  # a frozen build: no source file, or no __file__
        return None
    return (f"{importlib.util.MAGIC_NUMBER.hex()} optimize {sys.flags.optimize} "
            f"atheris {rewriting.hexdigest()} branches only")


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
    code = marshal.loads(data)
    if not isinstance(code, types.CodeType):
        raise TypeError(f"not code but {type(code).__name__}")
    return _replace_consts(code, lambda c: isinstance(c, str) and c == _ATHERIS_PLACEHOLDER,
                           atheris)


class InstrumentedCache:
    """A file per module and checkout, ``NAME.PATHHASH.atheris``: its latest instrumentation.

    Off (every load a miss, nothing stored) without a ``folder`` or a salt.
    """

    def __init__(self, folder: Optional[Path]):
        self.folder = folder
        self._salt = _salt() if folder is not None else None
        self.hits = self.misses = 0

    def key(self, path: str, source: bytes, first_marker: int) -> bytes:
        """What a module's instrumentation is a function of: all of it goes into the key."""
        digest = hashlib.sha256(f"{self._salt} {path} {first_marker}\n".encode())
        digest.update(source)
        return digest.digest()

    def _entry(self, fullname: str, path: str) -> Path:
        return self.folder / f"{fullname}.{hashlib.sha256(path.encode()).hexdigest()[:12]}.atheris"

    def load(self, fullname: str, path: str, key: bytes) -> Optional[tuple]:
        """``(counters, code)`` stored under ``key``, or None (also for a damaged entry)."""
        if self._salt is None:
            return None
        try:
            data = self._entry(fullname, path).read_bytes()
            stored_key, body_digest, counters = _HEADER.unpack_from(data)
            body = data[_HEADER.size:]
            if stored_key != key or hashlib.sha256(body).digest() != body_digest:
                return None
            return counters, thaw(body)
        except (OSError, struct.error, ValueError, EOFError, TypeError):
            return None

    def store(self, fullname: str, path: str, key: bytes, counters: int,
              code: types.CodeType) -> None:
        if self._salt is None:
            return
        body = freeze(code)
        with contextlib.suppress(OSError):
            write_atomic(self._entry(fullname, path),
                         _HEADER.pack(key, hashlib.sha256(body).digest(), counters) + body)


class _CachedSourceFileLoader(import_hook.AtherisSourceFileLoader):
    """atheris's source loader, instrumenting branches through the cache."""

    def __init__(self, name: str, path: str, cache: InstrumentedCache):
        super().__init__(name, path, trace_dataflow=False)
        self._cache = cache

    def get_code(self, fullname: str) -> types.CodeType:
        first_marker = atheris._reserve_counter()
        source = self.get_data(self.path)
        key = self._cache.key(self.path, source, first_marker)
        cached = self._cache.load(fullname, self.path, key)
        if cached is not None:
            self._cache.hits += 1
            counters, instrumented = cached
            for _ in range(counters + 1):  # the module's, then the closing marker
                atheris._reserve_counter()
            return instrumented
        self._cache.misses += 1
        # The bytes that were hashed, compiled here: SourceFileLoader.get_code would take a
        # __pycache__ entry whose whole-second mtime and size match, which a same-size edit
        # within a second (or cp -p, rsync -a, tar) leaves stale under the new source's key.
        code = self.source_to_code(source, self.path)
        instrumented = instrument_bytecode.patch_code(code, trace_dataflow=False)
        closing_marker = atheris._reserve_counter()
        self._cache.store(fullname, self.path, key, closing_marker - first_marker - 1,
                          instrumented)
        return instrumented


class _CachedMetaPathFinder(import_hook.AtherisMetaPathFinder):
    """atheris's finder, with its plain source-file loader swapped for the cached one."""

    def __init__(self, packages: set, exclude: set, cache: InstrumentedCache):
        # atheris matches top-level names only; the packages here are dotted
        # (``mmufuzz.harness``), so it is given their top level and this finder the rest.
        super().__init__({name.partition(".")[0] for name in packages}, exclude,
                         enable_loader_override=True, trace_dataflow=False)
        self._packages = tuple(packages)
        self._cache = cache

    def find_spec(self, fullname, path, target=None):
        if not any(fullname == name or fullname.startswith(name + ".")
                   for name in self._packages):
            return None
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
    cache = InstrumentedCache(folder if folder is not None else cache_dir())
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

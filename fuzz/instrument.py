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

atheris would number a module's blocks in the order of a set of instructions
hashed by their addresses, which changes with the allocation history: two
checkouts at paths of other lengths got other numberings, and with a fixed
``-seed`` their campaigns parted after a few hundred inputs (libFuzzer walks
counters in index order).  Here blocks are numbered in bytecode order
(:func:`_blocks_in_order`), so the numbering is a function of the source alone.

A cache that cannot be read or written (another user's, a read-only home,
no home at all, a frozen build whose atheris has no source files to key on)
costs the instrumentation, nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.machinery
import importlib.util
import marshal
import os
import struct
import sys
import types
from itertools import compress, count
from pathlib import Path
from typing import Callable, Optional

import atheris
from atheris import import_hook, instrument_bytecode, version_dependent

from mmufuzz.fuzz.atomic import write_atomic

# Stand for the atheris module and the hit record's list in stored code; no source string
# of ours looks like them.
_ATHERIS_PLACEHOLDER = "<mmufuzz instrument: the atheris module>"
_HITS_PLACEHOLDER = "<mmufuzz instrument: the hit record>"
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


def reserve_counter() -> int:
    """atheris's ``_reserve_counter`` as it is now: ``atheris.Setup`` replaces the module's
    pre-fuzz functions with the fuzzing core's, so a reference taken before then would keep
    handing out counters libFuzzer never sees."""
    return atheris._reserve_counter()


def trace_branch(counter: int) -> None:
    """atheris's ``_trace_branch`` as it is now (see :func:`reserve_counter`)."""
    atheris._trace_branch(counter)


class HitRecord:
    """Hit counts of the instrumented blocks in one exec, handed to libFuzzer once at its end.

    atheris instruments a block with a call of its native ``_trace_branch``
    (320-480 ns a call: a pybind11 call from Python); code instrumented for a
    record instead adds one to its block's slot of :attr:`hits` inline
    (``hits[i] += 1``: a few specialized bytecodes, no call).  :meth:`fold`
    then writes the counts, capped at 255, into atheris's counter array, the
    memory libFuzzer reads after the callback: one copy per exec.  libFuzzer
    buckets a counter's value (1, 2, 3, 4-7, 8-15, 16-31, 32-127, 128+), so the
    hit counts keep their meaning; atheris's own ``counters[i]++`` wraps at 256
    where the cap does not.

    The slots are indexed by atheris counter number: blocks and the feature
    counters of :class:`~mmufuzz.fuzz.worker.CounterSink` (:meth:`reserve`,
    :meth:`hit`) alike, so every counter below ``len(hits)`` is the record's.
    Where atheris's counter array cannot be found (before libFuzzer starts, or
    an atheris built otherwise) the fold calls ``trace`` as often as the least
    count of each counter's bucket instead.
    """

    def __init__(self, reserve: Callable[[], int] = reserve_counter,
                 trace: Callable[[int], None] = trace_branch,
                 counters: Optional[tuple] = None):
        """``counters``: ``(address, size)`` of the counter array to fold into; by default
        atheris's, found once fuzzing has started."""
        self.hits: list = []  # the object instrumented code holds: only ever changed in place
        self._zeros: list = []
        self._reserve, self._trace = reserve, trace
        self._counters = counters

    def cover(self, end: int) -> None:
        """Make slots for the counters below ``end``."""
        if end > len(self.hits):
            self.hits.extend([0] * (end - len(self.hits)))
            self._zeros = [0] * end

    def reserve(self) -> int:
        """A fresh atheris counter, with its slot."""
        counter = self._reserve()
        self.cover(counter + 1)
        return counter

    def hit(self, counter: int) -> None:
        self.hits[counter] += 1

    @contextlib.contextmanager
    def muted(self):
        """Leave the slots as they were before: what runs inside is not this exec's coverage.

        (A worker's schedule variants run quiet: libFuzzer would credit the
        blocks they reach to the input that queued them, and keep it for code
        the input never ran; ``docs/levers.md``, *Guidance levers*.)
        """
        saved = self.hits[:]
        try:
            yield
        finally:
            self.hits[:] = saved

    def fold(self) -> None:
        """Hand this exec's counts to libFuzzer and start the next exec from zero."""
        hits = self.hits
        if not any(hits):
            return
        try:
            counts = bytes(hits)
        except ValueError:  # some count is above 255: cap it (one C pass when none is)
            for index in compress(count(), map((255).__lt__, hits)):
                hits[index] = 255
            counts = bytes(hits)
        counters = self._counters or self._find_counters()
        if counters is not None and counters[1] >= len(hits):
            ctypes.memmove(counters[0], counts, len(counts))
        else:
            for index in compress(count(), hits):
                for _ in range(_bucket_floor(hits[index])):
                    self._trace(index)
        hits[:] = self._zeros

    def _find_counters(self) -> Optional[tuple]:
        """atheris::counters and atheris::max_counters of the core library libFuzzer runs.

        The core is loaded and the array allocated when fuzzing starts, so this
        is None before (and stays to be looked up again).
        """
        try:
            with open("/proc/self/maps") as maps:
                path = next(line.split()[-1] for line in maps
                            if "/atheris/core_with" in line and line.rstrip().endswith(".so"))
            core = ctypes.CDLL(path)
            address = ctypes.c_void_p.in_dll(core, "_ZN7atheris8countersE").value
            size = ctypes.c_int.in_dll(core, "_ZN7atheris12max_countersE").value
        except (OSError, StopIteration, ValueError):
            return None
        if address:
            self._counters = (address, size)
        return self._counters


def _bucket_floor(hits: int) -> int:
    """The least hit count in the libFuzzer bucket of ``hits`` (1, 2, 3, 4, 8, 16, 32, 128)."""
    if hits < 4:
        return hits
    if hits < 32:
        return 1 << (hits.bit_length() - 1)
    return 32 if hits < 128 else 128


class _RecordingInstrumentor(instrument_bytecode.Instrumentor):
    """atheris's block finder, with ``hits[counter] += 1`` where atheris puts its call."""

    def __init__(self, code: types.CodeType, hits: list):
        super().__init__(code)
        self.consts.append(hits)
        self._hits_const = len(self.consts) - 1

    def _generate_trace_branch_invocation(self, copyfrom_instruction):
        def instruction(op, arg=None):
            return instrument_bytecode._generate_instruction(op, arg, copyfrom_instruction)

        # What CPython compiles ``hits[counter] += 1`` to (BINARY_OP 0 is NB_ADD).
        return [instruction("LOAD_CONST", self._hits_const),
                instruction("LOAD_CONST", self._get_counter()),
                instruction("COPY", 2), instruction("COPY", 2), instruction("BINARY_SUBSCR"),
                instruction("LOAD_CONST", self._get_const(1)), instruction("BINARY_OP", 0),
                instruction("SWAP", 3), instruction("SWAP", 2), instruction("STORE_SUBSCR")]


class _InsertionOrderedSet(dict):
    """The one ``set`` atheris's ``trace_control_flow`` makes (the blocks to instrument),
    iterated in the order blocks were added, which is bytecode order."""

    def add(self, item) -> None:
        self[item] = None


@contextlib.contextmanager
def _blocks_in_order():
    """atheris's block finder numbering blocks in bytecode order, not by address.

    ``Instrumentor.trace_control_flow`` collects block starts in a ``set()`` of
    ``Instruction`` objects, which hash by ``id``, then reserves a counter per
    block as it iterates that set.  Its module's ``set`` is, for the moment,
    a set that keeps insertion order (the only ``set()`` in that module).
    """
    instrument_bytecode.set = _InsertionOrderedSet
    try:
        yield
    finally:
        del instrument_bytecode.set


# The opcodes a record's increment is made of exist from Python 3.11.
RECORD_SUPPORTED = sys.version_info >= (3, 11)


def patch_code_for_record(code: types.CodeType, hits: list) -> types.CodeType:
    """``code`` with every block counted in ``hits``, nested code included.

    atheris's ``patch_code`` leaves the code of comprehensions and generator
    expressions alone (they are named ``<listcomp>``, ``<genexpr>``, ...), so
    their branches are invisible to it; here every nested code object is
    instrumented.
    """
    if "__ATHERIS_INSTRUMENTED__" in code.co_consts:
        return code
    instrumentor = _RecordingInstrumentor(code, hits)
    instrumentor.trace_control_flow()
    consts = instrumentor.consts
    for i, const in enumerate(consts):
        if isinstance(const, types.CodeType):
            consts[i] = patch_code_for_record(const, hits)
    return instrumentor.to_code()


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
            f"atheris {rewriting.hexdigest()} branches only, in bytecode order")


def _replace_consts(code: types.CodeType, matches: Callable[[object], bool],
                    new: object) -> types.CodeType:
    """``code`` with every constant that ``matches``, in it and its nested code, set to ``new``."""
    consts = tuple(new if matches(const)
                   else _replace_consts(const, matches, new) if isinstance(const, types.CodeType)
                   else const
                   for const in code.co_consts)
    return code.replace(co_consts=consts)


def freeze(code: types.CodeType, hits: Optional[list] = None) -> bytes:
    """Instrumented ``code`` as bytes (marshal, with the atheris module and the record's
    ``hits`` as placeholders)."""
    code = _replace_consts(code, lambda c: c is atheris, _ATHERIS_PLACEHOLDER)
    if hits is not None:
        code = _replace_consts(code, lambda c: c is hits, _HITS_PLACEHOLDER)
    return marshal.dumps(code)


def _is_placeholder(name: str) -> Callable[[object], bool]:
    return lambda c: isinstance(c, str) and c == name


def thaw(data: bytes, hits: Optional[list] = None) -> types.CodeType:
    """The code :func:`freeze` stored, calling into this process's atheris (counting in
    this process's ``hits``)."""
    code = marshal.loads(data)
    if not isinstance(code, types.CodeType):
        raise TypeError(f"not code but {type(code).__name__}")
    code = _replace_consts(code, _is_placeholder(_ATHERIS_PLACEHOLDER), atheris)
    if hits is not None:
        code = _replace_consts(code, _is_placeholder(_HITS_PLACEHOLDER), hits)
    return code


class InstrumentedCache:
    """A file per module and checkout, ``NAME.PATHHASH.atheris``: its latest instrumentation.

    Off (every load a miss, nothing stored) without a ``folder`` or a salt.
    Code instrumented for a ``record`` is stored apart from atheris's calls by its salt.
    """

    def __init__(self, folder: Optional[Path], record: Optional[HitRecord] = None):
        self.folder = folder
        self.record = record
        self._salt = _salt() if folder is not None else None
        if self._salt is not None and record is not None:
            self._salt += " into a hit record, nested code too"
        self.hits = self.misses = 0

    def _record_hits(self) -> Optional[list]:
        return self.record.hits if self.record is not None else None

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
            return counters, thaw(body, self._record_hits())
        except (OSError, struct.error, ValueError, EOFError, TypeError):
            return None

    def store(self, fullname: str, path: str, key: bytes, counters: int,
              code: types.CodeType) -> None:
        if self._salt is None:
            return
        body = freeze(code, self._record_hits())
        with contextlib.suppress(OSError):
            write_atomic(self._entry(fullname, path),
                         _HEADER.pack(key, hashlib.sha256(body).digest(), counters) + body)


class _CachedSourceFileLoader(import_hook.AtherisSourceFileLoader):
    """atheris's source loader, instrumenting branches through the cache (for its record, if any)."""

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
            for _ in range(counters):
                atheris._reserve_counter()
            self._closed(atheris._reserve_counter())
            return instrumented
        self._cache.misses += 1
        # The bytes that were hashed, compiled here: SourceFileLoader.get_code would take a
        # __pycache__ entry whose whole-second mtime and size match, which a same-size edit
        # within a second (or cp -p, rsync -a, tar) leaves stale under the new source's key.
        code = self.source_to_code(source, self.path)
        record = self._cache.record
        with _blocks_in_order():
            if record is None:
                instrumented = instrument_bytecode.patch_code(code, trace_dataflow=False)
            else:
                instrumented = patch_code_for_record(code, record.hits)
        closing_marker = atheris._reserve_counter()
        self._closed(closing_marker)
        self._cache.store(fullname, self.path, key, closing_marker - first_marker - 1,
                          instrumented)
        return instrumented

    def _closed(self, closing_marker: int) -> None:
        """The module's counters are taken: its record (if any) gets their slots."""
        if self._cache.record is not None:
            self._cache.record.cover(closing_marker + 1)


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
def instrument_branches(packages: set, exclude: set, folder: Optional[Path] = None,
                        record: Optional[HitRecord] = None):
    """Imports of ``packages`` (but not the ``exclude`` modules) instrumented, branches only.

    ``atheris.instrument_imports`` also turns every comparison into a call
    that records its operands (data-flow tracing).  libFuzzer uses those only
    for its value profile, which campaigns leave off, and as words for its own
    byte mutations, which run on few inputs (the custom mutator's
    ``BYTE_MUTATION_RATE``) and whose bytes decode to pooled values anyway; so
    it is off here.  With a ``record``, blocks count into it (:class:`HitRecord`)
    instead of calling atheris.  Yields the cache (its ``hits`` and ``misses``).
    """
    cache = InstrumentedCache(folder if folder is not None else cache_dir(), record)
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

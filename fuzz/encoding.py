"""The two encodings of a Program: fuzzer bytes and the text reproducer.

**Bytes** (``decode``/``encode``) are what libFuzzer mutates.  ``decode`` is
total: every byte string is a valid program, so no execution is wasted on a
parse error.  Each field reads a selector byte that either picks a value from a
small pool of interesting values or escapes to a literal mapped into the
field's range.  Pools are built from the program decoded so far (slot bounds,
2M-aligned gfns inside slots and their neighbours, gfns and addresses earlier
ops used), so a one-byte mutation tends to move an op onto something that
matters; and half the selectors of a gfn or gva field reuse an operand of the
latest ops (``_Context.reuse``), so that a fresh op acts on what the program
just touched.  ``encode`` is canonical: ``decode(encode(p)) == p`` for every program
``decode`` can produce, which makes ``encode(decode(b))`` a fixpoint.

**Text** (``parse_reproducer``/``format_program``) is the readable, diffable
form users and CI see (``docs/reproducers.md``).  It is untrusted input: it is
parsed with a small linear scanner, never ``eval``, in time and memory bounded
by its size (capped), and every error is a :class:`ReproError` of one line
naming the file, line and field and quoting at most a short excerpt.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Optional

from mmufuzz.harness.ops import (GFN_LIMIT, GVA_LIMIT, OP_CLASSES, OP_NAMES, PAGE_SHIFT,
                                 PAGES_PER_2M, PG_LEVEL_2M, SIDE_NAMES, Access, AccessKind, Accept,
                                 Domain, Invlpg, ManualProtect, Paging, Parallel, Program,
                                 PTE_ADDR_MASK, PteFlag, VmHeader, VmType, WritePte, domain,
                                 op_vcpu, schedule_digits, schedule_of)

FORMAT_LINE = "# mmufuzz reproducer v1"
MARKER = ">>> "
BOM = "\ufeff"
# Bounds on untrusted text, far above anything the printer writes: a file (a dirty
# log of a whole slot in a report is a few MB), its lines, its ops, the code of a line.
MAX_FILE_BYTES = 16 << 20
MAX_OPS_IN_FILE = 100_000
MAX_LINES = 200_000
MAX_CODE_CHARS = 4096
_EXCERPT_CHARS = 40
_MESSAGE_CHARS = 400  # an error message longer than this is cut (it quoted too much)

# --- errors -----------------------------------------------------------------


def excerpt(text: str) -> str:
    """``text`` quoted for an error message: one line, at most a few dozen characters."""
    text = str(text)
    if len(text) <= _EXCERPT_CHARS:
        return repr(text)
    return f"{text[:_EXCERPT_CHARS]!r}... ({len(text)} characters)"


def _one_line(text: str) -> str:
    """``text`` as it is if printable, else with its control characters escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


class ReproError(ValueError):
    """Bad reproducer input: one line that names the file, the line and the field."""

    def __init__(self, path, line: int, field_name: Optional[str], message: str):
        self.path, self.line, self.field, self.message = str(path), line, field_name, message
        where = _one_line(f"{self.path}:{line}" if line else self.path)
        what = f"field {excerpt(field_name)}: " if field_name else ""
        message = _one_line(message)
        if len(message) > _MESSAGE_CHARS:
            message = f"{message[:_MESSAGE_CHARS]}... ({len(message)} characters)"
        super().__init__(f"{where}: {what}{message}")


class _FieldError(Exception):
    """A field-level problem; the line parser adds file and line."""

    def __init__(self, field_name: Optional[str], message: str):
        super().__init__(message)
        self.field, self.message = field_name, message


# --- cross-field rules, shared by the parser and the decoder -----------------

def _collision(sides) -> Optional[tuple]:
    """``(i, j)`` of the first two guest sides of one vCPU (j the later), or None: a vCPU
    is sequential, so two of its ops cannot run concurrently."""
    for j in range(1, len(sides)):
        vcpu = op_vcpu(sides[j])
        for i in range(j):
            if vcpu is not None and op_vcpu(sides[i]) == vcpu:
                return i, j
    return None


def _check_op(op, header: VmHeader) -> None:
    """The rules no single field domain states (docs/reproducers.md, "Field rules")."""
    if isinstance(op, Parallel):
        if op.d is not None and op.c is None:
            raise _FieldError("d", "d= needs c= (the actors are a, b, c, d, in order)")
        clash = _collision(op.sides)
        if clash is not None:
            i, j = clash
            raise _FieldError(SIDE_NAMES[j], f"{SIDE_NAMES[i]} and {SIDE_NAMES[j]} both run on "
                                             f"vcpu {op_vcpu(op.sides[j])}")
        return
    vcpu = op_vcpu(op)
    if vcpu is not None and vcpu >= header.vcpus:
        raise _FieldError("vcpu", f"vcpu {vcpu} but the vm has {header.vcpus}")
    if isinstance(op, Access) and (op.value is None) == (op.kind is AccessKind.WRITE):
        raise _FieldError("value", "value= is required for a write and only for a write")
    if isinstance(op, Accept) and op.level == PG_LEVEL_2M and op.gpa % (PAGES_PER_2M << PAGE_SHIFT):
        raise _FieldError("gpa", f"{op.gpa:#x} is not aligned to 2m")
    if isinstance(op, WritePte) and op.flags & PteFlag.PS and op.target % PAGES_PER_2M:
        raise _FieldError("target", f"ps needs a 2M-aligned target, not {op.target:#x}")


# --- text: values -----------------------------------------------------------

_NUMBER = re.compile(r"0x[0-9a-fA-F]+|[0-9]+")


_MAX_NUMBER_CHARS = 24  # 0x and 16 hex digits, or 20 decimal digits, plus leading zeros


def _parse_int(text: str, dom: Domain) -> int:
    if len(text) > _MAX_NUMBER_CHARS or not _NUMBER.fullmatch(text):
        raise ValueError(f"{excerpt(text)} is not a number (0x... hex or decimal digits)")
    value = int(text, 16 if text.startswith("0x") else 10)
    if not dom.lo <= value < dom.hi:
        raise ValueError(f"{text} is out of range {_show(dom.lo, dom)}..{_show(dom.hi - 1, dom)}")
    if value % dom.align:
        raise ValueError(f"{text} is not aligned to {dom.align:#x}")
    return value


def _show(value: int, dom: Domain) -> str:
    return f"{value:#x}" if dom.radix == 16 else str(value)


def _parse_value(text: str, dom: Domain, header: Optional[VmHeader]):
    if dom.kind == "int":
        return _parse_int(text, dom)
    if dom.kind == "bool":
        if text not in ("0", "1"):
            raise ValueError(f"{excerpt(text)} must be 0 or 1")
        return text == "1"
    if dom.kind == "enum":
        if text not in dom.choices:
            raise ValueError(f"{excerpt(text)} must be one of {', '.join(dom.choices)}")
        return dom.choices[text]
    if dom.kind == "flags":
        flags = next(iter(dom.choices.values())) & 0
        for name in filter(None, text.split(",")):
            if name not in dom.choices:
                raise ValueError(f"unknown flag {excerpt(name)} (known: {', '.join(dom.choices)})")
            flags |= dom.choices[name]
        return flags
    if dom.kind == "root":
        return None if text == "off" else _parse_int(text, dom)
    if dom.kind == "op":
        if not (text.startswith("(") and text.endswith(")")):
            raise ValueError("must be a parenthesised op, like (zap_all)")
        return _parse_op(text[1:-1], header, nested=True)
    raise AssertionError(f"unknown domain kind {dom.kind!r}")


def _format_value(value, dom: Domain) -> str:
    if dom.kind == "int":
        return _show(value, dom)
    if dom.kind == "bool":
        return "1" if value else "0"
    if dom.kind == "enum":
        return next(name for name, v in dom.choices.items() if v == value)
    if dom.kind == "flags":
        return ",".join(name for name, flag in dom.choices.items() if value & flag)
    if dom.kind == "root":
        return "off" if value is None else _show(value, dom)
    if dom.kind == "op":
        return f"({format_op(value)})"
    raise AssertionError(f"unknown domain kind {dom.kind!r}")


# --- text: ops --------------------------------------------------------------
# An Access spells its address ``gpa=`` or ``gva=`` (the ``virtual`` field).

def _text_fields(op) -> list[tuple[str, str]]:
    """(text name, dataclass field name) of an op's printed fields, canonical order."""
    names = []
    for item in dataclasses.fields(op):
        if isinstance(op, Access) and item.name == "virtual":
            continue
        if isinstance(op, Access) and item.name == "addr":
            names.append(("gva" if op.virtual else "gpa", "addr"))
        elif getattr(op, item.name) is not None or not domain(type(op), item.name).optional:
            names.append((item.name, item.name))
    return names


def format_op(op) -> str:
    """One op in canonical text: keyword, then its fields in declaration order."""
    cls = type(op)
    parts = [OP_NAMES[cls]]
    for text_name, name in _text_fields(op):
        parts.append(f"{text_name}={_format_value(getattr(op, name), domain(cls, name))}")
    return " ".join(parts)


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_TOKEN = re.compile(r"[^ \t]*")
_PLAIN_VALUE = re.compile(r"[^ \t()]*")


def _split_fields(text: str) -> list[tuple[str, str]]:
    """``k=v k=(op ...)`` into pairs, in one pass; parentheses nest, anything else is an error.

    Fields are separated by spaces or tabs (a line holds no other whitespace).
    """
    pairs, i, n = [], 0, len(text)
    while i < n:
        if text[i] in " \t":
            i += 1
            continue
        name = _FIELD_NAME.match(text, i)
        if name is None:
            token = _TOKEN.match(text, i).group()
            raise _FieldError(None, f"expected name=value, got {excerpt(token)}")
        key, j = name.group()[:-1], name.end()
        if j < n and text[j] == "(":
            depth = 0
            for k in range(j, n):
                depth += {"(": 1, ")": -1}.get(text[k], 0)
                if depth == 0:
                    break
            if depth:
                raise _FieldError(key, "unbalanced parentheses")
            end = k + 1
        else:
            end = _PLAIN_VALUE.match(text, j).end()
        if end < n and text[end] not in " \t":
            raise _FieldError(key, "unbalanced parentheses" if text[end] in "()"
                              else f"expected a space after the value, got {excerpt(text[end])}")
        pairs.append((key, text[j:end]))
        i = end
    return pairs


def _parse_fields(cls, text: str, header: Optional[VmHeader]) -> dict:
    """Parse ``text`` into keyword arguments of ``cls`` (all fields checked)."""
    given: dict[str, str] = {}
    for key, value in _split_fields(text):
        if key in given:
            raise _FieldError(key, "given twice")
        given[key] = value
    kwargs = {}
    for item in dataclasses.fields(cls):
        names = ("gpa", "gva") if (cls is Access and item.name == "addr") else (item.name,)
        if cls is Access and item.name == "virtual":
            continue
        present = [n for n in names if n in given]
        dom = domain(cls, item.name)
        if len(present) > 1:
            raise _FieldError(present[1], f"give only one of {' or '.join(names)}")
        if not present:
            if item.default is not dataclasses.MISSING and cls is VmHeader:
                continue  # a header option left out: its default
            if dom.optional:
                kwargs[item.name] = None
                continue
            raise _FieldError("|".join(names), "missing")
        try:
            kwargs[item.name] = _parse_value(given.pop(present[0]), dom, header)
        except ValueError as error:
            raise _FieldError(present[0], str(error)) from None
        except _FieldError as error:  # inside a parenthesised op
            raise _FieldError(error.field, f"{error.message} (in '{present[0]}')") from None
        if cls is Access and item.name == "addr":
            kwargs["virtual"] = present[0] == "gva"
    if given:
        hint = f" (its actors are {', '.join(SIDE_NAMES)})" if cls is Parallel else ""
        raise _FieldError(next(iter(given)), f"unknown field for {OP_NAMES.get(cls, 'vm')}{hint}")
    return kwargs


def _keyword(text: str) -> tuple[str, str]:
    """A line's first word and the rest: words are separated by spaces or tabs."""
    text = text.strip(" \t")
    end = _TOKEN.match(text).end()
    return text[:end], text[end:]


def _parse_op(text: str, header: Optional[VmHeader], nested: bool = False):
    """One op; ``nested``: a side of a ``parallel``, which the grammar bars from being one.

    The bar is checked on the keyword, before the fields are parsed, so nesting
    depth never exceeds one whatever the text.
    """
    keyword, rest = _keyword(text)
    cls = OP_CLASSES.get(keyword)
    if cls is None:
        raise _FieldError(None, f"unknown op {excerpt(keyword)}" if keyword else "empty op")
    if nested and cls is Parallel:
        raise _FieldError(None, "a parallel cannot contain a parallel")
    op = cls(**_parse_fields(cls, rest, header))
    _check_op(op, header)
    return op


# --- text: files ------------------------------------------------------------

_META_KEY = re.compile(r"[a-z][a-z_-]*:")
_META_GAP = re.compile(r"(\s{2,})")
# Header comments printed before the program, in this order; everything else after it.
_META_HEAD = ("finding", "target", "inject", "signature")
_META_TAIL = ("expect", "expected", "actual", "result")


@dataclass(frozen=True)
class Reproducer:
    """A parsed reproducer file: the program, the ``>>>`` op index, the ``# key: value`` comments.

    ``source`` (the file) and ``meta_lines`` (the line of each comment key) let
    whoever interprets a comment name the line in an error.
    """

    program: Program
    marker: Optional[int] = None
    meta: dict = field(default_factory=dict)
    source: str = field(default="<string>", compare=False)
    meta_lines: dict = field(default_factory=dict, compare=False)

    def error(self, key: Optional[str], message: str) -> "ReproError":
        """A ReproError about comment ``key`` (the file as a whole for None)."""
        return ReproError(self.source, self.meta_lines.get(key, 0), key, message)


def _parse_meta(comment: str, number: int, meta: dict, lines: dict) -> None:
    """Collect ``key: value`` pairs of a full-line comment; two or more spaces separate pairs.

    Linear in the comment's length: split at runs of whitespace, then join the
    pieces that do not start a new ``key:`` to the value before them.
    """
    body = comment.strip()
    if not _META_KEY.match(body):
        return
    pairs: list[list[str]] = []
    pieces = _META_GAP.split(body)
    for index in range(0, len(pieces), 2):
        key = _META_KEY.match(pieces[index])
        if key is not None:
            pairs.append([key.group()[:-1], pieces[index][key.end():]])
        else:
            pairs[-1][1] += pieces[index - 1] + pieces[index]
    for key, value in pairs:
        if key not in meta:
            meta[key], lines[key] = value.strip(), number


def _lines(text: str):
    """Numbered lines, split at ``\n`` (and ``\r\n``) only: Unicode line separators
    inside a comment are text, as every editor numbering lines agrees."""
    for number, raw in enumerate(text.split("\n"), 1):
        yield number, raw[:-1] if raw.endswith("\r") else raw


def parse_reproducer(text: str, path="<string>") -> Reproducer:
    """Parse a reproducer's text; raise :class:`ReproError` on the first bad line.

    A leading UTF-8 byte-order mark is skipped (editors on some systems add one).
    Code (what precedes ``#``) is ASCII, at most ``MAX_CODE_CHARS`` a line;
    comments may hold any text but control characters (they would reach the
    terminal through ``show`` and reports) and bidirectional overrides (they
    make a line read differently from what it says).
    """
    lines = text.count("\n") + 1
    if lines > MAX_LINES:
        raise ReproError(path, 0, None, f"{lines} lines, at most {MAX_LINES}")
    header, ops, marker, meta, meta_lines = None, [], None, {}, {}
    for number, raw in _lines(text[len(BOM):] if text.startswith(BOM) else text):
        hidden = _HIDDEN.search(raw)
        if hidden is not None:
            raise ReproError(path, number, None, f"character U+{ord(hidden.group()):04X} "
                                                 "(a control or bidirectional character)")
        line = raw.strip(" \t")
        marked = line.startswith(MARKER.strip())
        if marked:
            line = line[len(MARKER.strip()):].strip(" \t")
        code, hashmark, comment = line.partition("#")
        code = code.strip(" \t")
        if not code:
            if hashmark and not marked:
                _parse_meta(comment, number, meta, meta_lines)
            continue
        try:
            _check_code(code)
            if header is None:
                header = _parse_header(code)
                continue
            if _keyword(code)[0] == "vm":
                raise _FieldError(None, "the vm header may appear only once, first")
            if len(ops) == MAX_OPS_IN_FILE:
                raise _FieldError(None, f"more than {MAX_OPS_IN_FILE} ops")
            ops.append(_parse_op(code, header))
        except _FieldError as error:
            raise ReproError(path, number, error.field, error.message) from None
        if marked:
            marker = len(ops) - 1
    if header is None:
        raise ReproError(path, 0, None, "no 'vm type=... vcpus=...' header line")
    return Reproducer(Program(header, tuple(ops)), marker, meta, str(path), meta_lines)


_NOT_CODE = re.compile(r"[^\t\x20-\x7e]")
_HIDDEN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _check_code(code: str) -> None:
    if len(code) > MAX_CODE_CHARS:
        raise _FieldError(None, f"line is {len(code)} characters long, at most "
                                f"{MAX_CODE_CHARS} before a comment")
    bad = _NOT_CODE.search(code)
    if bad is not None:
        bad = bad.group()
        raise _FieldError(None, f"character U+{ord(bad):04X} outside a comment "
                                "(ops are printable ASCII)")


def _parse_header(code: str) -> VmHeader:
    keyword, rest = _keyword(code)
    if keyword != "vm":
        raise _FieldError(None, f"the first line must be 'vm type=... vcpus=...', "
                                f"not {excerpt(keyword)}")
    return VmHeader(**_parse_fields(VmHeader, rest, None))


def load_reproducer(path) -> Reproducer:
    """Read and parse a reproducer file: a regular file of UTF-8 text, at most MAX_FILE_BYTES.

    A FIFO, a device or a directory is refused before anything is read (it
    could block or never end); everything else wrong is a ReproError too.
    """
    data = read_input(path, MAX_FILE_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ReproError(path, data.count(b"\n", 0, error.start) + 1, None,
                         "not a text file (invalid UTF-8)") from None
    return parse_reproducer(text, path)


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def read_input(path, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (symlinks followed), at most ``limit`` of them.

    Opened non-blocking, so a FIFO cannot stall the open, and checked with
    ``fstat`` on the open descriptor, so what is read is what was checked.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as error:
        raise ReproError(path, 0, None, f"cannot read: {error.strerror or error}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
            raise ReproError(path, 0, None, f"cannot read: {kind}, not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(limit + 1)
    except OSError as error:
        raise ReproError(path, 0, None, f"cannot read: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        size = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"
        raise ReproError(path, 0, None, f"larger than {size}: refused unread")
    return data


def format_header(header: VmHeader) -> str:
    """The header line; options only when set, so older reproducers print unchanged."""
    text = f"vm type={header.type.value} vcpus={header.vcpus}"
    if header.manual_protect is not ManualProtect.OFF:
        text += f" manual_protect={header.manual_protect.value}"
    if header.range_flush:
        text += " range_flush=1"
    return text


def format_program(program: Program, marker: Optional[int] = None,
                   meta: Optional[dict] = None) -> str:
    """The canonical reproducer text, ``>>>`` before op ``marker``, meta as header comments."""
    meta = meta or {}
    head = [k for k in _META_HEAD if k in meta]
    tail = [k for k in _META_TAIL if k in meta]
    rest = sorted(k for k in meta if k not in head and k not in tail)
    lines = [FORMAT_LINE]
    lines += [f"# {k}: {meta[k]}" for k in head + rest]
    lines.append(format_header(program.header))
    for index, op in enumerate(program.ops):
        lines.append((MARKER if index == marker else "") + format_op(op))
    lines += [f"# {k}: {meta[k]}" for k in tail]
    return "\n".join(lines) + "\n"


# --- bytes ------------------------------------------------------------------
# Field encoding: one selector byte; LITERAL escapes to a fixed-width
# little-endian literal reduced into the field's range, anything else picks
# pool[selector % len(pool)].

LITERAL = 0xFF
MAX_OPS = 64

# Op kinds by opcode byte.  Guest accesses dominate, as they do in a real guest;
# every kind stays reachable.  Generic weights: nothing here knows a bug.
_OP_WEIGHTS = (
    ("memslot_add", 18), ("memslot_delete", 6), ("memslot_move", 6), ("memslot_set_flags", 8),
    ("set_attributes", 12), ("accept", 12), ("paging", 6), ("write_pte", 18), ("access", 90),
    ("invlpg", 8), ("flush_tlb", 4), ("host_invalidate", 12), ("zap_all", 4), ("split", 6),
    ("recover", 8), ("get_dirty_log", 6), ("clear_dirty_log", 2),
)
# ``parallel`` by number of actors, after the simple ops.  Pairs keep the opcodes they had
# when two was the only arity, but the last six (a v1 input decodes as it did unless one of
# those starts an op); three and four actors cost more to run, and are rarer.
_PARALLEL_WEIGHTS = {2: 24, 3: 4, 4: 2}
assert sum(w for _, w in _OP_WEIGHTS) + sum(_PARALLEL_WEIGHTS.values()) == 256
# An opcode stands for (op class, actors); actors is 0 for a simple op.
_OPCODES = (tuple((OP_CLASSES[name], 0) for name, weight in _OP_WEIGHTS for _ in range(weight))
            + tuple((Parallel, n) for n, weight in _PARALLEL_WEIGHTS.items()
                    for _ in range(weight)))
_FIRST_OPCODE = {kind: _OPCODES.index(kind) for kind in dict.fromkeys(_OPCODES)}
_SIMPLE_OPCODES = _OPCODES[:sum(w for _, w in _OP_WEIGHTS)]
_FIRST_SIMPLE_OPCODE = {kind: _OPCODES.index(kind) for kind in dict.fromkeys(_SIMPLE_OPCODES)}


def opcode_table() -> tuple:
    """The kind ``(op class, actors)`` each of the 256 opcode bytes decodes to: the
    decoder's op mix, which a generator that draws op kinds itself starts from."""
    return _OPCODES


def opcode(kind: tuple) -> int:
    """The first opcode byte that decodes to ``kind`` (``(op class, actors)``)."""
    return _FIRST_OPCODE[kind]

_GFN_CONSTANTS = (0x0, 0x1, 0x1ff, 0x200, 0x201, 0x3ff, 0x400, 0x600, 0x800, 0x1000)
_NPAGES = (0x1, 0x2, 0x10, 0x1ff, 0x200, 0x201, 0x400, 0x600)
_WORDS = (0, 1, 7, 255, 511)
_INDICES = (0, 1, 2, 3, 4, 511)
_HOST_OFFSETS = (0, 1, 256, 511)
_FIRST_PAGES = (0x0, 0x40, 0x80, 0x1c0, 0x200)  # slot-relative, multiples of 64
_VALUES = (0x0, 0x1, 0x2a, 0xffffffffffffffff, 0x8000000000000000, 0x1122334455667788)
_SCHEDULES = (0x0, 0x1, 0x2, 0x5, 0xa, 0xff, 0x5555555555555555, 0xaaaaaaaaaaaaaaaa,
              0xffffffffffffffff)
_SMALL_SLOTS = 4   # selectors below 0xC0 pick slot (s % 4): programs reuse a few slots
_DYNAMIC_GFNS = 48  # how many recent gfns the context remembers
_DYNAMIC_INDICES = 8  # ... and PTE indices (each gives a gva at each level)
# Operand reuse: selectors from REUSE_SELECTOR up to LITERAL draw a gfn or gva field from
# the operands of the latest ops (_Context.reuse), the lower ones from its pool (which
# therefore holds at most REUSE_SELECTOR values).  Half the selectors: a fresh op that
# names memory names what the program already uses about as often as anything else.
REUSE_SELECTOR = 0x80
_REUSED = 8  # operands remembered per kind (gfns, gvas)
_ROOTS = 4   # paging roots remembered
_LINKS = 4   # links remembered per table
_PATHS = 16  # table paths followed per level when finding the gvas of a PTE
PT64_LEVELS = 4
# The shift of the index of a level-L table's entry in a gva, by L (index 0 unused).
_LEVEL_SHIFTS = (None,) + tuple(PAGE_SHIFT + 9 * (level - 1)
                                for level in range(1, PT64_LEVELS + 1))

_RADIX10_POOLS = {"word": _WORDS, "index": _INDICES, "host_offset": _HOST_OFFSETS}
_POOLS = {"npages": _NPAGES, "value": _VALUES, "first": _FIRST_PAGES}
_CONSTANT_POOLS = {**_POOLS, **_RADIX10_POOLS}


class _Context:
    """What earlier ops made interesting; grows identically while decoding and encoding.

    The pools derived from the gfns and PTE indices (gpas, gvas, roots) are built
    when first asked for after a change, not for every field that draws from them.

    Besides the pools, the context keeps the **operands** the latest ops used,
    most recent first (syzkaller's resource reuse): the gfns they named and the
    guest-virtual pages they touched, invalidated or remapped.  A page-table
    write's gvas are those whose walk goes through the written entry, found
    from the tables earlier ``write_pte``s linked and the roots ``paging``
    loaded (:meth:`_mapped_gvas`): a guest that changes a PTE goes on to use,
    invalidate or change again what that PTE maps.  The upper selectors of a
    gfn or gva field draw from these (:data:`REUSE_SELECTOR`).
    """

    def __init__(self, header: VmHeader):
        self.header = header
        self.gfns: list[int] = list(_GFN_CONSTANTS)
        self.indices: list[int] = []
        self._derived: dict = {}  # pool name -> the pool, until the gfns or indices change
        self.recent = {"gfn": [], "gva": []}  # operands of the latest ops, most recent first
        self.roots: list[int] = []  # the tables paging ops loaded, most recent first
        self.links: dict[int, list] = {}  # table -> [(parent table, index)] linking to it

    def note_gfn(self, gfn: int) -> None:
        if gfn in self.gfns or not 0 <= gfn < GFN_LIMIT:
            return
        self.gfns.append(gfn)
        if len(self.gfns) > len(_GFN_CONSTANTS) + _DYNAMIC_GFNS:
            del self.gfns[len(_GFN_CONSTANTS)]
        self._derived.clear()

    def _used(self, kind: str, values) -> None:
        """``values`` are the latest operands of ``kind``: to the front of its reuse list."""
        fresh = list(dict.fromkeys(values))
        self.recent[kind] = (fresh + [v for v in self.recent[kind] if v not in fresh])[:_REUSED]

    def note(self, op) -> None:
        """Remember the gfns an op names: slot bounds, 2M frames inside, pages touched;
        and its operands, for reuse."""
        if isinstance(op, Parallel):
            for side in op.sides:
                self.note(side)
            return
        base = getattr(op, "base", None)
        if base is not None:
            self.note_gfn(base)
            npages = getattr(op, "npages", 1) or 1
            last = base + npages - 1
            huge = -(-base // PAGES_PER_2M) * PAGES_PER_2M
            frame = base & -PAGES_PER_2M  # the 2M frame the range starts in
            for gfn in (last, base + npages, huge, huge - 1, huge + 1, frame):
                self.note_gfn(gfn)
        named = [getattr(op, name, None) for name in ("base", "table", "target", "root")]
        for gfn in named:
            if gfn is not None:
                self.note_gfn(gfn)
        if isinstance(op, Accept):
            self.note_gfn(op.gpa >> PAGE_SHIFT)
            named.append(op.gpa >> PAGE_SHIFT)
        elif isinstance(op, Access):
            if op.virtual:
                self._used("gva", (op.addr,))
            else:
                self.note_gfn(op.addr >> PAGE_SHIFT)
                named.append(op.addr >> PAGE_SHIFT)
        elif isinstance(op, Invlpg):
            self._used("gva", (op.gva,))
        elif isinstance(op, Paging) and op.root is not None:
            self.roots = [op.root] + [r for r in self.roots if r != op.root][:_ROOTS - 1]
        elif isinstance(op, WritePte):
            if op.index not in self.indices:
                self.indices = (self.indices + [op.index])[-_DYNAMIC_INDICES:]
                self._derived.clear()
            self._used("gva", self._mapped_gvas(op.table, op.index))
            if op.flags & PteFlag.P and not op.flags & PteFlag.PS:
                parents = self.links.setdefault(op.target, [])
                if (op.table, op.index) not in parents:
                    parents.insert(0, (op.table, op.index))
                    del parents[_LINKS:]
        self._used("gfn", (gfn for gfn in named if gfn is not None and 0 <= gfn < GFN_LIMIT))

    def _mapped_gvas(self, table: int, index: int) -> list[int]:
        """The gvas whose 4-level walk goes through entry ``index`` of guest table ``table``,
        as far as the earlier ops tell: paths of linked tables up to a loaded root (or,
        before any ``paging`` op, up to a table nothing links, as a guest builds its
        tables before it loads CR3).  At most :data:`_REUSED`, shortest paths first."""
        out: list[int] = []
        paths = [(table, ())]  # (table, indices of the entries above it, nearest first)
        for depth in range(PT64_LEVELS):
            level = PT64_LEVELS - depth  # of ``table`` if the path's top is a root
            for node, above in paths:
                if node in self.roots or (not self.roots and node not in self.links):
                    gva = index << _LEVEL_SHIFTS[level]
                    for k, entry in enumerate(above, 1):
                        gva |= entry << _LEVEL_SHIFTS[level + k]
                    if gva < GVA_LIMIT and gva not in out:
                        out.append(gva)
                        if len(out) == _REUSED:
                            return out
            paths = [(parent, above + (entry,)) for node, above in paths
                     for parent, entry in self.links.get(node, ())][:_PATHS]
        return out

    def gvas(self) -> list[int]:
        """Guest-virtual pages: identity gpas plus addresses built from PTE indices used
        (each index at each of the four levels)."""
        out = [gfn << PAGE_SHIFT for gfn in self.gfns]
        for index in self.indices:
            out += [index << shift for shift in _LEVEL_SHIFTS[1:] if index << shift < GVA_LIMIT]
        return list(dict.fromkeys(out))

    def _pool_of(self, name: str, build) -> list:
        pool = self._derived.get(name)
        if pool is None:
            pool = self._derived[name] = build()
        return pool

    def pool(self, cls, name: str, op_so_far: dict):
        """The interesting values of one field (a sequence nobody changes), or None for plain
        literal-only fields."""
        if name in ("base", "table", "target"):
            return self.gfns
        if name == "root":
            return self._pool_of("root", lambda: [None] + self.gfns)
        if name in ("gpa", "addr") and not op_so_far.get("virtual"):
            return self._pool_of("gpa", lambda: [gfn << PAGE_SHIFT for gfn in self.gfns])
        if name in ("gva", "addr"):
            return self._pool_of("gva", self.gvas)
        return _CONSTANT_POOLS.get(name)

    def reuse(self, name: str, op_so_far: dict) -> list:
        """The operands of the latest ops a field ``name`` may reuse (most recent first), or
        an empty list."""
        if name in ("base", "table", "target", "root"):
            return self.recent["gfn"]
        if name in ("gpa", "addr") and not op_so_far.get("virtual"):
            return [gfn << PAGE_SHIFT for gfn in self.recent["gfn"]]
        if name in ("gva", "addr"):
            return self.recent["gva"]
        return []


def _literal_width(dom: Domain) -> int:
    return max(1, ((dom.hi - dom.lo - 1) // dom.align).bit_length() + 7 >> 3)


class _Reader:
    """Bytes consumed front to back; past the end every byte reads 0."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        pos = self.pos
        self.pos += 1
        return self.data[pos] if pos < len(self.data) else 0

    def literal(self, width: int) -> int:
        chunk = self.data[self.pos:self.pos + width]
        self.pos += width
        return int.from_bytes(chunk.ljust(width, b"\0"), "little")

    def exhausted(self) -> bool:
        return self.pos >= len(self.data)


def _decode_int(reader: _Reader, dom: Domain, pool, reused=()) -> int:
    """A pool pick, a reused operand (selectors from REUSE_SELECTOR on, if there is one) or
    a literal."""
    selector = reader.byte()
    if reused and REUSE_SELECTOR <= selector < LITERAL:
        return reused[(selector - REUSE_SELECTOR) % len(reused)]
    if pool and selector != LITERAL:
        return pool[selector % len(pool)]
    span = (dom.hi - dom.lo + dom.align - 1) // dom.align
    return dom.lo + reader.literal(_literal_width(dom)) % span * dom.align


def _encode_int(out: bytearray, value: int, dom: Domain, pool, reused=()) -> None:
    limit = REUSE_SELECTOR if reused else LITERAL
    if pool and value in pool[:limit]:
        out.append(pool.index(value))
        return
    if value in reused:
        out.append(REUSE_SELECTOR + reused.index(value))
        return
    out.append(LITERAL)
    out += ((value - dom.lo) // dom.align).to_bytes(_literal_width(dom), "little")


# A written value.  What a guest writes that an MMU reads is a page-table entry, and a
# random 64-bit literal is almost never one (its address bits name no memory), so with
# gfns to reuse the upper selectors make an entry: a gfn the latest ops named (selector
# bits 1-6) with NX (bit 0) and one more byte for bits 0-7 (P, RW, US, PWT, PCD, A, D and
# PS, which is PAT in a 4K entry).  Any such combination, since the generator must not
# know which ones an MMU treats specially: A and D clear, reserved address bits of a 2M
# entry, flags write_pte never sets.  The lower selectors pick a constant, LITERAL any
# 64-bit value.
_PTE_LOW_BITS = 0xFF
_NX_SHIFT = 63
_PTE_BITS = PTE_ADDR_MASK | _PTE_LOW_BITS | 1 << _NX_SHIFT


def _decode_value(reader: _Reader, dom: Domain, gfns: list) -> int:
    selector = reader.byte()
    if gfns and REUSE_SELECTOR <= selector < LITERAL:
        pick = selector - REUSE_SELECTOR
        gfn = gfns[(pick >> 1) % len(gfns)]
        return gfn << PAGE_SHIFT | reader.byte() | (pick & 1) << _NX_SHIFT
    if selector != LITERAL:
        return _VALUES[selector % len(_VALUES)]
    return reader.literal(_literal_width(dom))


def _encode_value(out: bytearray, value: int, dom: Domain, gfns: list) -> None:
    gfn = (value & PTE_ADDR_MASK) >> PAGE_SHIFT
    if value not in _VALUES and not value & ~_PTE_BITS and gfn in gfns:
        out.append(REUSE_SELECTOR + 2 * gfns.index(gfn) + (value >> _NX_SHIFT))
        out.append(value & _PTE_LOW_BITS)
        return
    _encode_int(out, value, dom, _VALUES)


# Schedules.  Races need one side parked mid-update while the others run through, so
# most selectors build a run shape: each actor in turn takes a run of steps, then the
# first resumes (its one step is the shape's last digit) and, after the digits, the
# actors take turns.  With N actors a run shape is an order of the actors (selector
# mod N!), the first run's length (the selector's quotient, mod its limit), and a byte for
# the length of each later run; with two it is "one side k steps, the other m, then
# alternation", as in v1.  Selectors from _RUN_SELECTORS on pick a classic pattern from
# _SCHEDULES or escape to a literal.
_RUN_SELECTORS = 0x80
# actors -> (the most steps of the first run, of each later run): the whole shape fits
# the schedule's horizon (64, 40 and 32 digits), and N! times the first limit fits the
# run selectors.
_RUN_LIMITS = {2: (32, 31), 3: (13, 13), 4: (5, 8)}
_ORDERS = {n: tuple(itertools.permutations(range(n))) for n in _RUN_LIMITS}


def _run_schedule(order: tuple, lengths: list) -> int:
    """Actor ``order[i]`` takes ``lengths[i]`` steps, in turn; then ``order[0]`` one more."""
    digits = [actor for actor, length in zip(order, lengths) for _ in range(length)]
    return schedule_of(digits + [order[0]], len(order))


def _run_shape(schedule: int, actors: int):
    """``(order index, lengths)`` if ``schedule`` is a run shape the decoder builds, else None."""
    runs: list = []  # [actor, length], in step order
    for digit in schedule_digits(schedule, actors):
        if runs and runs[-1][0] == digit:
            runs[-1][1] += 1
        else:
            runs.append([digit, 1])
    if len(runs) == actors + 1 and runs[-1] == [runs[0][0], 1]:
        runs.pop()  # the first actor's last step
    elif not (len(runs) == actors and runs[0][0] == 0):  # else that step is a leading zero
        return None
    order, lengths = tuple(actor for actor, _ in runs), [length for _, length in runs]
    first, later = _RUN_LIMITS[actors]
    if sorted(order) != list(range(actors)) or lengths[0] > first \
            or max(lengths[1:]) > later:
        return None
    return _ORDERS[actors].index(order), lengths


def _decode_schedule(reader: _Reader, dom: Domain, actors: int) -> int:
    selector = reader.byte()
    if selector < _RUN_SELECTORS:
        orders = _ORDERS[actors]
        first, later = _RUN_LIMITS[actors]
        lengths = [1 + selector // len(orders) % first]
        lengths += [1 + reader.byte() % later for _ in range(actors - 1)]
        return _run_schedule(orders[selector % len(orders)], lengths)
    if selector != LITERAL:
        return _SCHEDULES[(selector - _RUN_SELECTORS) % len(_SCHEDULES)]
    return reader.literal(_literal_width(dom))


def _encode_schedule(out: bytearray, schedule: int, dom: Domain, actors: int) -> None:
    shape = _run_shape(schedule, actors)
    if shape is not None:
        order, lengths = shape
        out.append((lengths[0] - 1) * len(_ORDERS[actors]) + order)
        out += bytes(length - 1 for length in lengths[1:])
    elif schedule in _SCHEDULES:
        out.append(_RUN_SELECTORS + _SCHEDULES.index(schedule))
    else:
        out.append(LITERAL)
        out += schedule.to_bytes(_literal_width(dom), "little")


def _field_decoder(cls, name: str, dom: Domain):
    """How field ``name`` of ``cls`` is decoded: ``decode(reader, ctx, so_far, actors)``.

    Chosen once per field (:data:`_PLANS`), not by a chain of tests per decoded field.
    """
    if name == "vcpu":
        return lambda reader, ctx, so_far, actors: reader.byte() % ctx.header.vcpus

    if name == "slot":
        def slot(reader, ctx, so_far, actors):
            selector = reader.byte()
            return selector % _SMALL_SLOTS if selector < 0xC0 else selector % dom.hi
        return slot
    if dom.kind == "bool":
        return lambda reader, ctx, so_far, actors: bool(reader.byte() & 1)
    if dom.kind == "enum":
        choices = tuple(dom.choices.values())
        return lambda reader, ctx, so_far, actors: choices[reader.byte() % len(choices)]
    if dom.kind == "flags":
        named = tuple(enumerate(dom.choices.values()))

        def flags(reader, ctx, so_far, actors):
            bits = reader.byte()
            value = named[0][1] & 0
            for i, flag in named:
                if bits >> i & 1:
                    value |= flag
            return value
        return flags
    if dom.kind == "op":
        return lambda reader, ctx, so_far, actors: _decode_op(reader, ctx, _SIMPLE_OPCODES)
    if name == "schedule":
        return lambda reader, ctx, so_far, actors: _decode_schedule(reader, dom, actors)

    if name == "value":
        def value(reader, ctx, so_far, actors):
            if so_far.get("kind") is not AccessKind.WRITE:
                return None
            return _decode_value(reader, dom, ctx.recent["gfn"])
        return value

    def number(reader, ctx, so_far, actors):
        return _decode_int(reader, dom, ctx.pool(cls, name, so_far), ctx.reuse(name, so_far))
    return number


def _encode_field(out: bytearray, value, cls, name: str, dom: Domain, ctx: _Context,
                  so_far: dict, actors: int) -> None:
    if name == "vcpu":
        out.append(value)
    elif name == "slot":
        out.append(value if value < _SMALL_SLOTS else 0xC0 + value)
    elif dom.kind == "bool":
        out.append(int(value))
    elif dom.kind == "enum":
        out.append(list(dom.choices.values()).index(value))
    elif dom.kind == "flags":
        out.append(sum(1 << i for i, flag in enumerate(dom.choices.values()) if value & flag))
    elif dom.kind == "op":
        _encode_op(out, value, ctx, _FIRST_SIMPLE_OPCODE)
    elif name == "value":
        if value is not None:
            _encode_value(out, value, dom, ctx.recent["gfn"])
    elif name == "schedule":
        _encode_schedule(out, value, dom, actors)
    else:
        # root's pool starts with None, so "off" is selector 0 and never a literal.
        _encode_int(out, value, dom, ctx.pool(cls, name, so_far), ctx.reuse(name, so_far))


def conform(op, header: VmHeader):
    """Bend an op into the cross-field rules the parser enforces (``_check_op``).

    The vCPU is taken modulo the VM's, a write gets a value and nothing else
    does, 2m accepts and ``ps`` targets are aligned down, and the guest sides
    of a ``parallel`` get distinct vCPUs: a side whose vCPU an earlier side
    runs on moves to the next vCPU no earlier side uses, or, with none left,
    is dropped (:meth:`Parallel.without`; in a one-vCPU VM a pair of guest ops
    becomes its ``a``).  Generators that draw fields independently (the byte
    decoder, the Hypothesis engine) use it to stay valid by construction.
    """
    if isinstance(op, Parallel):
        op = Parallel.of([conform(side, header) for side in op.sides], op.schedule)
        while (clash := _collision(op.sides)) is not None:
            j = clash[1]
            side, used = op.sides[j], {op_vcpu(s) for s in op.sides[:j]}
            free = [v % header.vcpus for v in range(side.vcpu + 1, side.vcpu + header.vcpus)
                    if v % header.vcpus not in used]
            if not free:
                op = op.without(j)
                if not isinstance(op, Parallel):
                    return op
                continue
            sides = list(op.sides)
            sides[j] = dataclasses.replace(side, vcpu=free[0])
            op = Parallel.of(sides, op.schedule)
        return op
    vcpu = op_vcpu(op)
    if vcpu is not None and vcpu >= header.vcpus:
        op = dataclasses.replace(op, vcpu=vcpu % header.vcpus)
    if isinstance(op, Access) and (op.value is None) == (op.kind is AccessKind.WRITE):
        op = dataclasses.replace(op, value=0 if op.kind is AccessKind.WRITE else None)
    if isinstance(op, Accept) and op.level == PG_LEVEL_2M:
        return dataclasses.replace(op, gpa=op.gpa & ~((PAGES_PER_2M << PAGE_SHIFT) - 1))
    if isinstance(op, WritePte) and op.flags & PteFlag.PS:
        return dataclasses.replace(op, target=op.target & ~(PAGES_PER_2M - 1))
    return op


def _byte_order(cls, actors: int) -> list[str]:
    """Field names in byte order: an access's ``virtual`` comes first, as it picks the
    address pool; a ``parallel`` has the fields of its ``actors`` sides only."""
    names = [item.name for item in dataclasses.fields(cls)]
    if cls is Access:
        names.remove("virtual")
        names.insert(0, "virtual")
    if cls is Parallel:
        names = [*SIDE_NAMES[:actors], "schedule"]
    return names


_BYTE_ORDER = {kind: _byte_order(*kind) for kind in _FIRST_OPCODE}
# Each op kind's fields in byte order, with their decoders.
_PLANS = {(cls, actors): tuple((name, _field_decoder(cls, name, domain(cls, name)))
                               for name in names)
          for (cls, actors), names in _BYTE_ORDER.items()}


def _decode_op(reader: _Reader, ctx: _Context, opcodes):
    cls, actors = kind = opcodes[reader.byte() % len(opcodes)]
    values: dict = {}
    for name, decode_field in _PLANS[kind]:
        values[name] = decode_field(reader, ctx, values, actors)
    return conform(cls(**values), ctx.header)


def _encode_op(out: bytearray, op, ctx: _Context, first_opcode) -> None:
    cls = type(op)
    kind = (cls, len(op.sides) if cls is Parallel else 0)
    actors = kind[1]
    out.append(first_opcode[kind])
    so_far: dict = {}
    for name in _BYTE_ORDER[kind]:
        value = getattr(op, name)
        _encode_field(out, value, cls, name, domain(cls, name), ctx, so_far, actors)
        so_far[name] = value


# The header byte: bit 0 the VM type, bits 1-2 the vCPUs, bits 3-5 the dirty-log mode
# (one value in eight each for the two manual-protect modes; the other six are off).
_MANUAL_PROTECT = {6: ManualProtect.ON, 7: ManualProtect.INIT_SET}
_MANUAL_PROTECT_BITS = {mode: bits for bits, mode in _MANUAL_PROTECT.items()}


def decode(data: bytes) -> Program:
    """Any bytes -> a valid program of at most MAX_OPS ops (total, deterministic)."""
    reader = _Reader(data)
    first = reader.byte()
    header = VmHeader(VmType.TDX if first & 1 else VmType.DEFAULT, 1 + (first >> 1) % 4,
                      _MANUAL_PROTECT.get(first >> 3 & 7, ManualProtect.OFF),
                      bool(first >> 6 & 1))
    ctx = _Context(header)
    ops = []
    while not reader.exhausted() and len(ops) < MAX_OPS:
        op = _decode_op(reader, ctx, _OPCODES)
        ctx.note(op)
        ops.append(op)
    return Program(header, tuple(ops))


def mapped_gvas(program: Program, index: int) -> list[int]:
    """The gvas whose walk goes through the entry the ``write_pte`` at ``index`` writes, as
    the ops before it tell (the tables they linked, the roots they loaded): what a guest
    invalidates after changing that entry.  The decoder's own operand reuse draws from the
    same list."""
    ctx = _Context(program.header)
    for op in program.ops[:index]:
        ctx.note(op)
    write = program.ops[index]
    return ctx._mapped_gvas(write.table, write.index)


def encode(program: Program) -> bytes:
    """The canonical bytes of a program: ``decode(encode(p)) == p``.

    Raises ValueError for a program ``decode`` could never produce (too many
    ops, or an op breaking a cross-field rule).
    """
    if len(program.ops) > MAX_OPS:
        raise ValueError(f"{len(program.ops)} ops, at most {MAX_OPS} are encodable")
    header = program.header
    out = bytearray([(1 if header.type is VmType.TDX else 0) | (header.vcpus - 1) << 1
                     | _MANUAL_PROTECT_BITS.get(header.manual_protect, 0) << 3
                     | header.range_flush << 6])
    ctx = _Context(header)
    for op in program.ops:
        _encode_op(out, op, ctx, _FIRST_OPCODE)
        ctx.note(op)
    return bytes(out)

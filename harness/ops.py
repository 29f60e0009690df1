"""The guest interface: op vocabulary, outcome vocabulary and their limits.

Everything that runs a program (the reference, every system under test, the
encoders, the minimizer) speaks this vocabulary and nothing else, so it is
defined exactly once, here.  Ops and outcomes are frozen dataclasses: they are
hashable, cheap to compare, and safe to share between the reference's candidate
states.

Each op field carries a :class:`Domain` in its dataclass metadata.  The domain
is the single statement of a field's legal range and of how it prints (hex for
addresses, gfns, values and schedules; decimal for counts and indices), so the
text parser, the printer, the byte decoder and the minimizer all read the same
limits (``docs/semantics.md`` §A).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field, fields
from typing import Optional, Union

# --- units and limits -------------------------------------------------------

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
WORDS_PER_PAGE = PAGE_SIZE // 8
PTES_PER_TABLE = 512

# KVM's names: PG_LEVEL_4K = 1, PG_LEVEL_2M = 2 (arch/x86/include/asm/pgtable_types.h).
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PAGES_PER_2M = 512

GFN_LIMIT = 1 << 35
GPA_LIMIT = GFN_LIMIT << PAGE_SHIFT
# 4-level paging translates 48-bit canonical addresses; v1 uses the lower half only.
GVA_LIMIT = 1 << 47
NPAGES_MAX = 1 << 18
SLOT_COUNT = 16
VCPUS_MAX = 4
VALUE_LIMIT = 1 << 64
SCHEDULE_LIMIT = 1 << 64


class VmType(enum.Enum):
    """The kind of VM a program runs in; TDX enables private memory."""

    DEFAULT = "default"
    TDX = "tdx"


class ManualProtect(enum.Enum):
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as the VM enables it before its first op.

    ``off``: KVM_GET_DIRTY_LOG clears and re-protects what it reports; ``on``
    (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE): it only reports, and
    KVM_CLEAR_DIRTY_LOG clears; ``init_set`` (that plus
    KVM_DIRTY_LOG_INITIALLY_SET): a slot starts logging with every page dirty.
    """

    OFF = "off"
    ON = "on"
    INIT_SET = "init_set"


class AccessKind(enum.Enum):
    """What a guest access does; a fetch is a read for slot permissions."""

    READ = "read"
    WRITE = "write"
    FETCH = "fetch"


class MemslotFlag(enum.IntFlag):
    """KVM memslot flags (KVM_MEM_*), plus ``host_huge`` for the host backing."""

    READONLY = 1
    DIRTY_LOG = 2
    PRIVATE = 4
    HOST_HUGE = 8


class PteFlag(enum.IntFlag):
    """Guest PTE bits a ``write_pte`` may set, with their x86 bit positions."""

    P = 1 << 0
    RW = 1 << 1
    PS = 1 << 7
    NX = 1 << 63


# write_pte always sets A and D; a guest walk sets them where missing (SEMANTICS §F).
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)

FLAG_NAMES = {
    MemslotFlag: {"readonly": MemslotFlag.READONLY, "dirty_log": MemslotFlag.DIRTY_LOG,
                  "private": MemslotFlag.PRIVATE, "host_huge": MemslotFlag.HOST_HUGE},
    PteFlag: {"p": PteFlag.P, "rw": PteFlag.RW, "ps": PteFlag.PS, "nx": PteFlag.NX},
}
LEVEL_NAMES = {"4k": PG_LEVEL_4K, "2m": PG_LEVEL_2M}


# --- field domains ----------------------------------------------------------

@dataclass(frozen=True)
class Domain:
    """The legal values of one op field and how the text format spells them.

    ``kind`` is one of: ``int`` (``lo <= v < hi``, multiple of ``align``,
    printed in ``radix``), ``bool`` (0/1), ``enum`` (``choices`` maps text to
    value), ``flags`` (comma-separated names from ``choices``), ``root`` (a gfn
    or ``off`` for None), ``op`` (a parenthesised op, not a ``parallel``).
    ``optional`` fields may be absent (None).
    """

    kind: str
    lo: int = 0
    hi: int = 0
    align: int = 1
    radix: int = 16
    choices: Optional[dict] = None
    optional: bool = False


def _int(lo: int, hi: int, radix: int = 16, align: int = 1, optional: bool = False):
    return field(metadata={"domain": Domain("int", lo, hi, align, radix, optional=optional)})


def _enum(choices: dict):
    return field(metadata={"domain": Domain("enum", choices=choices)})


def _flags(cls):
    return field(metadata={"domain": Domain("flags", choices=FLAG_NAMES[cls])})


_GFN = dict(lo=0, hi=GFN_LIMIT)
_BOOL = Domain("bool", 0, 2)


def _bool():
    return field(metadata={"domain": _BOOL})


def _vcpu():
    return _int(0, VCPUS_MAX, radix=10)


def _slot():
    return _int(0, SLOT_COUNT, radix=10)


def domain(cls, name: str) -> Domain:
    """The domain of field ``name`` of op class ``cls``."""
    return _DOMAINS[cls][name]


# The op fields that name guest memory: gfns, and page-aligned byte addresses (an access's
# ``addr`` may be a gva, the same number as a gpa with paging off).  Generators bias them
# toward locations a program already uses; the minimizer follows them to slice and relocate.
GFN_FIELDS = ("base", "table", "target", "root")
ADDRESS_FIELDS = ("gpa", "gva", "addr")


def op_gfns(op) -> set:
    """The gfns an op names (every side of a ``parallel``)."""
    if isinstance(op, Parallel):
        return set().union(*map(op_gfns, op.sides))
    gfns = {getattr(op, n) for n in GFN_FIELDS if getattr(op, n, None) is not None}
    return gfns | {getattr(op, n) >> PAGE_SHIFT for n in ADDRESS_FIELDS
                   if getattr(op, n, None) is not None}


def gpa_field(op) -> Optional[str]:
    """The field of a guest op that faults on a gpa: an accept's, an access's by gpa; else None."""
    if isinstance(op, Accept):
        return "gpa"
    if isinstance(op, Access) and not op.virtual:
        return "addr"
    return None


# --- the program header -----------------------------------------------------

@dataclass(frozen=True)
class VmHeader:
    """``vm type= vcpus= [manual_protect=] [range_flush=1]``: the VM a program creates before
    its first op.

    ``range_flush`` says the host can flush a gfn range of the VM's TLBs rather
    than everything (KVM as a Hyper-V guest: ``kvm_x86_ops.flush_remote_tlbs_range``).
    It changes nothing a correct KVM lets the guest see; it lets a flush whose
    range is too narrow leave stale translations (``docs/semantics.md`` §J).
    """

    type: VmType = _enum({t.value: t for t in VmType})
    vcpus: int = _int(1, VCPUS_MAX + 1, radix=10)
    # Header options are absent from the text when off (the default), so older reproducers
    # read as before.
    manual_protect: ManualProtect = field(
        default=ManualProtect.OFF,
        metadata={"domain": Domain("enum", choices={m.value: m for m in ManualProtect},
                                   optional=True)})
    range_flush: bool = field(default=False, metadata={"domain": _BOOL})


# --- ops --------------------------------------------------------------------

@dataclass(frozen=True)
class MemslotAdd:
    """KVM_SET_USER_MEMORY_REGION creating ``slot`` over [base, base+npages) with fresh backing."""

    slot: int = _slot()
    base: int = _int(**_GFN)
    npages: int = _int(1, NPAGES_MAX + 1)
    flags: MemslotFlag = _flags(MemslotFlag)
    host_offset: int = _int(0, PAGES_PER_2M, radix=10)


@dataclass(frozen=True)
class MemslotDelete:
    """Delete ``slot`` and drop its backing."""

    slot: int = _slot()


@dataclass(frozen=True)
class MemslotMove:
    """Move ``slot`` to ``base``; the backing (contents) follows the slot."""

    slot: int = _slot()
    base: int = _int(**_GFN)


@dataclass(frozen=True)
class MemslotSetFlags:
    """Replace the flags of ``slot``; only ``dirty_log`` may change."""

    slot: int = _slot()
    flags: MemslotFlag = _flags(MemslotFlag)


@dataclass(frozen=True)
class SetAttributes:
    """KVM_SET_MEMORY_ATTRIBUTES: convert [base, base+npages) to private or shared."""

    base: int = _int(**_GFN)
    npages: int = _int(0, NPAGES_MAX + 1)
    private: bool = _bool()


@dataclass(frozen=True)
class Accept:
    """TDG.MEM.PAGE.ACCEPT of the page (or 2M range) at ``gpa`` by ``vcpu``."""

    vcpu: int = _vcpu()
    gpa: int = _int(0, GPA_LIMIT, align=PAGE_SIZE)
    level: int = _enum(LEVEL_NAMES)


@dataclass(frozen=True)
class Paging:
    """Load CR3 of ``vcpu`` with the PML4 at gfn ``root`` (None: paging off); flushes its TLB."""

    vcpu: int = _vcpu()
    root: Optional[int] = field(metadata={"domain": Domain("root", **_GFN)})


@dataclass(frozen=True)
class WritePte:
    """Write PTE ``index`` of guest table ``table`` to point at ``target``: a physical write."""

    vcpu: int = _vcpu()
    table: int = _int(**_GFN)
    index: int = _int(0, PTES_PER_TABLE, radix=10)
    target: int = _int(**_GFN)
    flags: PteFlag = _flags(PteFlag)

    @property
    def pte(self) -> int:
        """The encoded PTE value the guest writes (A and D always set)."""
        return (self.target << PAGE_SHIFT) | int(self.flags) | PTE_ACCESSED | PTE_DIRTY


@dataclass(frozen=True)
class Access:
    """A guest load, store or fetch of word ``word`` of the page at ``addr``.

    ``addr`` is a gpa, or a gva when ``virtual`` is set (text: ``gpa=`` or
    ``gva=``).  ``value`` is present exactly for writes.
    """

    vcpu: int = _vcpu()
    addr: int = _int(0, GVA_LIMIT, align=PAGE_SIZE)
    virtual: bool = _bool()
    word: int = _int(0, WORDS_PER_PAGE, radix=10)
    kind: AccessKind = _enum({k.value: k for k in AccessKind})
    value: Optional[int] = _int(0, VALUE_LIMIT, optional=True)
    private: bool = _bool()


@dataclass(frozen=True)
class Invlpg:
    """The guest invalidates its TLB entries for the page containing ``gva``."""

    vcpu: int = _vcpu()
    gva: int = _int(0, GVA_LIMIT, align=PAGE_SIZE)


@dataclass(frozen=True)
class FlushTlb:
    """The guest flushes all of ``vcpu``'s TLB."""

    vcpu: int = _vcpu()


@dataclass(frozen=True)
class HostInvalidate:
    """An mmu-notifier invalidation: the host migrates the shared pages of a gfn range."""

    base: int = _int(**_GFN)
    npages: int = _int(1, NPAGES_MAX + 1)


@dataclass(frozen=True)
class ZapAll:
    """Zap every shared mapping (kvm_mmu_zap_all_fast)."""


@dataclass(frozen=True)
class Split:
    """Eagerly split the huge mappings of ``slot`` to 4K."""

    slot: int = _slot()


@dataclass(frozen=True)
class Recover:
    """Collapse or merge to huge mappings wherever legal."""


@dataclass(frozen=True)
class GetDirtyLog:
    """KVM_GET_DIRTY_LOG of ``slot``: report and clear the logged gfns."""

    slot: int = _slot()


@dataclass(frozen=True)
class ClearDirtyLog:
    """KVM_CLEAR_DIRTY_LOG of slot pages [first, first+npages), every bit of the range set."""

    slot: int = _slot()
    first: int = _int(0, NPAGES_MAX + 1)
    npages: int = _int(0, NPAGES_MAX + 1)


SimpleOp = Union[MemslotAdd, MemslotDelete, MemslotMove, MemslotSetFlags, SetAttributes,
                 Accept, Paging, WritePte, Access, Invlpg, FlushTlb, HostInvalidate, ZapAll,
                 Split, Recover, GetDirtyLog, ClearDirtyLog]


# The actors of a ``parallel``, in order: a schedule digit of 0 picks ``a``, 1 ``b``, ...
SIDE_NAMES = ("a", "b", "c", "d")
ACTORS_MAX = len(SIDE_NAMES)


def _side(optional: bool = False):
    dom = Domain("op", optional=optional)
    if optional:  # keyword-only, so ``Parallel(a, b, schedule)`` stays the two-actor form
        return field(default=None, kw_only=True, metadata={"domain": dom})
    return field(metadata={"domain": dom})


@dataclass(frozen=True)
class Parallel:
    """Run two to four actors interleaved (SEMANTICS §H).

    ``a`` and ``b`` always, ``c`` and then ``d`` optionally.  With N actors the
    ``schedule`` is read in base N, least significant digit first: digit i
    names the actor that takes step i (0 = a, 1 = b, ...); after the last
    non-zero digit the actors take turns (step i goes to actor i mod N).  With
    two actors that is bit i picking ``a`` (0) or ``b`` (1), the v1 format.
    """

    a: SimpleOp = _side()
    b: SimpleOp = _side()
    c: Optional[SimpleOp] = _side(optional=True)
    d: Optional[SimpleOp] = _side(optional=True)
    schedule: int = _int(0, SCHEDULE_LIMIT)

    @property
    def sides(self) -> tuple:
        """The actors' ops, in schedule-digit order (``a``, ``b``, then ``c``, ``d`` if given)."""
        if self.c is None:
            return (self.a, self.b)
        return (self.a, self.b, self.c) if self.d is None else (self.a, self.b, self.c, self.d)

    @classmethod
    def of(cls, sides, schedule: int) -> "Parallel":
        """The ``parallel`` of two to four ``sides`` (the digit order of ``schedule``)."""
        sides = tuple(sides)
        extra = dict(zip(SIDE_NAMES[2:], sides[2:]))
        return cls(sides[0], sides[1], schedule, **extra)

    def without(self, index: int):
        """This ``parallel`` with side ``index`` dropped: the others keep the order in
        which the schedule's explicit steps ran them (the dropped side's steps go, the
        later sides' digits move down).  Of two sides, the other side alone."""
        sides = self.sides[:index] + self.sides[index + 1:]
        if len(sides) == 1:
            return sides[0]
        digits = [d - (d > index) for d in schedule_digits(self.schedule, len(self.sides))
                  if d != index]
        return Parallel.of(sides, schedule_of(digits, len(sides)))


Op = Union[SimpleOp, Parallel]


def schedule_digits(schedule: int, actors: int) -> list:
    """The explicit steps of ``schedule`` for ``actors`` sides: its base-``actors`` digits,
    least significant first, up to the last non-zero one (SEMANTICS §H)."""
    digits = []
    while schedule:
        schedule, digit = divmod(schedule, actors)
        digits.append(digit)
    return digits


def schedule_of(digits, actors: int) -> int:
    """The schedule whose explicit steps are ``digits`` (trailing zeros add nothing)."""
    schedule = 0
    for digit in reversed(digits):
        schedule = schedule * actors + digit
    return schedule


@functools.cache  # a schedule explorer asks it for every schedule it builds
def schedule_horizon(actors: int) -> int:
    """How many steps a schedule of ``actors`` sides can spell in any order: the most
    base-``actors`` digits every sequence of which is below 2**64 (64, 40, 32)."""
    horizon = 0
    while actors ** (horizon + 1) <= SCHEDULE_LIMIT:
        horizon += 1
    return horizon


# The op kinds in their canonical order; the name is the text keyword.
OP_NAMES: dict[type, str] = {
    MemslotAdd: "memslot_add", MemslotDelete: "memslot_delete", MemslotMove: "memslot_move",
    MemslotSetFlags: "memslot_set_flags", SetAttributes: "set_attributes", Accept: "accept",
    Paging: "paging", WritePte: "write_pte", Access: "access", Invlpg: "invlpg",
    FlushTlb: "flush_tlb", HostInvalidate: "host_invalidate", ZapAll: "zap_all",
    Split: "split", Recover: "recover", GetDirtyLog: "get_dirty_log",
    ClearDirtyLog: "clear_dirty_log", Parallel: "parallel",
}
OP_CLASSES: dict[str, type] = {name: cls for cls, name in OP_NAMES.items()}

_DOMAINS: dict[type, dict[str, Domain]] = {
    cls: {f.name: f.metadata["domain"] for f in fields(cls)}
    for cls in (VmHeader, *OP_NAMES)
}


def op_name(op) -> str:
    """The text keyword of an op (``memslot_add``, ``access``, ...)."""
    return OP_NAMES[type(op)]


def op_vcpu(op) -> Optional[int]:
    """The vCPU an op runs on, or None for host work."""
    return getattr(op, "vcpu", None)


@dataclass(frozen=True)
class Program:
    """A header plus the ops to run, in order."""

    header: VmHeader
    ops: tuple = ()

    def with_ops(self, ops) -> "Program":
        """The same VM running ``ops`` instead (what mutators and reducers build)."""
        return Program(self.header, tuple(ops))


# --- outcomes ---------------------------------------------------------------
# The closed outcome vocabulary (SEMANTICS §A).  ``str()`` of an outcome is its
# canonical printed form, used in reproducers and reports.

def _hex(v: int) -> str:
    return f"{v:#x}"


@dataclass(frozen=True)
class Ok:
    """The op completed; ``value`` for a read/fetch, ``gpa`` for a gva access."""

    value: Optional[int] = None
    gpa: Optional[int] = None

    def __str__(self) -> str:
        parts = [] if self.value is None else [_hex(self.value)]
        if self.gpa is not None:
            parts.append(f"gpa={_hex(self.gpa)}")
        return f"ok({', '.join(parts)})" if parts else "ok"


@dataclass(frozen=True)
class MmioExit:
    """KVM_EXIT_MMIO at byte address ``gpa``."""

    gpa: int
    write: bool

    def __str__(self) -> str:
        return f"mmio_exit({_hex(self.gpa)}, {'write' if self.write else 'read'})"


@dataclass(frozen=True)
class MemoryFaultExit:
    """KVM_EXIT_MEMORY_FAULT for the page at ``gpa``; ``private`` is the access's intent."""

    gpa: int
    private: bool

    def __str__(self) -> str:
        return f"memory_fault_exit({_hex(self.gpa)}, {'private' if self.private else 'shared'})"


@dataclass(frozen=True)
class VePending:
    """#VE to the TD: a private access to a page not yet accepted."""

    gpa: int

    def __str__(self) -> str:
        return f"ve_pending({_hex(self.gpa)})"


@dataclass(frozen=True)
class VeUnexpected:
    """#VE from an EPT entry with suppress-#VE clear: never allowed."""

    gpa: int

    def __str__(self) -> str:
        return f"ve_unexpected({_hex(self.gpa)})"


@dataclass(frozen=True)
class PageFault:
    """#PF in the guest at ``gva`` with x86 ``error_code`` (P, W, RSVD, I/D bits)."""

    gva: int
    error_code: int

    def __str__(self) -> str:
        return f"page_fault({_hex(self.gva)}, {_hex(self.error_code)})"


@dataclass(frozen=True)
class AlreadyAccepted:
    """TDX accept of a page that is accepted already."""

    def __str__(self) -> str:
        return "already_accepted"


@dataclass(frozen=True)
class SizeMismatch:
    """TDX accept at a level the mapping does not allow (TDX_PAGE_SIZE_MISMATCH)."""

    def __str__(self) -> str:
        return "size_mismatch"


@dataclass(frozen=True)
class Einval:
    """The host rejected a malformed or conflicting request; nothing changed."""

    def __str__(self) -> str:
        return "einval"


@dataclass(frozen=True)
class Unsupported:
    """The op does not exist for this VM type (private ops in a default VM)."""

    def __str__(self) -> str:
        return "unsupported"


@dataclass(frozen=True)
class DirtyLog:
    """The gfns KVM_GET_DIRTY_LOG reported, sorted, absolute."""

    gfns: tuple = ()

    def __str__(self) -> str:
        return f"dirty_log({', '.join(_hex(g) for g in self.gfns)})"


@dataclass(frozen=True)
class PairOutcome:
    """The outcomes of the sides of a ``parallel``, in side order (two to four)."""

    a: "Outcome"
    b: "Outcome"
    c: Optional["Outcome"] = None
    d: Optional["Outcome"] = None

    @property
    def sides(self) -> tuple:
        """The outcomes of the actors, in the order of :attr:`Parallel.sides`."""
        return tuple(o for o in (self.a, self.b, self.c, self.d) if o is not None)

    def __str__(self) -> str:
        return f"({'; '.join(map(str, self.sides))})"


Outcome = Union[Ok, MmioExit, MemoryFaultExit, VePending, VeUnexpected, PageFault,
                AlreadyAccepted, SizeMismatch, Einval, Unsupported, DirtyLog, PairOutcome]

OK = Ok()
ALREADY_ACCEPTED = AlreadyAccepted()
SIZE_MISMATCH = SizeMismatch()
EINVAL = Einval()
UNSUPPORTED = Unsupported()

OUTCOME_NAMES: dict[type, str] = {
    Ok: "ok", MmioExit: "mmio_exit", MemoryFaultExit: "memory_fault_exit",
    VePending: "ve_pending", VeUnexpected: "ve_unexpected", PageFault: "page_fault",
    AlreadyAccepted: "already_accepted", SizeMismatch: "size_mismatch", Einval: "einval",
    Unsupported: "unsupported", DirtyLog: "dirty_log", PairOutcome: "pair",
}


def outcome_kind(outcome) -> str:
    """The outcome's kind name (``ok``, ``mmio_exit``, ...): what signatures use."""
    return OUTCOME_NAMES[type(outcome)]


# x86 page-fault error code bits (arch/x86/include/asm/trap_pf.h).
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4

"""The reference semantics: flat maps, one step per op, allowed-outcome sets.

Every rule here is a line of ``docs/semantics.md`` (cited as "SEMANTICS §X",
with the KVM source each follows).  The reference knows no host pages, huge
mappings or SPTEs: a gfn is in a slot or not, memory is a dict of written
words, and the guest's TLB is the set of translations it may still use.

For each op :meth:`Reference.allowed` lists the allowed outcomes, each paired
with the state change it implies (SEMANTICS §B); :meth:`Reference.step`
applies the one the target reported, :meth:`Reference.run` the first.  State
is a handful of dicts and lists of immutable values, so :meth:`copy` is a few
shallow copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from operator import or_

from mmufuzz.harness.ops import (EINVAL, OK, PAGE_SHIFT, PAGE_SIZE, PAGES_PER_2M, WORDS_PER_PAGE,
                         ALREADY_ACCEPTED, GFN_LIMIT, PG_LEVEL_2M, PTE_ACCESSED, SIZE_MISMATCH,
                         UNSUPPORTED, AccessKind, DirtyLog, ManualProtect, MemoryFaultExit,
                         MemslotFlag, MmioExit, Accept, Access,
                         Ok, OP_NAMES, PageFault, VePending, VmHeader, VmType, op_name)
from mmufuzz.reference.intervals import IntervalSet
from mmufuzz.reference.paging import (Translation, access_error_bits, accessed_dirty_bits,
                                      permission_fault, walk_addr)


class Expect:
    """The outcomes an op may have, each paired with the state change it implies.

    ``choices`` is a tuple of ``(outcome, effect)``; ``effect`` is a callable
    that changes the state that built it, or None.  The first choice is the
    canonical one (what a correct target reports without racing anything).
    """

    __slots__ = ("choices", "resolve_gpa")

    def __init__(self, choices: tuple, resolve_gpa: bool = False):
        self.choices = choices
        # A gva access may report ok without gpa=: resolve it from the value (§F).
        self.resolve_gpa = resolve_gpa

    @property
    def canonical(self):
        """The first allowed outcome: always a concrete Outcome."""
        return self.choices[0][0]

    def pick(self, actual):
        """The effect of the choice ``actual`` matches, or ``_REJECT``."""
        for outcome, effect in self.choices:
            if outcome == actual:
                return effect
        if self.resolve_gpa and type(actual) is Ok and actual.gpa is None:
            for outcome, effect in self.choices:
                if type(outcome) is Ok and outcome.value == actual.value:
                    return effect
        return _REJECT

    def __str__(self) -> str:
        return " | ".join(str(outcome) for outcome, _ in self.choices)


class DirtyLogBound(Expect):
    """``get_dirty_log``: any R with written ⊆ R ⊆ written ∪ touched (SEMANTICS §G).

    ``effect_of(R)`` is the state change reporting R implies: what a get clears,
    or, with manual protect, which only-touched gfns it showed to be logged.
    """

    __slots__ = ("lower", "upper", "effect_of")

    def __init__(self, lower: frozenset, upper: frozenset, effect_of):
        super().__init__(((DirtyLog(tuple(sorted(lower))), effect_of(lower)),))
        self.lower, self.upper, self.effect_of = lower, upper, effect_of

    def pick(self, actual):
        if type(actual) is not DirtyLog:
            return _REJECT
        gfns = actual.gfns
        if any(a >= b for a, b in zip(gfns, gfns[1:])):
            return _REJECT  # not the canonical form: sorted, no duplicates
        reported = frozenset(gfns)
        if self.lower <= reported <= self.upper:
            return self.effect_of(reported)
        return _REJECT

    def __str__(self) -> str:
        if self.lower == self.upper:
            return str(self.canonical)
        return f"{self.canonical} ⊆ R ⊆ {DirtyLog(tuple(sorted(self.upper)))}"


# The mutable containers of a Reference's state, which copy() copies.
_CONTAINERS = ("_slots", "_shared_mem", "_private_mem", "_accepted", "_dirty", "_cr3",
               "_past_words", "_since", "_invalidated")

# pick()'s "no allowed outcome matches"; distinct from an effect of None.
_REJECT = object()

_OK = Expect(((OK, None),))
_EINVAL = Expect(((EINVAL, None),))
_UNSUPPORTED = Expect(((UNSUPPORTED, None),))


@dataclass(frozen=True)
class Memslot:
    """A slot's gfn range, flags, the id of its backing (which follows moves), and where its
    first page sits in a host 2M page (only a TD's 2m accept sees it, SEMANTICS §E)."""

    base: int
    npages: int
    flags: MemslotFlag
    backing: int
    host_offset: int

    @property
    def end(self) -> int:
        return self.base + self.npages

    def overlaps(self, base: int, npages: int) -> bool:
        return base < self.end and self.base < base + npages


def check_memory_region_flags(flags: MemslotFlag, vm_type: VmType) -> bool:
    """The flag combinations KVM accepts for this VM type (kvm_main.c's namesake)."""
    if flags & MemslotFlag.PRIVATE:
        return vm_type is VmType.TDX and not flags & (MemslotFlag.DIRTY_LOG | MemslotFlag.READONLY)
    # kvm_arch_has_readonly_mem() is false for VMs with protected state (TDX).
    return not (flags & MemslotFlag.READONLY and vm_type is VmType.TDX)


def _values(word) -> frozenset:
    """The values a stored word may have: one, or several when A/D bits are unknown."""
    return word if type(word) is frozenset else frozenset((word,))


def _word(values: frozenset):
    """A stored word: an int when it is known, else the frozenset of its possible values."""
    return next(iter(values)) if len(values) == 1 else values


def _with_bits(word, bits: int):
    """``word`` with ``bits`` set in each of its possible values."""
    return _word(frozenset(v | bits for v in _values(word)))


def _reached_gpa(op, outcome):
    """The gpa an access (or a TD op that gave ``ve_pending``) reached: its outcome's, else
    its own address if that is a gpa, else None (a gva walk that went nowhere)."""
    gpa = getattr(outcome, "gpa", None)
    if gpa is None and not op.virtual:
        return op.addr
    return gpa


def _slot_in(slots: dict, gfn: int):
    """The slot of ``slots`` holding ``gfn``, or None."""
    for slot in slots.values():
        if slot.base <= gfn < slot.end:
            return slot
    return None


def _as_of(history: tuple, version: int, current):
    """What a value with ``history`` was at ``version``, and since which version it was that.

    ``history`` lists ``(version, old)`` in the order the value changed: it was
    ``old`` up to ``version - 1``.  The first version of its own stretch is 0
    when no change is recorded before it (callers clip it to what they ask about).
    """
    for index, (changed, old) in enumerate(history):
        if changed > version:
            return old, history[index - 1][0] if index else 0
    return current, history[-1][0] if history else 0


def _word_key(slot, table: int, index: int) -> tuple:
    """The ``_shared_mem`` key of entry ``index`` of the table at gfn ``table`` in ``slot``."""
    return (slot.backing, (table - slot.base) * WORDS_PER_PAGE + index)


def _without(rows: dict, backing: int, lo: int, hi: int) -> dict:
    """``rows`` keyed ``(backing, index)`` minus the keys of ``backing`` with lo <= index < hi."""
    return {key: v for key, v in rows.items() if key[0] != backing or not lo <= key[1] < hi}


class Reference:
    """The reference VM of one program.

    State (all values immutable, so copies share them):
    ``_slots`` slot id -> Memslot; ``_private`` the gfns whose attribute is
    private (VM-wide); ``_shared_mem``/``_private_mem`` ``(backing, page*512 +
    word)`` -> value, written words only (a shared word whose A/D bits a walk
    may or may not have set is the frozenset of its possible values until a
    read tells which, SEMANTICS §F); ``_accepted`` backing -> IntervalSet
    of accepted slot pages; ``_dirty`` ``(backing, page)`` -> written (True) or
    only touched (False) since the last get, for logging slots; ``_cr3`` and
    ``_since``/``_invalidated`` per vCPU, with ``_version``, ``_past_words`` and
    ``_past_layouts``, are its TLB (below); ``_mmio`` (a TD only) the gfns whose shared-EPT entry
    may hold an MMIO SPTE; ``_sept_tables`` (a TD only) the 2M ranges (gfn >> 9)
    whose secure-EPT entry may be a table.  Slot pages are slot-relative, so
    moves need no rewrite.

    Private state exists only for gfns whose attribute is private: it is
    dropped on conversion to shared and private slots cannot move.  A page with
    no private rows and not in ``_accepted`` is therefore exactly "contents 0,
    pending", which is what conversion to private and accept both require.

    The TLB (SEMANTICS §F) may hold any translation that was valid at some
    moment since the vCPU's last flush of it, walked or not, as x86 allows.  So
    instead of entries the reference keeps what the walks could have read: every
    change of a shared word or of the slots and attributes while some vCPU
    pages counts one ``_version``; ``_past_words`` (key -> ``(version, old
    value)`` of each change) and ``_past_layouts`` (``(version, slots,
    private)``) give the state as of any version since the oldest flush.  A
    vCPU may use the translation of any version since ``_since`` (its last CR3
    load or flush; None while it does not page) that no later ``invlpg`` or #PF
    in ``_invalidated`` (``(version, gva)``) covers.
    """

    def __init__(self, header: VmHeader):
        self.header = header
        self._tdx = header.type is VmType.TDX
        self._manual = header.manual_protect is not ManualProtect.OFF
        self._init_set = header.manual_protect is ManualProtect.INIT_SET
        self._slots: dict = {}
        self._private = IntervalSet()
        self._shared_mem: dict = {}
        self._private_mem: dict = {}
        self._accepted: dict = {}
        self._dirty: dict = {}
        self._cr3: list = [None] * header.vcpus
        self._since: list = [None] * header.vcpus
        self._invalidated: list = [()] * header.vcpus
        self._version = 0
        self._past_words: dict = {}
        self._past_layouts = ()
        self._floor = None  # the oldest _since, below which no history is kept
        self._mmio = frozenset()
        self._sept_tables = frozenset()
        self._next_backing = 0

    def copy(self) -> "Reference":
        """An independent copy: the containers are copied, their values shared."""
        new = object.__new__(Reference)
        state = new.__dict__
        state.update(self.__dict__)
        for name in _CONTAINERS:
            state[name] = state[name].copy()
        return new

    def __eq__(self, other) -> bool:
        """Same guest-visible state (backing ids included, so equal is never over-claimed)."""
        return isinstance(other, Reference) and self.__dict__ == other.__dict__

    __hash__ = None  # mutable

    # --- the interface ------------------------------------------------------

    def allowed(self, op) -> Expect:
        """What ``op`` may do from this state (a simple op, not a ``parallel``)."""
        return _RULES[type(op)](self, op)

    def step(self, op, actual):
        """Accept ``actual`` and advance to the state it implies (None), or return the Expect."""
        expect = self.allowed(op)
        effect = expect.pick(actual)
        if effect is _REJECT:
            return expect
        if effect is not None:
            effect()
        if self._tdx:
            self._note_td_exit(op, actual)
        return None

    def run(self, op):
        """Apply and return the canonical outcome: what a correct target reports."""
        expect = self.allowed(op)
        outcome = expect.canonical
        effect = expect.pick(outcome)
        if effect is not None:
            effect()
        if self._tdx:
            self._note_td_exit(op, outcome)
        return outcome

    def _note_td_exit(self, op, outcome) -> None:
        """What a TD's op may leave in the EPTs beyond its outcome: an MMIO SPTE, an S-EPT table."""
        kind = type(outcome)
        if kind is MmioExit:
            self._note_mmio(outcome)
        elif type(op) is Accept:
            if kind is not MemoryFaultExit:
                self._note_sept_table(op.gpa)
        elif kind is VePending or (kind is Ok and type(op) is Access and op.private):
            self._note_sept_table(_reached_gpa(op, outcome))

    def _note_sept_table(self, gpa: int) -> None:
        """A private fault at ``gpa`` may have left an S-EPT table at its 2M entry.

        A private access that completed or gave ``ve_pending``, and an accept
        past rule 3 (§E), faulted in their page, at 4K wherever 2M was not
        possible, and a 2M leaf may be split later.  KVM frees S-EPT pages only
        with the TD (``tdx_sept_free_private_spt``), so the table outlives every
        zap, conversion and slot delete, and the TDX module answers a 2m accept
        that meets it with TDX_PAGE_SIZE_MISMATCH before anything else (§E).
        """
        self._sept_tables = self._sept_tables | {(gpa >> PAGE_SHIFT) // PAGES_PER_2M}

    def _note_mmio(self, exit_: MmioExit) -> None:
        """A TD's shared access that exited to MMIO leaves an MMIO SPTE at the exit's gfn.

        KVM installs one whenever a shared fault finds no memslot
        (``kvm_handle_noslot_fault``, then ``RET_PF_EMULATE``), and the exit's gpa
        is the gfn that faulted: the data's, or a guest table's for a walk's read
        (always shared, whatever the op's ``private``; a private access never
        exits to MMIO).  In a TD nothing checks its generation (the CPU delivers
        #VE to the guest, which asks for MMIO with TDVMCALL), so it keeps giving
        ``mmio_exit`` until a fast zap replaces the direct root, even after a
        memslot or a private attribute appears there (SEMANTICS §E).  A readonly
        slot's write exit installs none, but a TD has no readonly slots.
        """
        self._mmio = self._mmio | {exit_.gpa >> PAGE_SHIFT}

    def settle(self, pair, actual, before: "Reference") -> None:
        """Apply what a ``parallel`` may leave beyond any order of its sides.

        KVM logs a gfn when a fault installs a writable SPTE, before the access
        that fault serves completes.  Another side can act in between: a
        ``get_dirty_log`` reports the gfn and write-protects it (the retried
        write faults and logs it again), a conversion or memslot change zaps
        the SPTE (the retried access exits).  Either way the gfn stays logged
        whatever the access's outcome, so a guest access or PTE write of a
        ``parallel`` leaves its gpa touched for the next get if its slot (found
        in ``before``, the state the parallel started from, else now) logs.  The
        oracle settles before the sides run and after each side: the fault may
        log the gfn at any point, so a get among the sides may report it
        although the access itself comes after that get, or exits, and even
        when another side turned logging on only just before the get.
        A private fault leaves its S-EPT tables behind the same way: a private
        access or accept may link them and map its page, then lose the page to
        a conversion on another side and exit after its retry, so the tables
        are there although its outcome is the one of coming after the
        conversion (:meth:`_note_sept_table`).
        See docs/semantics.md, "Concurrency".
        """
        for side, outcome in zip(pair.sides, actual.sides):
            if self._tdx and op_name(side) == "accept":
                self._note_sept_table(side.gpa)
                continue
            if self._tdx and op_name(side) == "access" and side.private:
                gpa = _reached_gpa(side, outcome)
                if gpa is not None:
                    self._note_sept_table(gpa)
                continue
            if op_name(side) == "write_pte":
                gfn = side.table
            elif op_name(side) == "access" and not side.private:
                if side.virtual and not isinstance(outcome, Ok):
                    continue  # no gpa was reached
                gfn = (outcome.gpa if side.virtual else side.addr) >> PAGE_SHIFT
            else:
                continue
            slot = before._slot_at(gfn) or self._slot_at(gfn)
            if slot is None:
                continue
            if any(s.backing == slot.backing and s.flags & MemslotFlag.DIRTY_LOG
                   for s in self._slots.values()):
                self._dirty.setdefault((slot.backing, gfn - slot.base), False)

    # --- memslots (kvm_set_memory_region) -------------------------------------

    def _slot_at(self, gfn: int):
        return _slot_in(self._slots, gfn)

    def _fits(self, slot_id, base: int, npages: int) -> bool:
        """[base, base+npages) is below the gfn limit and overlaps no other slot."""
        if base + npages > GFN_LIMIT:
            return False
        return not any(other.overlaps(base, npages)
                       for i, other in self._slots.items() if i != slot_id)

    def _memslot_add(self, op) -> Expect:
        if (op.slot in self._slots or not check_memory_region_flags(op.flags, self.header.type)
                or not self._fits(op.slot, op.base, op.npages)):
            return _EINVAL

        def add():
            self._relayout()
            slot = Memslot(op.base, op.npages, op.flags, self._next_backing, op.host_offset)
            self._slots[op.slot] = slot
            self._next_backing += 1
            if op.flags & MemslotFlag.DIRTY_LOG:
                self._start_logging(slot)
        return Expect(((OK, add),))

    def _start_logging(self, slot) -> None:
        """A slot starts logging: empty, or every page written with ``init_set`` (§G)."""
        if self._init_set:
            self._dirty.update(((slot.backing, page), True) for page in range(slot.npages))

    def _memslot_delete(self, op) -> Expect:
        slot = self._slots.get(op.slot)
        if slot is None:
            return _EINVAL

        def delete():
            self._relayout()
            del self._slots[op.slot]
            if self._floor is not None:  # a past walk may have read them (backings are not reused)
                for key, old in self._shared_mem.items():
                    if key[0] == slot.backing:
                        self._remember(key, old)
            everything = (slot.backing, 0, slot.npages * WORDS_PER_PAGE)
            self._shared_mem = _without(self._shared_mem, *everything)
            self._private_mem = _without(self._private_mem, *everything)
            self._dirty = _without(self._dirty, slot.backing, 0, slot.npages)
            self._accepted.pop(slot.backing, None)
        return Expect(((OK, delete),))

    def _modifiable(self, slot_id):
        """The slot a move/set_flags may change, or None (missing, or private: immutable)."""
        slot = self._slots.get(slot_id)
        if slot is None or slot.flags & MemslotFlag.PRIVATE:
            return None
        return slot

    def _memslot_move(self, op) -> Expect:
        slot = self._modifiable(op.slot)
        if slot is None or not self._fits(op.slot, op.base, slot.npages):
            return _EINVAL

        def move():
            self._relayout()
            self._slots[op.slot] = Memslot(op.base, slot.npages, slot.flags, slot.backing,
                                           slot.host_offset)
        return Expect(((OK, move),))

    def _memslot_set_flags(self, op) -> Expect:
        slot = self._modifiable(op.slot)
        if slot is None or (op.flags ^ slot.flags) & ~MemslotFlag.DIRTY_LOG:
            return _EINVAL
        if op.flags == slot.flags:
            return _OK

        def toggle_dirty_log():
            # Enabling starts a fresh log; disabling discards it.
            new = Memslot(slot.base, slot.npages, op.flags, slot.backing, slot.host_offset)
            self._slots[op.slot] = new
            self._dirty = _without(self._dirty, slot.backing, 0, slot.npages)
            if op.flags & MemslotFlag.DIRTY_LOG:
                self._start_logging(new)
        return Expect(((OK, toggle_dirty_log),))

    # --- private memory (KVM_SET_MEMORY_ATTRIBUTES, TDG.MEM.PAGE.ACCEPT) -------

    def _set_attributes(self, op) -> Expect:
        if not self._tdx:
            return _UNSUPPORTED
        if op.npages == 0:
            return _EINVAL
        lo, hi = op.base, op.base + op.npages
        if op.private:
            def to_private():
                self._relayout()
                self._private = self._private.with_range(lo, hi)
            return Expect(((OK, to_private),))

        def to_shared():
            self._relayout()
            self._private = self._private.without_range(lo, hi)
            for slot in self._slots.values():
                if slot.flags & MemslotFlag.PRIVATE and slot.overlaps(lo, op.npages):
                    first, last = max(lo, slot.base) - slot.base, min(hi, slot.end) - slot.base
                    self._private_mem = _without(self._private_mem, slot.backing,
                                                 first * WORDS_PER_PAGE, last * WORDS_PER_PAGE)
                    accepted = self._accepted.get(slot.backing)
                    if accepted is not None:
                        self._accepted[slot.backing] = accepted.without_range(first, last)
        return Expect(((OK, to_shared),))

    def _accept(self, op) -> Expect:
        if not self._tdx:
            return _UNSUPPORTED
        gfn = op.gpa >> PAGE_SHIFT
        slot = self._slot_at(gfn)
        huge = op.level == PG_LEVEL_2M
        if gfn not in self._private or slot is None or not slot.flags & MemslotFlag.PRIVATE:
            # A 2m accept meets a table left at its 2M entry before it can exit to KVM.
            table = huge and gfn // PAGES_PER_2M in self._sept_tables
            return Expect(((MemoryFaultExit(op.gpa, True), None),)
                          + (((SIZE_MISMATCH, None),) if table else ()))
        npages = PAGES_PER_2M if huge else 1
        # At 2M the host may have mapped the range at 4K: the guest then sees a mismatch.
        or_mismatch = ((SIZE_MISMATCH, None),) if huge else ()
        if huge and not (gfn + npages <= slot.end and self._private.covers(gfn, gfn + npages)):
            return Expect(((SIZE_MISMATCH, None),))
        if huge and not (slot.flags & MemslotFlag.HOST_HUGE
                         and (gfn - slot.base + slot.host_offset) % PAGES_PER_2M == 0):
            return Expect(((SIZE_MISMATCH, None),))  # it can only ever be mapped at 4K
        first = gfn - slot.base
        accepted = self._accepted.get(slot.backing, IntervalSet())
        if accepted.covers(first, first + npages):
            return Expect(((ALREADY_ACCEPTED, None),) + or_mismatch)
        if accepted.overlaps(first, first + npages):
            return Expect(((SIZE_MISMATCH, None),))

        def accept():
            # Pending pages have no private rows: zeroing them is implicit.
            self._accepted[slot.backing] = accepted.with_range(first, first + npages)
        return Expect(((OK, accept),) + or_mismatch)

    # --- accesses (kvm_mmu_faultin_pfn order) ----------------------------------

    def _resolve(self, gpa: int, kind: AccessKind, private: bool):
        """Where a physical access at byte ``gpa`` goes (SEMANTICS §D rules 1-5).

        Returns the slot when the access completes (rule 6), else the tuple of
        allowed exits.  An MMIO SPTE a TD may have cached adds its exit to either
        (:meth:`_stale_mmio`; the callers add it).
        """
        if private and not self._tdx:
            return (UNSUPPORTED,)
        gfn = gpa >> PAGE_SHIFT
        slot = self._slot_at(gfn)
        write = kind is AccessKind.WRITE
        if private != (gfn in self._private):
            return (MemoryFaultExit(gfn << PAGE_SHIFT, private),)
        if private and (slot is None or not slot.flags & MemslotFlag.PRIVATE):
            return (MemoryFaultExit(gfn << PAGE_SHIFT, True),)
        if slot is None or (write and slot.flags & MemslotFlag.READONLY):
            return (MmioExit(gpa, write),)
        if private and gfn - slot.base not in self._accepted.get(slot.backing, IntervalSet()):
            return (VePending(gpa),)
        return slot

    def _stale_mmio(self, gpa: int, write: bool, private: bool) -> tuple:
        """``(mmio_exit,)`` if a shared access at byte ``gpa`` may meet an MMIO SPTE, else ().

        Only a TD's (``_mmio`` stays empty otherwise): in a default VM a stale
        MMIO SPTE fails its generation check and the fault path decides.  In a
        TD the CPU delivers #VE for it and the guest's TDVMCALL<MMIO> reaches
        userspace whatever the gfn's slot or attribute is now (SEMANTICS §D
        rule 4, §E).  A 2M leaf installed over its table can replace it, so the
        exit is allowed, never required.
        """
        if private or (gpa >> PAGE_SHIFT) not in self._mmio:
            return ()
        return (MmioExit(gpa, write),)

    def _physical(self, gpa: int, kind: AccessKind, value, private: bool, tag: bool,
                  overlay=None) -> tuple:
        """The choices of a physical access at byte ``gpa``; ``tag``: report ``gpa=`` in ok.

        ``overlay``: shared words as the access's own walk left them (its A/D
        updates, applied by the caller's effect before this access's).
        """
        slot = self._resolve(gpa, kind, private)
        stale = self._stale_mmio(gpa, kind is AccessKind.WRITE, private) if self._mmio else ()
        if type(slot) is tuple:
            return tuple((exit_, None) for exit_ in dict.fromkeys(slot + stale))
        return self._slot_access(slot, gpa, kind, value, private, tag, overlay) + tuple(
            (exit_, None) for exit_ in stale)

    def _slot_access(self, slot, gpa: int, kind: AccessKind, value, private: bool, tag: bool,
                     overlay) -> tuple:
        """The choices of a physical access at byte ``gpa`` that completes in ``slot``."""
        page = (gpa >> PAGE_SHIFT) - slot.base
        key = (slot.backing, page * WORDS_PER_PAGE + ((gpa >> 3) & (WORDS_PER_PAGE - 1)))
        logged = not private and slot.flags & MemslotFlag.DIRTY_LOG
        reported = gpa if tag else None
        if kind is AccessKind.WRITE:
            def write():
                if private:
                    self._private_mem[key] = value
                else:
                    self._store(key, value)
                if logged:
                    self._dirty[(slot.backing, page)] = True
            return ((Ok(None, reported), write),)

        def read():
            if logged:
                self._dirty.setdefault((slot.backing, page), False)
        if private:
            stored = self._private_mem.get(key, 0)
        elif overlay and key in overlay:
            stored = overlay[key]
        else:
            stored = self._shared_mem.get(key, 0)
        if type(stored) is not frozenset:
            return ((Ok(stored, reported), read if logged else None),)

        def resolve(known):
            # The read tells which A/D bits the walk set.
            def settle():
                self._store(key, known)
                read()
            return settle
        return tuple((Ok(v, reported), resolve(v)) for v in sorted(stored))

    def _access(self, op) -> Expect:
        addr = op.addr + 8 * op.word
        if not op.virtual:
            return Expect(self._physical(addr, op.kind, op.value, op.private, False))
        root = self._cr3[op.vcpu]
        if root is None:
            return Expect(self._physical(addr, op.kind, op.value, op.private, True), True)
        return Expect(self._translated(op, root, addr), True)

    def _write_pte(self, op) -> Expect:
        gpa = (op.table << PAGE_SHIFT) + 8 * op.index
        return Expect(self._physical(gpa, AccessKind.WRITE, op.pte, False, False))

    # --- guest paging and the TLB ----------------------------------------------

    def _translated(self, op, root: int, gva: int) -> tuple:
        """The choices of a gva access: the fresh walk, then every translation of ``gva``
        the vCPU's TLB may hold (:meth:`_past_translations`).

        Every choice marks the walk's table reads as touched (hardware may walk
        speculatively); a #PF drops every translation covering ``gva`` up to now.
        A completed, permitted fresh walk sets A/D bits (SEMANTICS §F): the
        fresh choice sets them; a choice through a cached translation may or may
        not have walked, so each bit the walk would set becomes unknown until a
        read of its entry tells.  When both give the same outcome, the unknown
        bits win.
        """
        vcpu, kind = op.vcpu, op.kind
        tables = []  # (slot, table gfn, index) of each entry the walk read, root first
        stale = []  # a TD's exits at table reads that may meet a cached MMIO SPTE

        def read_pte(table: int, index: int):
            gpa = (table << PAGE_SHIFT) + 8 * index
            slot = self._resolve(gpa, AccessKind.READ, False)
            exits = self._stale_mmio(gpa, False, False) if self._mmio else ()
            if type(slot) is tuple:
                return self._table_exit(gva, kind, gpa, tuple(dict.fromkeys(slot + exits)))
            stale.extend(exits)
            tables.append((slot, table, index))
            word = self._shared_mem.get(_word_key(slot, table, index), 0)
            if type(word) is frozenset:
                # The values differ in A/D bits only, which steer no walk but the
                # translation's D: count D as set if it may be (no write is refused).
                word = reduce(or_, word)
            return word

        fresh = walk_addr(root, gva, kind, read_pte)
        walked = fresh if type(fresh) is Translation else None
        certain, unknown, written = {}, {}, []
        if walked is not None and permission_fault(walked, kind) is None:
            certain, unknown, written = self._accessed_dirty(tables, kind)

        def touch_tables():
            for slot, table, _ in tables:
                if slot.flags & MemslotFlag.DIRTY_LOG:
                    self._dirty.setdefault((slot.backing, table - slot.base), False)

        def fault():
            touch_tables()
            self._invalidate(vcpu, gva)

        def through(words, effect):
            def use_translation():
                touch_tables()
                for key, value in words.items():
                    self._store(key, value)
                if words is certain:
                    for slot, table in written:
                        if slot.flags & MemslotFlag.DIRTY_LOG:
                            self._dirty[(slot.backing, table - slot.base)] = True
                if effect is not None:
                    effect()
            return use_translation

        def choices_of(translation, words):
            code = permission_fault(translation, kind)
            if code is not None:
                return ((PageFault(gva, code), fault),)
            if kind is AccessKind.WRITE and not translation.dirty:
                return ()  # a write through a clean translation walks again
            return tuple((outcome, through(words, effect)) for outcome, effect in
                         self._physical(translation.gpa(gva), kind, op.value, op.private, True,
                                        words))

        if walked is None:
            choices = tuple((o, fault if type(o) is PageFault else touch_tables) for o in fresh)
        else:
            choices = choices_of(walked, certain)
        choices += tuple((exit_, touch_tables) for exit_ in stale)
        for entry in self._past_translations(vcpu, root, gva):
            choices += choices_of(entry, unknown)
        first, unique = {}, []
        for outcome, effect in choices:
            if outcome in first:
                unique[first[outcome]] = (outcome, effect)  # a later choice's bits are unknown
            else:
                first[outcome] = len(unique)
                unique.append((outcome, effect))
        return tuple(unique)

    def _table_exit(self, gva: int, kind: AccessKind, gpa: int, exits: tuple) -> tuple:
        """What a walk gives when the table entry at byte ``gpa`` has no memslot (§F).

        KVM's walker faults (``FNAME(walk_addr_generic)``: an error hva is
        ``goto error``, a not-present #PF).  With TDP the CPU's walk exits
        instead, and KVM emulates: the emulator walks in software (the same
        #PF), unless the data operand's page offset equals the entry's, when it
        takes the exit's gpa for the operand's (x86.c,
        ``emulator_read_write_onepage``: ``gpa_available``) and exits to
        userspace at the entry with the access's direction.  A TD's walk is not
        emulated: it keeps the table read's own exits.
        """
        if self._tdx:
            return exits
        fault = (PageFault(gva, access_error_bits(kind)),)
        if kind is not AccessKind.FETCH and not (gva ^ gpa) & (PAGE_SIZE - 1):
            return fault + (MmioExit(gpa, kind is AccessKind.WRITE),)
        return fault

    def _accessed_dirty(self, tables: list, kind: AccessKind):
        """The A/D updates of a completed, permitted walk of ``tables`` (SEMANTICS §F).

        Returns ``(certain, unknown, written)``: each word the walk changes,
        as the walk leaves it; the same words with every value they may have
        if the walk may or may not have happened; the (slot, table) of each
        change, for the dirty log.  A table read at several levels gets every
        level's bits.  (KVM leaves an entry in a readonly slot alone,
        ``!walker->pte_writable`` -> ``continue``; here a readonly slot always
        reads zero, so no walk uses an entry in one.)
        """
        certain, written = {}, []
        leaf = len(tables) - 1
        for level_index, (slot, table, index) in enumerate(tables):
            key = _word_key(slot, table, index)
            old = certain.get(key, self._shared_mem.get(key, 0))
            new = _with_bits(old, accessed_dirty_bits(level_index == leaf, kind))
            if new != old:
                certain[key] = new
                written.append((slot, table))
        unknown = {}
        for key, new in certain.items():
            old = _values(self._shared_mem.get(key, 0))
            unknown[key] = _word(old | _values(_with_bits(_word(old), PTE_ACCESSED))
                                 | _values(new))
        return certain, unknown, written

    def _past_translations(self, vcpu: int, root: int, gva: int) -> list:
        """The translations of ``gva`` the vCPU's TLB may hold besides the fresh walk (§F).

        x86 may cache any translation that was valid at some moment since its
        last flush, speculatively too (SDM vol. 3 §4.10.2), and keep it until an
        ``invlpg`` or #PF of a gva it covers.  So the walk is redone as of each
        version since ``_since``, newest first: each walk notes from which
        version on every word and layout it read had the value it used, so one
        walk stands for that whole stretch and the next is as of the version
        before it.  The newest stretch is the fresh walk's own (its A/D bits
        are the fresh walk's to set), so it is left out.  A walk only for a
        translation: read-only, its D as the leaf had it then (a write needs it).
        """
        since, invalidated = self._since[vcpu], self._invalidated[vcpu]
        layout = (self._slots, self._private)
        found, version, newest = set(), self._version, True
        while version >= since:
            start = since

            def read_pte(table: int, index: int):
                nonlocal start
                (slots, private), began = _as_of(self._past_layouts, version, layout)
                slot = _slot_in(slots, table)
                if slot is None or table in private:
                    start = max(start, began)
                    return ()  # no completed walk
                key = _word_key(slot, table, index)
                word, changed = _as_of(self._past_words.get(key, ()), version,
                                       self._shared_mem.get(key, 0))
                start = max(start, began, changed)
                return reduce(or_, word) if type(word) is frozenset else word

            walked = walk_addr(root, gva, AccessKind.READ, read_pte)
            if (not newest and type(walked) is Translation
                    and all(at <= version for at, dropped in invalidated if walked.covers(dropped))):
                found.add(walked)
            version, newest = start - 1, False
        return sorted(found)

    def _invalidate(self, vcpu: int, gva: int) -> None:
        """An ``invlpg`` or #PF: translations covering ``gva`` up to now are dropped."""
        self._invalidated[vcpu] += ((self._version, gva),)

    def _restart_tlb(self, vcpu: int, root) -> None:
        """A CR3 load or flush: the vCPU's TLB starts empty now (none while it does not page),
        and history older than every paging vCPU's flush is dropped."""
        self._cr3[vcpu] = root
        self._since[vcpu] = None if root is None else self._version
        self._invalidated[vcpu] = ()
        floor = min((v for v in self._since if v is not None), default=None)
        if floor == self._floor:
            return
        self._floor = floor
        if floor is None:
            self._past_words, self._past_layouts = {}, ()
            return
        self._past_words = {key: kept for key, history in self._past_words.items()
                            if (kept := tuple(c for c in history if c[0] > floor))}
        self._past_layouts = tuple(c for c in self._past_layouts if c[0] > floor)

    def _remember(self, key, old) -> None:
        """The shared word ``key`` held ``old`` up to the version before this one."""
        self._past_words[key] = self._past_words.get(key, ()) + ((self._version, old),)

    def _store(self, key, value) -> None:
        """Write a shared word; while some vCPU pages, that is a new version (§F)."""
        if self._floor is not None:
            old = self._shared_mem.get(key, 0)
            if old != value:
                self._version += 1
                self._remember(key, old)
        self._shared_mem[key] = value

    def _relayout(self) -> None:
        """The slots or attributes are about to change: a new version if some vCPU pages."""
        if self._floor is not None:
            self._version += 1
            self._past_layouts += ((self._version, (dict(self._slots), self._private)),)

    def _paging(self, op) -> Expect:
        def load_cr3():
            self._restart_tlb(op.vcpu, op.root)
        return Expect(((OK, load_cr3),))

    def _invlpg(self, op) -> Expect:
        if self._cr3[op.vcpu] is None:
            return _OK  # paging off: a no-op

        def invlpg():
            self._invalidate(op.vcpu, op.gva)
        return Expect(((OK, invlpg),))

    def _flush_tlb(self, op) -> Expect:
        def flush():
            self._restart_tlb(op.vcpu, self._cr3[op.vcpu])
        return Expect(((OK, flush),))

    # --- host operations (guest-invisible) -------------------------------------

    def _host_invalidate(self, op) -> Expect:
        """Host work the guest must not see: always ok, nothing guest-visible changes."""
        return _OK

    _recover = _host_invalidate

    def _zap_all(self, op) -> Expect:
        """Guest-invisible too, but a fast zap replaces the direct roots: no MMIO SPTE
        a TD cached survives it (``kvm_mmu_zap_all_fast``)."""
        if not self._mmio:
            return _OK

        def drop_mmio():
            self._mmio = frozenset()
        return Expect(((OK, drop_mmio),))

    def _split(self, op) -> Expect:
        return _OK if op.slot in self._slots else _EINVAL

    def _logging(self, slot_id):
        """The slot ``slot_id`` if it exists and logs, else None."""
        slot = self._slots.get(slot_id)
        return slot if slot is not None and slot.flags & MemslotFlag.DIRTY_LOG else None

    def _get_dirty_log(self, op) -> Expect:
        slot = self._logging(op.slot)
        if slot is None:
            return _EINVAL
        rows = [(key[1], written) for key, written in self._dirty.items()
                if key[0] == slot.backing]
        written = frozenset(slot.base + page for page, w in rows if w)
        touched = frozenset(slot.base + page for page, _ in rows)

        def clear():
            self._dirty = _without(self._dirty, slot.backing, 0, slot.npages)

        def keep(reported):
            # Manual protect: nothing is cleared; what R showed is logged until a clear.
            shown = reported - written
            if not shown:
                return None

            def log_shown():
                self._dirty.update(((slot.backing, gfn - slot.base), True) for gfn in shown)
            return log_shown
        return DirtyLogBound(written, touched, keep if self._manual else lambda reported: clear)

    def _clear_dirty_log(self, op) -> Expect:
        """kvm_clear_dirty_log_protect's checks, then the range is neither written nor touched."""
        slot = self._logging(op.slot)
        if slot is None or op.first % 64 or op.first > slot.npages:
            return _EINVAL
        rest = slot.npages - op.first
        if op.npages > rest or (op.npages < rest and op.npages % 64):
            return _EINVAL

        def clear_range():
            self._dirty = _without(self._dirty, slot.backing, op.first, op.first + op.npages)
        return Expect(((OK, clear_range),))


# Op class -> the Reference method that lists its allowed outcomes (``_`` + its op name):
# one dict lookup per op instead of building the name and looking it up.
_RULES = {cls: getattr(Reference, "_" + name) for cls, name in OP_NAMES.items()
          if hasattr(Reference, "_" + name)}

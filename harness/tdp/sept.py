"""The TDX module's secure EPT: S-EPT pages, entry states, the TD epoch, and the calls on them.

The secure EPT is what a vCPU's private accesses walk.  KVM never writes it:
it asks the TDX module with SEAMCALLs (TDH.MEM.*), each of which checks the
entry it names and returns a status, and the guest accepts pages with a
TDCALL (TDG.MEM.PAGE.ACCEPT), which the module checks against the level the page is
mapped at.  So the rules here are the module's, and a
SEAMCALL KVM makes out of order fails exactly as the module would fail it
(KVM answers an unexpected failure with KVM_BUG_ON: :mod:`.tdx`).

Tables, as the module keeps them: a root of 512 entries, and below it the
S-EPT pages KVM hands over with TDH.MEM.SEPT.ADD, linked from a non-leaf
entry.  Entry states (TDX module ABI, "Secure EPT entry state"): FREE (absent
here), PENDING and MAPPED leaves (added by TDH.MEM.PAGE.AUG, made MAPPED by
the guest's ACCEPT), their BLOCKED forms after TDH.MEM.RANGE.BLOCK, and
NL_MAPPED / NL_BLOCKED non-leaf entries.  TDH.MEM.TRACK advances the TD's TLB
epoch; REMOVE, DEMOTE and PROMOTE need a blocked entry whose block is older
than the epoch (TDX_TLB_TRACKING_NOT_DONE otherwise), so that no vCPU can still
hold a translation made before the block.  An entry a guest TDCALL holds in
the module makes a host SEAMCALL that needs it fail with TDX_OPERAND_BUSY.

Accept state and private contents are also kept per (slot, gfn), apart from
the entries (SEMANTICS §E); a leaf's state is that state when it was added.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmufuzz.harness import faults
from mmufuzz.harness.ops import PAGES_PER_2M, PG_LEVEL_4K
from mmufuzz.harness.tdp import events
from mmufuzz.harness.tdp.spte import ROOT_LEVEL, gfn_round_for_level, pages_per_level, spte_index

# SEAMCALL completion status (the class of the TDX module's status codes KVM tells apart).
TDX_SUCCESS = "TDX_SUCCESS"
TDX_OPERAND_BUSY = "TDX_OPERAND_BUSY"
TDX_EPT_WALK_FAILED = "TDX_EPT_WALK_FAILED"
TDX_EPT_ENTRY_STATE_INCORRECT = "TDX_EPT_ENTRY_STATE_INCORRECT"
TDX_TLB_TRACKING_NOT_DONE = "TDX_TLB_TRACKING_NOT_DONE"
TDX_EPT_INVALID_PROMOTE_CONDITIONS = "TDX_EPT_INVALID_PROMOTE_CONDITIONS"
# TDG.MEM.PAGE.ACCEPT's completions other than taking the page: two statuses to the guest,
# or a TD exit to KVM (an EPT violation carrying the guest's accept level).
TDX_PAGE_ALREADY_ACCEPTED = "TDX_PAGE_ALREADY_ACCEPTED"
TDX_PAGE_SIZE_MISMATCH = "TDX_PAGE_SIZE_MISMATCH"
TDX_EXT_EXIT_QUAL_TYPE_ACCEPT = "TDX_EXT_EXIT_QUAL_TYPE_ACCEPT"

# Secure EPT entry states (FREE is an absent entry).
PENDING, MAPPED = "PENDING", "MAPPED"
PENDING_BLOCKED, BLOCKED = "PENDING_BLOCKED", "BLOCKED"
NL_MAPPED, NL_BLOCKED = "NL_MAPPED", "NL_BLOCKED"
_BLOCK = {PENDING: PENDING_BLOCKED, MAPPED: BLOCKED, NL_MAPPED: NL_BLOCKED}
_UNBLOCK = {blocked: state for state, blocked in _BLOCK.items()}
_NONLEAF = (NL_MAPPED, NL_BLOCKED)


@dataclass(slots=True, eq=False)
class SeptEntry:
    """One secure-EPT entry that is not FREE: a leaf (``pfn``) or a link (``child``)."""

    state: str
    level: int
    gfn: int
    pfn: int = 0
    child: "SeptPage | None" = None
    blocked_epoch: int = -1  # the TD epoch when TDH.MEM.RANGE.BLOCK blocked it

    @property
    def accepted(self) -> bool:
        """A leaf the guest has accepted (MAPPED, or BLOCKED from MAPPED)."""
        return self.state in (MAPPED, BLOCKED)


@dataclass(slots=True, eq=False)
class SeptPage:
    """One S-EPT page: the root, or a page added with TDH.MEM.SEPT.ADD.  ``entries`` maps an
    index to its entry; an absent index is FREE."""

    level: int
    gfn: int
    entries: dict = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Tdcall:
    """A guest TDG.MEM.PAGE.ACCEPT in the module: it holds ``entry`` until it completes."""

    entry: SeptEntry
    done: bool = False


class SecureEpt:
    """The TDX module's view of one TD's private memory."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.root = SeptPage(ROOT_LEVEL, 0)
        self.epoch = 0
        self.held: list[Tdcall] = []  # TDCALLs in flight, in start order

    # --- walks ---------------------------------------------------------------------

    def _slot(self, gfn: int, level: int):
        """(page, index) of the entry at ``level`` for ``gfn``, or None (TDX_EPT_WALK_FAILED:
        a non-leaf entry above it is missing).  Host SEAMCALLs walk through blocked
        links: blocking stops the guest's walk, not the module's."""
        page = self.root
        while page.level > level:
            entry = page.entries.get(spte_index(gfn, page.level))
            if entry is None or entry.state not in _NONLEAF:
                return None
            page = entry.child
        return page, spte_index(gfn, level)

    def entry(self, gfn: int, level: int):
        """The entry at ``level`` for ``gfn`` (None: FREE or not reachable)."""
        where = self._slot(gfn, level)
        return None if where is None else where[0].entries.get(where[1])

    def _guest_walk(self, gfn: int, level: int = PG_LEVEL_4K):
        """The guest's walk of ``gfn`` down to ``level``: (entry, level) where it stops, at
        ``level`` or above it at the first entry that is not a mapped link (entry None:
        FREE).  Unlike the host's SEAMCALLs, it does not pass blocked links."""
        page = self.root
        while True:
            entry = page.entries.get(spte_index(gfn, page.level))
            if page.level == level or entry is None or entry.state != NL_MAPPED:
                return entry, page.level
            page = entry.child

    def lookup(self, gfn: int):
        """The guest's walk: the PENDING or MAPPED leaf mapping ``gfn``, or None (an EPT
        violation: nothing mapped, or a blocked entry on the way)."""
        entry, _ = self._guest_walk(gfn)
        return entry if entry is not None and entry.state in (MAPPED, PENDING) else None

    def entries(self):
        """Every entry, depth first: (level, gfn) -> entry."""
        found, stack = {}, [self.root]
        while stack:
            page = stack.pop()
            for entry in page.entries.values():
                found[(entry.level, entry.gfn)] = entry
                if entry.child is not None:
                    stack.append(entry.child)
        return found

    def leaves(self) -> dict:
        """(level, first gfn) -> leaf entry, whatever its state."""
        return {key: e for key, e in self.entries().items() if e.state not in _NONLEAF}

    def held_over(self, gfn: int, level: int) -> bool:
        """A TDCALL in flight holds an entry whose range meets the entry of ``gfn`` (its
        first page) at ``level``.  Held entries are leaves, so on a guest's own
        leaf this is "another ACCEPT holds it"."""
        end = gfn + pages_per_level(level)
        return any(call.entry.gfn < end and gfn < call.entry.gfn + pages_per_level(call.entry.level)
                   for call in self.held)

    def _busy(self, gfn: int, level: int) -> bool:
        """A host SEAMCALL on the entry meets a TDCALL in flight: TDX_OPERAND_BUSY."""
        if self.held_over(gfn, level):
            self.kvm.events[events.SEPT_OPERAND_BUSY] += 1
            return True
        return False

    # --- SEAMCALLs (host side); each returns a status ----------------------------

    def _free_entry(self, gfn: int, level: int):
        """``(page, index)`` of the free entry for ``gfn`` at ``level``, or the status
        refusing it: no S-EPT page there yet, or the entry is in use."""
        where = self._slot(gfn, level)
        if where is None:
            return TDX_EPT_WALK_FAILED
        page, index = where
        if index in page.entries:
            return TDX_EPT_ENTRY_STATE_INCORRECT
        return where

    def sept_add(self, gfn: int, level: int) -> str:
        """TDH.MEM.SEPT.ADD: link a new S-EPT page of level ``level - 1`` at ``level``."""
        where = self._free_entry(gfn, level)
        if isinstance(where, str):
            return where
        page, index = where
        first = gfn_round_for_level(gfn, level)
        page.entries[index] = SeptEntry(NL_MAPPED, level, first,
                                        child=SeptPage(level - 1, first))
        return TDX_SUCCESS

    def page_aug(self, gfn: int, level: int, pfn: int) -> str:
        """TDH.MEM.PAGE.AUG: add a leaf in the pages' recorded accept state (pending unless
        the pages were accepted before, SEMANTICS §E)."""
        where = self._free_entry(gfn, level)
        if isinstance(where, str):
            return where
        page, index = where
        slot = self.kvm.memslots.lookup(gfn)
        first = gfn - slot.base_gfn
        pages = range(first, first + pages_per_level(level))
        if faults.active("pending-access-maps"):
            slot.accepted.update(pages)  # TDH.MEM.PAGE.ADD, not AUG: mapped as accepted
        states = {i in slot.accepted for i in pages}
        if len(states) != 1:
            return TDX_EPT_ENTRY_STATE_INCORRECT  # (the model's: one leaf, one state)
        accepted = states.pop()
        self.kvm.events[events.SEPT_AUG + 2 * (level - 1) + accepted] += 1
        page.entries[index] = SeptEntry(MAPPED if accepted else PENDING, level, gfn, pfn)
        return TDX_SUCCESS

    def range_block(self, gfn: int, level: int) -> str:
        """TDH.MEM.RANGE.BLOCK: the entry (leaf or link) stops translating; its block is
        stamped with the current TD epoch."""
        entry = self.entry(gfn, level)
        if entry is None or entry.state not in _BLOCK:
            return TDX_EPT_ENTRY_STATE_INCORRECT
        if self._busy(gfn, level):
            return TDX_OPERAND_BUSY
        self.kvm.events[events.SEPT_BLOCK] += 1
        entry.state, entry.blocked_epoch = _BLOCK[entry.state], self.epoch
        return TDX_SUCCESS

    def range_unblock(self, gfn: int, level: int) -> str:
        """TDH.MEM.RANGE.UNBLOCK: a blocked entry translates again."""
        entry = self.entry(gfn, level)
        if entry is None or entry.state not in _UNBLOCK:
            return TDX_EPT_ENTRY_STATE_INCORRECT
        self.kvm.events[events.SEPT_UNBLOCK] += 1
        entry.state, entry.blocked_epoch = _UNBLOCK[entry.state], -1
        return TDX_SUCCESS

    def track(self) -> str:
        """TDH.MEM.TRACK: advance the TD epoch (vCPUs entering later flush their TLBs)."""
        self.epoch += 1
        return TDX_SUCCESS

    def _tracked(self, entry, blocked_states) -> str:
        """The status of a blocked-entry SEAMCALL's precondition on ``entry``."""
        if entry is None or entry.state not in blocked_states:
            return TDX_EPT_ENTRY_STATE_INCORRECT
        if entry.blocked_epoch >= self.epoch:
            return TDX_TLB_TRACKING_NOT_DONE
        if self._busy(entry.gfn, entry.level):
            return TDX_OPERAND_BUSY
        return TDX_SUCCESS

    def page_remove(self, gfn: int, level: int) -> str:
        """TDH.MEM.PAGE.REMOVE: a blocked, tracked leaf becomes FREE."""
        where = self._slot(gfn, level)
        entry = None if where is None else where[0].entries.get(where[1])
        status = self._tracked(entry, (BLOCKED, PENDING_BLOCKED))
        if status == TDX_SUCCESS:
            self.kvm.events[events.SEPT_REMOVE + level - 1] += 1
            del where[0].entries[where[1]]
        return status

    def page_demote(self, gfn: int, level: int) -> str:
        """TDH.MEM.PAGE.DEMOTE: a blocked, tracked 2M leaf becomes a link to a new S-EPT
        page of 512 4K leaves, unblocked, in its state."""
        entry = self.entry(gfn, level)
        status = self._tracked(entry, (BLOCKED, PENDING_BLOCKED))
        if status != TDX_SUCCESS:
            return status
        self.kvm.events[events.SEPT_DEMOTE] += 1
        state = _UNBLOCK[entry.state]
        child = SeptPage(level - 1, entry.gfn)
        step = pages_per_level(level - 1)
        child.entries = {i: SeptEntry(state, level - 1, entry.gfn + i * step, entry.pfn + i * step)
                         for i in range(PAGES_PER_2M)}
        entry.state, entry.blocked_epoch, entry.pfn, entry.child = NL_MAPPED, -1, 0, child
        return TDX_SUCCESS

    def page_promote(self, gfn: int, level: int) -> str:
        """TDH.MEM.PAGE.PROMOTE: a blocked, tracked link over 512 contiguous leaves in one
        accept state becomes a 2M leaf in that state; the S-EPT page goes back to KVM."""
        entry = self.entry(gfn, level)
        status = self._tracked(entry, (NL_BLOCKED,))
        if status != TDX_SUCCESS:
            return status
        children = [entry.child.entries.get(i) for i in range(PAGES_PER_2M)]
        first = children[0]
        mixed_ok = faults.active("merge-partial-accept")
        if any(c is None or c.state not in (MAPPED, PENDING) or c.pfn != first.pfn + i
               or (c.state != first.state and not mixed_ok) for i, c in enumerate(children)):
            self.kvm.events[events.SEPT_PROMOTE_REFUSED] += 1
            return TDX_EPT_INVALID_PROMOTE_CONDITIONS
        self.kvm.events[events.SEPT_PROMOTE] += 1
        entry.state, entry.blocked_epoch, entry.pfn, entry.child = first.state, -1, first.pfn, None
        return TDX_SUCCESS

    # --- TDG.MEM.PAGE.ACCEPT (the guest's TDCALL) ----------------------------------

    def page_accept(self, gfn: int, level: int):
        """The guest's ACCEPT of ``gfn`` at ``level``: a :class:`Tdcall` holding the PENDING
        leaf, or how the module completes it instead (check_tdaccept_failure).

        The guest's walk goes down to the accept level.  It stops above it at
        a leaf or at a missing or blocked link: at a MAPPED (accepted) leaf
        larger than the request that is TDX_PAGE_ALREADY_ACCEPTED, anywhere
        else a TD exit to KVM, an EPT violation whose extended exit
        qualification is TDX_EXT_EXIT_QUAL_TYPE_ACCEPT with the accept level
        (a PENDING 2M leaf for a 4K accept, or nothing mapped).  At the accept
        level: a link (the range is mapped smaller) is TDX_PAGE_SIZE_MISMATCH,
        a MAPPED leaf TDX_PAGE_ALREADY_ACCEPTED, a PENDING one is taken (or is
        TDX_OPERAND_BUSY while another ACCEPT holds it), and a free or blocked
        entry is the EPT violation again.
        """
        entry, at = self._guest_walk(gfn, level)
        if at > level:
            if entry is not None and entry.state == MAPPED:
                return TDX_PAGE_ALREADY_ACCEPTED
            return TDX_EXT_EXIT_QUAL_TYPE_ACCEPT
        if entry is None or entry.state in (BLOCKED, PENDING_BLOCKED):
            return TDX_EXT_EXIT_QUAL_TYPE_ACCEPT
        if entry.state in _NONLEAF:
            return TDX_PAGE_SIZE_MISMATCH
        if entry.state == MAPPED:
            return TDX_PAGE_ALREADY_ACCEPTED
        if self.held_over(entry.gfn, level):
            # Another vCPU's ACCEPT holds the leaf: the module fails to take the entry's
            # lock (TDX_OPERAND_BUSY) and the guest runs the ACCEPT again.
            return TDX_OPERAND_BUSY
        call = Tdcall(entry)
        self.held.append(call)
        return call

    def accept_end(self, call: Tdcall) -> None:
        """The ACCEPT completes (if a kick has not made it complete already): the pages are
        zeroed and MAPPED."""
        if call.done:
            return
        call.done = True
        self.held.remove(call)
        leaf = call.entry
        slot = self.kvm.memslots.lookup(leaf.gfn)
        n, first = pages_per_level(leaf.level), leaf.gfn - slot.base_gfn
        self.kvm.events[events.SEPT_ACCEPT + leaf.level - 1] += 1
        leaf.state = MAPPED
        slot.accepted.update(range(first, first + n))
        self.kvm.host.clear(leaf.pfn, n)

    def complete_tdcalls(self) -> None:
        """Every vCPU was forced out of the guest: a TDCALL in flight completes first (the
        exit is taken after the instruction), so none holds an entry any more."""
        for call in list(self.held):
            self.accept_end(call)


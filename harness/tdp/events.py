"""The MMU-state events the tdp target counts for campaign feedback (harness.target.StateEvents).

Each is a change of MMU state that line coverage cannot tell apart from its
neighbours: which kind of SPTE transition happened at which level of which
root, what the secure EPT did, why a fault retried, what a hardware walk
found.  The code that makes the change counts it with one list increment
(``kvm.events[i] += 1``); :class:`~mmufuzz.harness.tdp.TdpTarget` hands the
names of those an op raised to the campaign.

SPTE transitions are indexed by bits, so the choke point (``account_changed_spte``)
computes its index without a lookup: ``level << 6 | mirror << 5 | old << 3 |
new << 1 | same_pfn``, ``old`` and ``new`` each 0 (not present), 1 (a table)
or 2 (a leaf), the sum of *present* and *leaf*.
"""

from __future__ import annotations

from mmufuzz.harness.ops import PG_LEVEL_4K
from mmufuzz.harness.target import StateEvents
from mmufuzz.harness.tdp.spte import ROOT_LEVEL

_SPTE_STATES = ("none", "table", "leaf")
SPTE_EVENTS = (ROOT_LEVEL + 1) << 6  # the transition slots come first


def _spte_name(index: int) -> str:
    level, mirror, old, new, same = (index >> 6, index >> 5 & 1, index >> 3 & 3, index >> 1 & 3,
                                     index & 1)
    if old > 2 or new > 2:
        return f"spte:unused{index}"
    root = "mirror" if mirror else "direct"
    return f"spte:L{level}:{root}:{_SPTE_STATES[old]}>{_SPTE_STATES[new]}{':same_pfn' if same else ''}"


_LEVELS = range(PG_LEVEL_4K, ROOT_LEVEL + 1)
_OTHER = (
    # The secure EPT (the TDX module's SEAMCALLs the mirror root's hooks make).
    *(f"sept:aug:L{level}:{state}" for level in (1, 2) for state in ("pending", "accepted")),
    "sept:remove:L1", "sept:remove:L2", "sept:demote", "sept:block", "sept:unblock",
    "sept:promote", "sept:promote_refused", "sept:accept:L1", "sept:accept:L2",
    "sept:walk:pending", "sept:walk:raced",
    # Why a fault retried, and the MMIO SPTEs it installed (generation relations).
    "fault:retry:invalidate_in_progress", "fault:retry:sequence_moved",
    "fault:retry:slot_invalid", "fault:retry:frozen", "fault:retry:cmpxchg_lost",
    "fault:mmio_spte", "fault:mmio_spte:generation_moved",
    # fast_page_fault: a leaf made writable without mmu_lock, or a cmpxchg it lost.
    "fault:fast:fixed", "fault:fast:cmpxchg_lost",
    # What a hardware walk of the direct root found, and TLB flushes.
    *(f"walk:absent:L{level}" for level in _LEVELS),
    *(f"walk:permission:L{level}" for level in _LEVELS),
    *(f"walk:fill:L{level}" for level in _LEVELS),
    "walk:aborted_by_flush", "walk:mmio:current", "walk:mmio:stale", "walk:ve",
    # The CPU set a leaf's EPT Dirty bit, with PML logging the gpa or not.
    "walk:set_dirty", "walk:set_dirty:pml",
    "tlb:flush:held_entries", "tlb:flush:empty",
    # A TD's walk met an MMIO SPTE: #VE to the guest, TDVMCALL<MMIO>, no generation check.
    "walk:mmio:td_ve",
    # A SEAMCALL met a guest TDCALL holding its S-EPT entry (TDX_OPERAND_BUSY).
    "sept:operand_busy",
    "tlb:flush_range:kept_entries", "tlb:flush_range:dropped_all",
)
EVENTS = StateEvents([_spte_name(i) for i in range(SPTE_EVENTS)] + list(_OTHER))
_INDEX = {name: i for i, name in enumerate(EVENTS.names)}


def event(name: str) -> int:
    """The index of a named event (module constants: looked up once, at import)."""
    return _INDEX[name]


SEPT_AUG = event("sept:aug:L1:pending")  # + 2 * (level - 1) + accepted
SEPT_REMOVE = event("sept:remove:L1")  # + level - 1
SEPT_DEMOTE, SEPT_BLOCK, SEPT_UNBLOCK = event("sept:demote"), event("sept:block"), event("sept:unblock")
SEPT_PROMOTE, SEPT_PROMOTE_REFUSED = event("sept:promote"), event("sept:promote_refused")
SEPT_ACCEPT = event("sept:accept:L1")  # + level - 1
SEPT_WALK_PENDING, SEPT_WALK_RACED = event("sept:walk:pending"), event("sept:walk:raced")
RETRY_IN_PROGRESS = event("fault:retry:invalidate_in_progress")
RETRY_SEQUENCE = event("fault:retry:sequence_moved")
RETRY_SLOT_INVALID = event("fault:retry:slot_invalid")
RETRY_FROZEN = event("fault:retry:frozen")
RETRY_CMPXCHG = event("fault:retry:cmpxchg_lost")
MMIO_SPTE, MMIO_SPTE_GENERATION_MOVED = event("fault:mmio_spte"), event("fault:mmio_spte:generation_moved")
WALK_ABSENT = event("walk:absent:L1") - PG_LEVEL_4K  # + level
WALK_PERMISSION = event("walk:permission:L1") - PG_LEVEL_4K  # + level
WALK_FILL = event("walk:fill:L1") - PG_LEVEL_4K  # + level
WALK_ABORTED = event("walk:aborted_by_flush")
WALK_MMIO_CURRENT, WALK_MMIO_STALE = event("walk:mmio:current"), event("walk:mmio:stale")
WALK_VE = event("walk:ve")
WALK_SET_DIRTY, WALK_SET_DIRTY_PML = event("walk:set_dirty"), event("walk:set_dirty:pml")
FAST_PF_FIXED, FAST_PF_CMPXCHG_LOST = event("fault:fast:fixed"), event("fault:fast:cmpxchg_lost")
WALK_MMIO_TD_VE = event("walk:mmio:td_ve")
SEPT_OPERAND_BUSY = event("sept:operand_busy")
TLB_FLUSH_HELD, TLB_FLUSH_EMPTY = event("tlb:flush:held_entries"), event("tlb:flush:empty")
TLB_RANGE_KEPT = event("tlb:flush_range:kept_entries")
TLB_RANGE_DROPPED_ALL = event("tlb:flush_range:dropped_all")

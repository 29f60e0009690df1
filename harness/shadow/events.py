"""The shadow-MMU state events the shadow target counts for campaign feedback
(harness.target.StateEvents).

Line coverage cannot tell these apart from their neighbours: the same lines of
``kvm_mmu_find_shadow_page`` skip a *direct* page of another level on every
physical access (gfn 0 is shadowed at every level of the nonpaging root) and
skip the page of a *guest table used at two levels* (a self-map, a table
linked from a PML4 and a PD, a CR3 loaded from a page table); the same lines
of ``FNAME(sync_spte)`` keep an MMIO SPTE on a CR3 load and on an invlpg; the
same lines of ``mmu_set_spte`` make an MMIO SPTE in a synced page and in an
unsync one.  Each event is one such MMU state, counted where the shadow MMU
makes it (``kvm.events[i] += 1``); :class:`~mmufuzz.harness.shadow.ShadowTarget`
hands the names of those an op raised to the campaign.
"""

from __future__ import annotations

from mmufuzz.harness.shadow.spte import (PT64_ROOT_4LEVEL, is_last_spte, is_mmio_spte,
                                         is_shadow_present_pte)
from mmufuzz.harness.target import StateEvents

_LEVELS = range(1, PT64_ROOT_4LEVEL + 1)
# What an entry of a shadow page holds (spte_kind's index).
SPTE_KINDS = ("none", "mmio", "leaf", "link")

EVENTS = StateEvents([
    # kvm_mmu_find_shadow_page, asked for an indirect page of level L, met an indirect
    # page of the same gfn with another role (of level M, synced or unsync): one guest
    # table used at two levels, or under two inherited accesses.
    *(f"find:L{want}:other_role:L{have}:{state}" for want in _LEVELS for have in _LEVELS
      for state in ("sync", "unsync")),
    # mmu_set_spte made an MMIO SPTE: in a direct page, a synced or an unsync indirect one.
    "mmio_spte:direct", "mmio_spte:indirect:sync", "mmio_spte:indirect:unsync",
    # kvm_unsync_page: the page going unsync held leaves / MMIO SPTEs (dropped here).
    "unsync:held_leaves", "unsync:held_mmio",
    # FNAME(sync_spte)'s verdict on one entry: guest PTE unreadable (zap the page), no
    # longer valid, MMIO SPTE kept or cleared, another gfn, same access, narrowed access.
    "sync_spte:no_gpte", "sync_spte:invalid_gpte", "sync_spte:mmio_kept",
    "sync_spte:mmio_cleared", "sync_spte:other_gfn", "sync_spte:same", "sync_spte:narrowed",
    # __kvm_mmu_invalidate_addr (invlpg; here also every injected #PF, docs/shadow.md
    # difference 3) met an unsync page of level L on the gva's path, its entry for the gva
    # holding nothing, an MMIO SPTE, a leaf or a link.
    *(f"invlpg:unsync:L{level}:{kind}" for level in _LEVELS for kind in SPTE_KINDS),
])
_INDEX = {name: i for i, name in enumerate(EVENTS.names)}


def spte_kind(spte: int, level: int) -> int:
    """The index in SPTE_KINDS of what an entry of a level-``level`` page holds."""
    if is_shadow_present_pte(spte):
        return 2 if is_last_spte(spte, level) else 3
    return 1 if is_mmio_spte(spte) else 0


def event(name: str) -> int:
    """The index of a named event (module constants: looked up once, at import)."""
    return _INDEX[name]


FIND_OTHER_ROLE = event("find:L1:other_role:L1:sync")  # + 8*(want-1) + 2*(have-1) + unsync
MMIO_SPTE_DIRECT = event("mmio_spte:direct")
MMIO_SPTE_SYNC, MMIO_SPTE_UNSYNC = event("mmio_spte:indirect:sync"), event("mmio_spte:indirect:unsync")
UNSYNC_HELD_LEAVES, UNSYNC_HELD_MMIO = event("unsync:held_leaves"), event("unsync:held_mmio")
SYNC_NO_GPTE, SYNC_INVALID_GPTE = event("sync_spte:no_gpte"), event("sync_spte:invalid_gpte")
SYNC_MMIO_KEPT, SYNC_MMIO_CLEARED = event("sync_spte:mmio_kept"), event("sync_spte:mmio_cleared")
SYNC_OTHER_GFN, SYNC_SAME = event("sync_spte:other_gfn"), event("sync_spte:same")
SYNC_NARROWED = event("sync_spte:narrowed")
INVLPG_UNSYNC = event("invlpg:unsync:L1:none")  # + len(SPTE_KINDS) * (level - 1) + kind

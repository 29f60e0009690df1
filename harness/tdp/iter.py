"""tdp_iter: a pre-order walk over the SPTEs covering a gfn range.

The same step-down / step-side / step-up moves as KVM's tdp_iter.c, so that
the paths built on it (map, zap, split, recover) visit entries in KVM's order
and can be interleaved at the same points.  Every move reads one SPTE; reading
a freed table raises ``walker_read_freed_table`` (see pgalloc).
"""

from __future__ import annotations

from mmufuzz.harness.ops import PG_LEVEL_4K
from mmufuzz.harness.tdp.pgalloc import PageTableAllocator, TablePage, next_used
from mmufuzz.harness.tdp.spte import (
    LEVEL_SHIFT,
    PAGES_PER_LEVEL,
    PT_PAGE_SIZE_MASK,
    ROOT_LEVEL,
    SHADOW_NONPRESENT_VALUE,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    gfn_round_for_level,
    spte_index,
)

_LAST_INDEX = SPTE_ENT_PER_PAGE - 1


class TdpIter:
    """KVM's struct tdp_iter over [start, end) of ``root``, stopping at ``min_level``.

    ``old_spte`` is the value read at (``page``, ``index``); ``valid`` turns
    false when the walk has left the range.
    """

    __slots__ = (
        "alloc",
        "end",
        "gfn",
        "index",
        "level",
        "min_level",
        "next_last_level_gfn",
        "old_spte",
        "pt_path",
        "root",
        "valid",
    )

    def __init__(self, alloc: PageTableAllocator, root: TablePage, start: int, end: int,
                 min_level: int = PG_LEVEL_4K):
        self.alloc, self.root, self.end, self.min_level = alloc, root, end, min_level
        self.next_last_level_gfn = start
        self.pt_path: list = [None] * (ROOT_LEVEL + 1)
        self.restart()

    def restart(self) -> None:
        """tdp_iter_restart: walk again from the root to ``next_last_level_gfn``."""
        self.pt_path[ROOT_LEVEL] = self.root
        self.level = ROOT_LEVEL
        self.gfn = gfn_round_for_level(self.next_last_level_gfn, ROOT_LEVEL)
        self.valid = self.gfn < self.end
        self._refresh()

    @property
    def page(self) -> TablePage:
        """The table holding the current entry (sptep's page)."""
        return self.pt_path[self.level]

    def _refresh(self) -> None:
        self.index = (self.gfn >> LEVEL_SHIFT[self.level]) & _LAST_INDEX  # spte_index
        self.old_spte = self.pt_path[self.level].spt[self.index]

    def read(self) -> int:
        """Re-read the current entry (kvm_tdp_mmu_read_spte)."""
        self.old_spte = self.pt_path[self.level].spt[self.index]
        return self.old_spte

    # The moves test SPTE bits inline (is_shadow_present_pte, is_last_spte): a walk
    # makes one per entry it visits, and zaps visit whole slots.

    def _try_step_down(self) -> bool:
        level = self.level
        if level == self.min_level:
            return False
        # Re-read before stepping down: the table may have been unlinked meanwhile.
        spte = self.old_spte = self.pt_path[level].spt[self.index]
        if not spte & SPTE_MMU_PRESENT_MASK or level == PG_LEVEL_4K or spte & PT_PAGE_SIZE_MASK:
            return False
        child = self.alloc.child(spte)
        self.level = level = level - 1
        self.pt_path[level] = child
        self.gfn = gfn = self.next_last_level_gfn & -PAGES_PER_LEVEL[level]  # gfn_round_for_level
        self.index = index = (gfn >> LEVEL_SHIFT[level]) & _LAST_INDEX  # spte_index
        self.old_spte = child.spt[index]
        return True

    def _try_step_side(self) -> bool:
        index = self.index
        if index == _LAST_INDEX:
            return False
        self.gfn = self.next_last_level_gfn = self.gfn + PAGES_PER_LEVEL[self.level]
        self.index = index = index + 1
        self.old_spte = self.pt_path[self.level].spt[index]
        return True

    def _try_step_up(self) -> bool:
        if self.level == ROOT_LEVEL:
            return False
        self.level += 1
        self.gfn = gfn_round_for_level(self.gfn, self.level)
        self.index = spte_index(self.gfn, self.level)
        return True

    def skip_absent(self, most: int) -> int:
        """Step side over up to ``most`` empty entries after the current one; return how many.

        The walk lands where that many calls of :meth:`next` would have put it,
        each a step side over an entry no zap or write-protect acts on; the
        caller counts them as visited.  A run of SHADOW_NONPRESENT_VALUE entries,
        which is most of a sparse table, is found by a C-level scan
        (:func:`~harness.tdp.pgalloc.next_used`) instead of a step each.
        Nothing is skipped where :meth:`next` would step down (the current
        entry links a table) or the run would leave the table or the range.
        Only SPTE reads are skipped: a walk yields nowhere on a non-present
        entry, so no other thread can tell.
        """
        level, index = self.level, self.index
        if index == _LAST_INDEX:
            return 0
        page = self.pt_path[level]
        if page.freed:
            return 0  # next() reads it and reports
        spt = page.spt
        if spt[index + 1] is not SHADOW_NONPRESENT_VALUE:
            return 0  # a dense table: nothing to skip, and no scan to pay for
        step = PAGES_PER_LEVEL[level]
        most = min(most, _LAST_INDEX - index, (self.end - self.gfn - 1) // step)
        if most <= 0:
            return 0
        spte = spt[index]  # as _try_step_down re-reads it
        if (level != self.min_level and spte & SPTE_MMU_PRESENT_MASK and level != PG_LEVEL_4K
                and not spte & PT_PAGE_SIZE_MASK):
            return 0
        skipped = next_used(spt, index + 1, index + 1 + most) - index - 1
        if skipped:
            self.index = index = index + skipped
            self.gfn = self.next_last_level_gfn = self.gfn + skipped * step
            self.old_spte = spt[index]
        return skipped

    def next(self) -> None:
        """tdp_iter_next: step down if possible, else side, else up and side."""
        if self._try_step_down():
            self.valid = self.gfn < self.end
            return
        while True:
            if self._try_step_side():
                self.valid = self.gfn < self.end
                return
            if not self._try_step_up():
                break
        self.valid = False

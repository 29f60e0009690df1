"""Page-table pages: allocation, refcounts (present children), poison on free.

A table page is 512 SPTEs plus KVM's kvm_mmu_page bookkeeping (level, first
gfn, mirror role).  Freeing replaces the entries with poison, so any walker,
software or hardware, that still holds a pointer to a freed page raises
``walker_read_freed_table`` on its next read instead of seeing odd values.
"""

from __future__ import annotations

from itertools import compress, count

from mmufuzz.harness import faults
from mmufuzz.harness.ops import PAGE_SHIFT
from mmufuzz.harness.target import InvariantViolation
from mmufuzz.harness.tdp.hostmem import HostMemory
from mmufuzz.harness.tdp.spte import SHADOW_NONPRESENT_VALUE, SPTE_BASE_ADDR_MASK, SPTE_ENT_PER_PAGE


class _FreedTable:
    """The entries of a freed table page: every read or write is a violation.

    It names its page by value, not by reference: a page whose entries point
    back at it would be a reference cycle, left for the garbage collector when
    its VM is dropped (a schedule variant drops one per run).
    """

    __slots__ = ("gfn", "level", "pfn")

    def __init__(self, page: TablePage):
        self.gfn, self.level, self.pfn = page.gfn, page.level, page.pfn

    def _violation(self, index) -> InvariantViolation:
        return InvariantViolation(
            "walker_read_freed_table",
            f"gfn={self.gfn:#x} level={self.level} index={index} pfn={self.pfn:#x}")

    def __getitem__(self, index):
        raise self._violation(index)

    def __setitem__(self, index, value):
        raise self._violation(index)

    def __iter__(self):
        raise self._violation(0)  # an iteration's first read is entry 0


# used_entries looks at a table this many entries at a time.
_CHUNK = 64


def used_entries(spt: list) -> list[int]:
    """The indices of the entries of ``spt`` that are not SHADOW_NONPRESENT_VALUE.

    Tables are sparse: a chunk's ``count`` of SHADOW_NONPRESENT_VALUE is one
    C call, and only a chunk that holds something else is compared entry by
    entry, which makes a table with a few entries about three times cheaper
    than comparing all 512; a full table (a split's 512 leaves) and a full
    chunk are taken whole.  No bytecode runs per entry, so no coverage
    instrumentation either.
    """
    empty = spt.count(SHADOW_NONPRESENT_VALUE)
    if empty == SPTE_ENT_PER_PAGE:
        return []
    if not empty:
        return list(range(SPTE_ENT_PER_PAGE))
    used = []
    for base in range(0, SPTE_ENT_PER_PAGE, _CHUNK):
        chunk = spt[base:base + _CHUNK]
        empty = chunk.count(SHADOW_NONPRESENT_VALUE)
        if not empty:
            used += range(base, base + _CHUNK)
        elif empty != _CHUNK:
            used += compress(range(base, base + _CHUNK), map(SHADOW_NONPRESENT_VALUE.__ne__, chunk))
    return used


def next_used(spt: list, start: int, stop: int) -> int:
    """The first index in [start, stop) whose entry is not SHADOW_NONPRESENT_VALUE, else ``stop``.

    The walks that look for the next entry with something to do (a zap, a
    write-protect, the teardown of a removed table) skip the empty runs
    between with it: a chunk's ``count`` of SHADOW_NONPRESENT_VALUE is one C
    call, which for the entries that hold that very object is a pointer
    comparison each.  ``spt`` must be a live table's entries.
    """
    if start >= stop:
        return stop
    if spt[start] != SHADOW_NONPRESENT_VALUE:
        return start  # a dense table's next entry: no chunk to copy
    rest = spt[start:stop]
    if rest.count(SHADOW_NONPRESENT_VALUE) == stop - start:
        return stop  # the common end of a sparse table: nothing after
    while start < stop:
        end = min(start + _CHUNK, stop)
        chunk = spt[start:end]
        if chunk.count(SHADOW_NONPRESENT_VALUE) != end - start:
            return start + next(compress(count(), map(SHADOW_NONPRESENT_VALUE.__ne__, chunk)))
        start = end
    return stop


class TablePage:
    """kvm_mmu_page: one table of SPTEs at ``level`` covering gfns from ``gfn``.

    It pickles with its entries and the invariant checks' records of them:
    a checkpoint (:mod:`mmufuzz.harness.tdp.checkpoint`) copies the entries
    out of band and shares the records with every restored copy.
    """

    __slots__ = ("freed", "gfn", "level", "mirror", "pfn", "refcount", "seen", "spt")

    def __init__(self, pfn: int, level: int, gfn: int, mirror: bool):
        self.pfn, self.level, self.gfn, self.mirror = pfn, level, gfn, mirror
        self.spt = [SHADOW_NONPRESENT_VALUE] * SPTE_ENT_PER_PAGE
        self.refcount = 0  # present children, kept by handle_changed_spte
        self.freed = False
        self.seen = None  # the invariant checks' last look at the entries

    def __getstate__(self) -> tuple:
        spt = None if self.freed else self.spt
        return self.pfn, self.level, self.gfn, self.mirror, self.refcount, spt, self.seen

    def __setstate__(self, state: tuple) -> None:
        self.pfn, self.level, self.gfn, self.mirror, self.refcount, spt, self.seen = state
        self.freed = spt is None
        self.spt = _FreedTable(self) if self.freed else spt

    def __repr__(self) -> str:
        return f"TablePage(pfn={self.pfn:#x} level={self.level} gfn={self.gfn:#x})"


class PageTableAllocator:
    """Hands out table pages (with host pfns, so SPTEs can point at them) and frees them."""

    def __init__(self, host: HostMemory):
        self._host = host
        self.pages: dict[int, TablePage] = {}  # pfn -> page, freed ones included

    def alloc(self, level: int, gfn: int, mirror: bool) -> TablePage:
        """A fresh table page whose entries are all SHADOW_NONPRESENT_VALUE.

        KVM fills the pages of the vCPU's shadow-page cache with it when it
        tops the cache up (mmu_topup_shadow_page_cache, KVM commit d8fa2031faab);
        before, they came zeroed (__GFP_ZERO).
        """
        page = TablePage(self._host.alloc(1), level, gfn, mirror)
        if faults.active("table-init-zero"):
            page.spt = [0] * SPTE_ENT_PER_PAGE
        self.pages[page.pfn] = page
        return page

    def child(self, spte: int) -> TablePage:
        """spte_to_child_pt: the table a non-leaf SPTE links."""
        return self.pages[(spte & SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT]  # spte_to_pfn

    def free(self, page: TablePage) -> None:
        """Free a table page: from now on its entries are poison."""
        if page.freed:
            raise InvariantViolation("double_free_table",
                                     f"gfn={page.gfn:#x} level={page.level} pfn={page.pfn:#x}")
        page.freed = True
        page.spt = _FreedTable(page)

    def live_pages(self) -> list[TablePage]:
        """Every allocated, not yet freed page, in allocation order."""
        return [page for page in self.pages.values() if not page.freed]

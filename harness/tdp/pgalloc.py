"""Page-table pages: allocation, refcounts (present children), poison on free.

A table page is 512 SPTEs plus KVM's kvm_mmu_page bookkeeping (level, first
gfn, mirror role).  Freeing replaces the entries with poison, so any walker,
software or hardware, that still holds a pointer to a freed page raises
``walker_read_freed_table`` on its next read instead of seeing odd values.
"""

from __future__ import annotations

from harness.target import InvariantViolation
from harness.tdp.hostmem import HostMemory
from harness.tdp.spte import SHADOW_NONPRESENT_VALUE, SPTE_ENT_PER_PAGE, spte_to_pfn


class _FreedTable:
    """The entries of a freed table page: every read or write is a violation."""

    __slots__ = ("page",)

    def __init__(self, page: TablePage):
        self.page = page

    def _violation(self, index) -> InvariantViolation:
        page = self.page
        return InvariantViolation(
            "walker_read_freed_table",
            f"gfn={page.gfn:#x} level={page.level} index={index} pfn={page.pfn:#x}")

    def __getitem__(self, index):
        raise self._violation(index)

    def __setitem__(self, index, value):
        raise self._violation(index)

    def __iter__(self):
        raise self._violation(0)  # an iteration's first read is entry 0


class TablePage:
    """kvm_mmu_page: one table of SPTEs at ``level`` covering gfns from ``gfn``."""

    __slots__ = ("freed", "gfn", "level", "mirror", "pfn", "refcount", "spt")

    def __init__(self, pfn: int, level: int, gfn: int, mirror: bool):
        self.pfn, self.level, self.gfn, self.mirror = pfn, level, gfn, mirror
        self.spt = [SHADOW_NONPRESENT_VALUE] * SPTE_ENT_PER_PAGE
        self.refcount = 0  # present children, kept by handle_changed_spte
        self.freed = False

    def __repr__(self) -> str:
        return f"TablePage(pfn={self.pfn:#x} level={self.level} gfn={self.gfn:#x})"


class PageTableAllocator:
    """Hands out table pages (with host pfns, so SPTEs can point at them) and frees them."""

    def __init__(self, host: HostMemory):
        self._host = host
        self.pages: dict[int, TablePage] = {}  # pfn -> page, freed ones included

    def alloc(self, level: int, gfn: int, mirror: bool) -> TablePage:
        """A fresh table page whose entries are all SHADOW_NONPRESENT_VALUE."""
        page = TablePage(self._host.alloc(1), level, gfn, mirror)
        self.pages[page.pfn] = page
        return page

    def child(self, spte: int) -> TablePage:
        """spte_to_child_pt: the table a non-leaf SPTE links."""
        return self.pages[spte_to_pfn(spte)]

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

"""Host memory: the pages that hold guest contents, and the host's mappings of them.

Guest-visible contents live in host pages (pfns), never in SPTEs or slots, so
an SPTE or TLB entry with a wrong or stale pfn shows as a wrong value or as a
touch of a poisoned page.  Pages are never reused: a page that left service
(migrated away, slot deleted) is poisoned for the rest of the program, and any
access to it raises ``stale_host_page_access``.
"""

from __future__ import annotations

from bisect import bisect_right, insort

from mmufuzz.harness.ops import PAGES_PER_2M, PG_LEVEL_2M, PG_LEVEL_4K
from mmufuzz.harness.target import InvariantViolation


class HostMemory:
    """The host's physical pages: allocation, contents, poison."""

    def __init__(self):
        self._next_pfn = PAGES_PER_2M
        # pfn -> {word: value}; a missing page or word reads 0.
        self._contents: dict[int, dict[int, int]] = {}
        # Disjoint poisoned pfn ranges, sorted by start.
        self._poison_starts: list[int] = []
        self._poison_ends: dict[int, int] = {}

    def alloc(self, count: int, align: int = 1) -> int:
        """``count`` fresh contiguous pfns starting at a multiple of ``align``."""
        start = -(-self._next_pfn // align) * align
        self._next_pfn = start + count
        return start

    def is_poisoned(self, pfn: int) -> bool:
        """The page has left service."""
        i = bisect_right(self._poison_starts, pfn)
        return i > 0 and pfn < self._poison_ends[self._poison_starts[i - 1]]

    def check(self, pfn: int) -> None:
        """Raise ``stale_host_page_access`` if ``pfn`` has left service."""
        if self._poison_starts and self.is_poisoned(pfn):
            raise InvariantViolation("stale_host_page_access", f"pfn={pfn:#x}")

    def read(self, pfn: int, word: int) -> int:
        """One word of a host page."""
        self.check(pfn)
        page = self._contents.get(pfn)
        return page.get(word, 0) if page else 0

    def write(self, pfn: int, word: int, value: int) -> None:
        """Store one word into a host page."""
        self.check(pfn)
        page = self._contents.get(pfn)
        if page is None:
            page = self._contents[pfn] = {}
        page[word] = value

    def pfns_with_contents(self, start: int, count: int) -> list[int]:
        """The pfns in [start, start+count) holding a nonzero word, sorted."""
        if count > len(self._contents):
            return sorted(p for p in self._contents if start <= p < start + count)
        return [p for p in range(start, start + count) if p in self._contents]

    def clear(self, start: int, count: int) -> None:
        """Zero the pages [start, start+count)."""
        for pfn in self.pfns_with_contents(start, count):
            del self._contents[pfn]

    def copy(self, src: int, dst: int, count: int) -> None:
        """Copy the contents of [src, src+count) to the fresh pages at dst."""
        for pfn in self.pfns_with_contents(src, count):
            self._contents[dst + pfn - src] = dict(self._contents[pfn])

    def poison(self, start: int, count: int) -> None:
        """Take [start, start+count) out of service for good; contents are dropped."""
        self.clear(start, count)
        insort(self._poison_starts, start)
        self._poison_ends[start] = start + count


class Backing:
    """A memslot's host mapping (the VMA of its userspace address range).

    Slot page i lives at offset ``(host_offset + i) mod 512`` of a 2M host page
    (SEMANTICS §C).  The mapping is a list of extents ``(lo, hi, delta)``:
    pages [lo, hi) live at pfn ``i + delta``.  A migration replaces the
    pfns of a range with fresh ones at the same 2M offsets; with ``huge`` set
    the host maps whole 2M pages, and a migrated one comes back split to 4K
    pages (THP split on migration), which is what host_pfn_mapping_level sees.
    """

    def __init__(self, host: HostMemory, npages: int, host_offset: int, huge: bool):
        self.host, self.npages, self.host_offset, self.huge = host, npages, host_offset, huge
        self._extents: list[tuple[int, int, int]] = [
            (0, npages, self._fresh_delta(0, npages))]
        self._split_2m: set[int] = set()  # 2M host page numbers (pfn >> 9) mapped at 4K

    def _fresh_delta(self, lo: int, hi: int) -> int:
        """Allocate fresh pfns for pages [lo, hi), keeping their offsets in 2M host pages."""
        first = (self.host_offset + lo) // PAGES_PER_2M
        last = (self.host_offset + hi - 1) // PAGES_PER_2M
        base = self.host.alloc((last - first + 1) * PAGES_PER_2M, PAGES_PER_2M)
        return base + self.host_offset - first * PAGES_PER_2M

    def pfn(self, index: int) -> int:
        """The host pfn of slot page ``index``."""
        for lo, hi, delta in self._extents:
            if lo <= index < hi:
                return index + delta
        raise IndexError(f"index={index:#x} npages={self.npages:#x}")

    def host_level(self, index: int) -> int:
        """host_pfn_mapping_level: the size of the host page slot page ``index`` is in."""
        if self.huge and (self.pfn(index) >> 9) not in self._split_2m:
            return PG_LEVEL_2M
        return PG_LEVEL_4K

    def host_page_range(self, lo: int, hi: int) -> tuple[int, int]:
        """The slot pages sharing host pages with [lo, hi): whole 2M host pages where huge."""
        if self.host_level(lo) == PG_LEVEL_2M:
            lo = max(0, lo - (self.host_offset + lo) % PAGES_PER_2M)
        last = hi - 1
        if self.host_level(last) == PG_LEVEL_2M:
            hi = min(self.npages, last - (self.host_offset + last) % PAGES_PER_2M + PAGES_PER_2M)
        return lo, hi

    def migrate(self, lo: int, hi: int) -> None:
        """Move pages [lo, hi) to fresh host pages with the same contents; poison the old."""
        delta = self._fresh_delta(lo, hi)
        kept = []
        for elo, ehi, edelta in self._extents:
            if ehi <= lo or elo >= hi:
                kept.append((elo, ehi, edelta))
                continue
            a, b = max(elo, lo), min(ehi, hi)
            self.host.copy(a + edelta, a + delta, b - a)
            self.host.poison(a + edelta, b - a)
            if elo < a:
                kept.append((elo, a, edelta))
            if b < ehi:
                kept.append((b, ehi, edelta))
        kept.append((lo, hi, delta))
        kept.sort()
        self._extents = kept
        if self.huge:
            self._split_2m.update(range((lo + delta) >> 9, ((hi - 1 + delta) >> 9) + 1))

    def release(self) -> None:
        """The slot is gone: every page leaves service."""
        for lo, hi, delta in self._extents:
            self.host.poison(lo + delta, hi - lo)
        self._extents = []

"""Memory attributes (KVM_SET_MEMORY_ATTRIBUTES): which gfns are private.

Attributes are VM-wide and independent of memslots (SEMANTICS §E).  Ranges
of up to 2^18 pages change at once, so the private gfns are kept as sorted,
disjoint, non-adjacent ``[start, end)`` ranges rather than per gfn.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right


class MemoryAttributes:
    """The private gfns of a VM (KVM's mem_attr_array)."""

    def __init__(self):
        self._starts: list[int] = []
        self._ends: list[int] = []

    def is_private(self, gfn: int) -> bool:
        """KVM_MEMORY_ATTRIBUTE_PRIVATE is set for ``gfn``."""
        i = bisect_right(self._starts, gfn) - 1
        return i >= 0 and gfn < self._ends[i]

    def any_private(self) -> bool:
        """Some gfn is private (never, outside a TD)."""
        return bool(self._starts)

    def private_ranges(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The private parts of [lo, hi), in order."""
        i = max(bisect_right(self._starts, lo) - 1, 0)
        out = []
        while i < len(self._starts) and self._starts[i] < hi:
            a, b = max(lo, self._starts[i]), min(hi, self._ends[i])
            if a < b:
                out.append((a, b))
            i += 1
        return out

    def ranges_in_state(self, lo: int, hi: int, private: bool) -> list[tuple[int, int]]:
        """The parts of [lo, hi) whose attribute is ``private``, in order."""
        inside = self.private_ranges(lo, hi)
        if private:
            return inside
        out, cursor = [], lo
        for a, b in inside:
            if cursor < a:
                out.append((cursor, a))
            cursor = b
        if cursor < hi:
            out.append((cursor, hi))
        return out

    def uniform(self, lo: int, hi: int) -> bool:
        """Every gfn of [lo, hi) has the same attribute (kvm_range_has_memory_attributes)."""
        inside = self.private_ranges(lo, hi)
        return not inside or inside == [(lo, hi)]

    def boundaries(self, lo: int, hi: int) -> list[int]:
        """The gfns in [lo, hi) whose attribute differs from the one below: the starts and
        ends of the private ranges there, in order."""
        starts, ends = self._starts, self._ends
        found = (starts[bisect_left(starts, lo):bisect_left(starts, hi)]
                 + ends[bisect_left(ends, lo):bisect_left(ends, hi)])
        found.sort()
        return found

    def set(self, lo: int, hi: int, private: bool) -> None:
        """Give every gfn of [lo, hi) the attribute ``private``."""
        i = bisect_left(self._ends, lo)       # first range ending at or after lo
        j = bisect_right(self._starts, hi)    # ranges [i, j) touch [lo, hi]
        if private:
            if i < j:
                lo, hi = min(lo, self._starts[i]), max(hi, self._ends[j - 1])
            kept = [(lo, hi)]
        else:
            kept = []
            if i < j and self._starts[i] < lo:
                kept.append((self._starts[i], lo))
            if i < j and self._ends[j - 1] > hi:
                kept.append((hi, self._ends[j - 1]))
        self._starts[i:j] = [a for a, _ in kept]
        self._ends[i:j] = [b for _, b in kept]

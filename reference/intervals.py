"""An immutable set of integers stored as sorted half-open intervals.

The reference keeps page attributes and accept states over ranges of up to
2^18 pages per op.  A per-page Python set would cost a loop of that length for
every ``set_attributes`` or 2M ``accept``; this representation costs a bisect
plus a rebuild proportional to the number of intervals, which stays small
because fuzzed programs convert and accept in ranges.  Being immutable, a set
is shared freely between copies of the reference.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right


class IntervalSet:
    """A set of integers; ``bounds`` alternates interval starts and ends.

    ``x`` is a member iff an odd number of bounds are <= x, i.e. x lies in
    some [bounds[2k], bounds[2k+1]).  Adjacent intervals are always merged,
    so equal sets have equal bounds.
    """

    __slots__ = ("_bounds",)

    def __init__(self, bounds: tuple = ()):
        self._bounds = bounds

    def __contains__(self, x: int) -> bool:
        return bisect_right(self._bounds, x) & 1 == 1

    def __eq__(self, other) -> bool:
        return isinstance(other, IntervalSet) and self._bounds == other._bounds

    def __hash__(self) -> int:
        return hash(self._bounds)

    def __bool__(self) -> bool:
        return bool(self._bounds)

    def __repr__(self) -> str:
        pairs = zip(self._bounds[::2], self._bounds[1::2])
        return "IntervalSet(" + ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in pairs) + ")"

    def covers(self, lo: int, hi: int) -> bool:
        """Every x in [lo, hi) is a member (hi > lo)."""
        i = bisect_right(self._bounds, lo)
        # Inside an interval, bounds[i] is its end.
        return i & 1 == 1 and self._bounds[i] >= hi

    def overlaps(self, lo: int, hi: int) -> bool:
        """Some x in [lo, hi) is a member (hi > lo)."""
        i = bisect_right(self._bounds, lo)
        # Outside every interval, bounds[i] (if any) is the next start.
        return i & 1 == 1 or (i < len(self._bounds) and self._bounds[i] < hi)

    def with_range(self, lo: int, hi: int) -> "IntervalSet":
        """This set plus [lo, hi)."""
        return self._replace(lo, hi, inside=True)

    def without_range(self, lo: int, hi: int) -> "IntervalSet":
        """This set minus [lo, hi)."""
        return self._replace(lo, hi, inside=False)

    def _replace(self, lo: int, hi: int, inside: bool) -> "IntervalSet":
        """Make [lo, hi) all members (``inside``) or all non-members.

        Bounds in [lo, hi] are dropped; ``lo`` becomes a bound iff the state
        just below it differs from the new state, ``hi`` iff the state at hi
        does.  The parity of i (j) is the old state below lo (at hi).
        """
        b = self._bounds
        i = bisect_left(b, lo)
        j = bisect_right(b, hi)
        head = (lo,) if (i & 1 == 1) != inside else ()
        tail = (hi,) if (j & 1 == 1) != inside else ()
        return IntervalSet(b[:i] + head + tail + b[j:])

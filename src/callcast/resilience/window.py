"""Counts over a sliding time window, in O(1) per update and read.

The window is cut into ``buckets`` slices of ``window / buckets`` seconds; a count lands in the
slice of its time, and a slice older than the window is dropped whole. A read therefore covers
between ``window - window / buckets`` and ``window`` seconds of history: coarse at the old edge,
exact everywhere else, and with no per-event memory.
"""

from __future__ import annotations


class SlidingCounts:
    """``kinds`` counters (indexed 0..kinds-1) summed over the last ``window`` seconds.

    Times are whatever clock the owner uses (monotonic seconds); they must not go backwards.
    """

    __slots__ = ("_buckets", "_current", "_slices", "_totals", "_width")

    def __init__(self, window: float, kinds: int, *, buckets: int = 10) -> None:
        if window <= 0 or buckets < 1 or kinds < 1:
            raise ValueError("need window > 0, buckets >= 1, kinds >= 1")
        self._width = window / buckets
        self._slices = buckets
        self._buckets = [[0] * kinds for _ in range(buckets)]
        self._totals = [0] * kinds
        self._current: int | None = None  # index (time // width) of the newest slice

    def add(self, kind: int, now: float, amount: int = 1) -> None:
        """Count ``amount`` of ``kind`` at time ``now``."""
        self._buckets[self._advance(now) % self._slices][kind] += amount
        self._totals[kind] += amount

    def total(self, kind: int, now: float) -> int:
        """The count of ``kind`` over the window ending at ``now``."""
        self._advance(now)
        return self._totals[kind]

    def clear(self) -> None:
        """Forget everything counted so far."""
        for bucket in self._buckets:
            bucket[:] = [0] * len(bucket)
        self._totals[:] = [0] * len(self._totals)

    def _advance(self, now: float) -> int:
        """Drop the slices that left the window at ``now``; the index of ``now``'s slice."""
        index = int(now // self._width)
        current = self._current
        if current == index:
            return index
        self._current = index
        if current is None:
            return index
        for stale in range(current + 1, current + 1 + min(index - current, self._slices)):
            bucket = self._buckets[stale % self._slices]
            for kind, count in enumerate(bucket):
                if count:
                    self._totals[kind] -= count
                    bucket[kind] = 0
        return index

"""A retry budget: retries of calls to one target stay a small fraction of the calls.

Per-call retry limits alone multiply the load on a struggling target by ``max_attempts``; a budget
caps the retries of all calls together: over the last ``window`` seconds,
``retries ≤ ratio × calls + floor``. The floor lets a quiet caller still retry now and then.
"""

from __future__ import annotations

from callcast.resilience.window import SlidingCounts

_CALLS = 0
_RETRIES = 1


class RetryBudget:
    """Counts calls and retries to one target; :meth:`try_spend` grants a retry or refuses it."""

    __slots__ = ("_counts", "denied", "floor", "ratio")

    def __init__(self, ratio: float, floor: int, window: float) -> None:
        self.ratio = ratio
        self.floor = floor
        self._counts = SlidingCounts(window, 2)
        self.denied = 0
        """Retries refused by the budget so far."""

    def record_call(self, now: float) -> None:
        """A call (its first attempt) is being made."""
        self._counts.add(_CALLS, now)

    def try_spend(self, now: float) -> bool:
        """Whether one more retry fits the budget at ``now``; if so it is counted as made."""
        counts = self._counts
        if counts.total(_RETRIES, now) + 1 > self.ratio * counts.total(_CALLS, now) + self.floor:
            self.denied += 1
            return False
        counts.add(_RETRIES, now)
        return True

"""A circuit breaker: stop calling a target that keeps failing, and find out when it is back.

States and transitions are those of :class:`~callcast.resilience.policy.BreakerPolicy`. The breaker
is driven by its owner: :meth:`CircuitBreaker.admit` before an attempt, then exactly one of
:meth:`~CircuitBreaker.succeeded`, :meth:`~CircuitBreaker.failed` or :meth:`~CircuitBreaker.abandoned`
with what ``admit`` returned. Results of attempts admitted in an earlier state (a slow call that
started while closed and ends while open) are counted in the totals but do not move the state.
Each transition is logged once, at WARNING when it opens and INFO otherwise.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import NamedTuple

from callcast.exceptions import CircuitOpenError
from callcast.resilience.policy import BreakerPolicy
from callcast.resilience.window import SlidingCounts

log = logging.getLogger("callcast.resilience")

_CALLS = 0
_FAILURES = 1
TRANSITIONS_KEPT = 100
"""How many of the latest transitions a breaker remembers for :class:`Transition` reports."""


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Transition(NamedTuple):
    """The breaker went from ``old`` to ``new`` at time ``at`` (the breaker's clock: monotonic s)."""

    at: float
    old: BreakerState
    new: BreakerState


class CircuitBreaker:
    """The breaker of one target. Not thread-safe: one event loop drives it."""

    __slots__ = (
        "_clock",
        "_counts",
        "_opened_at",
        "_probe_successes",
        "_probes_out",
        "policy",
        "rejected",
        "state",
        "target",
        "transitions",
    )

    def __init__(self, target: str, policy: BreakerPolicy, clock: Callable[[], float]) -> None:
        self.target = target
        self.policy = policy
        self._clock = clock
        self._counts = SlidingCounts(policy.window, 2)
        self.state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probes_out = 0
        self._probe_successes = 0
        self.rejected = 0
        """Calls refused with CircuitOpenError so far."""
        self.transitions: deque[Transition] = deque(maxlen=TRANSITIONS_KEPT)

    def admit(self, now: float) -> bool:
        """Let an attempt through, or raise :class:`~callcast.CircuitOpenError`. Returns whether
        the attempt is a half-open probe (pass it back with its result)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.OPEN:
            wait = self._opened_at + self.policy.cooldown - now
            if wait > 0:
                self.rejected += 1
                raise CircuitOpenError(
                    f"call to {self.target}: circuit open (it kept failing); next probe in {wait:.3g}s",
                    target=self.target,
                    retry_after=wait,
                )
            self._move(BreakerState.HALF_OPEN, now)
        if self._probes_out >= self.policy.probes:
            self.rejected += 1
            raise CircuitOpenError(
                f"call to {self.target}: circuit half-open, {self._probes_out} probe calls in flight",
                target=self.target,
                retry_after=0.0,
            )
        self._probes_out += 1
        return True

    def succeeded(self, probe: bool, now: float) -> None:
        """An admitted attempt succeeded (or got a 4xx answer: the target is healthy)."""
        if probe:
            self._probes_out -= 1
            if self.state is BreakerState.HALF_OPEN:
                self._probe_successes += 1
                if self._probe_successes >= self.policy.probes:
                    self._move(BreakerState.CLOSED, now)
        elif self.state is BreakerState.CLOSED:
            self._counts.add(_CALLS, now)

    def failed(self, probe: bool, now: float) -> None:
        """An admitted attempt failed: timed out, unreachable, or a 5xx answer."""
        if probe:
            self._probes_out -= 1
            if self.state is BreakerState.HALF_OPEN:
                self._move(BreakerState.OPEN, now)
            return
        if self.state is not BreakerState.CLOSED:
            return
        counts = self._counts
        counts.add(_CALLS, now)
        counts.add(_FAILURES, now)
        calls = counts.total(_CALLS, now)
        policy = self.policy
        if calls >= policy.min_calls and counts.total(_FAILURES, now) >= policy.failure_rate * calls:
            self._move(BreakerState.OPEN, now)

    def abandoned(self, probe: bool) -> None:
        """An admitted attempt ended without a verdict (its caller was cancelled)."""
        if probe:
            self._probes_out -= 1

    def failure_counts(self, now: float) -> tuple[int, int]:
        """(failures, calls) in the current window (closed state only; cleared on each transition)."""
        return self._counts.total(_FAILURES, now), self._counts.total(_CALLS, now)

    def retry_after(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 unless open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.policy.cooldown - now)

    def _move(self, new: BreakerState, now: float) -> None:
        old = self.state
        self.state = new
        self.transitions.append(Transition(now, old, new))
        if new is BreakerState.OPEN:
            failures, calls = self._counts.total(_FAILURES, now), self._counts.total(_CALLS, now)
            self._opened_at = now
            if old is BreakerState.CLOSED:
                log.warning(
                    "circuit to %s opened: %d of %d calls failed in %gs; failing fast for %gs",
                    self.target,
                    failures,
                    calls,
                    self.policy.window,
                    self.policy.cooldown,
                )
            else:
                log.warning("circuit to %s opened again: a probe call failed", self.target)
        elif new is BreakerState.HALF_OPEN:
            self._probe_successes = 0
            log.info(
                "circuit to %s half-open: letting %d probe calls through",
                self.target,
                self.policy.probes,
            )
        else:
            log.info("circuit to %s closed: %d probe calls succeeded", self.target, self.policy.probes)
        self._counts.clear()

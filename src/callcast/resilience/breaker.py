"""A circuit breaker: stop calling a target that keeps failing, and find out when it is back.

States and transitions are those of :class:`~callcast.resilience.policy.BreakerPolicy`. The breaker
is driven by its owner: :meth:`CircuitBreaker.admit` before an attempt, then exactly one of
:meth:`~CircuitBreaker.succeeded`, :meth:`~CircuitBreaker.failed` or :meth:`~CircuitBreaker.abandoned`
with what ``admit`` returned. Results of attempts admitted in an earlier state (a slow call that
started while closed and ends while open, or after the breaker closed again; a probe of an earlier
half-open period) do not move the state.
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
        "_admitted",
        "_clock",
        "_closed_period",
        "_counts",
        "_opened_at",
        "_trial",
        "_trial_calls",
        "_trial_failures",
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
        self._trial = 0  # numbers the half-open periods, so a late probe result is recognised
        self._closed_period = 0  # numbers the closed periods (tokens 0, -1, -2...), likewise
        self._admitted = 0  # probes let through in this half-open period (and not abandoned)
        self._trial_calls = 0
        self._trial_failures = 0
        self.rejected = 0
        """Calls refused with CircuitOpenError so far."""
        self.transitions: deque[Transition] = deque(maxlen=TRANSITIONS_KEPT)

    def admit(self, now: float) -> int:
        """Let an attempt through, or raise :class:`~callcast.CircuitOpenError`. Returns a token to
        pass back with the attempt's result: for a regular call 0 or less (minus the closed period
        it started in), else the half-open period the attempt probes (1 or more)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return -self._closed_period
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
        if self._admitted >= self.policy.probes:
            self.rejected += 1
            raise CircuitOpenError(
                f"call to {self.target}: circuit half-open, waiting for its {self._admitted} probe calls",
                target=self.target,
                retry_after=0.0,
            )
        self._admitted += 1
        return self._trial

    def succeeded(self, token: int, now: float) -> None:
        """An admitted attempt succeeded (or got a 4xx answer: the target is healthy)."""
        if token <= 0:
            if self._in_this_closed_period(token):
                self._counts.add(_CALLS, now)
        elif self._is_current(token):
            self._trial_calls += 1
            self._judge_trial(now)

    def failed(self, token: int, now: float) -> None:
        """An admitted attempt failed: timed out, unreachable, or a 5xx answer."""
        if token > 0:
            if self._is_current(token):
                self._trial_calls += 1
                self._trial_failures += 1
                self._judge_trial(now)
            return
        if not self._in_this_closed_period(token):
            return
        counts = self._counts
        counts.add(_CALLS, now)
        counts.add(_FAILURES, now)
        calls = counts.total(_CALLS, now)
        policy = self.policy
        if calls >= policy.min_calls and counts.total(_FAILURES, now) >= policy.failure_rate * calls:
            self._move(BreakerState.OPEN, now)

    def abandoned(self, token: int) -> None:
        """An admitted attempt ended without a verdict (its caller was cancelled): a probe's place
        goes to another call."""
        if token > 0 and self._is_current(token):
            self._admitted -= 1

    def _is_current(self, token: int) -> bool:
        return token == self._trial and self.state is BreakerState.HALF_OPEN

    def _in_this_closed_period(self, token: int) -> bool:
        return token == -self._closed_period and self.state is BreakerState.CLOSED

    def _judge_trial(self, now: float) -> None:
        policy = self.policy
        if self._trial_failures >= policy.failure_rate * policy.probes:
            self._move(BreakerState.OPEN, now)
        elif self._trial_calls >= policy.probes:
            self._move(BreakerState.CLOSED, now)

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
                log.warning(
                    "circuit to %s opened again: %d of %d probe calls failed",
                    self.target,
                    self._trial_failures,
                    self._trial_calls,
                )
        elif new is BreakerState.HALF_OPEN:
            self._trial += 1
            self._admitted = self._trial_calls = self._trial_failures = 0
            log.info(
                "circuit to %s half-open: letting %d probe calls through",
                self.target,
                self.policy.probes,
            )
        else:
            self._closed_period += 1
            log.info(
                "circuit to %s closed: %d of %d probe calls succeeded",
                self.target,
                self._trial_calls - self._trial_failures,
                self._trial_calls,
            )
        self._counts.clear()

"""The policies of one target put to work around each call: bulkhead, breaker, attempts, retries.

:meth:`TargetGuard.call` runs one call as a sequence of attempts. An attempt is a function of the
seconds it may take that returns the target's answer ``(status, body)`` or raises
:class:`~callcast.CallTimeoutError` (no answer in time) or :class:`~callcast.ServiceUnavailableError`
(not reachable). The guard decides whether the call may start (breaker, bulkhead), how long each
attempt may take (the call's deadline, the policy's ``attempt_timeout``), whether a failed attempt is
retried (idempotent, retryable, budget, deadline) and what the breaker learns from it. What it
returns or raises is what the last attempt gave, or :class:`~callcast.CircuitOpenError` /
:class:`~callcast.BulkheadFullError` when no attempt was made.

The bookkeeping per call is a few integer updates and clock reads: no logging, no allocation beyond
the call's own coroutine.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from callcast.exceptions import BulkheadFullError, CallError, RemoteError, ServiceUnavailableError
from callcast.resilience.breaker import BreakerState, CircuitBreaker, Transition
from callcast.resilience.budget import RetryBudget
from callcast.resilience.bulkhead import Bulkhead
from callcast.resilience.policy import DEFAULT_CALL_POLICY, CallPolicy

Attempt = Callable[[float], Awaitable[tuple[int, bytes]]]
"""One try of a call: given the seconds it may take, the answer's (status, body)."""

RETRYABLE_STATUSES = frozenset({502, 503, 504})
"""Answers another attempt may fix: the target (or what is in front of it) is failing for now."""
MIN_ATTEMPT_SECONDS = 0.005
"""A retry is not made unless at least this much of the deadline is left for it after its delay."""


@dataclass(frozen=True, slots=True)
class CallStats:
    """What one target's calls from this process did so far (a snapshot).

    ``calls``: calls started (``rejected_open`` + ``rejected_full`` of them were not made);
    ``attempts``: requests made, retries included; ``retries``: attempts after the first;
    ``retries_denied``: retries the budget refused; ``succeeded`` / ``failed``: calls that ended with
    an answer below 500 / with an error (refused ones included); ``unreachable``: attempts that found
    the target unreachable; ``timeouts``: attempts that got no answer in their time; ``in_flight``:
    calls holding a bulkhead slot now. ``transitions``: the breaker's latest state changes (monotonic times).
    """

    target: str
    state: BreakerState
    calls: int
    attempts: int
    retries: int
    retries_denied: int
    succeeded: int
    failed: int
    unreachable: int
    timeouts: int
    rejected_open: int
    rejected_full: int
    in_flight: int
    transitions: tuple[Transition, ...]


class TargetGuard:
    """The breaker, bulkhead, retry budget and counters of calls to one target service."""

    def __init__(
        self,
        target: str,
        policy: CallPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.target = target
        self.policy = policy
        self._clock = clock
        self._jitter = jitter
        self.breaker = None if policy.breaker is None else CircuitBreaker(target, policy.breaker, clock)
        bulkhead = policy.bulkhead
        self.bulkhead = None if bulkhead is None else Bulkhead(bulkhead.max_concurrent)
        retry = policy.retry
        self.budget = RetryBudget(retry.budget_ratio, retry.budget_floor, retry.budget_window)
        self.calls = 0
        self.attempts = 0
        self.retries = 0
        self.succeeded = 0
        self.failed = 0
        self.unreachable = 0
        self.timeouts = 0

    async def call(
        self, attempt: Attempt, budget: float, *, idempotent: bool, policy: CallPolicy | None = None
    ) -> tuple[int, bytes]:
        """Make the call within ``budget`` seconds: see the module docstring for the contract."""
        self.calls += 1
        clock = self._clock
        now = clock()
        end = now + budget
        breaker = self.breaker
        probe = 0
        if breaker is not None:
            try:
                probe = breaker.admit(now)
            except CallError:  # CircuitOpenError
                self.failed += 1
                raise
        bulkhead = self.bulkhead
        if bulkhead is not None and not bulkhead.try_enter():
            assert self.policy.bulkhead is not None
            try:
                entered = await bulkhead.enter(min(self.policy.bulkhead.max_wait, budget))
            except BaseException:
                if breaker is not None:
                    breaker.abandoned(probe)
                raise
            if not entered:
                if breaker is not None:
                    breaker.abandoned(probe)
                self.failed += 1
                raise BulkheadFullError(
                    f"call to {self.target}: {bulkhead.limit} calls in flight already",
                    target=self.target,
                    limit=bulkhead.limit,
                )
            now = clock()
        try:
            return await self._attempts(attempt, policy or self.policy, idempotent, probe, now, end)
        finally:
            if bulkhead is not None:
                bulkhead.leave()

    async def _attempts(
        self, attempt: Attempt, policy: CallPolicy, idempotent: bool, probe: int, now: float, end: float
    ) -> tuple[int, bytes]:
        clock = self._clock
        breaker = self.breaker
        retry = policy.retry
        # An attempt's own limit leaves time for retries: a call that gets none has all the time.
        attempt_timeout = policy.attempt_timeout if idempotent and retry.max_attempts > 1 else None
        self.budget.record_call(now)
        number = 1
        while True:
            self.attempts += 1
            left = end - now
            error: CallError | None = None
            try:
                status, body = await attempt(left if attempt_timeout is None else min(attempt_timeout, left))
            except ServiceUnavailableError as failure:
                self.unreachable += 1
                error = failure
            except RemoteError:  # an answer came that cannot be used (too large): no retry helps
                if breaker is not None:
                    breaker.failed(probe, clock())
                self.failed += 1
                raise
            except CallError as failure:  # CallTimeoutError: no answer within the attempt's time
                self.timeouts += 1
                error = failure
            except BaseException:
                if breaker is not None:
                    breaker.abandoned(probe)
                raise
            now = clock()
            if error is None and status < 500:
                self.succeeded += 1
                if breaker is not None:
                    breaker.succeeded(probe, now)
                return status, body
            if breaker is not None:
                breaker.failed(probe, now)
            retryable = error is not None or status in RETRYABLE_STATUSES
            if not (idempotent and retryable and number < retry.max_attempts):
                break
            delay = retry.ceiling(number) * self._jitter()
            if now + delay + MIN_ATTEMPT_SECONDS >= end or not self.budget.try_spend(now):
                break
            if delay > 0:
                await asyncio.sleep(delay)
                now = clock()
            if breaker is not None:
                try:
                    probe = breaker.admit(now)
                except CallError:  # opened meanwhile: no retry; the caller gets the real failure
                    break
            number += 1
            self.retries += 1
        self.failed += 1
        if error is not None:
            raise error
        return status, body

    def stats(self) -> CallStats:
        """A snapshot of the counters and the breaker state."""
        breaker = self.breaker
        return CallStats(
            target=self.target,
            state=BreakerState.CLOSED if breaker is None else breaker.state,
            calls=self.calls,
            attempts=self.attempts,
            retries=self.retries,
            retries_denied=self.budget.denied,
            succeeded=self.succeeded,
            failed=self.failed,
            unreachable=self.unreachable,
            timeouts=self.timeouts,
            rejected_open=0 if breaker is None else breaker.rejected,
            rejected_full=0 if self.bulkhead is None else self.bulkhead.rejected,
            in_flight=0 if self.bulkhead is None else self.bulkhead.in_flight,
            transitions=() if breaker is None else tuple(breaker.transitions),
        )


class CallGuards:
    """The guards of one process's outgoing calls, one per target service, made on first use.

    ``policies`` maps a target service to its :class:`CallPolicy`; ``"*"`` is the policy of targets
    not listed; without either, :data:`DEFAULT_CALL_POLICY`.
    """

    def __init__(
        self, policies: Mapping[str, CallPolicy] | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policies = dict(policies or {})
        self._fallback = self.policies.get("*", DEFAULT_CALL_POLICY)
        self._clock = clock
        self._guards: dict[str, TargetGuard] = {}

    def policy(self, target: str) -> CallPolicy:
        """The policy of calls to ``target``."""
        return self.policies.get(target, self._fallback)

    def guard(self, target: str) -> TargetGuard:
        """The guard of ``target`` (made on first use with ``target``'s policy)."""
        guard = self._guards.get(target)
        if guard is None:
            guard = self._guards[target] = TargetGuard(target, self.policy(target), clock=self._clock)
        return guard

    def stats(self) -> dict[str, CallStats]:
        """Per target called so far: its :class:`CallStats`."""
        return {target: guard.stats() for target, guard in self._guards.items()}

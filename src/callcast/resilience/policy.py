"""What a caller does around its calls to one target service: the policy objects (plain config).

::

    runtime = await app.start(call_policies={
        "payments": CallPolicy(timeout=2.0, attempt_timeout=0.5),
        "*": CallPolicy(breaker=BreakerPolicy(cooldown=10.0)),   # every other target
    })
    await ctx.call(payments.authorize, request)                       # the payments policy
    await ctx.call(payments.authorize, request, timeout=0.3, idempotent=True)  # this call only

A target without an entry (and without ``"*"``) gets ``CallPolicy()``: the defaults below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from callcast.exceptions import ConfigurationError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


@dataclass(frozen=True, slots=True)
class CallRetryPolicy:
    """Retries of calls marked idempotent (never of the others).

    An attempt that failed in a way another attempt may fix — the target unreachable, the attempt's
    time up while the call's deadline still allows another, or a 502/503/504 answer — is tried again
    after a delay drawn uniformly from ``[0, min(max_delay, base_delay × 2^(n-1))]`` ("full
    jitter") after the n-th attempt, up to ``max_attempts`` attempts, never past the call's deadline,
    and only while the target's retry budget allows: over the last ``budget_window`` seconds,
    retries ≤ ``budget_ratio`` × calls + ``budget_floor``. So a target that fails everything gets
    at most about ``1 + budget_ratio`` attempts per call, not ``max_attempts``. 4xx answers, 500s
    (the handler raised: it would again) and open circuits are never retried.
    """

    max_attempts: int = 3
    base_delay: float = 0.025
    max_delay: float = 1.0
    budget_ratio: float = 0.1
    budget_floor: int = 5
    budget_window: float = 10.0

    def __post_init__(self) -> None:
        _require(self.max_attempts >= 1, "CallRetryPolicy.max_attempts must be at least 1")
        _require(0 <= self.base_delay <= self.max_delay, "CallRetryPolicy needs 0 <= base_delay <= max_delay")
        _require(0 <= self.budget_ratio <= 1, "CallRetryPolicy.budget_ratio must be within [0, 1]")
        _require(self.budget_floor >= 0, "CallRetryPolicy.budget_floor must be >= 0")
        _require(self.budget_window > 0, "CallRetryPolicy.budget_window must be > 0")

    def ceiling(self, attempt: int) -> float:
        """The largest delay after the ``attempt``-th attempt failed."""
        return min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 60))


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """The circuit breaker of one target, in this process.

    Closed (calls go through) → open when, over the last ``window`` seconds, at least ``min_calls``
    calls completed and at least ``failure_rate`` of them failed. Open: calls fail at once with
    :class:`~callcast.CircuitOpenError`. After ``cooldown`` seconds, half-open: ``probes`` calls go
    through (others still fail fast) and are judged like the window: as soon as ``failure_rate`` ×
    ``probes`` of them failed it opens again for another ``cooldown``; when all ``probes`` completed
    with fewer failures it closes. So a target that is back but still fails now and then below the
    threshold is not kept out. Failures are timeouts, unreachable targets and 5xx answers; 4xx
    answers are successes (the target is healthy, the request was not).
    """

    failure_rate: float = 0.5
    min_calls: int = 20
    window: float = 10.0
    cooldown: float = 5.0
    probes: int = 5

    def __post_init__(self) -> None:
        _require(0 < self.failure_rate <= 1, "BreakerPolicy.failure_rate must be within (0, 1]")
        _require(self.min_calls >= 1, "BreakerPolicy.min_calls must be at least 1")
        _require(self.window > 0 and self.cooldown >= 0, "BreakerPolicy needs window > 0 and cooldown >= 0")
        _require(self.probes >= 1, "BreakerPolicy.probes must be at least 1")


@dataclass(frozen=True, slots=True)
class BulkheadPolicy:
    """A cap on the calls to one target in flight at once from this process.

    A call beyond ``max_concurrent`` waits for a slot, first come first served, for at most
    ``max_wait`` seconds (and never past its deadline); then it fails with
    :class:`~callcast.BulkheadFullError` without being made. ``max_wait=0`` fails fast.
    """

    max_concurrent: int = 256
    max_wait: float = 0.1

    def __post_init__(self) -> None:
        _require(self.max_concurrent >= 1, "BulkheadPolicy.max_concurrent must be at least 1")
        _require(self.max_wait >= 0, "BulkheadPolicy.max_wait must be >= 0")


@dataclass(frozen=True, slots=True)
class CallPolicy:
    """How calls to one target are made.

    ``timeout``: seconds a call may take in all (attempts and delays between them) unless the call
    passes its own; it is also capped by the caller's own deadline, and the remaining time travels
    with every attempt so the callee (and its callees) give up when the caller has.
    ``attempt_timeout``: seconds one attempt may take (``None``: all the time left), so a slow
    attempt of an idempotent call leaves time for another. ``retry``, ``breaker`` and ``bulkhead``:
    see their classes; ``breaker=None`` or ``bulkhead=None`` turns that one off.

    The breaker and bulkhead are shared by all calls to the target and use the *target's* policy;
    a policy passed to one call changes only that call's timeouts and retries.
    """

    timeout: float = 10.0
    attempt_timeout: float | None = None
    retry: CallRetryPolicy = field(default_factory=CallRetryPolicy)
    breaker: BreakerPolicy | None = field(default_factory=BreakerPolicy)
    bulkhead: BulkheadPolicy | None = field(default_factory=BulkheadPolicy)

    def __post_init__(self) -> None:
        finite = math.isfinite(self.timeout)
        _require(self.timeout > 0 and finite, "CallPolicy.timeout must be > 0 and finite")
        _require(
            self.attempt_timeout is None or self.attempt_timeout > 0, "CallPolicy.attempt_timeout must be > 0"
        )


DEFAULT_CALL_POLICY = CallPolicy()

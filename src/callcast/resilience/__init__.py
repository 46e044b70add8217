"""Policies on outgoing calls (``ctx.call``): deadline, retries, circuit breaker, bulkhead.

Every call to another service, over the broker or over HTTP, goes through the :class:`TargetGuard`
of its target service in this process, configured by a :class:`CallPolicy` (per target, through
``App.start(call_policies=...)``, or per call). In the order a call meets them:

1. deadline — the call's time is ``min(timeout, the caller's own remaining time)``; each attempt
   sends its own deadline (``deadline`` envelope extension, ``x-callcast-deadline`` header) so the
   callee, and whatever it calls, gives up when the caller has;
2. circuit breaker — :class:`CircuitBreaker`: fail fast with ``CircuitOpenError`` while the target
   keeps failing;
3. bulkhead — :class:`Bulkhead`: at most ``max_concurrent`` calls in flight, else a short wait,
   then ``BulkheadFullError``;
4. attempts and retries — idempotent calls only, exponential backoff with full jitter, within the
   call's deadline and the target's :class:`RetryBudget`.

``runtime.call_stats()`` reports each target's :class:`CallStats`.
"""

from callcast.resilience.breaker import BreakerState, CircuitBreaker, Transition
from callcast.resilience.budget import RetryBudget
from callcast.resilience.bulkhead import Bulkhead
from callcast.resilience.guard import CallGuards, CallStats, TargetGuard
from callcast.resilience.policy import (
    DEFAULT_CALL_POLICY,
    BreakerPolicy,
    BulkheadPolicy,
    CallPolicy,
    CallRetryPolicy,
)

__all__ = [
    "DEFAULT_CALL_POLICY",
    "BreakerPolicy",
    "BreakerState",
    "Bulkhead",
    "BulkheadPolicy",
    "CallGuards",
    "CallPolicy",
    "CallRetryPolicy",
    "CallStats",
    "CircuitBreaker",
    "RetryBudget",
    "TargetGuard",
    "Transition",
]

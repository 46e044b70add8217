"""Call policies: the sliding window, retry budget, circuit breaker and bulkhead (deterministic, on an
injected clock), the guard that combines them, and ``ctx.call`` end to end on the memory broker and
over HTTP: deadlines cut a call chain short, idempotent calls are retried, failures are callcast's."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from pydantic import BaseModel

from callcast import (
    App,
    BreakerPolicy,
    BulkheadFullError,
    BulkheadPolicy,
    CallPolicy,
    CallRetryPolicy,
    CallTimeoutError,
    CircuitOpenError,
    ConfigurationError,
    Context,
    HTTPError,
    RemoteError,
    Service,
    ServiceUnavailableError,
)
from callcast.resilience import BreakerState, Bulkhead, CircuitBreaker, RetryBudget, TargetGuard
from callcast.resilience.window import SlidingCounts
from callcast.waiting import within
from tests.unit.conftest import StartApp, client, wait_until


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- sliding window ---------------------------------------------------------------------------------


def test_sliding_counts_forget_what_left_the_window() -> None:
    counts = SlidingCounts(10.0, 2, buckets=10)
    counts.add(0, 100.0, 3)
    counts.add(1, 105.0)
    assert (counts.total(0, 105.0), counts.total(1, 105.0)) == (3, 1)
    assert counts.total(0, 110.5) == 0  # the slice of t=100 left the window
    assert counts.total(1, 110.5) == 1
    assert counts.total(1, 500.0) == 0  # a long gap clears everything


# -- retry budget -----------------------------------------------------------------------------------


def test_retry_budget_allows_ratio_of_calls_plus_floor_then_refills() -> None:
    budget = RetryBudget(ratio=0.1, floor=2, window=10.0)
    for _ in range(100):
        budget.record_call(50.0)
    granted = sum(budget.try_spend(50.0) for _ in range(50))
    assert granted == 12  # 0.1 × 100 + 2
    assert budget.denied == 38
    for _ in range(10):
        budget.record_call(61.0)  # the first 100 calls and their retries left the window
    assert sum(budget.try_spend(61.0) for _ in range(50)) == 3


# -- circuit breaker --------------------------------------------------------------------------------


def breaker(clock: Clock, probes: int = 2) -> CircuitBreaker:
    policy = BreakerPolicy(failure_rate=0.5, min_calls=4, window=10.0, cooldown=5.0, probes=probes)
    return CircuitBreaker("pay", policy, clock)


def test_breaker_stays_closed_below_min_calls_and_below_the_failure_rate() -> None:
    clock = Clock()
    cb = breaker(clock)
    for _ in range(3):
        assert cb.admit(clock()) == 0
        cb.failed(False, clock())
    assert cb.state is BreakerState.CLOSED  # 3 failures < min_calls
    for _ in range(4):
        cb.succeeded(False, clock())
    cb.failed(False, clock())  # 4 of 8 = 0.5 ≥ 0.5: opens
    assert cb.state is BreakerState.OPEN


def test_breaker_fails_fast_while_open_then_probes_and_closes(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    cb = breaker(clock, probes=3)
    with caplog.at_level(logging.INFO, logger="callcast.resilience"):
        for _ in range(4):
            assert cb.admit(clock()) == 0  # a regular call
            cb.failed(0, clock())
        assert cb.state is BreakerState.OPEN
        clock.now += 2.0
        with pytest.raises(CircuitOpenError) as caught:
            cb.admit(clock())
        assert caught.value.retry_after == pytest.approx(3.0)
        assert isinstance(caught.value, ServiceUnavailableError)
        clock.now += 3.0
        probes = [cb.admit(clock()) for _ in range(3)]
        assert probes == [1, 1, 1]  # probes of the first half-open period
        assert cb.state is BreakerState.HALF_OPEN
        with pytest.raises(CircuitOpenError):  # only `probes` calls while half-open
            cb.admit(clock())
        cb.succeeded(probes[0], clock())
        cb.failed(probes[1], clock())  # 1 failure < 0.5 × 3: not enough to open again
        assert cb.state is BreakerState.HALF_OPEN
        cb.succeeded(probes[2], clock())
        assert cb.state is BreakerState.CLOSED
    assert [(t.old, t.new) for t in cb.transitions] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    assert [t.at for t in cb.transitions] == [1000.0, 1005.0, 1005.0]
    assert cb.rejected == 2
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3  # one line per transition, none per call
    assert "circuit to pay opened: 4 of 4 calls failed" in messages[0]
    assert "closed: 2 of 3 probe calls succeeded" in messages[2]


def test_failed_probes_open_again_for_another_cooldown() -> None:
    clock = Clock()
    cb = breaker(clock, probes=3)
    for _ in range(4):
        cb.failed(cb.admit(clock()), clock())
    clock.now += 5.0
    first, second = cb.admit(clock()), cb.admit(clock())
    clock.now += 1.0
    cb.failed(first, clock())
    assert cb.state is BreakerState.HALF_OPEN
    cb.failed(second, clock())  # 2 ≥ 0.5 × 3: judged without waiting for the third
    assert cb.state is BreakerState.OPEN
    assert cb.retry_after(clock()) == pytest.approx(5.0)


def test_late_results_do_not_move_the_state() -> None:
    clock = Clock()
    cb = breaker(clock, probes=1)
    stale = cb.admit(clock())  # admitted while closed
    for _ in range(4):
        cb.failed(cb.admit(clock()), clock())
    clock.now += 5.0
    old_probe = cb.admit(clock())
    cb.succeeded(stale, clock())  # a slow call from before: not a probe, ignored
    assert cb.state is BreakerState.HALF_OPEN
    cb.abandoned(old_probe)  # the probe's caller was cancelled: its place goes to another call
    probe = cb.admit(clock())
    cb.failed(probe, clock())
    clock.now += 5.0
    new_probe = cb.admit(clock())
    assert new_probe != old_probe
    cb.succeeded(old_probe, clock())  # a probe of the earlier half-open period: ignored
    assert cb.state is BreakerState.HALF_OPEN
    cb.succeeded(new_probe, clock())
    assert cb.state is BreakerState.CLOSED


def test_calls_from_before_an_opening_do_not_open_it_again_once_it_closed() -> None:
    """Slow calls admitted while closed that time out after the breaker opened, probed and closed
    again belong to the earlier closed period: they do not count in the new one."""
    clock = Clock()
    cb = breaker(clock, probes=1)
    slow = [cb.admit(clock()) for _ in range(10)]
    for _ in range(4):
        cb.failed(cb.admit(clock()), clock())
    assert cb.state is BreakerState.OPEN
    clock.now += 5.0
    cb.succeeded(cb.admit(clock()), clock())
    assert cb.state is BreakerState.CLOSED
    for token in slow:
        cb.failed(token, clock())
    assert cb.state is BreakerState.CLOSED
    assert cb.failure_counts(clock()) == (0, 0)


async def test_4xx_answers_count_as_successes_so_the_breaker_stays_closed() -> None:
    async def bad_request(seconds: float) -> tuple[int, bytes]:
        return 422, b'{"error": "DecodeError", "detail": "no"}'

    guard = TargetGuard("pay", CallPolicy(breaker=BreakerPolicy(min_calls=2)))
    for _ in range(10):
        assert (await guard.call(bad_request, 1.0, idempotent=True))[0] == 422
    stats = guard.stats()
    assert stats.state is BreakerState.CLOSED
    assert (stats.calls, stats.attempts, stats.succeeded, stats.retries) == (10, 10, 10, 0)


# -- bulkhead ---------------------------------------------------------------------------------------


async def test_bulkhead_admits_up_to_its_limit_then_queues_then_refuses() -> None:
    bulkhead = Bulkhead(2)
    assert bulkhead.try_enter()
    assert bulkhead.try_enter()
    assert not bulkhead.try_enter()
    assert await bulkhead.enter(0) is False
    waiter = asyncio.create_task(bulkhead.enter(5.0))
    await asyncio.sleep(0)
    assert not waiter.done()
    bulkhead.leave()  # the slot goes to the waiter, not back to the pool
    assert await within(waiter, 1.0) is True
    assert bulkhead.in_flight == 2
    assert await bulkhead.enter(0.01) is False
    assert bulkhead.rejected == 2
    bulkhead.leave()
    bulkhead.leave()
    assert bulkhead.in_flight == 0


async def test_a_cancelled_waiter_takes_no_slot_with_it() -> None:
    bulkhead = Bulkhead(1)
    assert bulkhead.try_enter()
    waiter = asyncio.create_task(bulkhead.enter(5.0))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    bulkhead.leave()
    assert bulkhead.in_flight == 0
    assert bulkhead.try_enter()


# -- the guard --------------------------------------------------------------------------------------


class Script:
    """An attempt function answering from a list of outcomes (a status, or an exception to raise)."""

    def __init__(self, *outcomes: int | Exception) -> None:
        self.outcomes = list(outcomes)
        self.budgets: list[float] = []

    async def __call__(self, seconds: float) -> tuple[int, bytes]:
        self.budgets.append(seconds)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome, b"{}"


def unreachable() -> ServiceUnavailableError:
    return ServiceUnavailableError("call to pay.x: ConnectError", target="pay.x")


def no_jitter(max_attempts: int = 3) -> CallPolicy:
    return CallPolicy(retry=CallRetryPolicy(base_delay=0.0, max_attempts=max_attempts))


async def test_idempotent_calls_are_retried_until_an_answer() -> None:
    guard = TargetGuard("pay", no_jitter())
    script = Script(unreachable(), 503, 200)
    assert await guard.call(script, 1.0, idempotent=True) == (200, b"{}")
    stats = guard.stats()
    assert (stats.attempts, stats.retries, stats.unreachable, stats.succeeded) == (3, 2, 1, 1)


async def test_other_calls_are_made_once() -> None:
    guard = TargetGuard("pay", no_jitter())
    with pytest.raises(ServiceUnavailableError):
        await guard.call(Script(unreachable(), 200), 1.0, idempotent=False)
    assert guard.stats().attempts == 1


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500])
async def test_4xx_and_500_answers_are_not_retried(status: int) -> None:
    guard = TargetGuard("pay", no_jitter())
    script = Script(status, 200)
    assert (await guard.call(script, 1.0, idempotent=True))[0] == status
    assert len(script.budgets) == 1


async def test_an_answer_that_cannot_be_used_is_a_failure_not_a_timeout_and_not_retried() -> None:
    guard = TargetGuard("pay", no_jitter())
    too_large = RemoteError(
        "pay.x answered more than 1 MiB", target="pay.x", status=502, error_type="TooLarge"
    )
    script = Script(too_large, 200)
    with pytest.raises(RemoteError):
        await guard.call(script, 1.0, idempotent=True)
    stats = guard.stats()
    assert (len(script.budgets), stats.timeouts, stats.failed) == (1, 0, 1)


async def test_a_call_that_cannot_be_retried_gets_all_its_time_in_one_attempt() -> None:
    guard = TargetGuard("pay", CallPolicy(attempt_timeout=0.1, retry=CallRetryPolicy(base_delay=0.0)))
    once, retried = Script(200), Script(200)
    await guard.call(once, 2.0, idempotent=False)
    await guard.call(retried, 2.0, idempotent=True)
    assert once.budgets[0] > 1.9
    assert retried.budgets == [0.1]


async def test_max_attempts_bounds_one_call() -> None:
    guard = TargetGuard("pay", no_jitter(max_attempts=4))
    script = Script(504)
    assert (await guard.call(script, 1.0, idempotent=True))[0] == 504
    assert len(script.budgets) == 4


async def test_the_retry_budget_caps_retries_over_all_calls() -> None:
    policy = CallPolicy(
        retry=CallRetryPolicy(base_delay=0.0, max_attempts=5, budget_ratio=0.1, budget_floor=0),
        breaker=None,
    )
    guard = TargetGuard("pay", policy)
    for _ in range(100):
        with pytest.raises(ServiceUnavailableError):
            await guard.call(Script(unreachable()), 1.0, idempotent=True)
    stats = guard.stats()
    assert stats.calls == 100
    assert stats.attempts <= 110  # not 500: retries ≤ 10 % of calls
    assert stats.retries_denied >= 90


async def test_attempts_share_the_call_deadline_and_no_retry_is_made_past_it() -> None:
    clock = Clock()
    policy = CallPolicy(attempt_timeout=0.3, retry=CallRetryPolicy(base_delay=0.0, max_attempts=5))

    async def slow(seconds: float) -> tuple[int, bytes]:
        budgets.append(seconds)
        clock.now += seconds  # the attempt used all its time
        raise CallTimeoutError("call to pay.x: no answer", target="pay.x")

    budgets: list[float] = []
    guard = TargetGuard("pay", policy, clock=clock)
    with pytest.raises(CallTimeoutError):
        await guard.call(slow, 0.7, idempotent=True)
    assert budgets == pytest.approx([0.3, 0.3, 0.1])  # the third gets what is left of 0.7 s
    assert guard.stats().timeouts == 3


async def test_an_open_breaker_refuses_without_an_attempt() -> None:
    policy = CallPolicy(
        breaker=BreakerPolicy(min_calls=3, cooldown=60), retry=CallRetryPolicy(max_attempts=1)
    )
    guard = TargetGuard("pay", policy)
    script = Script(unreachable())
    for _ in range(3):
        with pytest.raises(ServiceUnavailableError):
            await guard.call(script, 1.0, idempotent=True)
    with pytest.raises(CircuitOpenError, match="circuit open"):
        await guard.call(script, 1.0, idempotent=True)
    stats = guard.stats()
    assert len(script.budgets) == 3
    assert (stats.state, stats.rejected_open, stats.calls, stats.failed) == (BreakerState.OPEN, 1, 4, 4)


async def test_a_full_bulkhead_refuses_after_its_wait() -> None:
    guard = TargetGuard("pay", CallPolicy(bulkhead=BulkheadPolicy(max_concurrent=1, max_wait=0.02)))
    release = asyncio.Event()

    async def held(seconds: float) -> tuple[int, bytes]:
        await release.wait()
        return 200, b"{}"

    first = asyncio.create_task(guard.call(held, 5.0, idempotent=False))
    await asyncio.sleep(0)
    with pytest.raises(BulkheadFullError) as caught:
        await guard.call(held, 5.0, idempotent=False)
    assert caught.value.limit == 1
    assert guard.stats().in_flight == 1
    release.set()
    assert await within(first, 1.0) == (200, b"{}")
    assert (guard.stats().rejected_full, guard.stats().in_flight) == (1, 0)


def test_policies_refuse_nonsense() -> None:
    with pytest.raises(ConfigurationError):
        CallPolicy(timeout=0)
    with pytest.raises(ConfigurationError):
        BreakerPolicy(failure_rate=1.5)
    with pytest.raises(ConfigurationError):
        CallRetryPolicy(max_attempts=0)
    with pytest.raises(ConfigurationError):
        BulkheadPolicy(max_concurrent=0)


# -- ctx.call end to end ----------------------------------------------------------------------------


class Work(BaseModel):
    seconds: float = 0.0
    key: str = ""


class Done(BaseModel):
    deadline: float | None


class Seen:
    """What the services of the chain observed."""

    def __init__(self) -> None:
        self.c_deadline: float | None = None
        self.c_cancelled_at: float | None = None
        self.b_gave_up_at: float | None = None
        self.failures: dict[str, int] = {}


seen = Seen()
svc_c = Service("c")
svc_b = Service("b", calls=["c"])
svc_a = Service("a", calls=["b", "c"])


@svc_c.rpc
async def slow(req: Work, ctx: Context) -> Done:
    seen.c_deadline = ctx.deadline
    try:
        await asyncio.sleep(req.seconds)
    except asyncio.CancelledError:
        seen.c_cancelled_at = time.time()
        raise
    return Done(deadline=ctx.deadline)


@svc_c.rpc(idempotent=True)
async def flaky(req: Work, ctx: Context) -> Done:
    """Fails with 503 the first time it sees a key, then answers."""
    count = seen.failures.get(req.key, 0)
    seen.failures[req.key] = count + 1
    if count == 0:
        raise HTTPError(503, "warming up")
    return Done(deadline=ctx.deadline)


@svc_b.rpc
async def relay(req: Work, ctx: Context) -> Done:
    try:
        return await ctx.call(slow, req, timeout=30)  # capped by the caller's deadline
    except (CallTimeoutError, asyncio.CancelledError):  # its own call's timeout, or its deadline
        seen.b_gave_up_at = time.time()
        raise


@svc_a.get("/through")
async def through(ctx: Context) -> Done:
    return await ctx.call(flaky, Work(key="route"), idempotent=False)


chain = App([svc_a, svc_b, svc_c], name="chain")


async def assert_the_chain_gives_up_at_the_first_deadline(ctx: Context) -> None:
    global seen
    seen = Seen()
    began = time.time()
    with pytest.raises(CallTimeoutError):
        await ctx.call(relay, Work(seconds=5), timeout=0.3)
    ended = time.time()
    # Margins for a loaded machine: the work takes 5 s, and B, left alone, would wait 30 s for C.
    assert ended - began < 0.3 + 1.0, "A waited well past its deadline"
    assert seen.c_deadline is not None
    assert abs(seen.c_deadline - (began + 0.3)) < 0.5, "C did not get A's deadline"
    await wait_until(lambda: seen.c_cancelled_at is not None and seen.b_gave_up_at is not None, 2.0)
    assert seen.c_cancelled_at is not None
    assert seen.c_cancelled_at < began + 0.3 + 1.0, "C worked on past A's deadline"
    assert seen.b_gave_up_at is not None
    assert seen.b_gave_up_at < began + 0.3 + 1.0, "B waited for C past A's deadline"


async def test_a_chain_over_the_broker_gives_up_when_the_first_callers_deadline_passes(
    start: StartApp,
) -> None:
    runtime = await start(chain)
    await assert_the_chain_gives_up_at_the_first_deadline(runtime.context("a"))


async def test_a_chain_over_http_gives_up_when_the_first_callers_deadline_passes(start: StartApp) -> None:
    c = await start(chain, services=["c"])
    await c.serve_http("127.0.0.1", 0)
    b = await start(chain, services=["b"], service_urls={"c": f"http://127.0.0.1:{c.http_port}"})
    await b.serve_http("127.0.0.1", 0)
    a = await start(chain, services=["a"], service_urls={"b": f"http://127.0.0.1:{b.http_port}"})
    await assert_the_chain_gives_up_at_the_first_deadline(a.context("a"))


async def test_an_idempotent_endpoint_is_retried_and_a_plain_call_is_not(start: StartApp) -> None:
    global seen
    seen = Seen()
    runtime = await start(chain, services=["a", "c"])
    ctx = runtime.context("a")
    assert (await ctx.call(flaky, Work(key="k1"), timeout=2)).deadline is not None
    assert seen.failures["k1"] == 2
    with pytest.raises(RemoteError) as caught:
        await ctx.call(flaky, Work(key="k2"), timeout=2, idempotent=False)
    assert caught.value.status == 503
    assert "warming up" in str(caught.value)
    stats = runtime.call_stats()["c"]
    assert (stats.calls, stats.attempts, stats.retries) == (2, 3, 1)


async def test_a_policy_per_target_and_per_call(start: StartApp) -> None:
    global seen
    seen = Seen()
    runtime = await start(
        chain,
        services=["a", "c"],
        call_policies={"c": CallPolicy(timeout=0.2, retry=CallRetryPolicy(max_attempts=1))},
    )
    ctx = runtime.context("a")
    began = time.monotonic()
    with pytest.raises(CallTimeoutError):
        await ctx.call(slow, Work(seconds=5))  # the target's timeout: 0.2 s
    assert time.monotonic() - began < 0.9  # not the default policy's (3 s)
    with pytest.raises(RemoteError):
        await ctx.call(flaky, Work(key="k3"))  # the target's policy: one attempt
    assert (await ctx.call(flaky, Work(key="k4"), policy=CallPolicy())).deadline is not None
    assert seen.failures["k4"] == 2


async def test_an_open_circuit_fails_fast_and_a_route_answers_503(start: StartApp) -> None:
    runtime = await start(
        chain,
        services=["a"],
        service_urls={"c": "http://127.0.0.1:9"},  # nothing listens there: connection refused
        call_policies={"c": CallPolicy(breaker=BreakerPolicy(min_calls=3, cooldown=60))},
    )
    ctx = runtime.context("a")
    for _ in range(3):
        with pytest.raises(ServiceUnavailableError):
            await ctx.call(slow, Work(), timeout=2)
    attempts = runtime.call_stats()["c"].attempts
    with pytest.raises(CircuitOpenError):
        await ctx.call(slow, Work(), timeout=2)
    assert runtime.call_stats()["c"].attempts == attempts  # refused without an attempt
    async with client(runtime) as http:
        response = await http.get("/through")
    assert response.status_code == 503
    assert "circuit open" in response.json()["detail"]
    stats = runtime.call_stats()["c"]
    assert stats.state is BreakerState.OPEN
    assert (stats.unreachable, stats.rejected_open) == (3, 2)


async def test_the_apps_policies_apply_and_start_overrides_them(start: StartApp) -> None:
    slow_c = CallPolicy(timeout=0.2)
    app = App([svc_a, svc_b, svc_c], name="chain", call_policies={"c": slow_c, "*": CallPolicy(timeout=3)})
    runtime = await start(app, services=["a", "c"], call_policies={"b": CallPolicy(timeout=1)})
    assert runtime.rpc.guards.policy("c") is slow_c
    assert runtime.rpc.guards.policy("b").timeout == 1
    assert runtime.rpc.guards.policy("elsewhere").timeout == 3
    began = time.monotonic()
    with pytest.raises(CallTimeoutError):
        await runtime.context("a").call(slow, Work(seconds=5))
    assert time.monotonic() - began < 0.9  # the policy of c (0.2 s), not b's (1 s)


def test_call_policies_must_name_services_of_the_app() -> None:
    with pytest.raises(ConfigurationError, match="no service"):
        App([svc_c], call_policies={"payment": CallPolicy()})

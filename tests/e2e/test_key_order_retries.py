"""Per-key order through retries on the real brokers that do not keep it themselves (RabbitMQ, NATS,
Redis): the consumer's key gate keeps it within a process, and a failing keyed message is retried in
its lane, so the ones behind it wait for it even when they fill the handler's prefetch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from callcast import App, Context, RetryPolicy, Runtime, Service
from callcast.brokers import connect
from callcast.consumer import Consumer
from tests.real_brokers import BROKERS, new_run
from tests.unit.conftest import wait_until

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.05, max_delay=0.2)


class Step(BaseModel):
    account: str
    n: int


producer = Service("producer", publishes=[Step])
worker = Service("worker")
runs: dict[str, list[tuple[str, int]]] = {"narrow": [], "wide": [], "patient": []}
"""Per handler, the (account, step) of each run, in the order they started."""
failures_left: dict[tuple[str, str, int], int] = {}
"""(handler, account, step) -> runs of it that fail before one succeeds."""
attempts: dict[tuple[str, str, int], list[int]] = {}
"""(handler, account, step) -> ``ctx.attempt`` of each of its runs."""


async def _run(handler: str, event: Step, ctx: Context) -> None:
    runs[handler].append((event.account, event.n))
    attempts.setdefault((handler, event.account, event.n), []).append(ctx.attempt)
    left = failures_left.get((handler, event.account, event.n), 0)
    if left:
        failures_left[(handler, event.account, event.n)] = left - 1
        raise RuntimeError(f"step {event.n} of {event.account} fails {left} more time(s)")


@worker.on(Step, name="narrow", concurrency=1, retry=FAST_RETRY)
async def narrow(event: Step, ctx: Context) -> None:
    await _run("narrow", event, ctx)


@worker.on(Step, name="wide", concurrency=3, retry=FAST_RETRY)
async def wide(event: Step, ctx: Context) -> None:
    await _run("wide", event, ctx)


@worker.on(Step, name="patient", concurrency=3, retry=RetryPolicy(base_delay=20.0, max_delay=30.0))
async def patient(event: Step, ctx: Context) -> None:
    """Its first retry comes after 10 to 20 s: in its lane (``LANE_TIME``), and after the stop."""
    await _run("patient", event, ctx)


app = App([producer, worker], name="keyorder")


@pytest.fixture(
    params=[
        pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
async def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Runtime]:
    """The app on one real broker, in a namespace of this test's own."""
    target = BROKERS[request.param]
    target.require()
    run = new_run()
    broker = await connect(target.url(run))
    assert not broker.capabilities.ordered_per_key  # the gate's case
    for handler_runs in runs.values():
        handler_runs.clear()
    failures_left.clear()
    attempts.clear()
    started: Runtime | None = None
    try:
        started = await app.start(broker=broker, data_dir=tmp_path)
        yield started
    finally:
        if started is not None:
            await started.stop(grace=1)
        await broker.close()
        await target.cleanup(run)


def steps(handler: str, account: str) -> list[int]:
    return [n for name, n in runs[handler] if name == account]


def consumer_of(runtime: Runtime, handler: str) -> Consumer:
    for consumer in runtime._consumers:
        if isinstance(consumer, Consumer) and consumer.handler.group.endswith(f".{handler}"):
            return consumer
    raise AssertionError(f"no consumer for {handler}")


def stats(runtime: Runtime, handler: str) -> dict[str, int]:
    """The outcome counts of ``handler``'s consumer."""
    return dict(consumer_of(runtime, handler).stats)


async def test_a_retried_message_runs_before_the_later_ones_of_its_key(runtime: Runtime) -> None:
    """Step 1 of ``a`` fails twice. Sent back to the broker, its slot went to a step behind it (with
    ``concurrency=1`` the only slot; with 3, the steps of ``a`` filled them all), so it could not
    come back before its key's hold ran out, and the later steps ran first. Retried in its lane,
    it runs before them."""
    for handler in ("narrow", "wide"):
        failures_left[(handler, "a", 1)] = 2
    ctx = runtime.context("producer")
    for n in range(1, 6):
        await ctx.publish(Step(account="a", n=n), key="a")
    for n in range(1, 3):
        await ctx.publish(Step(account="b", n=n), key="b")
    await wait_until(
        lambda: all(len(steps(h, "a")) == 7 and len(steps(h, "b")) == 2 for h in ("narrow", "wide")),
        timeout=20,
    )
    for handler in ("narrow", "wide"):
        assert steps(handler, "a") == [1, 1, 1, 2, 3, 4, 5], handler
        assert steps(handler, "b") == [1, 2], handler
        assert attempts[(handler, "a", 1)] == [1, 2, 3], handler  # retries in the lane count
    assert stats(runtime, "narrow")["retried"] == 2


async def test_a_message_out_of_attempts_is_dead_lettered_and_its_key_goes_on(runtime: Runtime) -> None:
    """Runs retried in the lane count against ``max_attempts`` like retries through the broker."""
    failures_left[("narrow", "a", 1)] = 10
    ctx = runtime.context("producer")
    for n in range(1, 3):
        await ctx.publish(Step(account="a", n=n), key="a")
    await wait_until(lambda: len(steps("narrow", "a")) == 5, timeout=20)
    assert steps("narrow", "a") == [1, 1, 1, 1, 2]
    counts = stats(runtime, "narrow")
    assert (counts["retried"], counts["dead_lettered"]) == (3, 1)


async def test_a_stop_during_a_retry_wait_gives_the_message_back_first_of_its_key(
    runtime: Runtime, tmp_path: Path
) -> None:
    """The consumer stops while step 1 waits out its retry delay in its lane: it goes back to the
    broker unsettled; step 2, delivered and waiting for its turn, does not run before it here; the
    next process runs both. (In what order is the broker's: RabbitMQ puts a requeued delivery
    behind the ones waiting.)"""
    failures_left[("patient", "a", 1)] = 1
    ctx = runtime.context("producer")
    for n in range(1, 3):
        await ctx.publish(Step(account="a", n=n), key="a")
    consumer, broker = consumer_of(runtime, "patient"), runtime.broker
    await wait_until(lambda: steps("patient", "a") == [1] and consumer.stats["retried"] == 1)
    gate = consumer._gate
    assert gate is not None
    await wait_until(lambda: "a" in gate._lanes and len(gate._lanes["a"].tickets) == 1)  # step 2 waits
    await runtime.stop(grace=0.5)
    assert steps("patient", "a") == [1]
    assert consumer.stats["handled"] == 0
    again = await app.start(broker=broker, data_dir=tmp_path / "next", services=["worker"])
    try:
        await wait_until(lambda: len(steps("patient", "a")) == 3, timeout=20)
    finally:
        await again.stop(grace=1)
    assert sorted(steps("patient", "a")) == [1, 1, 2]

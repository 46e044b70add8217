"""The workloads a trial runs on one implementation, each bounded in count and time.

Every function returns a dict of figures (the metric names of the result rows) plus ``"notes"``,
a list of strings saying what went short (a deadline reached before the last message, errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from bench.payload import Event, Ping, make_event
from bench.sides import Pipe, RpcPair
from bench.stats import percentile
from callcast.waiting import wait_event, within

BACKLOG_PUBLISH_LIMIT = 60.0
"""Seconds a backlogged throughput trial waits for its publishes before handling starts regardless."""


async def _stop(task: asyncio.Task[Any], timeout: float) -> None:
    """Wait up to ``timeout`` for ``task``, then cancel it."""
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await within(asyncio.shield(task), timeout)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def throughput(
    pipe: Pipe,
    *,
    count: int,
    window: int,
    deadline: float,
    sleep: float = 0.0,
    backlogged: bool = False,
) -> dict[str, Any]:
    """Publish ``count`` events (``window`` in flight) to a running consumer whose handler awaits
    ``asyncio.sleep(sleep)`` when ``sleep`` > 0; messages/s from the first publish to the last
    handled, or to ``deadline`` seconds if that came first (counting what was handled).

    ``backlogged``: handlers wait (holding what the consumer took) until every event is published,
    and the clock starts then: the rate of handling a backlog, which the publish rate does not cap."""
    handled = 0
    done = asyncio.Event()
    released = asyncio.Event()
    if not backlogged:
        released.set()

    async def handler(event: Event) -> None:
        nonlocal handled
        if not released.is_set():
            await released.wait()
        if sleep:
            await asyncio.sleep(sleep)
        handled += 1
        if handled >= count:
            done.set()

    await pipe.open(handler)
    events = [make_event(seq) for seq in range(count)]
    started = time.perf_counter()
    publishing = asyncio.create_task(pipe.publish_all(events, window))
    notes: list[str] = []
    if backlogged:
        await _stop(publishing, BACKLOG_PUBLISH_LIMIT)
        started = time.perf_counter()
        released.set()
    complete = await wait_event(done, deadline)
    elapsed = time.perf_counter() - started
    seen = handled
    if not complete:
        notes.append(f"deadline: {seen}/{count} handled in {elapsed:.1f}s")
    await _stop(publishing, 0.0 if not complete else 5.0)
    if publishing.cancelled():
        notes.append("publishing did not finish")
    elif publishing.exception() is not None:
        notes.append(f"publish failed: {publishing.exception()!r}")
    return {"throughput": seen / elapsed, "handled": seen, "notes": notes}


async def latency(
    pipe: Pipe, *, rate: float, seconds: float, warmup: float, deadline: float
) -> dict[str, Any]:
    """Publish at ``rate`` per second, open loop (each publish starts on schedule, whether or not
    earlier ones returned), for ``warmup + seconds``; the latency of an event is from the moment its
    publish started (``sent_at`` in the payload) to the start of the handler. Events of the warm-up
    are not counted. p50/p99 in milliseconds."""
    total = int(rate * (warmup + seconds))
    first_counted = int(rate * warmup)
    samples: list[float] = []
    handled = 0
    last_arrival = 0.0
    done = asyncio.Event()

    async def handler(event: Event) -> None:
        nonlocal handled, last_arrival
        arrived = last_arrival = time.perf_counter()
        if event.seq >= first_counted:
            samples.append(arrived - event.sent_at)
        handled += 1
        if handled >= total:
            done.set()

    await pipe.open(handler)
    in_flight: set[asyncio.Task[None]] = set()
    failures = 0

    def finished(task: asyncio.Task[None]) -> None:
        nonlocal failures
        in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures += 1

    started = time.perf_counter()
    for seq in range(total):
        pause = started + seq / rate - time.perf_counter()
        if pause > 0:
            await asyncio.sleep(pause)
        task = asyncio.create_task(pipe.publish(make_event(seq)))
        in_flight.add(task)
        task.add_done_callback(finished)
    complete = await wait_event(done, deadline)
    notes = [] if complete else [f"deadline: {handled}/{total} handled"]
    if failures:
        notes.append(f"{failures} publishes failed")
    lag = last_arrival - (started + total / rate)
    if lag > 1.0:
        notes.append(f"fell behind {rate:,.0f}/s: the last event arrived {lag:.1f}s late (queueing)")
    for task in list(in_flight):
        task.cancel()
    achieved = total / max(1e-9, time.perf_counter() - started)
    return {
        "p50": _ms(percentile(samples, 0.50)),
        "p99": _ms(percentile(samples, 0.99)),
        "achieved_rate": achieved,
        "notes": notes,
    }


async def rpc(pair: RpcPair, *, seconds: float, warmup: float) -> dict[str, Any]:
    """Calls/s and p50/p99 (ms) with 1 sequential caller, then with 64 concurrent callers, each
    phase ``seconds`` long after ``warmup`` seconds of the same load that is not counted."""
    await pair.open()
    figures: dict[str, Any] = {"notes": []}
    for callers in (1, 64):
        await _callers(pair, callers, warmup)
        durations, failures, elapsed = await _callers(pair, callers, seconds)
        figures[f"throughput_c{callers}"] = len(durations) / elapsed
        figures[f"p50_c{callers}"] = _ms(percentile(durations, 0.50))
        figures[f"p99_c{callers}"] = _ms(percentile(durations, 0.99))
        if failures:
            figures["notes"].append(f"{callers} callers: {failures} calls failed")
    return figures


async def _callers(pair: RpcPair, callers: int, seconds: float) -> tuple[list[float], int, float]:
    """Run ``callers`` callers, each calling in a loop until ``seconds`` passed."""
    durations: list[float] = []
    failures = 0
    started = time.perf_counter()
    stop_at = started + seconds

    async def caller(number: int) -> None:
        nonlocal failures
        seq = number * 10_000_000
        while time.perf_counter() < stop_at:
            seq += 1
            begun = time.perf_counter()
            try:
                await pair.call(Ping(seq=seq, order_id=f"ord-{seq:012d}", amount_cents=seq % 100_000))
            except Exception:
                failures += 1
                if failures > 100:
                    return
                continue
            durations.append(time.perf_counter() - begun)

    await asyncio.gather(*(caller(n) for n in range(callers)))
    return durations, failures, time.perf_counter() - started


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0

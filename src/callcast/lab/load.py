"""The open-loop load generator: requests leave on a fixed schedule, answered or not.

A closed loop (each client waits for its answer before sending the next request) slows down with
the system it measures, so a slow system is offered less load and looks better than it is. Here
request *i* is sent at its scheduled offset whatever the outstanding requests are doing; the count
is bounded (``max_requests``) and so is each request's wait (``timeout``). The generator records
how late it sent each request (its own lag), so an overloaded measuring process shows itself.

Times are wall-clock (``time.time()``), the clock the downstream effects are stamped with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx


@dataclass
class RequestRecord:
    """One user request: when it left, when its answer (or failure) came, and the HTTP status
    (0: no HTTP answer at all — refused, reset or timed out)."""

    order_id: str
    sent_at: float
    answered_at: float
    status: int
    lag: float
    """Seconds the request left after its scheduled time."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def latency(self) -> float:
        return self.answered_at - self.sent_at


@dataclass
class Target:
    """Where the requests go; the orchestrator may point it elsewhere mid-run (a redeploy)."""

    base_url: str


@dataclass(frozen=True)
class Spike:
    """The arrival rate is multiplied by ``factor`` between ``start`` and ``end`` (seconds)."""

    start: float
    end: float
    factor: float


def arrival_offsets(
    duration: float, rate: float, *, spike: Spike | None = None, max_requests: int = 100_000
) -> list[float]:
    """Evenly spaced send times (seconds from the start) at ``rate`` per second for ``duration``
    seconds, faster inside ``spike``; at most ``max_requests`` of them."""
    if rate <= 0 or duration <= 0:
        raise ValueError("rate and duration must be positive")
    offsets: list[float] = []
    moment = 0.0
    while moment < duration and len(offsets) < max_requests:
        offsets.append(moment)
        current = rate
        if spike is not None and spike.start <= moment < spike.end:
            current = rate * spike.factor
        moment += 1.0 / current
    return offsets


def honour_cancellation() -> None:
    """Raise :class:`asyncio.CancelledError` if the current task was asked to cancel yet carries on.

    Python 3.11's ``asyncio.wait_for`` drops a cancellation that arrives just as what it waits for
    completes (3.12 fixed it), so a Ctrl-C can be lost somewhere in a library; the lab's loops call
    this at each step, so an interrupted run still stops (and cleans up) within a step."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def run_open_loop(
    client: httpx.AsyncClient,
    target: Target,
    offsets: list[float],
    order_id: Callable[[int], str],
    *,
    timeout: float,
    answered: Callable[[], None] | None = None,
) -> list[RequestRecord]:
    """POST ``/orders`` at each offset; every request's record, in send order, once all finished."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task[RequestRecord]] = []
    for index, offset in enumerate(offsets):
        honour_cancellation()
        wait = start + offset - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        lag = max(0.0, loop.time() - start - offset)
        tasks.append(asyncio.create_task(_send(client, target, order_id(index), timeout, lag, answered)))
    return list(await asyncio.gather(*tasks))


async def _send(
    client: httpx.AsyncClient,
    target: Target,
    order_id: str,
    timeout: float,
    lag: float,
    answered: Callable[[], None] | None,
) -> RequestRecord:
    sent_at = time.time()
    status = 0
    try:
        response = await client.post(
            f"{target.base_url}/orders", json={"order_id": order_id, "amount_cents": 1999}, timeout=timeout
        )
        status = response.status_code
    except httpx.HTTPError:
        status = 0
    record = RequestRecord(order_id, sent_at, time.time(), status, lag)
    if answered is not None:
        answered()
    return record

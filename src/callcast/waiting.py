"""Waiting with a deadline without losing a cancellation.

On Python 3.11, ``asyncio.wait_for`` returns the inner result when a cancellation and the inner
completion race (the cancellation is swallowed), so a task stopped at that moment keeps running and
whoever awaits it hangs. Everything in callcast that waits on an event with a timeout goes through
:func:`wait_event`, and everything that awaits with a deadline through :func:`within`, both built
on ``asyncio.timeout``, which keeps an outside cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds passed (``None``: no limit); whether it is set."""
    if event.is_set():
        await asyncio.sleep(0)  # still yield, so a caller looping on a set event cannot starve the loop
        return True
    if timeout is None:
        await event.wait()
        return True
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """``await awaitable`` with a deadline (``TimeoutError`` after ``timeout`` seconds): what
    ``asyncio.wait_for`` does, without swallowing an outside cancellation."""
    async with asyncio.timeout(timeout):
        return await awaitable


def retrieved(task: asyncio.Future[T]) -> None:
    """A done callback for a task whose outcome its waiters take (e.g. through ``asyncio.shield``):
    marks a failure as seen, so that one whose waiters all gave up is not reported as never
    retrieved. A cancelled task (the loop shutting down) needs no report either."""
    if not task.cancelled():
        task.exception()

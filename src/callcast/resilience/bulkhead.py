"""A bulkhead: at most ``limit`` calls to one target in flight at once from this process.

So a slow target ties up a bounded share of the caller (its connections, memory, tasks), not all
of it. Entering is synchronous and allocation-free while a slot is free; beyond the limit a call
queues (first come, first served) for a bounded time.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Bulkhead:
    """Slots for concurrent calls. Not thread-safe: one event loop uses it."""

    __slots__ = ("_waiters", "in_flight", "limit", "rejected")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.rejected = 0
        """Calls refused (no slot within their wait) so far."""
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_enter(self) -> bool:
        """Take a slot if one is free now (and nobody queues for one); whether it was taken."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def enter(self, timeout: float) -> bool:
        """Take a slot, waiting at most ``timeout`` seconds for one; whether it was taken (a refusal
        is counted in ``rejected``)."""
        if self.try_enter():
            return True
        if timeout <= 0:
            self.rejected += 1
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # handed a slot as the timeout fired
                return True
            self.rejected += 1
            return False
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed a slot, then cancelled: pass it on
                self.leave()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        return True

    def leave(self) -> None:
        """Give a slot back: to the longest waiter, else to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; in_flight stays
                return
        self.in_flight -= 1

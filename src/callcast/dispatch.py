"""Dispatching: take deliveries from a subscription and handle each in its own task.

Shared by event consumers and RPC servers. How many run at once is bounded by the subscription's
prefetch (a delivery is taken only while fewer than ``prefetch`` are unsettled). A transport failure
while taking (an outage included) is logged and retried after a pause, so a broker hiccup does not
silently end consumption; only the end of the subscription (closed) ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from callcast.exceptions import TransportError
from callcast.transport import Delivery, Subscription

log = logging.getLogger("callcast.dispatch")

RETRY_PAUSE = 1.0


class Dispatcher:
    """Runs ``handle(delivery)`` for every delivery of ``subscription`` until stopped."""

    def __init__(
        self, subscription: Subscription, handle: Callable[[Delivery], Coroutine[Any, Any, None]], name: str
    ) -> None:
        self.subscription = subscription
        self.handle = handle
        self.name = name
        self._running: set[asyncio.Task[None]] = set()
        self._pump = asyncio.create_task(self._take(), name=f"dispatch:{name}")

    async def _take(self) -> None:
        while True:
            try:
                async for delivery in self.subscription:
                    task = asyncio.create_task(self.handle(delivery))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                return  # the subscription was closed
            except TransportError as error:  # an outage included: the adapter reconnects, we ask again
                log.warning(
                    "%s: taking messages failed, retrying in %.0fs: %s", self.name, RETRY_PAUSE, error
                )
                await asyncio.sleep(RETRY_PAUSE)

    async def stop(self, grace: float) -> None:
        """Stop taking; let running handlers finish within ``grace`` seconds, cancel the rest; close.

        Deliveries of cancelled handlers were not settled, so closing the subscription gives them back.
        """
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning(
                    "%s: %d handler(s) cut off after %.1fs; their messages go back",
                    self.name,
                    len(pending),
                    grace,
                )
        await self.subscription.close()

"""One shutdown per broker object, however many callers ask for it and whatever becomes of them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class CloseOnce:
    """Runs a broker's shutdown once, as a task of its own.

    Every call of :meth:`run` waits for that one task: a second ``close()`` returns only once the
    broker is closed, and a caller cancelled while it waits (its own timeout, say) leaves the
    shutdown running to its end, so a later ``close()`` finds the broker closed, not half closed."""

    def __init__(self) -> None:
        self._task: asyncio.Future[None] | None = None

    async def run(self, shutdown: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Start ``shutdown`` on the first call; wait for it to end on every call."""
        if self._task is None:
            self._task = asyncio.ensure_future(shutdown())
        await asyncio.shield(self._task)

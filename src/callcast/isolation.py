"""Suspects run alone: a redelivered message that may have crashed a process of its group runs with
no other event handler of the process beside it, so a crash while it runs is its own
(:mod:`callcast.crashes` confirms it against the suspect)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class Isolation:
    """Runs suspects alone: one at a time, while no other handler sharing this isolation runs (the
    runtime shares one among the event consumers of its process; RPC requests it serves are not
    paused, as a request handler may wait on another). Others wait while a suspect waits or runs
    (a suspect is never starved by a stream of others).

    So an event handler must not wait for another event handler of its process to do something:
    while a suspect waits for the first to finish, the second waits for the suspect (until the
    first gives up waiting). Suspects are rare (a process of the group died here), and handlers
    that wait on other events are a hazard anyway; the alternative, a suspect beside other
    handlers, would blame their crashes on it."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._running = 0
        self._alone = False
        self._waiting_alone = 0
        self.held_up = 0
        """Shared runs waiting now for suspects to be done."""

    async def enter_shared(self) -> None:
        """Start a shared run (end it with :meth:`leave_shared`): at once, without the lock, when
        nothing runs or waits to run alone; else once the suspects are done."""
        if self._alone or self._waiting_alone:
            self.held_up += 1
            try:
                async with self._changed:
                    await self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            finally:
                self.held_up -= 1
        self._running += 1

    async def leave_shared(self) -> None:
        self._running -= 1
        if self._waiting_alone and not self._running:
            async with self._changed:
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        await self.enter_shared()
        try:
            yield
        finally:
            await self.leave_shared()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting_alone += 1
            try:
                await self._changed.wait_for(lambda: not self._alone and not self._running)
            finally:
                self._waiting_alone -= 1
                if not self._waiting_alone:  # cancelled meanwhile: the shared ones it held up go on
                    self._changed.notify_all()
            self._alone = True
        try:
            yield
        finally:
            async with self._changed:
                self._alone = False
                self._changed.notify_all()

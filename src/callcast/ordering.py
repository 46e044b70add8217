"""Per-key order inside one process, for brokers that do not keep it themselves.

Where a broker's ``capabilities.ordered_per_key`` is false (RabbitMQ, NATS, Redis), a consumer's
deliveries of one partition key pass through a :class:`KeyGate`: they run one at a time, in the
order they arrived, while other keys run in parallel. A failed message is retried in its lane: it
keeps its turn while it waits out its retry delay (:mod:`callcast.consumer`), so the later
messages of its key wait behind it. One sent back to the broker instead (a delay too long to
wait here, or a stop) puts a *hold* on its key: later messages of that key wait until it comes
back (and runs first) or until the hold expires (it went to another process), so a retry holds
back only its own key.

Across processes, order on such brokers holds only as far as the broker delivers one key's
messages to one process; use a broker with ``ordered_per_key`` or ``sequenced=True`` handlers for a
guarantee.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

_AFTER_HOLD = 0.05
"""Seconds past a hold's end at which its lane is looked at again (clocks of the loop and of
``time.monotonic`` may differ by a hair)."""


@dataclass(eq=False)
class _Lane:
    tickets: deque[object] = field(default_factory=deque)
    running: bool = False
    held_for: str | None = None
    held_until: float = 0.0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def held_against(self, message_id: str) -> float | None:
        """Seconds left on a hold that keeps ``message_id`` waiting, or ``None``."""
        if self.held_for is None or self.held_for == message_id:
            return None
        left = self.held_until - time.monotonic()
        return left if left > 0 else None

    def idle(self) -> bool:
        """Nothing waits, runs or holds the lane (a hold that expired is dropped)."""
        if self.held_for is not None and time.monotonic() >= self.held_until:
            self.held_for = None  # its message went elsewhere (another process, the DLQ)
        return not self.tickets and not self.running and self.held_for is None


class KeyGate:
    """One key's messages one at a time, in arrival order; holds for keys whose message is retried."""

    def __init__(self) -> None:
        self._lanes: dict[str, _Lane] = {}

    @contextlib.asynccontextmanager
    async def turn(self, key: str | None, message_id: str = "") -> AsyncIterator[None]:
        """Wait for this message's turn on ``key`` (no key: at once); the turn lasts the block."""
        if key is None:
            yield
            return
        lane = self._lanes.setdefault(key, _Lane())
        ticket = object()
        if lane.held_for == message_id:  # the retried message is back: it goes first
            lane.held_for = None
            lane.tickets.appendleft(ticket)
        else:
            lane.tickets.append(ticket)
        running = False
        try:
            async with lane.changed:
                while lane.running or lane.tickets[0] is not ticket or lane.held_against(message_id):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(lane.held_against(message_id)):
                            await lane.changed.wait()
                lane.tickets.popleft()
                lane.running = running = True
            yield
        finally:
            if not running:
                with contextlib.suppress(ValueError):
                    lane.tickets.remove(ticket)
            async with lane.changed:
                if running:
                    lane.running = False
                lane.changed.notify_all()
            if lane.idle() and self._lanes.get(key) is lane:
                del self._lanes[key]

    def hold(self, key: str | None, message_id: str, seconds: float) -> None:
        """Keep ``key``'s later messages waiting until ``message_id`` comes back, at most ``seconds``."""
        if key is None:
            return
        lane = self._lanes.setdefault(key, _Lane())
        lane.held_for = message_id
        lane.held_until = time.monotonic() + seconds
        asyncio.get_running_loop().call_later(seconds + _AFTER_HOLD, self._forget_if_idle, key, lane)

    def _forget_if_idle(self, key: str, lane: _Lane) -> None:
        """A lane whose hold expired with nothing else to do goes (it would be kept forever)."""
        if lane.idle() and self._lanes.get(key) is lane:
            del self._lanes[key]

    def __len__(self) -> int:
        """Keys with a lane: something waits, runs or holds."""
        return len(self._lanes)

"""Alarms: deadlines for hot paths, grouped into ticks that share one loop timer.

``asyncio.timeout`` asks the event loop for a timer of its own on every use and is entered and left
as coroutines. An RPC call carries a deadline on both sides (the caller waits for the answer until
it, the callee gives up at it): over NATS with 64 concurrent callers, dropping both timeouts raised
calls/s by ~19 %, and :class:`timeout` keeps them for about half of that cost. Here a deadline is
rounded up to the next tick (:data:`TICK` seconds); every deadline due in a tick shares one
dictionary, and the loop has a single timer armed, for the earliest tick that has any.

Contract: an alarm rings once, on the loop's thread, no earlier than its deadline and at most a tick
(plus the loop timer's millisecond granularity) later; a cancelled alarm never rings. Each event loop
has its own alarms (:func:`alarms`); use them from that loop only. Ticks whose alarms were all
cancelled stay until their time, so a busy process wakes at most once a tick for them; that is why
a deadline more than :data:`FAR` seconds away (a client may send one for a month ahead, or for
ever) gets a timer of the loop's own instead, whose memory its cancel frees: the ticks kept are at
most ``FAR / TICK``.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import weakref
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger("callcast.alarms")

TICK = 0.01
"""Seconds per tick: how late an alarm may ring."""
_TICKS_PER_SECOND = round(1 / TICK)

NEVER = 1e12
"""Loop time (~31,700 years) standing for "no deadline": later ones, and NaN, are taken as it."""

FAR = 60.0
"""Seconds: a deadline further away than this is not put in a tick."""

_TIMER_SLACK = 0.001
"""The loop timer is set this much past the tick: loop timers (libuv's in uvloop) round to the
millisecond and could otherwise fire just before it."""


class Alarm:
    """A deadline's pending action: :meth:`ring` is called once the deadline passed, unless
    :meth:`cancel` came first. Cancel it as soon as it is no longer needed."""

    __slots__ = ("_bucket", "_timer")

    def __init__(self) -> None:
        self._bucket: dict[Alarm, None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # a far deadline's own loop timer

    def ring(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        """Make sure it does not ring (nothing happens if it rang already)."""
        bucket = self._bucket
        if bucket is not None:
            self._bucket = None
            del bucket[self]
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _ring_far(self) -> None:
        self._timer = None
        try:
            self.ring()
        except Exception:
            log.exception("alarm %r failed", self)


class _Call(Alarm):
    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[], object]) -> None:
        super().__init__()
        self._callback = callback

    def ring(self) -> None:
        self._callback()

    def cancel(self) -> None:
        super().cancel()
        self._callback = _nothing  # no reference cycle through a bound method's owner


def _nothing() -> None:
    pass


class Alarms:
    """The alarms of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._buckets: dict[int, dict[Alarm, None]] = {}
        self._ticks: list[int] = []
        """A heap of the ticks in ``_buckets`` (each once)."""
        self._armed: int | None = None
        self._timer: asyncio.TimerHandle | None = None

    def at(self, when: float, callback: Callable[[], object]) -> Alarm:
        """Call ``callback()`` once the loop's clock (``loop.time()``) has passed ``when``."""
        alarm = _Call(callback)
        self.set(alarm, when)
        return alarm

    def after(self, seconds: float, callback: Callable[[], object]) -> Alarm:
        """Call ``callback()`` once ``seconds`` have passed."""
        return self.at(self._loop.time() + seconds, callback)

    def set(self, alarm: Alarm, when: float) -> None:
        """Ring ``alarm`` once the loop's clock has passed ``when`` (it must not be pending); a
        ``when`` beyond :data:`NEVER` (infinite, NaN) is taken as :data:`NEVER`."""
        if not when < NEVER:
            when = NEVER
        if when - self._loop.time() > FAR:
            alarm._timer = self._loop.call_at(when, alarm._ring_far)
            return
        tick = int(when * _TICKS_PER_SECOND) + 1
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
            heapq.heappush(self._ticks, tick)
            if self._armed is None or tick < self._armed:
                self._arm(tick)
        bucket[alarm] = None
        alarm._bucket = bucket

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = tick
        self._timer = self._loop.call_at(tick * TICK + _TIMER_SLACK, self._ring)

    def _ring(self) -> None:
        self._timer = self._armed = None
        now = self._loop.time()
        ticks = self._ticks
        while ticks and ticks[0] * TICK <= now:
            bucket = self._buckets.pop(heapq.heappop(ticks))
            while bucket:  # a ring may cancel alarms of this tick yet to ring
                alarm, _ = bucket.popitem()
                alarm._bucket = None
                try:
                    alarm.ring()
                except Exception:
                    log.exception("alarm %r failed", alarm)
        if ticks:
            self._arm(ticks[0])


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Alarms] = weakref.WeakKeyDictionary()
_last: tuple[asyncio.AbstractEventLoop | None, Alarms | None] = (None, None)


def alarms() -> Alarms:
    """The running loop's alarms."""
    global _last
    loop = asyncio.get_running_loop()
    last_loop, last = _last
    if last_loop is loop and last is not None:
        return last
    found = _by_loop.get(loop)
    if found is None:
        found = _by_loop[loop] = Alarms(loop)
    _last = (loop, found)
    return found


class timeout(Alarm):
    """``with timeout(seconds):`` inside a task cancels the block once ``seconds`` passed and
    raises :class:`TimeoutError` instead, like ``async with asyncio.timeout(seconds)``, but on an
    :class:`Alarm` (it may expire up to a tick late) and as a plain context manager (entering and
    leaving it cost no coroutine). A cancellation from outside stays a cancellation."""

    __slots__ = ("_cancelling", "_expired", "_seconds", "_task")

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._seconds = seconds
        self._expired = False

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("timeout() must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        wheel = alarms()
        wheel.set(self, wheel._loop.time() + self._seconds)

    def ring(self) -> None:
        self._expired = True
        self._task.cancel()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.cancel()
        if self._expired:  # its cancel is taken back whatever the block turned it into
            still_cancelling = self._task.uncancel()
            if (
                kind is not None
                and issubclass(kind, asyncio.CancelledError)
                and still_cancelling <= self._cancelling
            ):
                raise TimeoutError from error

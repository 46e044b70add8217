"""Alarms (callcast.alarms): deadlines grouped by tick ring once, never early, at most about a tick
late, never once cancelled; ``alarms.timeout`` behaves like ``asyncio.timeout``."""

from __future__ import annotations

import asyncio
import logging

import pytest

from callcast import alarms
from callcast.alarms import TICK
from callcast.waiting import wait_event, within

LATE_AT_MOST = 0.5
"""How late a ring may be before the test calls it wrong: a tick and the timer's millisecond, plus
room for a loaded CI machine."""


async def test_an_alarm_rings_once_not_before_its_deadline() -> None:
    loop = asyncio.get_running_loop()
    rung: list[float] = []
    done = asyncio.Event()

    def ring() -> None:
        rung.append(loop.time())
        done.set()

    when = loop.time() + 0.03
    alarms.alarms().at(when, ring)
    assert await wait_event(done, 5)
    await asyncio.sleep(2 * TICK)  # a second ring would have come by now
    assert len(rung) == 1
    assert when <= rung[0] <= when + LATE_AT_MOST


async def test_alarms_ring_in_the_order_of_their_deadlines() -> None:
    rung: list[int] = []
    last = asyncio.Event()
    wheel = alarms.alarms()
    for number, seconds in [(3, 0.09), (1, 0.01), (2, 0.05)]:
        wheel.after(seconds, lambda number=number: (rung.append(number), number == 3 and last.set()))
    assert await wait_event(last, 5)
    assert rung == [1, 2, 3]


async def test_a_cancelled_alarm_never_rings_even_when_its_tick_comes() -> None:
    rung: list[str] = []
    other = asyncio.Event()
    wheel = alarms.alarms()
    cancelled = wheel.after(0.02, lambda: rung.append("cancelled"))
    wheel.after(0.02, lambda: (rung.append("kept"), other.set()))
    cancelled.cancel()
    assert await wait_event(other, 5)
    assert rung == ["kept"]


async def test_a_callback_may_cancel_an_alarm_of_the_same_tick() -> None:
    rung: list[str] = []
    wheel = alarms.alarms()
    when = asyncio.get_running_loop().time() + 0.02
    first: alarms.Alarm | None = None
    second: alarms.Alarm | None = None

    def cancel_the_other(name: str) -> None:
        rung.append(name)
        for alarm in (first, second):
            assert alarm is not None
            alarm.cancel()

    first = wheel.at(when, lambda: cancel_the_other("first"))
    second = wheel.at(when, lambda: cancel_the_other("second"))
    later = asyncio.Event()
    wheel.at(when + 2 * TICK, later.set)
    assert await wait_event(later, 5)
    assert rung in (["first"], ["second"])


async def test_a_failing_callback_is_logged_and_the_others_still_ring(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fail() -> None:
        raise RuntimeError("boom")

    rang = asyncio.Event()
    wheel = alarms.alarms()
    wheel.after(0.01, fail)
    wheel.after(0.01, rang.set)
    with caplog.at_level(logging.ERROR, logger="callcast.alarms"):
        assert await wait_event(rang, 5)
    assert any("boom" in (record.exc_text or "") or record.exc_info for record in caplog.records)


async def test_each_loop_has_its_own_alarms() -> None:
    here = alarms.alarms()
    assert alarms.alarms() is here

    def elsewhere() -> bool:
        async def other_loop() -> bool:
            fired = asyncio.Event()
            alarms.alarms().after(0.01, fired.set)
            return alarms.alarms() is not here and await wait_event(fired, 5)

        return asyncio.run(other_loop())

    assert await asyncio.to_thread(elsewhere)
    assert alarms.alarms() is here


async def test_timeout_raises_timeout_error_when_the_block_runs_too_long() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError), alarms.timeout(0.05):
        await asyncio.sleep(10)
    assert 0.05 <= loop.time() - started <= 0.05 + LATE_AT_MOST


async def test_timeout_lets_a_quick_block_finish_and_leaves_no_cancellation_behind() -> None:
    with alarms.timeout(0.02):
        await asyncio.sleep(0)
    await asyncio.sleep(0.02 + 3 * TICK)  # the alarm's tick passes: nothing cancels this task
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    inside = asyncio.Event()

    async def guarded() -> None:
        with alarms.timeout(10):
            inside.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(guarded())
    assert await wait_event(inside, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task, 5)


async def test_an_expired_timeout_takes_its_cancel_back_whatever_the_block_turned_it_into() -> None:
    """As ``asyncio.timeout`` does: a block that turned the cancellation into an error of its own
    (as drivers do) leaves the task not cancelling, so a later check of ``cancelling()`` (a
    TaskGroup's, the consumer's) does not take it for a stop."""
    task = asyncio.current_task()
    assert task is not None

    async def driver_call() -> None:
        with alarms.timeout(0.01):
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                raise RuntimeError("its own error") from None

    with pytest.raises(RuntimeError, match="its own error"):
        await driver_call()
    assert task.cancelling() == 0


async def test_far_deadlines_leave_nothing_behind_once_cancelled() -> None:
    """Deadlines chosen by a client (a month ahead, or for ever), each cancelled once its call is
    answered, keep no memory."""
    wheel = alarms.alarms()
    month = 30 * 24 * 3600.0
    for n in range(5_000):
        wheel.after(month + n * alarms.TICK, lambda: None).cancel()
        wheel.at(float("inf"), lambda: None).cancel()
    assert len(wheel._buckets) == 0
    assert len(wheel._ticks) == 0


async def test_a_far_deadline_rings_on_its_own_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alarms, "FAR", 0.05)  # so that "far" comes within the test
    loop = asyncio.get_running_loop()
    rang = asyncio.Event()
    when = loop.time() + 0.1
    alarms.alarms().at(when, rang.set)
    assert len(alarms.alarms()._buckets) == 0
    await asyncio.wait_for(rang.wait(), 5)
    assert loop.time() >= when

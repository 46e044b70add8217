"""The lab's figures against faults injected on purpose: what it measures must show what was done.

Real services on the embedded broker, real HTTP, open-loop load (short runs, a few seconds each).
"""

from __future__ import annotations

from typing import Any

import pytest

from callcast.lab.run import Settings, run_once
from callcast.lab.scenarios import parse

pytestmark = pytest.mark.slow

SETTINGS = Settings(
    duration=3.0, rate=15.0, window=(0.2, 0.7), call_timeout=0.5, drain_timeout=8.0, slow_seconds=0.2
)


async def measure(style: str, scenario: str) -> dict[str, Any]:
    return await run_once(style, parse(scenario), SETTINGS)


async def test_200ms_on_a_synchronous_downstream_shows_in_request_latency_only() -> None:
    rise = {}
    for style in ("request", "event"):
        base = await measure(style, "baseline")
        slow = await measure(style, "slow-downstream")
        rise[style] = slow["latency_p50_ms"] - base["latency_p50_ms"]
        assert base["availability"] == 1.0
        assert slow["availability"] == 1.0
        assert slow["effects_lost"] == 0
        if style == "event":  # the delay moved into time to consistency
            assert slow["consistency_p50_ms"] >= 180.0
    # 200 ms on the synchronous path shows in the request style's latency, not the event style's
    # (compared with each other, not with fixed windows, which a loaded machine moves).
    assert rise["request"] >= 150.0, rise
    assert rise["request"] - rise["event"] >= 120.0, rise


async def test_a_downstream_down_fails_requests_not_events_and_nothing_is_lost() -> None:
    request = await measure("request", "down-downstream")
    event = await measure("event", "down-downstream")
    start, end = event["fault_window_s"]
    outage_ms = (end - start) * 1000.0
    assert outage_ms >= 1200.0  # the window really was that long
    assert request["availability"] < 0.85, request["statuses"]
    assert event["availability"] == 1.0, event["statuses"]
    # the orders accepted when the outage began waited for it to end
    assert 0.8 * outage_ms <= event["consistency_max_ms"] <= outage_ms + 3000.0
    assert event["effects_lost"] == 0
    assert event["backlog_left"] == 0
    assert event["effects_duplicated"] == 0
    assert request["effects_lost"] == 0

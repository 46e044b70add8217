"""The embedded SQLite broker with a backlog: publish ``count`` events in batches with nobody
consuming, then a worker process drains them while its resident memory is watched.

Publishing uses callcast's batch path (``ctx.envelope_for`` + ``runtime.broker.publish``), as a
user would to load a backlog; the worker is the ``sink`` service of the same app, alone in its
process, with callcast's defaults.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.payload import Event, make_event
from bench.sides.callcast_side import CallcastPipe
from callcast.waiting import wait_event


async def publish(namespace: str, workdir: Path, *, count: int, batch: int) -> dict[str, Any]:
    """Publish ``count`` events in batches of ``batch``; the ``sink`` group is declared, not run."""

    async def unused(event: Event) -> None:
        raise AssertionError("the publishing process runs no handler")

    pipe = CallcastPipe("sqlite", namespace, workdir)
    runtime = await pipe.start(unused, services=["bench"])
    try:
        context = runtime.context("bench")
        started = time.perf_counter()
        for first in range(0, count, batch):
            envelopes = [
                context.envelope_for(make_event(seq)) for seq in range(first, min(count, first + batch))
            ]
            await runtime.broker.publish(envelopes[0].type, envelopes)
        elapsed = time.perf_counter() - started
    finally:
        await pipe.close()
    return {"publish_rate": count / elapsed, "notes": []}


async def drain(namespace: str, workdir: Path, *, count: int, seconds: float) -> dict[str, Any]:
    """Run the ``sink`` service until it handled ``count`` events or ``seconds`` passed; the drain
    rate and this process's peak resident memory (``VmHWM``, MB)."""
    handled = 0
    done = asyncio.Event()

    async def handler(event: Event) -> None:
        nonlocal handled
        handled += 1
        if handled >= count:
            done.set()

    pipe = CallcastPipe("sqlite", namespace, workdir)
    started = time.perf_counter()
    await pipe.start(handler, services=["sink"])
    try:
        complete = await wait_event(done, seconds)
        elapsed = time.perf_counter() - started
        seen = handled
    finally:
        await pipe.close()
    notes = [] if complete else [f"bounded: {seen}/{count} drained in {elapsed:.1f}s"]
    return {"drain_rate": seen / elapsed, "worker_peak_rss": peak_rss_mb(), "notes": notes}


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """The peak resident set size (``VmHWM``) of process ``pid`` in MB (10⁶ bytes), from /proc."""
    return _status_kb(pid, "VmHWM")


def rss_mb(pid: int | str = "self") -> float | None:
    """The current resident set size (``VmRSS``) of process ``pid`` in MB, from /proc."""
    return _status_kb(pid, "VmRSS")


def _status_kb(pid: int | str, field: str) -> float | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return None

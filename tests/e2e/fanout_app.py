"""A small app for the multi-process test: one publisher, a competing group and a fan-out service.

    feed      POST /ticks {"start", "count"}     publishes Tick(n) for n in [start, start + count)
    workers   on Tick: record (event id, n, pid, attempt) in workers.db   run as several processes
    audit     on Tick: record (event id, n, pid, attempt) in audit.db     a second, independent group

Each handler commits its record before it returns (so before the broker gets the ack): a record
is proof the event was handled; two records of one event id are a redelivery (at least once).

Run: ``callcast run tests.e2e.fanout_app:app --service workers --no-http`` from the repo root.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path

from pydantic import BaseModel, Field

from callcast import App, Context, Service
from callcast.service import DEFAULT_CONCURRENCY

RECORDS_SCHEMA = """
CREATE TABLE IF NOT EXISTS handled (
    event_id TEXT NOT NULL, n INTEGER NOT NULL, pid INTEGER NOT NULL, attempt INTEGER NOT NULL,
    at REAL NOT NULL);
"""
WORK_SECONDS = 0.002
"""Simulated work per event, so a stream takes a while and a kill finds handlers mid-flight."""


class Tick(BaseModel):
    n: int


class TickBatch(BaseModel):
    start: int = Field(ge=0)
    count: int = Field(ge=1, le=10_000)


class Published(BaseModel):
    published: int


class Records:
    """An append-only SQLite file of handled events (WAL; the commit survives a crash)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout = 30000")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.executescript(RECORDS_SCHEMA)
        self._lock = threading.Lock()

    async def add(self, event_id: str, n: int, attempt: int) -> None:
        def insert() -> None:
            with self._lock:
                self._conn.execute(
                    "INSERT INTO handled (event_id, n, pid, attempt, at) VALUES (?, ?, ?, ?, ?)",
                    (event_id, n, os.getpid(), attempt, time.time()),
                )

        await asyncio.to_thread(insert)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


feed = Service("feed", publishes=[Tick])


@feed.post("/ticks", status_code=201)
async def publish_ticks(body: TickBatch, ctx: Context) -> Published:
    """Publish the batch; 201 once every event of it is stored by the broker."""
    await asyncio.gather(*(ctx.publish(Tick(n=n)) for n in range(body.start, body.start + body.count)))
    return Published(published=body.count)


def recording_service(name: str, concurrency: int = DEFAULT_CONCURRENCY) -> Service:
    service = Service(name)

    @service.on_startup
    async def open_records(ctx: Context) -> None:
        ctx.state.records = Records(ctx.data_dir / f"{name}.db")

    @service.on_shutdown
    async def close_records(ctx: Context) -> None:
        ctx.state.records.close()

    @service.on(Tick, name="record", concurrency=concurrency)
    async def record(event: Tick, ctx: Context) -> None:
        assert ctx.envelope is not None
        await asyncio.sleep(WORK_SECONDS)
        await ctx.state.records.add(ctx.envelope.id, event.n, ctx.attempt)

    return service


workers = recording_service("workers", concurrency=8)
"""Fewer deliveries at once than a /ticks batch: a worker cannot claim a whole batch, the other
competes for the rest."""
audit = recording_service("audit")

app = App([feed, workers, audit], name="fanout")

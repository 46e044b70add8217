"""Scenario 3 — ordering: a sequenced handler folds each key's events in sequence order.

N events on K keys, each key's events numbered 1, 2, … (``sequence`` extension and partition key,
as ``ctx.publish(e, key=k, sequence=n)`` sends them). The stream interleaves the keys at random and
is then shuffled within windows of 50 before publishing, so many events reach the broker ahead of
their predecessor. W processes run a ``sequenced=True`` handler that folds a non-commutative
function per key, ``state = (state × 31 + value) mod 2^61``: the final state of a key equals the
in-order fold only if its events were applied exactly once each, in sequence order.

Figures: keys whose state equals the in-order fold (all), applications out of order or twice (0),
parked (a trigger on ``callcast_parked`` counts the inserts, and the consumers' stats), stale
(consumers' stats, written at their graceful stop), dead letters (0).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import text

from callcast import App, Context, Service
from callcast.brokers import connect

from .harness import (
    Env,
    Result,
    Supervisor,
    Worker,
    dead_letters,
    envelopes_of,
    event_model,
    query,
    scalar,
    settle,
    stop_all,
)

NAME = "3 ordering"
MOD = 2**61
WINDOW = 50


@dataclass(frozen=True)
class Params:
    events: int = 10_000
    keys: int = 100
    workers: int = 3
    window: int = WINDOW
    """Events are shuffled within windows of this many before publishing (1: in order)."""
    time_limit: float = 600.0


FULL = Params()
SHORT = Params(events=600, keys=12, workers=2, time_limit=60.0)


class StepBase(BaseModel):
    key: str
    seq: int
    value: int


def service_name(run: str) -> str:
    return f"f{run}-order"


def fold(state: int, value: int) -> int:
    return (state * 31 + value) % MOD


def build(run: str, config: Mapping[str, Any]) -> App:
    step = event_model(StepBase, f"faults_{run}_order_step")
    service = Service(service_name(run), database=True)

    @service.on_startup
    async def tables(ctx: Context) -> None:
        async with ctx.transaction() as db:
            await db.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL, "
                    "steps INTEGER NOT NULL)"
                )
            )
            await db.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS applied (pos INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "key TEXT NOT NULL, seq INTEGER NOT NULL, event_id TEXT NOT NULL)"
                )
            )
            await db.execute(
                text("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER)")
            )
            await db.execute(text("INSERT OR IGNORE INTO counters VALUES ('parked', 0)"))
            await db.execute(
                text(
                    "CREATE TRIGGER IF NOT EXISTS count_parked AFTER INSERT ON callcast_parked "
                    "BEGIN UPDATE counters SET value = value + 1 WHERE name = 'parked'; END"
                )
            )

    @service.on(step, name="fold", sequenced=True)
    async def apply(event: StepBase, ctx: Context) -> None:
        assert ctx.envelope is not None
        row = (await ctx.db.execute(text("SELECT value FROM state WHERE key = :k"), {"k": event.key})).first()
        value = fold(int(row[0]) if row else 0, event.value)
        await ctx.db.execute(
            text(
                "INSERT INTO state VALUES (:k, :v, 1) "
                "ON CONFLICT (key) DO UPDATE SET value = :v, steps = steps + 1"
            ),
            {"k": event.key, "v": value},
        )
        await ctx.db.execute(
            text("INSERT INTO applied (key, seq, event_id) VALUES (:k, :s, :id)"),
            {"k": event.key, "s": event.seq, "id": ctx.envelope.id},
        )

    return App([service], name=f"faults-{run}")


async def scenario(env: Env, params: Params = FULL) -> Result:
    result = Result(NAME, env.broker_url)
    started = time.monotonic()
    app = build(env.run, {})
    svc = service_name(env.run)
    handler = app.service(svc).handlers[0]
    db = env.data_dir / f"{svc}.db"
    rng = env.rng

    keys = [f"key{i:03d}" for i in range(params.keys)]
    per_key = params.events // params.keys
    tokens = [key for key in keys for _ in range(per_key)]
    rng.shuffle(tokens)  # a random interleaving of the keys...
    next_seq: Counter[str] = Counter()
    stream: list[StepBase] = []
    for key in tokens:  # ...each key's events in sequence order
        next_seq[key] += 1
        stream.append(StepBase(key=key, seq=next_seq[key], value=rng.randrange(1, 2**32)))
    expected: dict[str, int] = defaultdict(int)
    for event in stream:
        expected[event.key] = fold(expected[event.key], event.value)
    windows = [stream[i : i + params.window] for i in range(0, len(stream), params.window)]
    for window in windows:
        rng.shuffle(window)
    published_ahead = 0  # events published while a smaller sequence of their key was not yet
    contiguous: Counter[str] = Counter()  # per key: 1..n all published
    published: set[tuple[str, int]] = set()
    for window in windows:
        for event in window:
            published_ahead += event.seq > contiguous[event.key] + 1
            published.add((event.key, event.seq))
            while (event.key, contiguous[event.key] + 1) in published:
                contiguous[event.key] += 1

    def applied() -> int:
        return scalar(db, "SELECT count(*) FROM applied")

    broker = await connect(env.broker_url)
    workers = [Worker(env, __name__, svc, f"consumer-{i + 1}", {}) for i in range(params.workers)]
    try:
        await broker.declare(handler.topic, handler.group)
        supervisor = Supervisor(env, workers)
        await supervisor.start()
        for window in windows:
            envelopes = envelopes_of(
                handler.topic,
                window,
                keys=[event.key for event in window],
                sequences=[event.seq for event in window],
            )
            await broker.publish(handler.topic, envelopes)
        env.say(
            f"published {len(stream)} events on {params.keys} keys, shuffled in windows of {params.window}"
        )
        complete = await supervisor.run(lambda: applied() >= len(stream), applied, quiet=env.stall)
        await settle(applied, env, quiet=2.0, limit=10.0)
        exits = await stop_all(workers)
        letters = await dead_letters(broker, handler.group)
    finally:
        await stop_all(workers)
        await broker.close()

    states = {key: value for key, value in query(db, "SELECT key, value FROM state")}
    order: dict[str, list[int]] = defaultdict(list)
    for key, seq in query(db, "SELECT key, seq FROM applied ORDER BY pos"):
        order[key].append(seq)
    stats: Counter[str] = Counter()
    for worker in workers:
        stats.update(worker.all_stats())
    result.report("events published (keys)", f"{len(stream)} ({params.keys})")
    result.report("consumer processes", params.workers)
    result.report("events published before a predecessor", published_ahead)
    result.expect("unexpected exits", len(supervisor.unexpected), 0)
    result.expect("all applied before the time limit", complete, True)
    result.expect(
        "keys whose state equals the in-order fold",
        sum(1 for key in keys if states.get(key) == expected[key]),
        params.keys,
    )
    result.expect(
        "keys applied exactly once each, in sequence order",
        sum(1 for key in keys if order[key] == list(range(1, per_key + 1))),
        params.keys,
    )
    result.expect("applications", sum(len(seqs) for seqs in order.values()), len(stream))
    result.report(
        "parked (inserts into callcast_parked)",
        scalar(db, "SELECT value FROM counters WHERE name = 'parked'"),
    )
    result.report("parked (consumer stats)", stats["parked"])
    result.report("stale (consumer stats)", stats["stale"])
    result.report("handled (consumer stats)", stats["handled"])
    result.expect("parked left over", scalar(db, "SELECT count(*) FROM callcast_parked"), 0)
    result.expect("dead letters", len(letters), 0)
    result.expect("exit codes at SIGTERM", exits, [0] * params.workers)
    result.notes += supervisor.unexpected
    result.elapsed = time.monotonic() - started
    return result

"""Scenario 1 — consumer kills: ``kill -9`` of consumer processes of an idempotent handler.

N events are published; W processes of one service consume them with an idempotent handler that
writes its effect into the service's SQLite database through ``ctx.db`` (a row per event, and a
counter). K kills, each followed by a restart of the killed process, spread over four points:

* ``before effect``: the handler kills its process first thing (its transaction, with the inbox
  record, is open and uncommitted) — the ``before_effect`` point of the test handler;
* ``after commit`` (before the ack): the handler's transaction committed, the ack not sent — the
  ``before_ack`` point of :class:`~callcast.testing.faults.FaultyBroker`;
* ``after ack``: the ack returned — ``after_ack``;
* ``random``: the supervisor's ``kill -9`` from outside, at a random time.

Every kill also takes down the other deliveries in flight in that process (up to the handler's
concurrency), at whatever point they were. When every event is applied before all K kills were
carried out (a broker may hand a whole batch to one consumer, so a kill's passage never comes),
N/10 more events are published, up to ``TOP_UPS_AT_MOST`` × N in all, and every figure counts
them. Figures: lost (events never applied, must be 0), effects applied twice (must be 0),
redeliveries absorbed by the inbox (``sum(duplicates)``, a figure).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import text

from callcast import App, Context, Service
from callcast.brokers import connect
from callcast.testing.faults import active_plan

from .harness import (
    Env,
    Result,
    Supervisor,
    Worker,
    dead_letters,
    envelopes_of,
    event_model,
    fmt,
    nth_for,
    publish_all,
    query,
    scalar,
    schedule,
    settle,
    stop_all,
)

NAME = "1 consumer kills"
TOP_UPS_AT_MOST = 2
"""Events published in all, at most, as a multiple of the planned number (see the module doc)."""


@dataclass(frozen=True)
class Params:
    events: int = 10_000
    workers: int = 4
    kills: int = 20
    time_limit: float = 600.0


FULL = Params()
SHORT = Params(events=1_000, workers=4, kills=8, time_limit=90.0)


class ItemBase(BaseModel):
    n: int


def service_name(run: str) -> str:
    return f"f{run}-kills"


def build(run: str, config: Mapping[str, Any]) -> App:
    item = event_model(ItemBase, f"faults_{run}_kills_item")
    service = Service(service_name(run), database=True)

    @service.on_startup
    async def tables(ctx: Context) -> None:
        async with ctx.transaction() as db:
            await db.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS effects (event_id TEXT NOT NULL, n INTEGER NOT NULL, "
                    "pid INTEGER NOT NULL, attempt INTEGER NOT NULL, at REAL NOT NULL)"
                )
            )
            await db.execute(
                text("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER)")
            )
            await db.execute(text("INSERT OR IGNORE INTO counters VALUES ('applied', 0)"))

    @service.on(item, name="apply", idempotent=True)
    async def apply(event: ItemBase, ctx: Context) -> None:
        assert ctx.envelope is not None
        plan = active_plan()
        if plan is not None:
            plan.reached("before_effect", ctx.envelope.type, f"{ctx.envelope.id} attempt={ctx.attempt}")
        await ctx.db.execute(
            text("INSERT INTO effects VALUES (:id, :n, :pid, :attempt, :at)"),
            {
                "id": ctx.envelope.id,
                "n": event.n,
                "pid": os.getpid(),
                "attempt": ctx.attempt,
                "at": time.time(),
            },
        )
        await ctx.db.execute(text("UPDATE counters SET value = value + 1 WHERE name = 'applied'"))

    return App([service], name=f"faults-{run}")


def kill_points(kills: int) -> dict[str, tuple[str | None, int]]:
    each = kills // 4
    return {
        "before effect": ("before_effect", each),
        "after commit": ("before_ack", each),
        "after ack": ("after_ack", each),
        "random": (None, kills - 3 * each),
    }


async def scenario(env: Env, params: Params = FULL) -> Result:
    result = Result(NAME, env.broker_url)
    started = time.monotonic()
    app = build(env.run, {})
    svc = service_name(env.run)
    handler = app.service(svc).handlers[0]
    db = env.data_dir / f"{svc}.db"

    def applied() -> int:
        return scalar(db, "SELECT count(DISTINCT n) FROM effects")

    def absorbed() -> int:
        return scalar(db, "SELECT sum(duplicates) FROM callcast_inbox WHERE subscriber = ?", [handler.group])

    broker = await connect(env.broker_url)
    published = params.events
    workers = [Worker(env, __name__, svc, f"consumer-{i + 1}", {}) for i in range(params.workers)]
    try:
        await broker.declare(handler.topic, handler.group)
        events = [ItemBase(n=n) for n in range(params.events)]
        await publish_all(broker, handler.topic, envelopes_of(handler.topic, events))
        env.say(f"published {params.events} events on {handler.topic}")
        plan = schedule(env.rng, kill_points(params.kills))
        supervisor = Supervisor(
            env,
            workers,
            plan,
            lambda kill, worker, queued: nth_for(
                env.rng, published - applied(), len(workers), queued, scale=0.5
            ),
            topics=[handler.topic],
            external_delay=(0.3, 1.5),
        )

        def all_applied() -> bool:
            return applied() >= published

        await supervisor.start()
        while True:
            complete = await supervisor.run(all_applied, applied, quiet=env.stall)
            if not complete or not supervisor.pending() or published >= TOP_UPS_AT_MOST * params.events:
                break
            # Work ran out before a planned kill's passage came (a broker may hand a whole batch
            # to one consumer): more events, so every planned kill is carried out.
            extra = max(1, params.events // 10)
            more = [ItemBase(n=n) for n in range(published, published + extra)]
            await publish_all(broker, handler.topic, envelopes_of(handler.topic, more))
            published += extra
            env.say(f"planned kills still to come: published {extra} more events ({published} in all)")
        env.say(f"applied {applied()} of {published}; waiting for redeliveries to settle")
        await settle(absorbed, env, quiet=env.redeliveries_settled, limit=30.0)
        exits = await stop_all(workers)
        letters = await dead_letters(broker, handler.group)
    finally:
        await stop_all(workers)
        await broker.close()

    rows = scalar(db, "SELECT count(*) FROM effects")
    distinct_ids = scalar(db, "SELECT count(DISTINCT event_id) FROM effects")
    missing = set(range(published)) - {n for (n,) in query(db, "SELECT DISTINCT n FROM effects")}
    counter = scalar(db, "SELECT value FROM counters WHERE name = 'applied'")
    result.report("events published", published)
    result.report("consumer processes", params.workers)
    result.expect("kills done", supervisor.done(), len(plan))
    result.report("kills by point", fmt(supervisor.executed()))
    result.report("restarts", supervisor.restarts)
    result.expect("unexpected exits", len(supervisor.unexpected), 0)
    result.expect("all applied before the time limit", complete, True)
    result.expect("lost (never applied)", len(missing), 0)
    result.expect("duplicate side effects (applied twice)", rows - distinct_ids, 0)
    result.expect("effect counter minus effect rows", counter - rows, 0)
    result.report("duplicate deliveries absorbed by the inbox", absorbed())
    result.report(
        "applied on a redelivery (attempt > 1)", scalar(db, "SELECT count(*) FROM effects WHERE attempt > 1")
    )
    result.expect("dead letters", len(letters), 0)
    result.expect("exit codes at SIGTERM", exits, [0] * params.workers)
    result.notes += supervisor.unexpected
    result.elapsed = time.monotonic() - started
    return result

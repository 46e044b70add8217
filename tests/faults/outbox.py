"""Scenario 4 — outbox: the producer process killed around commit, relay publish and relay delete.

A producer service runs T transactions, one after another, each inserting a row ``made(n)`` and
publishing ``Made(n)`` inside ``ctx.transaction()`` (so the event goes to the outbox); a fixed,
seeded share of them raise inside the transaction and roll back. On restart the producer goes on
after its last committed row. K times the producer process is killed and restarted, at:

* ``before commit``: inside the transaction, after the insert and the publish (the producer's
  ``before_commit`` point);
* ``after commit``: the transaction committed, the relay has not sent its rows yet
  (``after_commit``);
* ``relay before publish``: the relay is sending the committed rows (its claim on them is written
  with them), nothing published yet (:class:`~callcast.testing.faults.FaultyBroker`'s
  ``before_publish``);
* ``relay after publish``: the broker stored the batch, the rows are not deleted yet
  (``after_publish``): they are published again once the dead relay's claim (5 s) runs out;
* ``random``: ``kill -9`` from outside at a random time.

A downstream service applies each event with an idempotent handler (its own processes, not killed).
Figures: events lost (committed rows whose event never arrived: 0), events of rolled-back
transactions (0), effects applied twice downstream (0), redeliveries the inbox absorbed (a figure).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
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
    Kill,
    Result,
    Supervisor,
    Worker,
    dead_letters,
    event_model,
    fmt,
    nth_for,
    query,
    scalar,
    schedule,
    settle,
    stop_all,
)

NAME = "4 outbox"
RELAY_LEASE = 5.0
"""The relay's claim on outbox rows (``Relay(lease=5)``, the runtime's default): how long rows of a
killed relay wait before another relay takes them."""


@dataclass(frozen=True)
class Params:
    transactions: int = 5_000
    rollback_rate: float = 0.05
    kills: int = 30
    sinks: int = 2
    pace: float = 0.0
    """Seconds the producer sleeps between transactions."""
    time_limit: float = 900.0


FULL = Params()
SHORT = Params(transactions=400, kills=5, sinks=1, pace=0.005, time_limit=90.0)


class MadeBase(BaseModel):
    n: int


class _Rollback(Exception):
    """Raised inside a transaction that must not commit."""


def rolled_back(seed: int, n: int, rate: float) -> bool:
    """Whether transaction ``n`` rolls back (the same answer in the producer and the runner)."""
    return random.Random(seed * 1_000_003 + n).random() < rate


def names(run: str) -> tuple[str, str]:
    return f"f{run}-producer", f"f{run}-sink"


def build(run: str, config: Mapping[str, Any]) -> App:
    made = event_model(MadeBase, f"faults_{run}_outbox_made")
    producer_name, sink_name = names(run)
    producer = Service(producer_name, publishes=[made], database=True)
    sink = Service(sink_name, database=True)

    async def produce(ctx: Context) -> None:
        total = int(config["transactions"])
        rate = float(config["rollback_rate"])
        seed = int(config["seed"])
        pace = float(config.get("pace", 0.0))
        plan = active_plan()
        topic = made.__event_type__  # type: ignore[attr-defined]
        async with ctx.transaction() as db:
            last = (await db.execute(text("SELECT max(n) FROM made"))).scalar()
        for n in range(0 if last is None else int(last) + 1, total):
            with contextlib.suppress(_Rollback):
                async with ctx.transaction() as db:
                    await db.execute(text("INSERT INTO made VALUES (:n, :at)"), {"n": n, "at": time.time()})
                    await ctx.publish(made(n=n))
                    if rolled_back(seed, n, rate):
                        raise _Rollback
                    if plan is not None:
                        plan.reached("before_commit", topic, str(n))
                if plan is not None:
                    plan.reached("after_commit", topic, str(n))
            if pace:
                await asyncio.sleep(pace)

    @producer.on_startup
    async def start_producing(ctx: Context) -> None:
        async with ctx.transaction() as db:
            await db.execute(text("CREATE TABLE IF NOT EXISTS made (n INTEGER PRIMARY KEY, at REAL)"))
        ctx.state.task = asyncio.create_task(produce(ctx), name="produce")

    @producer.on_shutdown
    async def stop_producing(ctx: Context) -> None:
        ctx.state.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ctx.state.task

    @sink.on_startup
    async def tables(ctx: Context) -> None:
        async with ctx.transaction() as db:
            await db.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS effects (event_id TEXT NOT NULL, n INTEGER NOT NULL, "
                    "attempt INTEGER NOT NULL, at REAL NOT NULL)"
                )
            )

    @sink.on(made, name="apply", idempotent=True)
    async def apply(event: MadeBase, ctx: Context) -> None:
        assert ctx.envelope is not None
        await ctx.db.execute(
            text("INSERT INTO effects VALUES (:id, :n, :attempt, :at)"),
            {"id": ctx.envelope.id, "n": event.n, "attempt": ctx.attempt, "at": time.time()},
        )

    return App([producer, sink], name=f"faults-{run}")


def kill_points(kills: int) -> dict[str, tuple[str | None, int]]:
    each = kills // 5
    return {
        "before commit": ("before_commit", each),
        "after commit": ("after_commit", each),
        "relay before publish": ("before_publish", each),
        "relay after publish": ("after_publish", each),
        "random": (None, kills - 4 * each),
    }


async def scenario(env: Env, params: Params = FULL) -> Result:
    result = Result(NAME, env.broker_url)
    started = time.monotonic()
    config = {
        "transactions": params.transactions,
        "rollback_rate": params.rollback_rate,
        "seed": env.seed,
        "pace": params.pace,
    }
    app = build(env.run, config)
    producer_name, sink_name = names(env.run)
    handler = app.service(sink_name).handlers[0]
    producer_db = env.data_dir / f"{producer_name}.db"
    sink_db = env.data_dir / f"{sink_name}.db"
    rollbacks = {n for n in range(params.transactions) if rolled_back(env.seed, n, params.rollback_rate)}
    committing = set(range(params.transactions)) - rollbacks

    def cursor() -> int:
        return scalar(producer_db, "SELECT coalesce(max(n) + 1, 0) FROM made")

    def outbox_rows() -> int:
        return scalar(producer_db, "SELECT count(*) FROM callcast_outbox")

    def arrived() -> int:
        return scalar(sink_db, "SELECT count(DISTINCT n) FROM effects")

    def absorbed() -> int:
        inbox = "SELECT sum(duplicates) FROM callcast_inbox WHERE subscriber = ?"
        return scalar(sink_db, inbox, [handler.group])

    def arm(kill: Kill, worker: Worker, queued: int) -> int:
        # At most one relay publish per committed transaction: the relay's one sender takes every
        # commit made while a publish is under way, and claimed batches hold many rows.
        publishes = kill.inject in ("before_publish", "after_publish")
        return nth_for(env.rng, params.transactions - cursor(), 1, queued, scale=0.25 if publishes else 0.6)

    broker = await connect(env.broker_url)
    producer = Worker(env, __name__, producer_name, "producer", config)
    sinks = [Worker(env, __name__, sink_name, f"sink-{i + 1}", config) for i in range(params.sinks)]
    plan = schedule(env.rng, kill_points(params.kills))
    supervisor = Supervisor(
        env,
        [*sinks, producer],
        plan,
        arm,
        topics=[handler.topic],
        victims=[producer],
        external_delay=(0.05, 0.6),
    )
    try:
        await broker.declare(handler.topic, handler.group)  # before the first publish
        await supervisor.start()
        env.say(f"producer and {params.sinks} sink process(es) running")

        def complete() -> bool:
            rows = scalar(producer_db, "SELECT count(*) FROM made")
            return rows >= len(committing) and outbox_rows() == 0 and arrived() >= len(committing)

        finished = await supervisor.run(
            complete, lambda: (cursor(), outbox_rows(), arrived()), quiet=max(RELAY_LEASE + 15.0, env.stall)
        )
        env.say(f"transactions done, outbox empty, events arrived: {finished}")
        await settle(absorbed, env, quiet=env.redeliveries_settled, limit=30.0)
        exits = await stop_all(supervisor.workers)
        letters = await dead_letters(broker, handler.group)
    finally:
        await stop_all(supervisor.workers)
        await broker.close()

    committed = {n for (n,) in query(producer_db, "SELECT n FROM made")}
    effects = [n for (n,) in query(sink_db, "SELECT n FROM effects")]
    got = set(effects)
    result.report("transactions (deliberately rolled back)", f"{params.transactions} ({len(rollbacks)})")
    result.expect(
        "producer kills done",
        supervisor.done(),
        len(plan),
    )
    result.report("producer kills by point", fmt(supervisor.executed()))
    result.report("restarts", supervisor.restarts)
    result.expect("unexpected exits", len(supervisor.unexpected), 0)
    result.expect("all done before the time limit", finished, True)
    result.expect("rows committed (of those meant to commit)", len(committed & committing), len(committing))
    result.expect("rows committed by rolled-back transactions", len(committed & rollbacks), 0)
    result.expect("events lost (committed row, event never arrived)", len(committed - got), 0)
    result.expect("events of rolled-back transactions arrived", len(got & rollbacks), 0)
    result.expect("events without a committed row", len(got - committed), 0)
    result.expect("duplicate effects downstream", len(effects) - len(got), 0)
    result.report("duplicate deliveries absorbed by the inbox", absorbed())
    result.expect("outbox rows left", outbox_rows(), 0)
    result.expect("dead letters", len(letters), 0)
    result.expect("exit codes at SIGTERM", exits, [0] * len(exits))
    result.notes += supervisor.unexpected
    result.elapsed = time.monotonic() - started
    return result

"""Scenario 2 — poison messages and crashers, then the fix and ``callcast dlq replay``.

N events; 1 % are *poison* (the handler raises an ordinary exception every time) and 0.1 % are
*crashers* (the handler kills its own process with ``SIGKILL`` every time). The idempotent handler
has ``RetryPolicy(max_attempts=4)`` with small delays; W consumer processes, each restarted when it
dies. Expected:

* every poison event is dead-lettered with reason ``error`` after exactly ``max_attempts``
  attempts (``dlqattempts``), with ``dlqerror`` and ``dlqtraceback``;
* every crasher is dead-lettered with reason ``crashloop`` after ``max_attempts`` ± 1 deliveries;
* every dead letter says ``dlqsubscriber``, ``dlqtopic``, ``dlqtime``; no healthy event is lost.

Then the handler is "fixed" (a flag file it reads appears) and the real ``callcast dlq replay --all``
runs as a child process: every replayed event must be applied exactly once, and the dead letters of
this service must be gone (``callcast dlq list --json``).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import text

from callcast import App, Context, RetryPolicy, Service
from callcast.brokers import connect
from callcast.testing.faults import kill_this_process

from .harness import (
    Env,
    Result,
    Supervisor,
    Worker,
    cli,
    dead_letters,
    envelopes_of,
    event_model,
    fmt,
    publish_all,
    query,
    settle,
    stop_all,
)

NAME = "2 poison and crashers"
FIXED_FLAG = "poison-fixed"
"""A file in the data directory: once it exists, the handler takes every event."""
DIAGNOSTICS = ("dlqsubscriber", "dlqtopic", "dlqtime", "dlqerror", "dlqattempts", "dlqreason")


@dataclass(frozen=True)
class Params:
    events: int = 10_000
    poison: int = 100
    crashers: int = 10
    workers: int = 4
    max_attempts: int = 4
    time_limit: float = 900.0


FULL = Params()
SHORT = Params(events=600, poison=6, crashers=2, workers=2, time_limit=90.0)


class ItemBase(BaseModel):
    n: int
    kind: str = "ok"


def service_name(run: str) -> str:
    return f"f{run}-poison"


def build(run: str, config: Mapping[str, Any]) -> App:
    item = event_model(ItemBase, f"faults_{run}_poison_item")
    service = Service(service_name(run), database=True)
    retry = RetryPolicy(max_attempts=int(config.get("max_attempts", 4)), base_delay=0.05, max_delay=0.2)

    @service.on_startup
    async def tables(ctx: Context) -> None:
        async with ctx.transaction() as db:
            await db.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS effects (event_id TEXT NOT NULL, n INTEGER NOT NULL, "
                    "kind TEXT NOT NULL, attempt INTEGER NOT NULL, replays INTEGER NOT NULL, at REAL)"
                )
            )

    @service.on(item, name="apply", idempotent=True, retry=retry)
    async def apply(event: ItemBase, ctx: Context) -> None:
        assert ctx.envelope is not None
        if not os.path.exists(ctx.data_dir / FIXED_FLAG):  # noqa: ASYNC240 - a stat, no I/O to speak of
            if event.kind == "poison":
                raise RuntimeError(f"poison event {event.n}: this handler cannot take it (yet)")
            if event.kind == "crash":
                kill_this_process("crasher", f"{ctx.envelope.id} attempt={ctx.attempt}")
        await ctx.db.execute(
            text("INSERT INTO effects VALUES (:id, :n, :kind, :attempt, :replays, :at)"),
            {
                "id": ctx.envelope.id,
                "n": event.n,
                "kind": event.kind,
                "attempt": ctx.attempt,
                "replays": int(ctx.envelope.extensions.get("dlqreplays", "0")),
                "at": time.time(),
            },
        )

    return App([service], name=f"faults-{run}")


async def scenario(env: Env, params: Params = FULL) -> Result:
    result = Result(NAME, env.broker_url)
    started = time.monotonic()
    config = {"max_attempts": params.max_attempts}
    app = build(env.run, config)
    svc = service_name(env.run)
    handler = app.service(svc).handlers[0]
    db = env.data_dir / f"{svc}.db"

    special = env.rng.sample(range(params.events), params.poison + params.crashers)
    kinds = dict.fromkeys(special[: params.poison], "poison") | dict.fromkeys(
        special[params.poison :], "crash"
    )
    events = [ItemBase(n=n, kind=kinds.get(n, "ok")) for n in range(params.events)]
    envelopes = envelopes_of(handler.topic, events)
    kind_of = {envelope.id: event.kind for envelope, event in zip(envelopes, events, strict=True)}
    every_id = set(kind_of)

    def applied() -> Counter[str]:
        return Counter(event_id for (event_id,) in query(db, "SELECT event_id FROM effects"))

    broker = await connect(env.broker_url)
    workers = [Worker(env, __name__, svc, f"consumer-{i + 1}", config) for i in range(params.workers)]
    letters: list[dict[str, str]] = []
    try:
        await broker.declare(handler.topic, handler.group)
        await publish_all(broker, handler.topic, envelopes)
        env.say(f"published {params.events} events ({params.poison} poison, {params.crashers} crashers)")
        supervisor = Supervisor(env, workers)
        await supervisor.start()

        async def accounted() -> bool:
            """Every event is applied or dead-lettered."""
            nonlocal letters
            done = set(applied())
            letters = await dead_letters(broker, handler.group)
            return done | {letter["id"] for letter in letters} >= every_id

        complete = await supervisor.run(
            accounted, lambda: sum(applied().values()) + len(letters), quiet=env.stall, check_every=2.0
        )
        env.say(f"accounted for every event: {complete}; {len(letters)} dead letters")
        result.expect("every event applied or dead-lettered before the time limit", complete, True)
        await settle(lambda: (sum(applied().values()), len(letters)), env, quiet=2.0, limit=10.0)

        listed = await cli("dlq", "list", "--json", "--service", svc, "--broker", env.broker_url)
        before = json.loads(listed.stdout) if listed.returncode == 0 else []
        if listed.returncode != 0:
            result.notes.append(f"callcast dlq list failed ({listed.returncode}): {listed.stderr.strip()}")
        applied_before = applied()

        (env.data_dir / FIXED_FLAG).touch()
        env.say("handler fixed; callcast dlq replay --all")
        replayed = await cli("dlq", "replay", "--all", "--service", svc, "--broker", env.broker_url)
        if replayed.returncode != 0:
            result.notes.append(
                f"callcast dlq replay failed ({replayed.returncode}): {replayed.stderr.strip()}"
            )
        replayed_ids = {row["id"] for row in before}

        replayed_all = await supervisor.run(
            lambda: set(applied()) >= every_id,
            lambda: sum(applied().values()),
            quiet=env.stall,
            check_every=0.5,
        )
        result.expect("all applied after the replay before the time limit", replayed_all, True)
        await settle(lambda: sum(applied().values()), env, quiet=2.0, limit=10.0)
        listed_after = await cli("dlq", "list", "--json", "--service", svc, "--broker", env.broker_url)
        after = json.loads(listed_after.stdout) if listed_after.returncode == 0 else None
        exits = await stop_all(workers)
    finally:
        await stop_all(workers)
        await broker.close()

    applied_after = applied()
    by_kind: dict[str, list[dict[str, str]]] = {"poison": [], "crash": [], "ok": []}
    for row in before:
        by_kind[kind_of.get(row["id"], "ok")].append(row)
    poison_rows, crash_rows, healthy_rows = by_kind["poison"], by_kind["crash"], by_kind["ok"]
    max_attempts = params.max_attempts

    def attempts(rows: list[dict[str, str]]) -> str:
        return fmt(
            Counter(row.get("dlqattempts", "?") for row in sorted(rows, key=lambda r: r["dlqattempts"]))
        )

    healthy = {event_id for event_id, kind in kind_of.items() if kind == "ok"}
    lettered_ids = [row["id"] for row in before]
    result.report(
        "events published (poison, crashers)", f"{params.events} ({params.poison}, {params.crashers})"
    )
    result.report("consumer processes", params.workers)
    result.report("processes killed by crashers (restarted)", supervisor.other_deaths["crasher"])
    result.expect("unexpected exits", len(supervisor.unexpected), 0)
    result.expect("poison dead-lettered", len({row["id"] for row in poison_rows}), params.poison)
    result.expect(
        f"poison with dlqattempts = {max_attempts}",
        len({row["id"] for row in poison_rows if row.get("dlqattempts") == str(max_attempts)}),
        params.poison,
    )
    result.report("poison dlqattempts (value=count)", attempts(poison_rows))
    diagnosed = [
        row
        for row in poison_rows
        if row.get("dlqreason") == "error"
        and "RuntimeError" in row.get("dlqerror", "")
        and "poison event" in row.get("dlqtraceback", "")
    ]
    result.expect(
        "poison with reason error, dlqerror and dlqtraceback",
        len({row["id"] for row in diagnosed}),
        params.poison,
    )
    for row in poison_rows:
        if row not in diagnosed or row.get("dlqattempts") != str(max_attempts):
            result.notes.append(f"poison dead letter with other diagnostics: {_diagnostics(row)}")
    result.expect(
        "crashers dead-lettered with reason crashloop",
        len({row["id"] for row in crash_rows if row.get("dlqreason") == "crashloop"}),
        params.crashers,
    )
    result.expect(
        f"crashers with dlqattempts in {max_attempts}±1",
        len({row["id"] for row in crash_rows if abs(int(row.get("dlqattempts", "0")) - max_attempts) <= 1}),
        params.crashers,
    )
    result.report("crasher dlqattempts (value=count)", attempts(crash_rows))
    result.expect(
        "dead letters missing a diagnostic",
        sum(1 for row in before if any(not row.get(name) for name in DIAGNOSTICS)),
        0,
    )
    result.expect(
        "dead letters naming another subscriber or topic",
        sum(1 for row in before if (row["dlqsubscriber"], row["dlqtopic"]) != (handler.group, handler.topic)),
        0,
    )
    result.expect("healthy events dead-lettered", len(healthy_rows), 0)
    result.report(
        "healthy dead letters' reasons", fmt(Counter(row.get("dlqreason", "?") for row in healthy_rows))
    )
    result.report(
        "healthy dead letters already applied (ack lost)",
        sum(1 for row in healthy_rows if applied_before[row["id"]]),
    )
    result.expect(
        "healthy events lost (neither applied nor dead-lettered)",
        len(healthy - set(applied_before) - set(lettered_ids)),
        0,
    )
    # allowed: a crash between storing the dead letter and acking the delivery (callcast.deadletter)
    copies = len(lettered_ids) - len(set(lettered_ids))
    result.report("events dead-lettered twice", copies)
    result.expect("applied twice before the replay", sum(1 for c in applied_before.values() if c > 1), 0)
    result.expect(  # each event replayed once; the copies of one dead-lettered twice are purged
        "callcast dlq replay --all",
        replayed.stdout.strip(),
        f"replayed {len(set(lettered_ids))} dead letter(s)"
        + (f"; {copies} duplicate copies purged" if copies else ""),
    )
    result.expect(
        "replayed events applied exactly once",
        sum(1 for event_id in replayed_ids if applied_after[event_id] == 1),
        len(replayed_ids),
    )
    result.expect("lost after the replay (never applied)", len(every_id - set(applied_after)), 0)
    result.expect("applied twice after the replay", sum(1 for c in applied_after.values() if c > 1), 0)
    result.expect("dead letters left (callcast dlq list)", None if after is None else len(after), 0)
    result.expect("exit codes at SIGTERM", exits, [0] * params.workers)
    result.notes += supervisor.unexpected
    result.elapsed = time.monotonic() - started
    return result


def _diagnostics(row: dict[str, str]) -> str:
    """A dead letter's id and diagnostics, shortened, for a note."""
    return ", ".join(
        f"{name}={row.get(name, '')[-160:]!r}"
        for name in ("id", "dlqreason", "dlqattempts", "dlqerror", "dlqtraceback")
    )

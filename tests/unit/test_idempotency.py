"""Idempotency-Key on HTTP routes: replay, mismatch, concurrency, leases, the transaction guard."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel
from sqlalchemy import text

from callcast import App, Context, HTTPError, Service
from callcast.database import idempotency_table
from callcast.idempotency import IdempotencyPolicy, check_key, fingerprint
from callcast.service import Route
from callcast.waiting import within

from .conftest import StartApp, client, wait_until

KEY = "Idempotency-Key"


class Deposit(BaseModel):
    account: str
    cents: int


class Receipt(BaseModel):
    id: int
    account: str
    cents: int


def bank(policy: IdempotencyPolicy | str = "optional") -> tuple[App, dict[str, int]]:
    """A service whose POST /deposits writes a row in its transaction; counts handler runs."""
    runs = {"count": 0, "fail_next": 0}
    svc = Service("bank", database=True)
    gate: dict[str, asyncio.Event] = {}

    @svc.on_startup
    async def create(ctx: Context) -> None:
        async with ctx.transaction() as db:
            key = "SERIAL PRIMARY KEY" if db.dialect.name == "postgresql" else "INTEGER PRIMARY KEY"
            await db.execute(text(f"CREATE TABLE IF NOT EXISTS deposits (id {key}, account TEXT, cents INT)"))

    @svc.post("/deposits", status_code=201, idempotency=policy)  # type: ignore[arg-type]
    async def deposit(body: Deposit, ctx: Context) -> Receipt:
        runs["count"] += 1
        if "slow" in gate:
            gate["started"].set()
            await gate["slow"].wait()
        if runs["fail_next"]:
            runs["fail_next"] -= 1
            raise RuntimeError("transient")
        if body.cents < 0:
            raise HTTPError(422, "negative deposit")
        async with ctx.transaction() as db:
            result = await db.execute(
                text("INSERT INTO deposits (account, cents) VALUES (:a, :c) RETURNING id"),
                {"a": body.account, "c": body.cents},
            )
            row_id = int(result.scalar_one())
        return Receipt(id=row_id, account=body.account, cents=body.cents)

    app = App([svc], name="bank")
    app.gate = gate  # type: ignore[attr-defined]
    return app, runs


async def deposits(runtime: object) -> int:
    async with runtime.database("bank").transaction() as db:  # type: ignore[attr-defined]
        return int((await db.execute(text("SELECT count(*) FROM deposits"))).scalar_one())


async def test_same_key_same_body_replays_the_first_answer(start: StartApp) -> None:
    app, runs = bank()
    runtime = await start(app)
    async with client(runtime) as http:
        first = await http.post("/deposits", json={"account": "a", "cents": 5}, headers={KEY: "k1"})
        again = await http.post("/deposits", json={"account": "a", "cents": 5}, headers={KEY: "k1"})
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert runs["count"] == 1
    assert await deposits(runtime) == 1


async def test_same_key_other_body_is_422_and_does_not_run(start: StartApp) -> None:
    app, runs = bank()
    runtime = await start(app)
    async with client(runtime) as http:
        await http.post("/deposits", json={"account": "a", "cents": 5}, headers={KEY: "k"})
        other = await http.post("/deposits", json={"account": "a", "cents": 6}, headers={KEY: "k"})
    assert other.status_code == 422
    assert "different request" in other.json()["detail"]
    assert runs["count"] == 1


async def test_without_a_key_an_optional_route_runs_every_time(start: StartApp) -> None:
    app, runs = bank()
    runtime = await start(app)
    async with client(runtime) as http:
        for _ in range(2):
            assert (await http.post("/deposits", json={"account": "a", "cents": 1})).status_code == 201
    assert runs["count"] == 2


async def test_required_key_and_bad_keys_are_400_with_the_reason(start: StartApp) -> None:
    app, runs = bank("required")
    runtime = await start(app)
    body = {"account": "a", "cents": 1}
    async with client(runtime) as http:
        missing = await http.post("/deposits", json=body)
        too_long = await http.post("/deposits", json=body, headers={KEY: "x" * 256})
        longest = await http.post("/deposits", json=body, headers={KEY: "x" * 255})
    assert missing.status_code == 400
    assert "requires an Idempotency-Key" in missing.json()["detail"]
    assert too_long.status_code == 400
    assert "1 to 255" in too_long.json()["detail"]
    assert longest.status_code == 201
    assert runs["count"] == 1


def test_check_key_refuses_unprintable_keys() -> None:
    policy = IdempotencyPolicy()
    assert check_key("order-1 retry", policy) == "order-1 retry"
    assert check_key(None, policy) is None
    for bad in ("", "tab\there", "é"):
        with pytest.raises(ValueError, match="Idempotency-Key"):
            check_key(bad, policy)


def test_fingerprint_covers_method_path_query_and_body() -> None:
    base = fingerprint("POST", "/a", "", b"{}")
    assert base == fingerprint("POST", "/a", "", b"{}")
    assert len({base, fingerprint("PUT", "/a", "", b"{}"), fingerprint("POST", "/b", "", b"{}")}) == 3
    assert base != fingerprint("POST", "/a", "x=1", b"{}")
    assert base != fingerprint("POST", "/a", "", b"{} ")


async def test_invalid_requests_do_not_claim_the_key(start: StartApp) -> None:
    app, runs = bank()
    runtime = await start(app)
    async with client(runtime) as http:
        invalid = await http.post("/deposits", json={"account": "a"}, headers={KEY: "k"})
        valid = await http.post("/deposits", json={"account": "a", "cents": 2}, headers={KEY: "k"})
    assert invalid.status_code == 422
    assert valid.status_code == 201
    assert runs["count"] == 1


async def test_client_errors_are_stored_and_server_errors_release_the_key(start: StartApp) -> None:
    app, runs = bank()
    runtime = await start(app)
    negative = {"account": "a", "cents": -1}
    async with client(runtime) as http:
        refused = await http.post("/deposits", json=negative, headers={KEY: "neg"})
        replayed = await http.post("/deposits", json=negative, headers={KEY: "neg"})
        runs["fail_next"] = 1
        failed = await http.post("/deposits", json={"account": "a", "cents": 3}, headers={KEY: "f"})
        retried = await http.post("/deposits", json={"account": "a", "cents": 3}, headers={KEY: "f"})
    assert (refused.status_code, replayed.status_code) == (422, 422)
    assert replayed.headers["idempotent-replayed"] == "true"
    assert failed.status_code == 500
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    assert runs["count"] == 3  # neg once (its replay did not run), f twice
    assert await deposits(runtime) == 1


async def test_a_nested_transaction_does_not_mark_the_key_applied_before_the_outer_one_commits(
    start: StartApp,
) -> None:
    """The outer transaction fails after the nested one ended: nothing committed, so the 500 is not
    stored and the retry runs."""
    svc = Service("bank", database=True)
    runs = {"count": 0}

    @svc.post("/nested", status_code=201, idempotency="required")
    async def nested(body: Deposit, ctx: Context) -> Receipt:
        runs["count"] += 1
        async with ctx.transaction():
            async with ctx.transaction():
                pass
            if runs["count"] == 1:
                raise RuntimeError("after the nested block")
        return Receipt(id=runs["count"], account=body.account, cents=body.cents)

    runtime = await start(App([svc], name="bank"))
    async with client(runtime) as http:
        first = await http.post("/nested", json={"account": "a", "cents": 1}, headers={KEY: "n1"})
        again = await http.post("/nested", json={"account": "a", "cents": 1}, headers={KEY: "n1"})
    assert first.status_code == 500
    assert (again.status_code, again.json()["id"]) == (201, 2)


async def test_concurrent_requests_with_one_key_run_the_handler_once(start: StartApp) -> None:
    app, runs = bank()
    app.gate["slow"] = asyncio.Event()  # type: ignore[attr-defined]
    app.gate["started"] = started = asyncio.Event()  # type: ignore[attr-defined]
    runtime = await start(app)
    async with client(runtime) as http:
        requests = [
            asyncio.create_task(
                http.post("/deposits", json={"account": "c", "cents": 7}, headers={KEY: "same"})
            )
            for _ in range(20)
        ]
        await within(started.wait(), 5.0)  # the first one runs; the others arrive while it waits
        app.gate["slow"].set()  # type: ignore[attr-defined]
        answers = await within(asyncio.gather(*requests), 10.0)
    assert {answer.status_code for answer in answers} == {201}
    assert len({answer.content for answer in answers}) == 1
    assert sum(answer.headers.get("idempotent-replayed") == "true" for answer in answers) == 19
    assert runs["count"] == 1
    assert await deposits(runtime) == 1


async def test_a_slow_request_keeps_its_key_past_its_first_lease(start: StartApp) -> None:
    """A request of another process arriving after the claim's first lease ran out finds it
    renewed: it waits, then answers 409, and the handler ran once."""
    app, runs = bank(IdempotencyPolicy(lease=0.3, wait=0.2))
    app.gate["slow"] = asyncio.Event()  # type: ignore[attr-defined]
    app.gate["started"] = started = asyncio.Event()  # type: ignore[attr-defined]
    first, second = await start(app), await start(app)  # two processes' runtimes, one database
    body = {"account": "s", "cents": 3}
    async with client(first) as one, client(second) as two:
        slow = asyncio.create_task(one.post("/deposits", json=body, headers={KEY: "slow"}))
        await within(started.wait(), 5.0)
        first_lease_ends = time.time() + 0.3
        await wait_until(lambda: time.time() > first_lease_ends + 0.1)
        try:  # taken over, the retry would run the handler, and wait on the gate too
            retry = await within(two.post("/deposits", json=body, headers={KEY: "slow"}), 5.0)
        finally:
            app.gate["slow"].set()  # type: ignore[attr-defined]
        answer = await within(slow, 5.0)
    assert retry.status_code == 409
    assert answer.status_code == 201
    assert runs["count"] == 1


async def claim_row(runtime: object, key: str, *, owner: str, lease_until: float, state: str) -> None:
    async with runtime.database("bank").transaction() as db:  # type: ignore[attr-defined]
        await db.execute(
            idempotency_table.insert().values(
                service="bank",
                route="POST /deposits",
                key=key,
                fingerprint=fingerprint("POST", "/deposits", "", b'{"account":"a","cents":1}'),
                state=state,
                owner=owner,
                lease_until=lease_until,
                expires_at=time.time() + 3600,
            )
        )


async def test_a_crashed_claim_is_taken_over_after_its_lease(start: StartApp) -> None:
    app, runs = bank(IdempotencyPolicy(wait=0.2))
    runtime = await start(app)
    await claim_row(runtime, "dead", owner="gone", lease_until=time.time() - 1, state="running")
    await claim_row(runtime, "alive", owner="other", lease_until=time.time() + 60, state="running")
    await claim_row(runtime, "lost", owner="gone", lease_until=time.time() - 1, state="applied")
    body = b'{"account":"a","cents":1}'
    headers = {"content-type": "application/json"}
    async with client(runtime) as http:
        dead = await http.post("/deposits", content=body, headers={**headers, KEY: "dead"})
        alive = await http.post("/deposits", content=body, headers={**headers, KEY: "alive"})
        lost = await http.post("/deposits", content=body, headers={**headers, KEY: "lost"})
    assert dead.status_code == 201
    assert alive.status_code == 409
    assert "in progress" in alive.json()["detail"]
    assert lost.status_code == 409
    assert "answer was not stored" in lost.json()["detail"]
    assert runs["count"] == 1


async def test_expired_keys_are_free_again(start: StartApp) -> None:
    app, runs = bank(IdempotencyPolicy(retention=0.05))
    runtime = await start(app)
    body = {"account": "a", "cents": 1}
    async with client(runtime) as http:
        await http.post("/deposits", json=body, headers={KEY: "k"})
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and runs["count"] < 2:
            answer = await http.post("/deposits", json=body, headers={KEY: "k"})
    assert runs["count"] == 2
    assert "idempotent-replayed" not in answer.headers


async def test_a_request_that_lost_its_claim_cannot_commit(start: StartApp) -> None:
    """Its lease ran out and another request took the key over: its transaction rolls back."""
    svc = Service("bank", database=True)

    @svc.on_startup
    async def create(ctx: Context) -> None:
        async with ctx.transaction() as db:
            await db.execute(text("CREATE TABLE IF NOT EXISTS deposits (id INTEGER PRIMARY KEY, cents INT)"))

    @svc.post("/deposits", status_code=201, idempotency="optional")
    async def deposit(body: Deposit, ctx: Context) -> None:
        async with ctx.transaction() as db:  # as if another request took the key over meanwhile
            await db.execute(idempotency_table.update().values(owner="usurper"))
        async with ctx.transaction() as db:
            await db.execute(text("INSERT INTO deposits (cents) VALUES (:c)"), {"c": body.cents})

    runtime = await start(App([svc]))
    async with client(runtime) as http:
        answer = await http.post("/deposits", json={"account": "a", "cents": 1}, headers={KEY: "k"})
    assert answer.status_code == 409
    assert await deposits(runtime) == 0


def test_idempotency_needs_the_service_database() -> None:
    from callcast import ConfigurationError

    with pytest.raises(ConfigurationError, match="database=True"):
        Service("nodb").post("/x", idempotency="optional")
    with pytest.raises(ConfigurationError, match="required"):
        Service("db", database=True).post("/x", idempotency="always")  # type: ignore[arg-type]
    svc = Service("db", database=True)

    @svc.put("/x", idempotency="required")
    async def put(ctx: Context) -> None: ...

    route: Route = svc.routes[0]
    assert route.idempotency == IdempotencyPolicy(required=True)


@pytest.mark.postgres
async def test_keys_on_a_postgresql_service_database(postgres_database: str, start: StartApp) -> None:
    app, runs = bank()
    app.gate["slow"] = asyncio.Event()  # type: ignore[attr-defined]
    app.gate["started"] = started = asyncio.Event()  # type: ignore[attr-defined]
    runtime = await start(app, databases={"bank": postgres_database})
    body = {"account": "p", "cents": 9}
    async with client(runtime) as http:
        requests = [
            asyncio.create_task(http.post("/deposits", json=body, headers={KEY: "pg"})) for _ in range(10)
        ]
        await within(started.wait(), 5.0)
        app.gate["slow"].set()  # type: ignore[attr-defined]
        answers = await within(asyncio.gather(*requests), 10.0)
        other = await http.post("/deposits", json={**body, "cents": 1}, headers={KEY: "pg"})
    assert {answer.status_code for answer in answers} == {201}
    assert len({answer.content for answer in answers}) == 1
    assert other.status_code == 422
    assert runs["count"] == 1
    assert await deposits(runtime) == 1

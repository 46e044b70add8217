"""One correlation id from an HTTP request through a publish, a handler, a call and its handler,
in every context, in the task's contextvar and on every log record."""

from __future__ import annotations

import asyncio
import logging

import pytest
from pydantic import BaseModel

from callcast import App, Context, Service, correlation
from callcast.correlation import CorrelationFilter, accept

from .conftest import StartApp, client, wait_until

log = logging.getLogger("tests.correlation")


class Ping(BaseModel):
    n: int


class Pinged(BaseModel):
    n: int


class Pong(BaseModel):
    n: int


def chain() -> tuple[App, list[tuple[str, str, str | None]]]:
    """front (HTTP, publishes Pinged) → relay (on Pinged, calls back) → back (rpc): each records
    (where, ctx.correlation_id, the contextvar) and logs a line."""
    seen: list[tuple[str, str, str | None]] = []
    front = Service("front", publishes=[Pinged])
    relay = Service("relay", calls=["back"])
    back = Service("back")

    @back.rpc
    async def answer(req: Ping, ctx: Context) -> Pong:
        seen.append(("back", ctx.correlation_id, correlation.current.get()))
        log.warning("answering %s", req.n)
        return Pong(n=req.n)

    @relay.on(Pinged)
    async def forward(event: Pinged, ctx: Context) -> None:
        seen.append(("relay", ctx.correlation_id, correlation.current.get()))
        log.warning("forwarding %s", event.n)
        await ctx.call(answer, Ping(n=event.n), timeout=5.0)
        seen.append(("relay after call", ctx.correlation_id, correlation.current.get()))

    @front.post("/ping", status_code=202)
    async def ping(body: Ping, ctx: Context) -> None:
        seen.append(("front", ctx.correlation_id, correlation.current.get()))
        log.warning("publishing %s", body.n)
        await ctx.publish(Pinged(n=body.n))

    return App([front, relay, back], name="chain"), seen


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.handler.addFilter(CorrelationFilter())
    caplog.set_level(logging.WARNING, logger="tests.correlation")
    return caplog


async def test_the_id_of_the_request_reaches_every_handler_call_and_log_line(
    start: StartApp, logs: pytest.LogCaptureFixture
) -> None:
    app, seen = chain()
    runtime = await start(app)
    async with client(runtime) as http:
        answer = await http.post("/ping", json={"n": 1}, headers={"X-Correlation-Id": "req-42"})
    assert answer.status_code == 202
    assert answer.headers["x-correlation-id"] == "req-42"
    await wait_until(lambda: len(seen) == 4)
    assert {where for where, _, _ in seen} == {"front", "relay", "back", "relay after call"}
    assert all(ctx_id == "req-42" and current == "req-42" for _, ctx_id, current in seen), seen
    lines = [record for record in logs.records if record.name == "tests.correlation"]
    assert len(lines) == 3
    assert {getattr(record, "correlation_id", None) for record in lines} == {"req-42"}


async def test_an_unacceptable_header_is_replaced_by_a_new_id(start: StartApp) -> None:
    app, seen = chain()
    runtime = await start(app)
    async with client(runtime) as http:
        too_long = await http.post("/ping", json={"n": 2}, headers={"X-Correlation-Id": "x" * 129})
        plain = await http.post("/ping", json={"n": 3})
    new_ids = {too_long.headers["x-correlation-id"], plain.headers["x-correlation-id"]}
    assert len(new_ids) == 2
    assert "x" * 129 not in new_ids
    await wait_until(lambda: len(seen) == 8)
    assert {ctx_id for _, ctx_id, _ in seen} == new_ids


async def test_each_request_task_has_its_own_id(start: StartApp) -> None:
    """Concurrent units of work do not see each other's id (a contextvar per task)."""
    app, seen = chain()
    runtime = await start(app)
    async with client(runtime) as http:

        async def one(n: int) -> None:
            await http.post("/ping", json={"n": n}, headers={"X-Correlation-Id": f"id-{n}"})

        await asyncio.gather(*(asyncio.create_task(one(n)) for n in range(10)))
    await wait_until(lambda: len(seen) == 40)
    assert all(ctx_id == current for _, ctx_id, current in seen)
    assert {ctx_id for _, ctx_id, _ in seen} == {f"id-{n}" for n in range(10)}


def test_accept_limits_length_and_characters() -> None:
    assert accept("abc-123_:.") == "abc-123_:."
    assert accept("x" * 128) == "x" * 128
    for bad in (None, "", "x" * 129, "has space", "new\nline", "é"):
        assert accept(bad) is None


def test_the_filter_marks_records_outside_any_unit_of_work() -> None:
    async def outside() -> str:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        CorrelationFilter().filter(record)
        return str(record.correlation_id)  # type: ignore[attr-defined]

    assert asyncio.run(outside()) == "-"

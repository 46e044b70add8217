"""RPC over the broker and over HTTP: typed answers, remote errors kept, deadlines enforced."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel

from callcast import (
    App,
    CallTimeoutError,
    ConfigurationError,
    Context,
    HTTPError,
    RemoteError,
    ServiceUnavailableError,
)
from callcast import Service as Svc
from callcast.rpc import execute
from tests.unit.conftest import StartApp, client


class Add(BaseModel):
    a: int
    b: int
    sleep: float = 0.0


class Sum(BaseModel):
    total: int
    seen_deadline: bool
    correlation_id: str


calc = Svc("calc")


@calc.rpc
async def add(req: Add, ctx: Context) -> Sum:
    if req.a < 0:
        raise HTTPError(400, "negative numbers are not supported")
    if req.a == 13:
        raise RuntimeError("unlucky internals")
    await asyncio.sleep(req.sleep)
    return Sum(total=req.a + req.b, seen_deadline=ctx.deadline is not None, correlation_id=ctx.correlation_id)


@calc.rpc(name="count")
async def count_items(req: Add, ctx: Context) -> list[int]:
    return list(range(req.a))


front = Svc("front", calls=["calc"])
loner = Svc("loner")
app = App([calc, front, loner])


async def test_call_over_the_broker_returns_the_typed_answer(start: StartApp) -> None:
    runtime = await start(app)
    ctx = runtime.context("front", correlation_id="corr-1")
    answer = await ctx.call(add, Add(a=2, b=3), timeout=5)
    assert answer == Sum(total=5, seen_deadline=True, correlation_id="corr-1")
    assert await ctx.call(calc.count, Add(a=3, b=0)) == [0, 1, 2]


async def test_remote_http_error_keeps_status_and_detail(start: StartApp) -> None:
    runtime = await start(app)
    with pytest.raises(RemoteError) as caught:
        await runtime.context("front").call(add, Add(a=-1, b=0))
    assert caught.value.status == 400
    assert "negative numbers" in str(caught.value)


async def test_unexpected_remote_failure_is_500_without_internals(start: StartApp) -> None:
    runtime = await start(app)
    with pytest.raises(RemoteError) as caught:
        await runtime.context("front").call(add, Add(a=13, b=0))
    assert caught.value.status == 500
    assert "unlucky" not in str(caught.value)


async def test_timeout_raises_call_timeout_error_near_the_deadline(start: StartApp) -> None:
    runtime = await start(app)
    began = time.monotonic()
    with pytest.raises(CallTimeoutError):
        await runtime.context("front").call(add, Add(a=1, b=1, sleep=5), timeout=0.2)
    assert time.monotonic() - began < 1.0


async def test_the_callers_deadline_caps_the_timeout(start: StartApp) -> None:
    runtime = await start(app)
    ctx = runtime.context("front", deadline=time.time() + 0.2)
    began = time.monotonic()
    with pytest.raises(CallTimeoutError):
        await ctx.call(add, Add(a=1, b=1, sleep=5), timeout=30)
    assert time.monotonic() - began < 1.0


async def test_calls_to_undeclared_services_are_refused(start: StartApp) -> None:
    runtime = await start(app)
    with pytest.raises(ConfigurationError, match="does not declare"):
        await runtime.context("loner").call(add, Add(a=1, b=1))


async def test_call_waits_for_a_server_in_another_runtime_on_the_same_broker(start: StartApp) -> None:
    caller = await start(app, services=["front"])
    await start(app, services=["calc"])
    assert (await caller.context("front").call(add, Add(a=20, b=22))).total == 42


async def test_no_server_running_means_timeout_not_hang(start: StartApp) -> None:
    caller = await start(app, services=["front"])
    with pytest.raises(CallTimeoutError):
        await caller.context("front").call(add, Add(a=1, b=1), timeout=0.2)


async def test_call_over_http_to_a_real_server(start: StartApp) -> None:
    server = await start(app, services=["calc"])
    await server.serve_http("127.0.0.1", 0)
    caller = await start(
        app, services=["front"], service_urls={"calc": f"http://127.0.0.1:{server.http_port}"}
    )
    ctx = caller.context("front", correlation_id="over-http")
    answer = await ctx.call(add, Add(a=1, b=2), timeout=5)
    assert answer == Sum(total=3, seen_deadline=True, correlation_id="over-http")
    with pytest.raises(RemoteError) as caught:
        await ctx.call(add, Add(a=-5, b=2))
    assert caught.value.status == 400
    with pytest.raises(CallTimeoutError):
        await ctx.call(add, Add(a=1, b=1, sleep=5), timeout=0.2)


async def test_unreachable_http_service_is_service_unavailable(start: StartApp) -> None:
    caller = await start(app, services=["front"], service_urls={"calc": "http://127.0.0.1:9"})
    with pytest.raises(ServiceUnavailableError):
        await caller.context("front").call(add, Add(a=1, b=2), timeout=2)


gateway = Svc("gateway")


class Probe(BaseModel):
    n: int


@gateway.rpc
async def forward(request: Probe, ctx: Context) -> Probe:
    raise ServiceUnavailableError("call to downstream.work: connection refused", target="downstream.work")


async def test_an_endpoint_whose_own_call_found_no_one_answers_503_not_502(start: StartApp) -> None:
    """A callee that could not reach *its* callee is unavailable, not broken: 503 (retryable)."""
    runtime = await start(App([gateway], name="relay"))
    status, body = await execute(forward, b'{"n": 1}', runtime.context("gateway"))
    assert status == 503
    assert b"connection refused" in body


async def test_rpc_over_http_refuses_a_bad_or_passed_deadline_and_echoes_the_correlation_id(
    start: StartApp,
) -> None:
    runtime = await start(app)
    request = {"a": 1, "b": 2}
    async with client(runtime) as http:
        garbled = await http.post(
            "/rpc/calc/add", json=request, headers={"x-callcast-deadline": "soon", "x-correlation-id": "c-1"}
        )
        passed = await http.post("/rpc/calc/add", json=request, headers={"x-callcast-deadline": "1"})
        ahead = await http.post(
            "/rpc/calc/add", json=request, headers={"x-callcast-deadline": f"{time.time() + 30}"}
        )
    assert garbled.status_code == 400
    assert "UNIX time" in garbled.json()["detail"]
    assert garbled.headers["x-correlation-id"] == "c-1"
    assert passed.status_code == 504
    assert passed.headers["x-correlation-id"]
    assert ahead.status_code == 200
    assert ahead.json()["seen_deadline"] is True

"""RPC over the broker and over HTTP: typed answers, remote errors kept, deadlines enforced."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

import orjson
import pytest
from pydantic import BaseModel, TypeAdapter

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


@gateway.rpc(name="pass_on")
async def pass_on(request: Probe, ctx: Context) -> Probe:
    raise RemoteError(
        "downstream.work failed with 422 HTTPError: n must be even",
        target="downstream.work",
        status=422,
        error_type="HTTPError",
        detail="n must be even",
    )


async def test_an_endpoint_whose_callee_refused_the_input_answers_that_4xx_not_502(start: StartApp) -> None:
    """The callee's 422 (the input it was handed on was bad) stays a 4xx for the caller: not a
    failure of this service that callers would retry and count against its circuit breaker."""
    runtime = await start(App([gateway], name="relay"))
    status, body = await execute(pass_on, b'{"n": 1}', runtime.context("gateway"))
    assert status == 422
    assert orjson.loads(body) == {"error": "HTTPError", "detail": "n must be even"}  # not who said it


async def test_an_endpoint_whose_own_call_found_no_one_answers_503_not_502(
    start: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    """A callee that could not reach *its* callee is unavailable, not broken: 503 (retryable).
    Its answer (``/rpc`` may face outside callers) names the kind of failure only; the full text,
    naming the internal service it could not reach, goes to the log."""
    runtime = await start(App([gateway], name="relay"))
    with caplog.at_level(logging.WARNING, logger="callcast.rpc"):
        status, body = await execute(forward, b'{"n": 1}', runtime.context("gateway"))
    assert status == 503
    assert orjson.loads(body) == {
        "error": "ServiceUnavailableError",
        "detail": "a service this request needs is unavailable",
    }
    assert "downstream.work: connection refused" in caplog.text


@gateway.get("/relay/{outcome}")
async def relay(outcome: str) -> Probe:
    if outcome == "refused":
        raise RemoteError(
            "downstream.work failed with 422 HTTPError: n must be even",
            target="downstream.work",
            status=422,
            detail="n must be even",
        )
    raise ServiceUnavailableError(
        "call to downstream.work: amqp://***@broker.internal:5672 refused", target="downstream.work"
    )


async def test_a_route_tells_its_client_the_callees_4xx_reason_and_only_the_kind_of_a_5xx(
    start: StartApp, caplog: pytest.LogCaptureFixture
) -> None:
    """A 5xx's full text names internal services and addresses: the operator's log gets it, the
    (perhaps external) client only the kind of failure."""
    runtime = await start(App([gateway], name="relay"))
    async with client(runtime) as http:
        refused = await http.get("/relay/refused")
        unavailable = await http.get("/relay/unavailable")
    assert (refused.status_code, refused.json()) == (422, {"detail": "n must be even"})
    assert unavailable.status_code == 503
    assert unavailable.json() == {"detail": "a service this request needs is unavailable"}
    assert "broker.internal" in caplog.text


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


async def test_a_deadline_that_is_no_number_of_seconds_is_400_and_a_far_one_is_served(
    start: StartApp,
) -> None:
    runtime = await start(app)
    request = {"a": 1, "b": 2}
    async with client(runtime) as http:
        refused = [
            await http.post("/rpc/calc/add", json=request, headers={"x-callcast-deadline": value})
            for value in ("nan", "inf", "-inf")
        ]
        far = await http.post("/rpc/calc/add", json=request, headers={"x-callcast-deadline": "1e307"})
    assert [answer.status_code for answer in refused] == [400, 400, 400]
    assert far.status_code == 200


async def test_a_call_timeout_must_be_a_positive_finite_number(start: StartApp) -> None:
    runtime = await start(app)
    ctx = runtime.context("front")
    for timeout in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="timeout"):
            await ctx.call(add, Add(a=1, b=2), timeout=timeout)


async def test_an_invalid_answer_is_reported_without_the_values_it_held(start: StartApp) -> None:
    """What the callee sent may be anything (a card number, say): the error names the fields only."""
    wrong = Svc("wrong")

    @wrong.rpc(name="add")
    async def secretive(req: Add, ctx: Context) -> dict[str, str]:
        return {"total": "card 4111-1111-1111-1111"}

    asker = Svc("asker", calls=["wrong"])
    runtime = await start(App([wrong, asker]))
    expecting_a_sum = dataclasses.replace(secretive, response_adapter=TypeAdapter(Sum))
    with pytest.raises(RemoteError) as raised:
        await runtime.context("asker").call(expecting_a_sum, Add(a=1, b=2))
    assert raised.value.status == 502
    assert "total" in str(raised.value)
    assert "4111" not in str(raised.value)


bulky = Svc("bulky")


@bulky.rpc
async def everything(req: Add, ctx: Context) -> list[str]:
    return ["x" * 1000] * 1100  # ~1.1 MB of JSON


async def test_an_answer_over_http_larger_than_the_limit_is_502_not_read_whole(start: StartApp) -> None:
    server = await start(App([bulky, front], name="big"), services=["bulky"])
    await server.serve_http("127.0.0.1", 0)
    caller_app = App([bulky, Svc("reader", calls=["bulky"])], name="big")
    caller = await start(
        caller_app, services=["reader"], service_urls={"bulky": f"http://127.0.0.1:{server.http_port}"}
    )
    with pytest.raises(RemoteError) as raised:
        await caller.context("reader").call(everything, Add(a=1, b=1), timeout=5)
    assert raised.value.status == 502
    assert "more than" in str(raised.value)


async def test_an_answer_over_http_that_cannot_be_decoded_is_service_unavailable(start: StartApp) -> None:
    """A body announced as gzip that is not: httpx raises DecodingError, which is no TransportError."""

    async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            await reader.read(100)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nxxxxx")
            await writer.drain()
        writer.close()

    listener = await asyncio.start_server(garbled, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        caller = await start(app, services=["front"], service_urls={"calc": f"http://127.0.0.1:{port}"})
        with pytest.raises(ServiceUnavailableError, match="DecodingError"):
            await caller.context("front").call(add, Add(a=1, b=2), timeout=5)
    finally:
        listener.close()
        await listener.wait_closed()

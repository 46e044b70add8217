"""The FastAPI example: callcast services inside a FastAPI app, a FastAPI route with a callcast Context."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from examples.fastapi_app import create_api
from fastapi import FastAPI
from openapi_spec_validator import validate

from callcast import App, ConfigurationError, Context, Service
from callcast.brokers.memory import MemoryBroker
from callcast.fastapi import Callcast

from .conftest import wait_until


@pytest.fixture
async def http(broker: MemoryBroker, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    api = create_api(broker=broker, data_dir=tmp_path)
    async with api.router.lifespan_context(api):
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def test_a_fastapi_route_calls_and_publishes_through_its_context(http: httpx.AsyncClient) -> None:
    answer = await http.post("/hello", json={"name": "Ann"}, headers={"X-Correlation-Id": "corr-1"})
    assert answer.status_code == 200
    assert answer.json() == {"text": "Hello, Ann!"}
    assert answer.headers["x-correlation-id"] == "corr-1"

    async def signed() -> bool:
        return bool((await http.get("/guestbook")).json())

    await wait_until(signed)
    book = await http.get("/guestbook")
    assert book.json() == [{"name": "Ann", "correlation_id": "corr-1"}]
    assert "x-correlation-id" in book.headers


async def test_callcast_errors_in_fastapi_routes_keep_their_status(http: httpx.AsyncClient) -> None:
    missing = await http.post("/hello", json={"name": "nobody"})
    assert missing.status_code == 404  # the RPC's own 4xx, passed on, as in callcast routes
    assert "nobody is here" in missing.json()["detail"]
    invalid = await http.post("/hello", json={"name": ""})
    assert invalid.status_code == 422  # FastAPI's own validation


async def test_rpc_endpoints_and_fastapi_routes_share_one_openapi_document(http: httpx.AsyncClient) -> None:
    rpc = await http.post("/rpc/greeter/greet", json={"name": "Bo"})
    assert rpc.status_code == 200
    assert rpc.json() == {"text": "Hello, Bo!"}
    spec = (await http.get("/openapi.json")).json()
    validate(spec)
    assert {"/", "/hello", "/guestbook", "/rpc/greeter/greet"} <= spec["paths"].keys()
    assert "Greet" in spec["components"]["schemas"]
    assert (await http.get("/")).status_code == 200


def test_clashes_and_unknown_services_are_refused() -> None:
    svc = Service("svc")

    @svc.get("/taken")
    async def taken(ctx: Context) -> None: ...

    cc = Callcast(App([svc]), broker="memory://")
    api = FastAPI()

    @api.get("/taken")
    async def also_taken() -> None: ...

    with pytest.raises(ConfigurationError, match="GET /taken"):
        cc.mount(api)
    with pytest.raises(ConfigurationError, match="does not run"):
        cc.context("elsewhere")

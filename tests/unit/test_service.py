"""Declaring services: mistakes are caught when the module is imported, not at the first request."""

from __future__ import annotations

import inspect

import pytest
from pydantic import BaseModel

import callcast
from callcast import App, ConfigurationError, Context, Service
from callcast.topology import describe, render
from tests.unit.conftest import StartApp


class Ping(BaseModel):
    n: int


def test_handlers_must_be_async() -> None:
    svc = Service("s")
    with pytest.raises(ConfigurationError, match="async"):
        svc.get("/x")(lambda: None)  # type: ignore[arg-type,return-value]


def test_rpc_needs_a_model_request_and_a_context() -> None:
    svc = Service("s")

    async def no_model(req: int, ctx: Context) -> int:
        return req

    async def one_arg(req: Ping) -> int:
        return 1

    with pytest.raises(ConfigurationError, match="pydantic model"):
        svc.rpc(no_model)  # type: ignore[type-var]
    with pytest.raises(ConfigurationError, match=r"\(request, ctx\)"):
        svc.rpc(one_arg)  # type: ignore[arg-type]


def test_route_path_parameters_must_exist_in_the_signature() -> None:
    svc = Service("s")

    async def handler(ctx: Context) -> None:
        return None

    with pytest.raises(ConfigurationError, match="user_id"):
        svc.get("/users/{user_id}")(handler)


def test_duplicate_names_and_routes_are_refused() -> None:
    one, two = Service("a"), Service("a")
    with pytest.raises(ConfigurationError, match="two services"):
        App([one, two])
    first, second = Service("b"), Service("c")

    async def handler() -> None:
        return None

    first.get("/same")(handler)
    second.get("/same")(handler)
    with pytest.raises(ConfigurationError, match="served by both"):
        App([first, second])


def test_names_that_would_share_a_database_are_refused() -> None:
    """``CALLCAST_DATABASE_A_B`` names the database of ``a-b`` and of ``a_b``."""
    for first, second in (("a-b", "a_b"), ("orders", "Orders")):
        with pytest.raises(ConfigurationError, match="share a database"):
            App([Service(first), Service(second)])


def test_bad_service_names_and_publishes_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        Service("has space")
    with pytest.raises(ConfigurationError, match="pydantic"):
        Service("ok", publishes=[int])  # type: ignore[list-item]


async def test_publishing_an_undeclared_event_is_refused(start: StartApp) -> None:
    quiet = Service("quiet")
    runtime = await start(App([quiet]))
    with pytest.raises(ConfigurationError, match="does not declare"):
        await runtime.context("quiet").publish(Ping(n=1))


def test_topology_names_routes_rpcs_publishers_subscribers_and_calls() -> None:
    pub = Service("pub", publishes=[Ping], calls=["rpcs"])
    sub = Service("sub")
    rpcs = Service("rpcs")

    @pub.post("/ping")
    async def ping(body: Ping) -> Ping:
        return body

    @sub.on(Ping)
    async def on_ping(event: Ping, ctx: Context) -> None:
        return None

    @rpcs.rpc
    async def echo(req: Ping, ctx: Context) -> Ping:
        return req

    app = App([pub, sub, rpcs], name="t")
    data = describe(app)
    assert data["events"] == {"Ping": {"publishers": ["pub"], "subscribers": ["sub.on_ping"]}}
    assert data["services"]["pub"]["routes"] == ["POST /ping"]
    assert data["services"]["rpcs"]["rpc"] == ["rpcs.echo"]
    text = render(app)
    assert "Ping: pub -> sub.on_ping" in text
    assert "pub -> rpcs" in text


def test_public_api_is_exactly_what_all_lists() -> None:
    public = {
        name
        for name, value in vars(callcast).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(callcast.__all__)
    for name in callcast.__all__:
        assert getattr(callcast, name) is not None


def test_every_callcast_exception_has_one_root() -> None:
    from callcast import exceptions

    errors = [
        value
        for value in vars(exceptions).values()
        if isinstance(value, type) and issubclass(value, Exception) and value is not exceptions.HTTPError
    ]
    assert all(issubclass(error, callcast.CallcastError) for error in errors)
    for error in errors:
        assert error.__name__ in exceptions.__doc__  # the tree in the docstring names each one

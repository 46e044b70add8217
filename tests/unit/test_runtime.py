"""The runtime's start and stop: groups declared before anything publishes, a port in use, stopping
every consumer within one grace period, and what the starting task is left with."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from pydantic import BaseModel

from callcast import App, ConfigurationError, Context, Service, correlation
from callcast.brokers.memory import MemoryBroker
from tests.unit.conftest import StartApp, wait_until


class Hello(BaseModel):
    word: str


greeter = Service("greeter", publishes=[Hello])
listener = Service("listener")
heard: list[str] = []
hook_ids: list[str] = []


@greeter.on_startup
async def say_hello(ctx: Context) -> None:
    hook_ids.append(ctx.correlation_id)
    await ctx.publish(Hello(word="hello"))


@listener.on(Hello)
async def hear(event: Hello, ctx: Context) -> None:
    heard.append(event.word)


async def test_what_a_startup_hook_publishes_reaches_every_group_of_the_app(start: StartApp) -> None:
    """The groups are declared before any hook runs (brokers drop a publish no group takes)."""
    heard.clear()
    await start(App([greeter, listener]))
    await wait_until(lambda: heard == ["hello"])


async def test_the_starting_task_keeps_no_correlation_id_of_a_hook(start: StartApp) -> None:
    """Tasks started after the hooks (consumers, servers) would log under the hook's id."""
    hook_ids.clear()
    before = correlation.current.get()
    await start(App([greeter, listener]))
    assert hook_ids
    assert correlation.current.get() == before


async def test_a_service_named_twice_runs_once(start: StartApp) -> None:
    runtime = await start(App([greeter, listener]), services=["listener", "listener"])
    assert [service.name for service in runtime.running_services] == ["listener"]


async def test_a_port_in_use_is_a_clear_error_and_the_runtime_still_stops(start: StartApp) -> None:
    runtime = await start(App([greeter, listener]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match="cannot serve HTTP"):
            await runtime.serve_http("127.0.0.1", port)
    await runtime.stop(grace=1)
    assert runtime.http_port is None


class Stuck(BaseModel):
    n: int


async def test_consumers_are_stopped_together_within_one_grace_period(
    broker: MemoryBroker, tmp_path: object
) -> None:
    """Three groups, each with a handler that never ends: one grace period in all, not three."""
    never = asyncio.Event()
    stuck = Service("stuck", publishes=[Stuck])
    running: list[str] = []

    def handler(name: str) -> object:
        async def wait_forever(event: Stuck, ctx: Context) -> None:
            running.append(name)
            await never.wait()

        wait_forever.__name__ = wait_forever.__qualname__ = name
        return wait_forever

    for name in ("one", "two", "three"):
        stuck.on(Stuck)(handler(name))  # type: ignore[arg-type]
    runtime = await App([stuck]).start(broker=broker, data_dir=tmp_path)  # type: ignore[arg-type]
    await runtime.context("stuck").publish(Stuck(n=1))
    await wait_until(lambda: len(running) == 3)
    began = time.monotonic()
    await runtime.stop(grace=1.0)
    assert time.monotonic() - began < 2.5


async def test_http_requests_and_handlers_in_flight_share_one_grace_period(
    broker: MemoryBroker, tmp_path: object
) -> None:
    """A request that never ends and a handler that never ends: ``stop(grace)`` takes one grace
    period in all (uvicorn's own drain is 10 s; it is given the grace instead)."""
    never = asyncio.Event()
    slow = Service("slow", publishes=[Stuck])
    running: list[str] = []

    @slow.get("/wait")
    async def wait_forever() -> None:
        running.append("request")
        await never.wait()

    @slow.on(Stuck)
    async def handle_forever(event: Stuck, ctx: Context) -> None:
        running.append("handler")
        await never.wait()

    runtime = await App([slow]).start(broker=broker, data_dir=tmp_path)  # type: ignore[arg-type]
    await runtime.serve_http("127.0.0.1", 0)
    port = runtime.http_port
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /wait HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    await writer.drain()
    await runtime.context("slow").publish(Stuck(n=1))
    await wait_until(lambda: sorted(running) == ["handler", "request"])
    began = time.monotonic()
    await runtime.stop(grace=1.0)
    assert time.monotonic() - began < 2.5
    writer.close()

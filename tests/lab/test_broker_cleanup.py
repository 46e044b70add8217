"""``callcast compare --broker URL`` on the user's own broker: each run works in a namespace of its own
and removes it afterwards, also when the run fails or is interrupted, and touches nothing else.

Real servers on 127.0.0.1 (a server that is down is a skip locally, a failure in CI). The "user"
is a namespace of its own per test (:func:`tests.real_brokers.new_run`), holding one group with one
message, that must come through every lab run untouched; it is swept when the test ends.
"""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from callcast.brokers import connect
from callcast.envelope import Envelope
from callcast.lab import run as lab_run
from callcast.lab.namespace import PREFIX, scoped
from callcast.lab.run import Settings, run_matrix, run_once
from callcast.lab.scenarios import parse
from tests.real_brokers import BROKERS, NATS_URL, POSTGRES_DSN, REDIS_URL, new_run

pytestmark = pytest.mark.slow

SETTINGS = Settings(duration=1.5, rate=15.0, window=(0.2, 0.7), call_timeout=0.5, drain_timeout=6.0)
USER_TOPIC, USER_GROUP = "user.Kept", "user.keeper"


async def names_left(broker: str, user: str) -> set[str]:
    """What exists on ``broker`` under any lab namespace, or in the namespace ``user``."""
    if broker == "rabbitmq":
        names: set[str] = set()
        for kind in ("queues", "exchanges"):
            listing = await asyncio.to_thread(
                subprocess.run,
                ["rabbitmqctl", f"list_{kind}", "--quiet", "--no-table-headers", "name"],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            names |= {
                f"{kind} {line}" for line in listing.stdout.splitlines() if line.startswith((PREFIX, user))
            }
        return names
    if broker == "nats":
        import nats

        client = await nats.connect(NATS_URL)
        try:
            jetstream = client.jetstream()
            streams = {info.config.name or "" for info in await jetstream.streams_info()}
            consumers = {f"consumer {info.name}" for info in await jetstream.consumers_info(user.upper())}
            lab = {f"stream {name}" for name in streams if name.startswith((PREFIX, f"KV_{PREFIX}"))}
            return lab | consumers
        finally:
            await client.close()
    if broker == "redis":
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            return {
                key.decode()
                async for key in client.scan_iter(count=1000)
                if key.decode().startswith((PREFIX, f"{user}:"))
            }
        finally:
            await client.aclose()
    import asyncpg

    connection = await asyncpg.connect(POSTGRES_DSN)
    try:
        like = PREFIX.replace("_", r"\_") + "%"
        schemas = await connection.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", like)
        groups = await connection.fetch(f'SELECT topic, grp FROM "{user}".subscriptions')
        return {f"schema {row['nspname']}" for row in schemas} | {
            f"group {row[0]}/{row[1]}" for row in groups
        }
    finally:
        await connection.close()


async def user_keeps_its_message(url: str, label: bytes) -> None:
    """The user's group on ``url`` still holds its one message."""
    broker = await connect(url)
    try:
        subscription = await broker.subscribe(USER_TOPIC, USER_GROUP)
        async with asyncio.timeout(10):
            delivery = await subscription.__anext__()
        assert delivery.envelope.data == label
        await delivery.ack()
    finally:
        await broker.close()


@pytest.fixture(
    params=[
        pytest.param(name, marks=getattr(pytest.mark, name))
        for name in ("rabbitmq", "nats", "redis", "postgres")
    ]
)
async def user(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str, str]]:
    """A user's namespace on a real broker, with one group holding one message: (broker name,
    namespace, the user's URL); swept when the test ends."""
    name = request.param
    target = BROKERS[name]
    target.require()
    namespace = new_run()
    url = target.url(namespace)
    try:
        broker = await connect(url)
        try:
            await broker.declare(USER_TOPIC, USER_GROUP)
            await broker.publish(USER_TOPIC, [Envelope(type="Kept", source="/user", data=namespace.encode())])
        finally:
            await broker.close()
        yield name, namespace, url
    finally:
        await target.cleanup(namespace)


async def test_a_run_removes_what_it_created_on_the_users_broker_and_nothing_else(
    user: tuple[str, str, str],
) -> None:
    broker, namespace, url = user
    before = await names_left(broker, namespace)
    # event style with a flaky payments: handlers retry, so on RabbitMQ retry buckets are made too
    result = await run_once("event", parse("flaky-downstream"), replace(SETTINGS, broker=url))
    assert result["injected_failures"] > 0
    assert result["requests_ok"] > 0
    assert await names_left(broker, namespace) == before
    await user_keeps_its_message(url, namespace.encode())


@pytest.mark.parametrize("user", [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)], indirect=True)
async def test_a_failed_run_is_reported_removes_its_namespace_and_the_matrix_goes_on(
    user: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker, namespace, url = user
    drain = lab_run._drain

    async def failing_drain(live: Any, records: Any) -> Any:
        if live.style == "event":
            raise RuntimeError("injected: the drain broke")
        return await drain(live, records)

    monkeypatch.setattr(lab_run, "_drain", failing_drain)
    before = await names_left(broker, namespace)
    output = io.StringIO()
    entries = await run_matrix(
        ["event", "request"],
        [parse("baseline")],
        replace(SETTINGS, broker=url),
        console=Console(file=output, width=300),
    )

    failed, kept = entries
    assert failed["error"] == "RuntimeError: injected: the drain broke"
    assert "latency_p50_ms" not in failed
    assert kept["style"] == "request"
    assert kept["requests_ok"] > 0
    for entry in entries:
        cleanup = entry["broker_cleanup"]
        assert cleanup["namespace"].startswith(PREFIX)
        assert f"exchange {cleanup['namespace']}" in cleanup["removed"]
        assert any(item.startswith(f"queue {cleanup['namespace']}/") for item in cleanup["removed"])
        assert cleanup["not_removed"] == []
    assert failed["broker_cleanup"]["namespace"] != kept["broker_cleanup"]["namespace"]
    printed = output.getvalue()
    assert "event / baseline: FAILED: RuntimeError: injected: the drain broke" in printed
    assert f"namespace {failed['broker_cleanup']['namespace']}: removed" in printed
    assert await names_left(broker, namespace) == before
    await user_keeps_its_message(url, namespace.encode())


@pytest.mark.parametrize("user", [pytest.param("redis", marks=pytest.mark.redis)], indirect=True)
async def test_an_interrupted_compare_removes_the_namespace_of_the_run_in_progress(
    user: tuple[str, str, str], tmp_path: Path
) -> None:
    import redis.asyncio

    broker, namespace, url = user
    before = await names_left(broker, namespace)
    command = [sys.executable, "-m", "callcast.cli", "compare", "--quiet", "--out", str(tmp_path)]
    command += ["--scenario", "baseline", "--style", "event", "--duration", "60", "--broker", url]
    process = await asyncio.create_subprocess_exec(*command, stdout=PIPE, stderr=PIPE)
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        # the user presses Ctrl-C once orders flow: OrderPlaced events in the run's own namespace
        deadline = time.monotonic() + 30
        while not await orders_flow(client, before):
            assert process.returncode is None, await process.communicate()
            assert time.monotonic() < deadline, "no OrderPlaced in a namespace of the run's own"
            await asyncio.sleep(0.05)  # polling the broker for the run's first events
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(60):
            _out, raw_err = await process.communicate()
    finally:
        await client.aclose()
        if process.returncode is None:
            process.kill()
            await process.wait()
    err = raw_err.decode()
    assert process.returncode == 130, err
    assert "event / baseline: namespace callcast_lab_" in err
    assert "could NOT remove" not in err
    assert await names_left(broker, namespace) == before
    await user_keeps_its_message(url, namespace.encode())


async def orders_flow(client: Any, before: set[str]) -> bool:
    """Whether a lab namespace that did not exist ``before`` has OrderPlaced events on Redis."""
    async for key in client.scan_iter(match=f"{PREFIX}*:OrderPlaced"):
        if key.decode() not in before and await client.xlen(key) > 0:
            return True
    return False


def test_a_runs_url_replaces_the_users_namespace_options_and_keeps_the_others() -> None:
    space = "callcast_lab_r1"
    assert scoped("amqp://u:p%2F@h:5672/vh?exchange=mine&heartbeat=5", space) == (
        "amqp://u:p%2F@h:5672/vh?heartbeat=5&exchange=callcast_lab_r1"
    )
    assert scoped("nats://tok@h:4222?stream=MINE&ack_wait=3&prefix=mine", space) == (
        "nats://tok@h:4222?ack_wait=3&stream=callcast_lab_r1&prefix=callcast_lab_r1"
    )
    assert scoped("redis://h:6379/0", space) == "redis://h:6379/0?prefix=callcast_lab_r1"
    assert scoped("postgresql://u@h/db?schema=s&pool_size=3", space) == (
        "postgresql://u@h/db?pool_size=3&schema=callcast_lab_r1"
    )
    assert (
        scoped("sqlite:////abs/dir/mine.db?lease=2", space) == "sqlite:////abs/dir/callcast_lab_r1.db?lease=2"
    )
    assert scoped("sqlite:///rel/mine.db", space) == "sqlite:///rel/callcast_lab_r1.db"
    assert scoped("memory://", space) == "memory://"

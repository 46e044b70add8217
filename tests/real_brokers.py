"""The real brokers of this machine, for tests that run whole apps on each: a URL with a namespace
of its own per test run, and a clean-up that removes everything under that namespace.

    target = BROKERS["rabbitmq"]
    target.require()                 # skip locally / fail in CI when the server is down
    url = target.url(run)            # e.g. amqp://guest:guest@127.0.0.1:5672/?exchange=cc-e2e-<run>
    ...
    await target.cleanup(run)
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from tests.brokers.conftest import require_server

HOST = "127.0.0.1"


def new_run() -> str:
    """A fresh namespace name: lower-case letters and digits, safe in every broker's names."""
    return "cce2e" + uuid.uuid4().hex[:10]


@dataclass(frozen=True)
class RealBroker:
    name: str
    port: int
    url: Callable[[str], str]
    cleanup: Callable[[str], Awaitable[None]]

    def require(self) -> None:
        __tracebackhide__ = True
        require_server(self.name, self.port, HOST)


def sqlite_target(directory: Path) -> RealBroker:
    """The embedded broker in ``directory`` (nothing to clean: the directory is temporary)."""

    async def nothing(run: str) -> None:
        return None

    return RealBroker("sqlite", 0, lambda run: f"sqlite:///{directory / (run + '.db')}?lease=2", nothing)


# -- RabbitMQ ---------------------------------------------------------------------------------------


async def _rabbitmq_cleanup(run: str) -> None:
    import aio_pika
    import aiormq

    def names(kind: str) -> list[str]:
        result = subprocess.run(
            ["rabbitmqctl", f"list_{kind}", "--quiet", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return [line.split("\t")[0] for line in result.stdout.splitlines() if line.startswith(run)]

    queues = await asyncio.to_thread(names, "queues")
    exchanges = await asyncio.to_thread(names, "exchanges")
    connection = await aio_pika.connect(f"amqp://guest:guest@{HOST}:5672/")
    try:
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(aiormq.exceptions.AMQPError):
                await channel.queue_delete(name)
            with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError):
                await channel.close()
        channel = await connection.channel()
        for name in exchanges:
            with contextlib.suppress(aiormq.exceptions.AMQPError):
                await channel.exchange_delete(name)
    finally:
        await connection.close()


# -- NATS -------------------------------------------------------------------------------------------


async def _nats_cleanup(run: str) -> None:
    import nats
    import nats.js.errors

    nc = await nats.connect(f"nats://{HOST}:4222", allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        for stream in (run.upper(), f"KV_{run.upper()}_uncounted"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)
    finally:
        await nc.close()


# -- PostgreSQL ---------------------------------------------------------------------------------------


async def _postgres_cleanup(run: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(f"postgresql://postgres@{HOST}:5432/test", timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{run}" CASCADE')
    finally:
        await conn.close()


# -- Redis ------------------------------------------------------------------------------------------


async def _redis_cleanup(run: str) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis(host=HOST, port=6379, db=0)
    try:
        keys = [key async for key in client.scan_iter(match=f"{run}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


BROKERS: dict[str, RealBroker] = {
    "rabbitmq": RealBroker(
        "rabbitmq", 5672, lambda run: f"amqp://guest:guest@{HOST}:5672/?exchange={run}", _rabbitmq_cleanup
    ),
    "nats": RealBroker(
        "nats", 4222, lambda run: f"nats://{HOST}:4222?stream={run.upper()}&prefix={run}", _nats_cleanup
    ),
    "redis": RealBroker(
        "redis", 6379, lambda run: f"redis://{HOST}:6379/0?prefix={run}&lease=2", _redis_cleanup
    ),
    "postgres": RealBroker(
        "postgres",
        5432,
        lambda run: f"postgresql://postgres@{HOST}:5432/test?schema={run}",
        _postgres_cleanup,
    ),
}

"""The brokers a run can use: where they listen, callcast's URL for a namespace, and the sweep that
deletes everything a run created under its namespace prefix.

Every trial gets a namespace of its own (lower-case letters and digits, starting with the run's
prefix): callcast's URL options put all its names under it (RabbitMQ ``?exchange=``, NATS
``?stream=``/``?prefix=``, Redis ``?prefix=``, PostgreSQL ``?schema=``, SQLite a file of its own),
and the raw and FastStream sides name their queues, streams, keys and tables after it too. So one
sweep per broker, by prefix, removes all of it, also after a trial that was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
RABBITMQ_URL = f"amqp://guest:guest@{HOST}:5672/"
NATS_URL = f"nats://{HOST}:4222"
REDIS_URL = f"redis://{HOST}:6379/0"
POSTGRES_DSN = f"postgresql://postgres@{HOST}:5432/test"


@dataclass(frozen=True)
class BrokerSpec:
    name: str
    port: int | None
    """The server's port on 127.0.0.1, or ``None`` for the embedded ones."""

    def available(self) -> bool:
        """Whether the server accepts a connection (embedded brokers always are)."""
        if self.port is None:
            return True
        with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1.0):
            return True
        return False


BROKERS: dict[str, BrokerSpec] = {
    spec.name: spec
    for spec in (
        BrokerSpec("rabbitmq", 5672),
        BrokerSpec("nats", 4222),
        BrokerSpec("redis", 6379),
        BrokerSpec("postgres", 5432),
        BrokerSpec("sqlite", None),
        BrokerSpec("memory", None),
    )
}


def callcast_url(broker: str, namespace: str, workdir: Path) -> str:
    """callcast's broker URL for ``namespace``."""
    if broker == "rabbitmq":
        return f"{RABBITMQ_URL}?exchange={namespace}"
    if broker == "nats":
        return f"{NATS_URL}?stream={namespace.upper()}&prefix={namespace}"
    if broker == "redis":
        return f"{REDIS_URL}?prefix={namespace}"
    if broker == "postgres":
        return f"{POSTGRES_DSN}?schema={namespace}"
    if broker == "sqlite":
        return f"sqlite:///{workdir / (namespace + '.db')}"
    if broker == "memory":
        return "memory://"
    raise ValueError(f"unknown broker {broker!r}")


async def sweep(broker: str, prefix: str) -> None:
    """Delete what trials created on ``broker`` under namespaces starting with ``prefix``."""
    if broker == "rabbitmq":
        await _sweep_rabbitmq(prefix)
    elif broker == "nats":
        await _sweep_nats(prefix)
    elif broker == "redis":
        await _sweep_redis(prefix)
    elif broker == "postgres":
        await _sweep_postgres(prefix)


def _rabbitmq_names(kind: str, prefix: str) -> list[str]:
    try:
        listing = subprocess.run(
            ["rabbitmqctl", f"list_{kind}", "--quiet", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split("\t")[0] for line in listing.stdout.splitlines() if line.startswith(prefix)]


async def _sweep_rabbitmq(prefix: str) -> None:
    import aio_pika
    import aiormq

    queues = await asyncio.to_thread(_rabbitmq_names, "queues", prefix)
    exchanges = await asyncio.to_thread(_rabbitmq_names, "exchanges", prefix)
    connection = await aio_pika.connect(RABBITMQ_URL, timeout=10)
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


async def _sweep_nats(prefix: str) -> None:
    import nats
    import nats.js.errors

    nc = await nats.connect(NATS_URL, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        names = [info.config.name for info in await js.streams_info()]
        upper = prefix.upper()
        for name in names:
            if name and (name.startswith(upper) or name.startswith(f"KV_{upper}")):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(name)
    finally:
        await nc.close()


async def _sweep_redis(prefix: str) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


async def _sweep_postgres(prefix: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_DSN, timeout=10)
    try:
        schemas = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", prefix.replace("_", r"\_") + "%"
        )
        for record in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{record["nspname"]}" CASCADE')
    finally:
        await conn.close()

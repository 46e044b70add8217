"""Deleting what a test or benchmark run left on a real broker: everything named under one prefix.

A run that gives all its names a prefix of its own (callcast's URL options put every name it
creates under one: RabbitMQ ``?exchange=``, NATS ``?stream=``/``?prefix=``, Redis ``?prefix=``,
PostgreSQL ``?schema=``) is cleaned up by one sweep per broker, also after a run that was killed:

* RabbitMQ: the queues and exchanges whose names start with the prefix (listed with ``rabbitmqctl``
  on this machine's node);
* NATS: the streams whose names start with the prefix in upper case, and their ``KV_`` buckets;
* Redis: the keys that start with the prefix;
* PostgreSQL: the schemas that start with the prefix, with everything in them.

Names another process deletes meanwhile are skipped. Pick prefixes no other name starts with.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis.asyncio


async def sweep_rabbitmq(url: str, prefix: str) -> None:
    """Delete the queues and exchanges of the broker at ``url`` whose names start with ``prefix``."""
    import aio_pika
    import aiormq

    queues = await asyncio.to_thread(_rabbitmq_names, "queues", prefix)
    exchanges = await asyncio.to_thread(_rabbitmq_names, "exchanges", prefix)
    connection = await aio_pika.connect(url, timeout=10)
    try:
        for name in queues:  # a failed delete closes its channel: one channel per queue
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


def _rabbitmq_names(kind: str, prefix: str) -> list[str]:
    """The names of the local node's ``kind`` (queues, exchanges) that start with ``prefix``."""
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


async def sweep_nats(url: str, prefix: str) -> None:
    """Delete the JetStream streams (and ``KV_`` buckets) whose names start with ``prefix``, in upper
    case as callcast's ``?stream=`` names are."""
    import nats
    import nats.js.errors

    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5)
        upper = prefix.upper()
        for info in await js.streams_info():
            name = info.config.name
            if name and (name.startswith(upper) or name.startswith(f"KV_{upper}")):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(name)
    finally:
        await nc.close()


async def sweep_redis(url: str, prefix: str) -> None:
    """Delete the keys that start with ``prefix``."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        await delete_keys(client, f"{prefix}*")
    finally:
        await client.aclose()


async def delete_keys(client: redis.asyncio.Redis, pattern: str) -> int:
    """Delete the keys that match ``pattern`` (found with ``SCAN``, deleted 500 at a time); how
    many were deleted (keys another client deleted meanwhile are not counted)."""
    keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
    deleted = 0
    for start in range(0, len(keys), 500):
        deleted += await client.delete(*keys[start : start + 500])
    return deleted


async def sweep_postgres(dsn: str, prefix: str) -> None:
    """Drop the schemas whose names start with ``prefix``, with everything in them."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        schemas = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", prefix.replace("_", r"\_") + "%"
        )
        for record in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{record["nspname"]}" CASCADE')
    finally:
        await conn.close()

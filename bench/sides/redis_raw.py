"""Raw Redis Streams (redis-py asyncio), as a competent engineer writes it: ``XADD`` in pipelines
(one round trip per batch of ``window``), a consumer group read with ``XREADGROUP COUNT 256``, and
one ``XACK`` per batch, after the handler ran on every entry of it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio

from bench.brokers import REDIS_URL
from bench.payload import Event, to_json
from bench.sides import Handler, cancel

BATCH = 256
GROUP = "sink"


def _identity() -> dict[str, Any]:
    """Connection options naming the client once: left to itself, redis-py 7.2+ reads its package
    metadata from disk for every new connection, on the event loop, and a stalled loop grows the
    pool until it runs out of connections (FastStream and callcast pass theirs too)."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:
        return {}
    return {"driver_info": DriverInfo(lib_version=redis.__version__)}


class RedisPipe:
    def __init__(self, namespace: str) -> None:
        self.stream = f"{namespace}:raw:events"
        self.client: Any = None
        self.reader: Any = None
        self.consuming: asyncio.Task[None] | None = None

    async def open(self, handler: Handler) -> None:
        identity = _identity()
        self.client = redis.asyncio.Redis.from_url(REDIS_URL, **identity)
        self.reader = redis.asyncio.Redis.from_url(REDIS_URL, **identity)
        await self.client.xgroup_create(self.stream, GROUP, id="$", mkstream=True)

        async def consume() -> None:
            while True:
                replies = await self.reader.xreadgroup(
                    GROUP, "c1", {self.stream: ">"}, count=BATCH, block=1000
                )
                for _stream, entries in replies or ():
                    ids = []
                    for entry_id, fields in entries:
                        await handler(Event.model_validate_json(fields[b"data"]))
                        ids.append(entry_id)
                    if ids:
                        await self.reader.xack(self.stream, GROUP, *ids)

        self.consuming = asyncio.create_task(consume())

    async def publish(self, event: Event) -> None:
        await self.client.xadd(self.stream, {"data": to_json(event)})

    async def publish_all(self, events: Sequence[Event], window: int) -> None:
        for start in range(0, len(events), window):
            async with self.client.pipeline(transaction=False) as pipeline:
                for event in events[start : start + window]:
                    pipeline.xadd(self.stream, {"data": to_json(event)})
                await pipeline.execute()

    async def close(self) -> None:
        await cancel(self.consuming)
        for client in (self.reader, self.client):
            if client is not None:
                await client.aclose()
        self.client = self.reader = None

"""Raw NATS (nats-py), as a competent engineer writes it: JetStream with file storage, concurrent
publishes each awaiting its ack, a durable pull consumer fetching batches of 256 and acking each
after the handler; RPC with core NATS request/reply (``nc.request`` and a responding subscriber)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors

from bench.brokers import NATS_URL
from bench.payload import RPC_TIMEOUT, Event, Ping, Pong, answer, to_json
from bench.sides import Handler, cancel, windowed

BATCH = 256


class NatsPipe:
    def __init__(self, namespace: str) -> None:
        self.stream = f"{namespace.upper()}_RAW"
        self.subject = f"{namespace}.raw.events"
        self.nc: Any = None
        self.js: Any = None
        self.consuming: asyncio.Task[None] | None = None

    async def open(self, handler: Handler) -> None:
        self.nc = await nats.connect(NATS_URL)
        self.js = self.nc.jetstream(timeout=10)
        await self.js.add_stream(name=self.stream, subjects=[self.subject])
        subscription = await self.js.pull_subscribe(self.subject, durable="sink", stream=self.stream)

        async def consume() -> None:
            while True:
                try:
                    messages = await subscription.fetch(batch=BATCH, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for message in messages:
                    await handler(Event.model_validate_json(message.data))
                    await message.ack()

        self.consuming = asyncio.create_task(consume())

    async def publish(self, event: Event) -> None:
        await self.js.publish(self.subject, to_json(event))

    async def publish_all(self, events: Sequence[Event], window: int) -> None:
        await windowed(self.publish, events, window)

    async def close(self) -> None:
        await cancel(self.consuming)
        if self.nc is not None:
            await self.nc.close()
            self.nc = None


class NatsRpc:
    def __init__(self, namespace: str) -> None:
        self.subject = f"{namespace}.raw.rpc"
        self.nc: Any = None

    async def open(self) -> None:
        self.nc = await nats.connect(NATS_URL)

        async def serve(message: Any) -> None:
            await message.respond(to_json(answer(Ping.model_validate_json(message.data))))

        await self.nc.subscribe(self.subject, cb=serve)
        await self.nc.flush()

    async def call(self, request: Ping) -> Pong:
        reply = await self.nc.request(self.subject, to_json(request), timeout=RPC_TIMEOUT)
        return Pong.model_validate_json(reply.data)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()
            self.nc = None

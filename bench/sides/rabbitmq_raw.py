"""Raw RabbitMQ (aio-pika), as a competent engineer writes it: a durable quorum queue, persistent
messages, publisher confirms with many publishes in flight, prefetch 256, ack after the handler;
RPC with direct reply-to (``amq.rabbitmq.reply-to``) and a future per correlation id."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.brokers import RABBITMQ_URL
from bench.payload import RPC_TIMEOUT, Event, Ping, Pong, answer, to_json
from bench.sides import Handler, windowed

PREFETCH = 256
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class RabbitPipe:
    def __init__(self, namespace: str) -> None:
        self.queue_name = f"{namespace}.events"
        self.connection: Any = None
        self.exchange: Any = None

    async def open(self, handler: Handler) -> None:
        self.connection = await aio_pika.connect(RABBITMQ_URL)
        publishing = await self.connection.channel(publisher_confirms=True)
        self.exchange = publishing.default_exchange
        consuming = await self.connection.channel()
        await consuming.set_qos(prefetch_count=PREFETCH)
        queue = await consuming.declare_queue(
            self.queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )

        async def on_message(message: AbstractIncomingMessage) -> None:
            await handler(Event.model_validate_json(message.body))
            await message.ack()

        await queue.consume(on_message)

    async def publish(self, event: Event) -> None:
        message = aio_pika.Message(
            to_json(event), delivery_mode=aio_pika.DeliveryMode.PERSISTENT, content_type="application/json"
        )
        await self.exchange.publish(message, routing_key=self.queue_name)

    async def publish_all(self, events: Sequence[Event], window: int) -> None:
        await windowed(self.publish, events, window)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None


class RabbitRpc:
    def __init__(self, namespace: str) -> None:
        self.queue_name = f"{namespace}.rpc"
        self.connection: Any = None
        self.client: Any = None
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.ids = itertools.count()

    async def open(self) -> None:
        self.connection = await aio_pika.connect(RABBITMQ_URL)
        serving = await self.connection.channel(publisher_confirms=False)
        await serving.set_qos(prefetch_count=PREFETCH)
        queue = await serving.declare_queue(self.queue_name, auto_delete=True)
        replies = serving.default_exchange

        async def serve(message: AbstractIncomingMessage) -> None:
            response = answer(Ping.model_validate_json(message.body))
            reply = aio_pika.Message(
                to_json(response), correlation_id=message.correlation_id, content_type="application/json"
            )
            await replies.publish(reply, routing_key=message.reply_to or "")
            await message.ack()

        await queue.consume(serve)
        self.client = await self.connection.channel(publisher_confirms=False)
        underlay = await self.client.get_underlay_channel()

        async def on_reply(message: Any) -> None:
            future = self.waiting.pop(message.header.properties.correlation_id, None)
            if future is not None and not future.done():
                future.set_result(message.body)

        await underlay.basic_consume(DIRECT_REPLY_TO, on_reply, no_ack=True)

    async def call(self, request: Ping) -> Pong:
        correlation_id = str(next(self.ids))
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiting[correlation_id] = future
        message = aio_pika.Message(
            to_json(request),
            correlation_id=correlation_id,
            reply_to=DIRECT_REPLY_TO,
            content_type="application/json",
        )
        try:
            await self.client.default_exchange.publish(message, routing_key=self.queue_name)
            async with asyncio.timeout(RPC_TIMEOUT):
                body = await future
        finally:
            self.waiting.pop(correlation_id, None)
        return Pong.model_validate_json(body)

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

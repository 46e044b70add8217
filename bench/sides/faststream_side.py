"""FastStream 0.7.8, written the way its documentation shows: a broker object, ``@broker.subscriber``
on a handler annotated with the pydantic model (FastStream validates it), ``broker.publish`` with
the model, ``broker.request`` for RPC and a subscriber that returns the answer.

Settings beyond FastStream's defaults, each to match what the other sides do:
RabbitMQ: a durable quorum queue, persistent messages, channel prefetch 256 (FastStream's default
is unlimited); NATS: a JetStream stream and a durable pull subscriber fetching batches of 256
(handled one by one); Redis: a stream consumer group (``StreamSub``). FastStream's logging stays on
at its defaults (two lines per message): the trial process sends its output to a log file.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from bench.brokers import NATS_URL, RABBITMQ_URL, REDIS_URL
from bench.payload import RPC_TIMEOUT, Event, Ping, Pong, answer
from bench.sides import Handler, Pipe, RpcPair, windowed

PREFETCH = 256


class FastStreamPipe:
    """Event path: ``setup(handler)`` returns (broker, publish) with the subscriber registered."""

    def __init__(self, setup: Callable[[Handler], tuple[Any, Callable[[Event], Awaitable[Any]]]]) -> None:
        self.setup = setup
        self.broker: Any = None
        self.send: Callable[[Event], Awaitable[Any]] | None = None

    async def open(self, handler: Handler) -> None:
        self.broker, self.send = self.setup(handler)
        await self.broker.start()

    async def publish(self, event: Event) -> None:
        assert self.send is not None, "open() first"
        await self.send(event)

    async def publish_all(self, events: Sequence[Event], window: int) -> None:
        await windowed(self.publish, events, window)

    async def close(self) -> None:
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None


class FastStreamRpc:
    """RPC: ``setup()`` returns (broker, request) with the answering subscriber registered."""

    def __init__(self, setup: Callable[[], tuple[Any, Callable[[Ping], Awaitable[Any]]]]) -> None:
        self.broker, self.request = setup()

    async def open(self) -> None:
        await self.broker.start()

    async def call(self, request: Ping) -> Pong:
        response = await self.request(request)
        return Pong.model_validate(await response.decode())

    async def close(self) -> None:
        await self.broker.stop()


def faststream_pipe(broker: str, namespace: str) -> Pipe:
    if broker == "rabbitmq":
        return FastStreamPipe(lambda handler: _rabbit_events(namespace, handler))
    if broker == "nats":
        return FastStreamPipe(lambda handler: _nats_events(namespace, handler))
    if broker == "redis":
        return FastStreamPipe(lambda handler: _redis_events(namespace, handler))
    raise ValueError(f"FastStream has no {broker} broker here")


def faststream_rpc(broker: str, namespace: str) -> RpcPair:
    if broker == "rabbitmq":
        return FastStreamRpc(lambda: _rabbit_rpc(namespace))
    if broker == "nats":
        return FastStreamRpc(lambda: _nats_rpc(namespace))
    if broker == "redis":
        return FastStreamRpc(lambda: _redis_rpc(namespace))
    raise ValueError(f"FastStream has no {broker} broker here")


def _rabbit_events(namespace: str, handler: Handler) -> tuple[Any, Callable[[Event], Awaitable[Any]]]:
    from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue

    broker = RabbitBroker(RABBITMQ_URL, default_channel=Channel(prefetch_count=PREFETCH))
    queue = RabbitQueue(f"{namespace}.fs.events", queue_type=QueueType.QUORUM, durable=True)

    @broker.subscriber(queue)
    async def handle(event: Event) -> None:
        await handler(event)

    return broker, lambda event: broker.publish(event, queue=queue, persist=True)


def _nats_events(namespace: str, handler: Handler) -> tuple[Any, Callable[[Event], Awaitable[Any]]]:
    from faststream.nats import JStream, NatsBroker, PullSub

    broker = NatsBroker(NATS_URL)
    subject = f"{namespace}.fs.events"
    stream = JStream(f"{namespace.upper()}_FS", subjects=[subject])

    @broker.subscriber(subject, stream=stream, durable="sink", pull_sub=PullSub(batch_size=PREFETCH))
    async def handle(event: Event) -> None:
        await handler(event)

    return broker, lambda event: broker.publish(event, subject, stream=stream.name)


def _redis_events(namespace: str, handler: Handler) -> tuple[Any, Callable[[Event], Awaitable[Any]]]:
    from faststream.redis import RedisBroker, StreamSub

    broker = RedisBroker(REDIS_URL)
    key = f"{namespace}:fs:events"

    @broker.subscriber(stream=StreamSub(key, group="sink", consumer="c1"))
    async def handle(event: Event) -> None:
        await handler(event)

    return broker, lambda event: broker.publish(event, stream=key)


def _rabbit_rpc(namespace: str) -> tuple[Any, Callable[[Ping], Awaitable[Any]]]:
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    broker = RabbitBroker(RABBITMQ_URL, default_channel=Channel(prefetch_count=PREFETCH))
    queue = RabbitQueue(f"{namespace}.fs.rpc", auto_delete=True)

    @broker.subscriber(queue)
    async def serve(request: Ping) -> Pong:
        return answer(request)

    return broker, lambda request: broker.request(request, queue=queue, timeout=RPC_TIMEOUT)


def _nats_rpc(namespace: str) -> tuple[Any, Callable[[Ping], Awaitable[Any]]]:
    from faststream.nats import NatsBroker

    broker = NatsBroker(NATS_URL)
    subject = f"{namespace}.fs.rpc"

    @broker.subscriber(subject)
    async def serve(request: Ping) -> Pong:
        return answer(request)

    return broker, lambda request: broker.request(request, subject, timeout=RPC_TIMEOUT)


def _redis_rpc(namespace: str) -> tuple[Any, Callable[[Ping], Awaitable[Any]]]:
    from faststream.redis import RedisBroker

    broker = RedisBroker(REDIS_URL)
    channel = f"{namespace}:fs:rpc"

    @broker.subscriber(channel)
    async def serve(request: Ping) -> Pong:
        return answer(request)

    return broker, lambda request: broker.request(request, channel, timeout=RPC_TIMEOUT)

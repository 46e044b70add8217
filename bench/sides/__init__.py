"""The three implementations of each workload, behind two small shapes.

A :class:`Pipe` is one implementation's event path on one broker: a durable consumer whose handler
validates the body as :class:`~bench.payload.Event` and then awaits the workload's ``handler``
(the message is acknowledged after that), and a publisher that returns once the broker stored the
event. An :class:`RpcPair` is a server answering :class:`~bench.payload.Ping` with
:class:`~bench.payload.Pong` and a client calling it, both in this process.

:func:`pipe` and :func:`rpc_pair` pick the implementation; they return ``None`` where a side has
no implementation on a broker (e.g. FastStream on SQLite).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from bench.payload import Event, Ping, Pong

Handler = Callable[[Event], Awaitable[None]]


class Pipe(Protocol):
    async def open(self, handler: Handler) -> None:
        """Start consuming: every event is validated, handed to ``handler``, then acknowledged."""

    async def publish(self, event: Event) -> None:
        """Publish one event; return once the broker stored it."""

    async def publish_all(self, events: Sequence[Event], window: int) -> None:
        """Publish ``events`` with at most ``window`` publishes (or one pipeline of that size) in flight."""

    async def close(self) -> None:
        """Stop consuming and disconnect (names are deleted by the run's sweep)."""


class RpcPair(Protocol):
    async def open(self) -> None:
        """Start the server and connect the client."""

    async def call(self, request: Ping) -> Pong:
        """One call, answered by the server."""

    async def close(self) -> None: ...


async def windowed(publish: Callable[[Event], Awaitable[None]], events: Iterable[Event], window: int) -> None:
    """Publish ``events`` with ``window`` publishers working through them: at most ``window`` in flight."""
    pending = iter(events)

    async def publisher() -> None:
        for event in pending:
            await publish(event)

    await asyncio.gather(*(publisher() for _ in range(window)))


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a consuming loop and wait for it to end. Some clients swallow a cancellation that
    meets a blocking read (redis-py), so the loop is cancelled again until it ends (at most ~3 s)."""
    if task is None:
        return
    for _ in range(30):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: a loop that failed while stopping is not worth a warning


def pipe(side: str, broker: str, namespace: str, workdir: Path, options: dict[str, Any]) -> Pipe | None:
    """``side``'s event path on ``broker`` under ``namespace``, or ``None`` if it has none there."""
    if side == "callcast":
        from bench.sides.callcast_side import CallcastPipe

        return CallcastPipe(broker, namespace, workdir, concurrency=options.get("concurrency"))
    if side == "raw":
        if broker == "rabbitmq":
            from bench.sides.rabbitmq_raw import RabbitPipe

            return RabbitPipe(namespace)
        if broker == "nats":
            from bench.sides.nats_raw import NatsPipe

            return NatsPipe(namespace)
        if broker == "redis":
            from bench.sides.redis_raw import RedisPipe

            return RedisPipe(namespace)
        if broker == "postgres":
            from bench.sides.postgres_raw import PostgresPipe

            return PostgresPipe(namespace)
        return None
    if side == "faststream":
        if broker in ("rabbitmq", "nats", "redis"):
            from bench.sides.faststream_side import faststream_pipe

            return faststream_pipe(broker, namespace)
        return None
    raise ValueError(f"unknown side {side!r}")


def rpc_pair(side: str, broker: str, namespace: str, workdir: Path) -> RpcPair | None:
    """``side``'s RPC on ``broker`` under ``namespace``, or ``None`` if it has none there."""
    if side == "callcast":
        from bench.sides.callcast_side import CallcastRpc

        return CallcastRpc(broker, namespace, workdir)
    if side == "raw":
        if broker == "rabbitmq":
            from bench.sides.rabbitmq_raw import RabbitRpc

            return RabbitRpc(namespace)
        if broker == "nats":
            from bench.sides.nats_raw import NatsRpc

            return NatsRpc(namespace)
        return None
    if side == "faststream":
        if broker in ("rabbitmq", "nats", "redis"):
            from bench.sides.faststream_side import faststream_rpc

            return faststream_rpc(broker, namespace)
        return None
    raise ValueError(f"unknown side {side!r}")

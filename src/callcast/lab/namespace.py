"""A run's own namespace on the broker the user names (``--broker URL``), and its removal afterwards.

Each run puts every name it creates on the user's broker under ``callcast_lab_<run tag>``, a
namespace no other run and no user shares, through the adapters' own URL options (:func:`scoped`:
the URL's values of these options are replaced, its other options kept):

============ ================================ =================================================
broker       the run's URL                    removed when the run ends (:func:`remove`)
============ ================================ =================================================
RabbitMQ     ``?exchange=<ns>``               the exchange ``<ns>`` and the queues
                                              ``<ns>/<topic>/<group>`` of the groups the run
                                              used, each with its retry buckets
NATS         ``?stream=<ns>&prefix=<ns>``     the streams ``<ns>`` and ``KV_<ns>_uncounted``
Redis        ``?prefix=<ns>``                 the keys ``<ns>:*``
PostgreSQL   ``?schema=<ns>``                 the schema ``<ns>``, with everything in it
SQLite       the file ``<ns>.db`` beside the  that file and its ``-wal``, ``-shm``, ``-journal``
             URL's file
memory       unchanged                        nothing: it ends with the process
============ ================================ =================================================

RabbitMQ cannot list queues over AMQP, so the run notes the groups it declares and subscribes to
(:class:`GroupRecorder`) and deletes exactly their queues, and every retry bucket name the adapter
can give them; queues of ephemeral groups (RPC replies) are exclusive and went with the connection.

Nothing outside the namespace is read or deleted, so the user's own groups, messages and dead
letters stay as they were. A process killed outright removes nothing: all it left starts with
:data:`PREFIX`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from callcast.brokers import scrub
from callcast.forwarding import ForwardingBroker
from callcast.transport import Broker, Holding, Subscription

PREFIX = "callcast_lab_"
"""Every run's namespace starts with this (letters, digits and ``_``: a legal name on every broker)."""
REMOVAL_TIMEOUT = 60.0
"""Seconds the removal of one namespace may take before what is left is reported as not removed."""

_NAME_OPTIONS = {
    "amqp": ("exchange",),
    "amqps": ("exchange",),
    "nats": ("stream", "prefix"),
    "redis": ("prefix",),
    "rediss": ("prefix",),
    "postgresql": ("schema",),
    "postgres": ("schema",),
}
"""Per URL scheme, the adapter's options that put every name it creates under one namespace."""


def applies(url: str) -> bool:
    """Whether the broker at ``url`` keeps what a run creates beyond the run's process (a run on it
    gets a namespace, removed afterwards): every scheme of the table but ``memory``."""
    return urlsplit(url).scheme in _REMOVERS


def scoped(url: str, namespace: str) -> str:
    """``url`` with every name the broker creates for the run under ``namespace`` (module table).
    A scheme the lab does not know is returned as is (connecting to it fails anyway)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        from callcast.brokers.sqlite import parse_url

        path = parse_url(url)[0].with_name(f"{namespace}.db")
        return f"sqlite:///{path}" + (f"?{parts.query}" if parts.query else "")
    names = _NAME_OPTIONS.get(parts.scheme, ())
    if not names:
        return url
    query = [
        (key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key not in names
    ]
    query += [(name, namespace) for name in names]
    return urlunsplit(parts._replace(query=urlencode(query)))


class GroupRecorder(ForwardingBroker):
    """A :class:`~callcast.transport.Broker` that hands every call to ``broker`` and adds each
    (topic, group) declared or joined by a durable subscription to ``groups``. Native
    request/reply passes through where ``broker`` has it."""

    def __init__(self, broker: Broker, groups: set[tuple[str, str]]) -> None:
        super().__init__(broker)
        self.groups = groups

    async def declare(self, topic: str, group: str) -> None:
        self.groups.add((topic, group))
        await super().declare(topic, group)

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        prefetch: int = 32,
        ephemeral: bool = False,
        holding: Holding | None = None,
    ) -> Subscription:
        if not ephemeral:
            self.groups.add((topic, group))
        return await super().subscribe(topic, group, prefetch=prefetch, ephemeral=ephemeral, holding=holding)


@dataclass
class Cleanup:
    """What the removal of one run's namespace did: ``removed`` names what existed and is gone,
    ``not_removed`` what may be left, each with the reason."""

    namespace: str
    removed: list[str] = field(default_factory=list)
    not_removed: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        """As JSON-able data (``broker_cleanup`` in ``results.json``)."""
        return asdict(self)

    def summary(self) -> str:
        """One line for the terminal (names inside the namespace shown without it)."""
        inside = f"{self.namespace}/"
        removed = ", ".join(item.replace(inside, "") for item in self.removed) or "nothing (none was left)"
        line = f"namespace {self.namespace}: removed {removed}"
        if self.not_removed:
            line += f"; could NOT remove {'; '.join(self.not_removed)}"
        return line


async def remove(url: str, namespace: str, groups: Collection[tuple[str, str]] = ()) -> Cleanup:
    """Delete what a run created on the broker at ``url`` (the run's :func:`scoped` URL) under
    ``namespace``; ``groups``: the (topic, group) pairs it used (see :class:`GroupRecorder`).
    Never raises for a failed removal (a cancellation still propagates): the failure is in
    ``not_removed``, with what was done before it in ``removed``."""
    cleanup = Cleanup(namespace)
    remover = _REMOVERS.get(urlsplit(url).scheme)
    if remover is None:
        return cleanup
    try:
        async with asyncio.timeout(REMOVAL_TIMEOUT):
            await remover(url, namespace, groups, cleanup)
    except Exception as error:
        cleanup.not_removed.append(f"what is left under {namespace}: {_reason(error, url)}")
    return cleanup


def _reason(error: BaseException, url: str) -> str:
    """The error as text, at most 300 characters, without the URL's secrets (see
    :func:`~callcast.brokers.scrub`)."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return scrub(text, url)[:300]


async def _rabbitmq(url: str, namespace: str, groups: Collection[tuple[str, str]], cleanup: Cleanup) -> None:
    import aio_pika
    import aiormq
    from aio_pika.abc import AbstractChannel

    from callcast.brokers import rabbitmq

    settings = rabbitmq.parse_url(url)
    connection = await aio_pika.connect(settings.client_url, timeout=settings.timeout)

    async def exists(declare: Callable[[AbstractChannel], Awaitable[object]]) -> bool:
        """Whether a passive declaration finds what it names (a miss closes its channel)."""
        channel = await connection.channel()
        try:
            await declare(channel)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        await channel.close()
        return True

    async def remove_queue(queue: str) -> None:
        try:
            found = await exists(lambda channel: channel.declare_queue(queue, passive=True))
            channel = await connection.channel()
            await channel.queue_delete(queue)
            for milliseconds in _bucket_delays():
                await channel.queue_delete(rabbitmq.retry_queue_name(queue, milliseconds))
            await channel.close()
        except Exception as error:
            cleanup.not_removed.append(f"queue {queue} and its retry buckets: {_reason(error, url)}")
        else:
            if found:
                cleanup.removed.append(f"queue {queue} and its retry buckets")

    try:
        queues = sorted({rabbitmq.queue_name(namespace, topic, group) for topic, group in groups})
        await asyncio.gather(*(remove_queue(queue) for queue in queues))
        found = await exists(lambda channel: channel.get_exchange(namespace, ensure=True))
        channel = await connection.channel()
        await channel.exchange_delete(namespace)
        if found:
            cleanup.removed.append(f"exchange {namespace}")
    finally:
        await connection.close()


def _bucket_delays() -> list[int]:
    """Every delay, in ms, the RabbitMQ adapter can name a retry bucket by: 0 (given back without an
    attempt), then each value :func:`~callcast.brokers.rabbitmq.retry_bucket` rounds to."""
    from callcast.brokers.rabbitmq import retry_bucket

    delays, milliseconds = [0], 1
    while (bucket := retry_bucket(milliseconds / 1000)) >= milliseconds:  # below: the longest bucket
        delays.append(bucket)
        milliseconds = bucket + 1
    return delays


async def _nats(url: str, namespace: str, groups: Collection[tuple[str, str]], cleanup: Cleanup) -> None:
    import nats
    import nats.js.errors

    server = urlunsplit(urlsplit(url)._replace(query="", fragment=""))
    client = await nats.connect(server, allow_reconnect=False, connect_timeout=5)
    try:
        jetstream = client.jetstream(timeout=10)
        for stream in (namespace, f"KV_{namespace}_uncounted"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await jetstream.delete_stream(stream)
                cleanup.removed.append(f"stream {stream}")
    finally:
        await client.close()


async def _redis(url: str, namespace: str, groups: Collection[tuple[str, str]], cleanup: Cleanup) -> None:
    import redis.asyncio

    from callcast.brokers.redis import parse_url
    from callcast.testing.sweep import delete_keys

    target, options = parse_url(url)
    settings: dict[str, Any] = {"socket_connect_timeout": options.connect_timeout, **dict(options.tls)}
    client = redis.asyncio.Redis.from_url(target, socket_timeout=options.timeout, **settings)
    try:
        deleted = await delete_keys(client, f"{namespace}:*")
        if deleted:
            cleanup.removed.append(f"{deleted} keys {namespace}:*")
    finally:
        await client.aclose()


async def _postgres(url: str, namespace: str, groups: Collection[tuple[str, str]], cleanup: Cleanup) -> None:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    from callcast.brokers.postgres import parse_url

    connection = await asyncpg.connect(**parse_url(url).connect_kwargs)
    try:
        if await connection.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", namespace):
            await connection.execute(f'DROP SCHEMA "{namespace}" CASCADE')
            cleanup.removed.append(f"schema {namespace}")
    finally:
        await connection.close()


async def _sqlite(url: str, namespace: str, groups: Collection[tuple[str, str]], cleanup: Cleanup) -> None:
    from callcast.brokers.sqlite import parse_url

    database = parse_url(url)[0]
    for path in [database, *(Path(f"{database}{suffix}") for suffix in ("-wal", "-shm", "-journal"))]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            cleanup.removed.append(f"file {path}")


_REMOVERS: dict[str, Callable[[str, str, Collection[tuple[str, str]], Cleanup], Awaitable[None]]] = {
    "amqp": _rabbitmq,
    "amqps": _rabbitmq,
    "nats": _nats,
    "redis": _redis,
    "rediss": _redis,
    "postgresql": _postgres,
    "postgres": _postgres,
    "sqlite": _sqlite,
}
"""Per URL scheme, how to remove a run's namespace: ``(url, namespace, groups, cleanup)``."""

"""What a running app still has on its way for one event type, read from outside its processes.

A test that counts an event's effects ("exactly one welcome email") must not count the moment the
first effect shows up: a redelivery, a retry waiting in the broker or a second copy still in the
publisher's outbox would land later, unseen. :func:`until_quiet` (and :func:`wait_quiet`, for tests
without an event loop) wait, with a deadline, until nothing of the event type is left anywhere:

1. the outbox of every service that publishes it holds no row of its topic (the relay deletes a
   row only after the broker accepted its envelope), and then
2. every consumer group of the topic, as the app's topology lists them, has acknowledged all it was
   given: nothing waiting to be handed out, held by a subscriber, or waiting for a delayed retry,
   as the broker itself counts it.

(The outboxes are the services' default SQLite files, ``<data dir>/<service>.db``: the
:class:`~tests.e2e.procs.CallcastProcess` runs configure no other database.)

Read in that order, no envelope slips between the two reads: one still in an outbox is counted
there; one the relay sent before the outbox was read is in the broker until its group acks it; and
a group acks only after its handler returned (for an idempotent handler, after its transaction
committed). Once both read empty the effects of the event type are final, so counting them then
is honest.

How a group's backlog is read on each broker (the names are those each adapter documents for
other tools; the group must be declared there, or the probe fails rather than read zero):

========== ===========================================================================================
sqlite     the group's ``deliveries`` rows: one per envelope not yet acked (retries included)
postgres   the ``<schema>.deliveries`` rows of (topic, group), as above
redis      the group's pending entries (held by a subscriber, or parked with ``callcast:retry``
           until their retry) plus the entries after its last-delivered id, on the topic's stream
           and on the group's direct stream
nats       the JetStream consumer's ``num_pending`` plus ``num_ack_pending`` (an envelope nacked
           with a delay stays ack-pending until it is redelivered)
rabbitmq   the ready messages of the group's queue and of its retry buckets (a passive
           ``queue.declare``, answered by the queue's leader) plus the unacked messages of the
           channels consuming the group's queue (``rabbitmqctl list_channels``). ``list_queues``
           is not used: on quorum queues its counters are refreshed every few seconds, so it reads
           zero for a while after a message arrived. The ready counts are read before and after
           the unacked ones, so a message that moves between queue and consumer meanwhile is seen.
           Unlike the others this is no single snapshot: a message requeued and handed out again
           while the look lasts (about two seconds of ``rabbitmqctl``), as when a consumer's
           channel is lost just then, could go unseen by that one look.
========== ===========================================================================================
"""

from __future__ import annotations

import asyncio
import importlib
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from pydantic import BaseModel

from callcast import App, event_type
from callcast.topology import describe

from .procs import CallcastProcess

POLL = 0.05
"""Seconds between two looks while the pipeline is not quiet yet."""


@dataclass(frozen=True)
class Backlog:
    """What is still on its way for one topic; nothing anywhere once :attr:`quiet`."""

    topic: str
    outboxes: dict[str, int]
    """Publishing service → rows of the topic its outbox still holds."""
    groups: dict[str, int]
    """Consumer group of the topic → envelopes it has not acknowledged (0 exactly when none is
    left; on RabbitMQ a message seen twice in one look counts twice)."""

    @property
    def quiet(self) -> bool:
        return not any(self.outboxes.values()) and not any(self.groups.values())

    def __str__(self) -> str:
        outboxes = ", ".join(f"{service} outbox {rows}" for service, rows in self.outboxes.items())
        groups = ", ".join(f"group {group} {left}" for group, left in self.groups.items())
        return f"{self.topic}: {outboxes or 'no outbox'}; {groups}"


async def backlog(process: CallcastProcess, event: type[BaseModel]) -> Backlog:
    """One look at what ``process``'s app still has on its way for ``event`` (outboxes first)."""
    topic = event_type(event)
    ends = describe(app_of(process))["events"].get(topic)
    if not ends or not ends["subscribers"]:
        raise ValueError(f"no consumer group of {process.app} takes {topic}: nothing to wait for")
    outboxes = {
        service: outbox_rows(process.data_dir / f"{service}.db", topic) for service in ends["publishers"]
    }
    groups = {group: await unacknowledged(process.broker_url, topic, group) for group in ends["subscribers"]}
    return Backlog(topic, outboxes, groups)


async def until_quiet(process: CallcastProcess, event: type[BaseModel], *, timeout: float) -> Backlog:
    """Wait until nothing of ``event`` is on its way (see the module docstring); AssertionError,
    naming what was left, after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = await backlog(process, event)
        if found.quiet:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"still on its way after {timeout:.1f}s: {found}")
        await asyncio.sleep(POLL)


def app_of(process: CallcastProcess) -> App:
    """The App object ``process`` runs (its ``MODULE:ATTRIBUTE``), imported here for its topology."""
    module, _, attribute = process.app.partition(":")
    app = getattr(importlib.import_module(module), attribute or "app")
    assert isinstance(app, App), f"{process.app} is not a callcast App"
    return app


def wait_quiet(process: CallcastProcess, event: type[BaseModel], *, timeout: float) -> Backlog:
    """:func:`until_quiet` for a test that runs no event loop."""
    return asyncio.run(until_quiet(process, event, timeout=timeout))


def outbox_rows(database: Path, topic: str) -> int:
    """Rows of ``topic`` in the outbox of a service's SQLite database, which must exist: a database
    configured elsewhere would otherwise read as an empty outbox."""
    if not database.exists():
        raise AssertionError(f"no service database at {database}: its outbox cannot be read")
    conn = sqlite3.connect(database, timeout=10)
    try:
        return int(
            conn.execute("SELECT count(*) FROM callcast_outbox WHERE topic = ?", (topic,)).fetchone()[0]
        )
    except sqlite3.OperationalError as error:  # the service has not created its tables yet
        if "no such table" in str(error):
            return 0
        raise
    finally:
        conn.close()


async def unacknowledged(broker_url: str, topic: str, group: str) -> int:
    """Envelopes of ``topic`` that ``group`` has not acknowledged, as the broker counts them."""
    scheme = urlsplit(broker_url).scheme
    if scheme == "sqlite":
        return await asyncio.to_thread(_sqlite, broker_url, topic, group)
    if scheme in ("postgresql", "postgres"):
        return await _postgres(broker_url, topic, group)
    if scheme in ("redis", "rediss"):
        return await _redis(broker_url, topic, group)
    if scheme == "nats":
        return await _nats(broker_url, topic, group)
    if scheme in ("amqp", "amqps"):
        return await _rabbitmq(broker_url, topic, group)
    raise ValueError(f"no way to read the backlog of a {scheme}:// broker")


def _undeclared(broker: str, topic: str, group: str) -> AssertionError:
    return AssertionError(f"{broker}: no group {group!r} on {topic!r} where the probe looks")


def _sqlite(broker_url: str, topic: str, group: str) -> int:
    from callcast.brokers.sqlite import parse_url

    path, _ = parse_url(broker_url)
    conn = sqlite3.connect(path, timeout=10)
    try:
        declared, rows = conn.execute(  # one statement: one snapshot
            "SELECT (SELECT count(*) FROM subscriptions WHERE topic = ? AND grp = ?), "
            "(SELECT count(*) FROM deliveries WHERE grp = ?)",
            (topic, group, group),
        ).fetchone()
    finally:
        conn.close()
    if not declared:
        raise _undeclared("sqlite", topic, group)
    return int(rows)


async def _postgres(broker_url: str, topic: str, group: str) -> int:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    from callcast.brokers.postgres import parse_url

    settings = parse_url(broker_url)
    schema = f'"{settings.schema}"'
    conn = await asyncpg.connect(**settings.connect_kwargs)
    try:
        row = await conn.fetchrow(
            f"SELECT (SELECT count(*) FROM {schema}.subscriptions WHERE topic = $1 AND grp = $2), "
            f"(SELECT count(*) FROM {schema}.deliveries WHERE topic = $1 AND grp = $2)",
            topic,
            group,
        )
    finally:
        await conn.close()
    if not row[0]:
        raise _undeclared("postgres", topic, group)
    return int(row[1])


def _redis_name(name: str) -> str:
    """A topic or group name as it appears in a key (see the redis adapter's key table)."""
    return name.replace("%", "%25").replace(":", "%3A")


async def _redis(broker_url: str, topic: str, group: str) -> int:
    import redis.asyncio

    from callcast.brokers.redis import parse_url

    client_url, options = parse_url(broker_url)
    topic_key = f"{options.prefix}:{_redis_name(topic)}"
    streams = (topic_key, f"{topic_key}:{_redis_name(group)}:direct")
    client = redis.asyncio.Redis.from_url(client_url, decode_responses=True)
    try:
        left = 0
        for stream in streams:
            info = next((g for g in await client.xinfo_groups(stream) if g["name"] == group), None)
            if info is None:
                raise _undeclared(f"redis stream {stream}", topic, group)
            # read after the pending count: an entry handed out in between is still after the
            # last-delivered id read before it, so it is counted (twice at worst, never missed)
            undelivered = await client.xrange(
                stream, min=f"({info['last-delivered-id']}", max="+", count=1000
            )
            left += int(info["pending"]) + len(undelivered or ())
        return left
    finally:
        await client.aclose()


async def _nats(broker_url: str, topic: str, group: str) -> int:
    import nats

    from callcast.brokers.nats import NatsBroker

    parts = urlsplit(broker_url)
    stream = parse_qs(parts.query).get("stream", ["CALLCAST"])[-1]
    nc = await nats.connect(urlunsplit(parts._replace(query="", fragment="")), allow_reconnect=False)
    try:
        info = await nc.jetstream(timeout=5).consumer_info(stream, NatsBroker.consumer_name(topic, group))
    finally:
        await nc.close()
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def _rabbitmq(broker_url: str, topic: str, group: str) -> int:
    from callcast.brokers.rabbitmq import parse_url, queue_name

    settings = parse_url(broker_url)
    path = urlsplit(broker_url).path
    vhost = unquote(path[1:]) if len(path) > 1 else "/"
    queue = queue_name(settings.exchange, topic, group)
    listed, consumers = await asyncio.gather(
        asyncio.to_thread(_rabbitmqctl, "list_queues", "-p", vhost, "name"),
        asyncio.to_thread(_rabbitmqctl, "list_consumers", "-p", vhost, "queue_name", "channel_pid"),
    )
    before = await _rabbitmq_ready(settings.client_url, queue, _buckets(listed, queue))
    channels = {row[1] for row in consumers if row[0] == queue}
    held = await asyncio.to_thread(_rabbitmq_unacked, channels)
    # listed again after the unacked count: a retry bucket made meanwhile is read too
    listed = await asyncio.to_thread(_rabbitmqctl, "list_queues", "-p", vhost, "name")
    after = await _rabbitmq_ready(settings.client_url, queue, _buckets(listed, queue))
    return before + held + after


def _rabbitmqctl(*args: str) -> list[list[str]]:
    """The rows of a ``rabbitmqctl`` listing on this machine's node."""
    command = shutil.which("rabbitmqctl")
    if command is None:
        raise AssertionError("rabbitmqctl is not installed: the RabbitMQ backlog cannot be read")
    result = subprocess.run(
        [command, *args, "--quiet", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [line.split("\t") for line in result.stdout.splitlines() if line]


def _buckets(listed: list[list[str]], queue: str) -> list[str]:
    """The retry buckets of ``queue`` among the queues ``listed``."""
    return [row[0] for row in listed if row[0].startswith(f"{queue}/retry/")]


def _rabbitmq_unacked(channels: set[str]) -> int:
    """Unacked messages of ``channels`` (those consuming the group's queue: callcast gives each
    group of a process a channel of its own, so these are the deliveries its subscribers hold)."""
    rows = _rabbitmqctl("list_channels", "pid", "messages_unacknowledged")
    return sum(int(row[1]) for row in rows if row[0] in channels)


async def _rabbitmq_ready(client_url: str, queue: str, buckets: list[str]) -> int:
    """Ready messages of the group's queue and of its retry ``buckets``, counted by their leaders."""
    import aio_pika
    import aiormq

    connection = await aio_pika.connect(client_url, timeout=10)
    try:
        channel = await connection.channel()
        ready = (await channel.declare_queue(queue, passive=True)).declaration_result.message_count or 0
        for bucket in buckets:
            channel = await connection.channel()  # a bucket that expired meanwhile closes its channel
            try:
                declared = await channel.declare_queue(bucket, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
            ready += declared.declaration_result.message_count or 0
        return ready
    finally:
        await connection.close()

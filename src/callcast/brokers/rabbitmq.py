"""``amqp://user:password@host:5672/vhost``: RabbitMQ (3.10 or later), through aio-pika.

Topology
--------
Every name below starts with the exchange's name, so that one ``?exchange=`` is one namespace.
Inside a name, ``%`` and ``/`` of the exchange, topic and group are percent-encoded (``%25``,
``%2F``), so that ``/`` only ever separates the parts and two (topic, group) pairs never share a
queue. A group queue name longer than 200 bytes is cut and ends in ``~`` and a hash of the full name.

``callcast``
    A durable **topic exchange** (name set by ``?exchange=``). ``publish(topic, ...)`` sends every
    envelope to it with the routing key = the topic. Topic names may not contain ``*`` or ``#``
    (they would be wildcards in a binding) and are at most 255 bytes.
``callcast/<topic>/<group>``
    One durable **quorum queue** per (topic, group), bound to the exchange with the binding key =
    the topic: fan-out is one copy per bound queue, competing consumers are the consumers of one
    queue. The topic is part of the name, so one group name on two topics is two groups.
    ``publish(topic, ..., group=G)`` sends straight to G's queue through the default exchange (no
    other group sees it; nothing is stored if G was never declared).
``callcast/<topic>/<group>/retry/<ms>ms``
    The group's **delayed-retry buckets**: durable quorum queues with ``x-message-ttl`` = ms that
    dead-letter (``x-dead-letter-strategy: at-least-once``) through the default exchange straight
    back to the group's queue, so that only that group gets the retry. One bucket per delay in use,
    the delay rounded *up* to the R10 series of preferred numbers (10, 13, 16, 20, 25, 32, 40, 50,
    63, 80 × 10ⁿ ms; whole ms below 10 ms; at most ~49 days, to which a longer or infinite delay is
    cut): never early, at most 28% late, at most ten buckets per tenfold range of delays (a default
    retry policy, 0.1 s to 30 s, uses ≤ 26). A bucket nobody used for 15 minutes plus its TTL
    expires (``x-expires``); the adapter re-declares a bucket before using it if its last
    declaration is more than 5 minutes old, so a bucket never expires with a retry in it. The
    ``0ms`` bucket hands envelopes back without counting an attempt (below).
Ephemeral subscriptions
    The same names, but an **exclusive classic queue** (and exclusive retry buckets): they exist
    only while the subscribing connection lives and are deleted when the subscription closes, so
    nothing is kept for them while no one listens. They are not auto-delete: when the reader's
    channel alone closes, its queue keeps what it holds for the restored channel.

Messages
--------
The envelope travels in *binary content mode* of the **CloudEvents AMQP protocol binding**: every
attribute and extension is a string header (application property) named ``cloudEvents_<name>``
(``cloudEvents_id``, ``cloudEvents_type``, ``cloudEvents_source``, ``cloudEvents_specversion``,
``cloudEvents_time``, ``cloudEvents_subject``, ``cloudEvents_partitionkey``, …), ``datacontenttype``
is the AMQP ``content_type`` property, and the body is the data, byte for byte. Messages are
persistent (``delivery_mode`` 2). The binding allows ``cloudEvents:`` as the prefix too: both are read,
and so are the ``ce-`` headers of the RabbitMQ binding of the CloudEvents SDKs. A message that is not a
CloudEvent is delivered as a ``callcast.undecodable`` envelope (see
:func:`callcast.envelope.decode_or_quarantine`) instead of breaking the subscription.

How the contract is met
-----------------------
Durability
    Quorum queues (replicated, fsynced), persistent messages and **publisher confirms**:
    ``publish`` returns once RabbitMQ confirmed every envelope of the batch. A batch is sent as one
    pipelined burst on the connection's publishing channel, its confirms in flight together, and
    ``publish`` waits for all of them (a batch costs about one round trip). The channel keeps the
    batch's order.
Acks and prefetch
    Manual acks. Each subscription is one AMQP consumer with ``basic.qos`` = its prefetch; the
    subscriptions of one group in one broker object share one channel and a buffer, and each
    delivery goes to whichever of them asks first with fewer than ``prefetch`` unsettled. ``ack`` is
    ``basic.ack``; ``nack()`` is ``basic.nack`` with requeue. A group's acks are written in
    batches: a batch gathers the acks of a loop turn, and of the turns after it until the channel's
    previous batch is written. The run of a batch's tags that leads the channel's unsettled
    deliveries (in delivery order) goes out as one ``basic.ack`` with ``multiple``, the others one
    by one. No delivery still handled, buffered or being nacked is ever covered by a ``multiple``
    ack; ``ack`` returns once its own frame is written.
Delayed nack
    ``nack(delay=d)`` publishes a copy to the group's retry bucket for ``d`` (confirmed), then acks
    the delivery: RabbitMQ holds the copy back for the bucket's TTL and dead-letters it to the
    group's queue. If the copy cannot be stored, the delivery is requeued at once instead and
    ``nack`` raises :class:`~callcast.exceptions.PublishError`.
Attempt counting
    Quorum queues count redeliveries (nack, or a consumer whose channel or connection went away,
    e.g. a killed process) in the ``x-delivery-count`` header (RabbitMQ 4 counts the latter in
    ``x-acquired-count``: the larger of the two is used). A copy published to a retry bucket is
    a new message to RabbitMQ, so the adapter stamps it with the header ``callcast-attempts`` = the
    deliveries made so far; ``attempt`` = that stamp + ``x-delivery-count`` + 1. The stamp is read
    only from a message that RabbitMQ dead-lettered (``x-death``, reason ``expired``) out of one of
    *this group's* retry buckets; on any other message it is ignored. (A publisher that forges both
    ``x-death`` and the stamp could still forge the count: RabbitMQ does not reserve the headers.)
    Ephemeral queues are classic queues, which keep no count: there the adapter counts the
    deliveries of each message itself, which is the broker's count for a queue that cannot outlive
    this connection.
Fetched ahead
    Envelopes RabbitMQ pushed to the buffer but no subscription took count no attempt: when the
    last subscription of a group closes, they go back through the ``0ms`` retry bucket stamped with
    the deliveries made before, instead of being requeued (which would count one). They go to the
    back of the queue. (If the connection is lost instead, RabbitMQ requeues and counts them.) Every
    member's ``holding`` hears of a buffered delivery; those of the members that did not take it
    hear it returned when one does.
Close
    ``Subscription.close()`` cancels its consumer and requeues the deliveries it handed out and did
    not settle, in delivery order; acks and nacks afterwards are ignored. The last subscription of
    a group also closes the group's channel.
A subscriber that disappears
    RabbitMQ requeues the unacknowledged deliveries of a connection the moment it closes (a killed
    process's socket closes at once), or after the heartbeat timeout (``?heartbeat=``) for a host
    that vanished from the network.
Per-key order
    Not guaranteed (``ordered_per_key`` is False): competing consumers of a queue and requeues
    interleave envelopes of one key. The framework adds its ordering gate above the seam.
Reconnect
    The adapter reconnects by itself (pauses from 50 ms doubling to 2 s) after the connection is
    lost, e.g. a server restart: it re-declares the exchange and reopens the publishing channel,
    and every group re-declares its queue and restarts its consumers, so iteration simply resumes.
    While the connection is down, ``publish``, ``declare`` and ``subscribe`` wait up to
    ``?timeout=`` for it, then raise :class:`~callcast.exceptions.BrokerUnavailableError` (nothing was
    sent). A publish whose confirm is lost raises :class:`~callcast.exceptions.PublishError` (it may
    or may not be stored). Deliveries handed out before the loss were requeued by RabbitMQ: their
    ``ack`` raises ``BrokerUnavailableError``, their ``nack`` is a no-op.

Limits
------
* After a crash or a lost connection, every envelope RabbitMQ had pushed to that connection counts
  an attempt, handed out or not (up to ``prefetch`` per subscription).
* A delivery left unsettled longer than the server's ``consumer_timeout`` (30 minutes by default)
  makes RabbitMQ close the group's channel: the group resumes on a new one, and the delivery comes
  back as the next attempt.
* RabbitMQ 4 gives quorum queues a default delivery limit (20 returns, then the message is dropped):
  only ``nack()`` without delay and crashes return a message; delayed retries are fresh copies.
* Structured-mode CloudEvents (``application/cloudevents+json`` bodies) are not unpacked: they
  arrive as ``callcast.undecodable``.

URL
---
``amqp://user:password@host:5672/vhost`` (``amqps://`` for TLS; an empty path or ``/%2F`` is the
vhost ``/``). Options in the query:

``exchange``
    The exchange's name and the namespace of the queues (default ``callcast``): letters, digits and
    ``. _ : -``, not starting with ``amq.``.
``timeout``
    Seconds (default 10) that an operation waits for the connection, a declaration or a publish
    confirm before raising.
``heartbeat``
    AMQP heartbeat in seconds (default 60; 0 disables): how soon RabbitMQ gives a silent peer's
    deliveries back to the group, and the client notices a dead server.
``name``, ``cafile``, ``capath``, ``cadata``, ``keyfile``, ``certfile``, ``no_verify_ssl``, ``auth``
    Passed to the client (connection name, TLS, auth mechanism).

The password never appears in :attr:`RabbitBroker.url`, in logs or in exception messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.abc
import aiormq.exceptions
from pamqp import commands as spec

from callcast import alarms
from callcast.brokers import port_of, redact, seconds_option
from callcast.brokers.closing import CloseOnce
from callcast.envelope import Envelope, decode_or_quarantine
from callcast.exceptions import BrokerUnavailableError, ConfigurationError, PublishError, TransportError
from callcast.transport import Capabilities, Delivery, Holding
from callcast.waiting import retrieved, wait_event, within

CAPABILITIES = Capabilities(
    durable=True,
    shared=True,
    delayed_nack=True,
    delivery_count=True,
    ordered_per_key=False,
    request_reply=False,
    replays_history=False,
)

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_EXCHANGE = "callcast"
CE_PREFIX = "cloudEvents_"
"""The header prefix callcast writes (the binding's JMS-compatible form)."""
ATTEMPTS_HEADER = "callcast-attempts"
"""Deliveries made before the adapter re-published the message into a retry bucket."""

_READ_PREFIXES = ("ce-", "cloudEvents:", CE_PREFIX)  # later ones win when a message has several
_BROKER_HEADERS = frozenset(
    {
        "x-delivery-count",
        "x-acquired-count",
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        ATTEMPTS_HEADER,
    }
)
_OWN_OPTIONS = frozenset({"exchange", "timeout"})
_CLIENT_OPTIONS = frozenset(
    {"heartbeat", "name", "cafile", "capath", "cadata", "keyfile", "certfile", "no_verify_ssl", "auth"}
)
_EXCHANGE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,100}")
_MAX_QUEUE_NAME = 200  # bytes; leaves room for "/retry/<ms>ms" within AMQP's 255
_BUCKET_MANTISSAS = (10, 13, 16, 20, 25, 32, 40, 50, 63, 80)
_RETRY_EXPIRES_MS = 15 * 60 * 1000
_RETRY_REDECLARE = 5 * 60.0
_MAX_DELAY_MS = 2**32 - 1 - _RETRY_EXPIRES_MS
_MAX_DELAY = _MAX_DELAY_MS / 1000
"""The longest ``nack`` delay in seconds (the longest bucket); a longer or infinite one is cut to it."""
_RECONNECT_FIRST = 0.05
_RECONNECT_MAX = 2.0

log = logging.getLogger("callcast.brokers.rabbitmq")

T = TypeVar("T")


# -- the URL --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RabbitSettings:
    """What a ``amqp://`` URL says. ``client_url`` holds the password: never print it."""

    client_url: str
    exchange: str
    timeout: float
    heartbeat: int | None
    password: str | None

    def __repr__(self) -> str:
        return (
            f"RabbitSettings(exchange={self.exchange!r}, timeout={self.timeout!r}, "
            f"heartbeat={self.heartbeat!r})"
        )


def parse_url(url: str) -> RabbitSettings:
    """Split an ``amqp://`` URL into the client's URL and callcast's options; raise
    :class:`ConfigurationError` for anything the adapter cannot honour."""
    parts = urlsplit(url)
    shown = redact(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(f"not an amqp:// or amqps:// URL: {shown!r}")
    port_of("rabbitmq", url)
    host, password = parts.hostname, parts.password
    if not host:
        raise ConfigurationError(f"rabbitmq broker: the URL names no host: {shown!r}")
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - _OWN_OPTIONS - _CLIENT_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"rabbitmq broker: unknown option(s) {', '.join(unknown)} in {shown!r}; the options are "
            f"{', '.join(sorted(_OWN_OPTIONS | _CLIENT_OPTIONS))}"
        )
    exchange = options.get("exchange", DEFAULT_EXCHANGE)
    if not _EXCHANGE_NAME.fullmatch(exchange) or exchange.startswith("amq."):
        raise ConfigurationError(
            f"rabbitmq broker: exchange must be 1-100 letters, digits or . _ : - and not start with "
            f"amq., got {exchange!r}"
        )
    timeout = seconds_option("rabbitmq", options, "timeout", 10.0)
    heartbeat: int | None = None
    if "heartbeat" in options:
        try:
            heartbeat = int(options["heartbeat"])
        except ValueError:
            heartbeat = -1
        if not 0 <= heartbeat <= 65535:
            raise ConfigurationError("rabbitmq broker: heartbeat must be a whole number of seconds, 0-65535")
    client_options = {key: value for key, value in options.items() if key in _CLIENT_OPTIONS}
    client_options.setdefault("name", "callcast")
    client_url = urlunsplit(parts._replace(query=urlencode(client_options), fragment=""))
    return RabbitSettings(client_url, exchange, timeout, heartbeat, password)


# -- names ----------------------------------------------------------------------------------------


def _part(text: str) -> str:
    return text.replace("%", "%25").replace("/", "%2F")


def queue_name(exchange: str, topic: str, group: str) -> str:
    """The queue of ``group`` on ``topic``: ``<exchange>/<topic>/<group>``."""
    name = f"{_part(exchange)}/{_part(topic)}/{_part(group)}"
    raw = name.encode()
    if len(raw) <= _MAX_QUEUE_NAME:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:24]
    head = raw[: _MAX_QUEUE_NAME - len(digest) - 1].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def retry_queue_name(group_queue: str, milliseconds: int) -> str:
    """The retry bucket of a group's queue for a delay of ``milliseconds``."""
    return f"{group_queue}/retry/{milliseconds}ms"


def retry_bucket(delay: float) -> int:
    """The bucket (ms) that holds a ``nack(delay=...)`` back: the delay in whole milliseconds below
    10 ms, else rounded *up* to the Renard R10 series (10, 13, 16, 20, 25, 32, 40, 50, 63, 80 × 10ⁿ
    ms): a retry is never early and at most 28% late, and a group needs at most ten buckets for
    each tenfold range of delays (the jittered backoff of a retry policy spreads over few)."""
    milliseconds = max(1, math.ceil(round(delay * 1000, 6)))
    if milliseconds < 10:
        return milliseconds
    scale = 1
    while True:
        for mantissa in _BUCKET_MANTISSAS:
            if mantissa * scale >= milliseconds:
                return min(mantissa * scale, _MAX_DELAY_MS)
        scale *= 10


def _check_topic(topic: str) -> None:
    if "*" in topic or "#" in topic:
        raise ConfigurationError(f"rabbitmq broker: a topic may not contain * or #, got {topic!r}")
    if len(topic.encode()) > 255:
        raise ConfigurationError(f"rabbitmq broker: a topic is at most 255 bytes, got {topic[:40]!r}…")


# -- messages -------------------------------------------------------------------------------------


def amqp_properties(envelope: Envelope) -> spec.Basic.Properties:
    """The AMQP properties of an envelope: ``cloudEvents_*`` headers and ``content_type``."""
    headers: dict[str, Any] = {
        CE_PREFIX + name[3:]: value for name, value in envelope.headers().items() if name.startswith("ce-")
    }
    return spec.Basic.Properties(content_type=envelope.datacontenttype, delivery_mode=2, headers=headers)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=UTC)
        return stamp.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def envelope_of(properties: spec.Basic.Properties, body: bytes) -> Envelope:
    """The envelope of a received message (``callcast.undecodable`` if it is not a CloudEvent)."""
    found: dict[str, tuple[int, str]] = {}
    for name, value in (properties.headers or {}).items():
        for rank, prefix in enumerate(_READ_PREFIXES):
            if name.startswith(prefix):
                attribute = "ce-" + name[len(prefix) :]
                if attribute == "ce-time" and isinstance(value, int) and not isinstance(value, bool):
                    # The binding lets senders write the time as milliseconds since the epoch (the
                    # CloudEvents SDK does): read it as the RFC 3339 string callcast carries.
                    moment = datetime.fromtimestamp(value / 1000, UTC)
                    value = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                if attribute not in found or found[attribute][0] <= rank:
                    found[attribute] = (rank, _text(value))
    headers = {attribute: value for attribute, (_, value) in found.items()}
    if properties.content_type:
        headers["content-type"] = properties.content_type
    return decode_or_quarantine(headers, body)


def _count(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    try:
        return max(0, int(_text(value)))
    except ValueError:
        return 0


def _retry_properties(original: spec.Basic.Properties, attempts: int) -> spec.Basic.Properties:
    """A copy of a received message's properties for re-publishing it into a retry bucket: the
    broker's bookkeeping headers dropped, the attempts made so far stamped, a fresh message id."""
    headers = {k: v for k, v in (original.headers or {}).items() if k not in _BROKER_HEADERS}
    headers[ATTEMPTS_HEADER] = attempts
    return spec.Basic.Properties(
        content_type=original.content_type,
        content_encoding=original.content_encoding,
        headers=headers,
        delivery_mode=2,
        priority=original.priority,
        correlation_id=original.correlation_id,
        reply_to=original.reply_to,
        message_id=uuid.uuid4().hex,
        timestamp=original.timestamp,
        message_type=original.message_type,
        app_id=original.app_id,
    )


async def _quietly(awaitable: Awaitable[Any], timeout: float) -> None:
    """Await a clean-up step, ignoring its failure: the state it cleans is going away anyway."""
    with contextlib.suppress(Exception):
        await within(awaitable, timeout)


# -- the broker -----------------------------------------------------------------------------------


class RabbitBroker:
    """RabbitMQ. Build with :func:`callcast.brokers.connect` (``amqp://user:pw@host:5672/vhost``)."""

    capabilities = CAPABILITIES

    def __init__(self, url: str = DEFAULT_URL) -> None:
        self._settings = parse_url(url)
        self.url = redact(url)
        self.exchange = self._settings.exchange
        self.timeout = self._settings.timeout
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._publish_channel: aio_pika.abc.AbstractChannel | None = None
        self._admin_channel: aio_pika.abc.AbstractChannel | None = None
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._connected_once = False
        self._closing = False  # close() began: the seam's methods refuse, close hands back what it can
        self._close_once = CloseOnce()
        self._closed = False
        self._generation = 0
        self._readers: dict[tuple[str, str], _GroupReader] = {}
        self._subscriptions: set[_RabbitSubscription] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._channel_lock = asyncio.Lock()
        self._subscribe_lock = asyncio.Lock()
        self._retry_declared: dict[str, tuple[int, float]] = {}

    # -- errors ---------------------------------------------------------------------------------

    def _describe(self, error: BaseException) -> str:
        text = str(error) or type(error).__name__
        password = self._settings.password
        if password:
            for form in {password, unquote(password)}:
                text = text.replace(form, "***")
        return f"{type(error).__name__}: {text}"[:500]

    def _error(self, what: str, error: BaseException) -> TransportError:
        """Translate a driver exception: connection trouble is BrokerUnavailableError, the rest
        (a channel error such as a queue declared elsewhere with other arguments) TransportError."""
        message = f"rabbitmq broker {self.url}: {what}: {self._describe(error)}"
        if isinstance(error, TransportError):
            return error
        if isinstance(
            error,
            aiormq.exceptions.AMQPConnectionError
            | aiormq.exceptions.ChannelInvalidStateError
            | OSError
            | TimeoutError
            | RuntimeError,
        ):
            return BrokerUnavailableError(message)
        return TransportError(message)

    def _closed_error(self) -> BrokerUnavailableError:
        return BrokerUnavailableError(f"rabbitmq broker {self.url} is closed")

    # -- the connection -------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection and declare the exchange; called by :func:`callcast.brokers.connect`."""
        if self._closing:
            raise self._closed_error()
        if self._supervisor is not None:
            return
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise(), name="callcast-rabbitmq-reconnect")

    async def _open(self) -> None:
        try:
            connection = await within(
                aio_pika.connect(self._settings.client_url, timeout=self.timeout), self.timeout
            )
        except Exception as error:
            raise BrokerUnavailableError(
                f"rabbitmq broker {self.url}: cannot connect: {self._describe(error)}"
            ) from None
        try:
            publish_channel = await self._new_channel(connection, confirms=True)
            admin_channel = await self._new_channel(connection, confirms=False)
            admin = await admin_channel.get_underlay_channel()
            await admin.exchange_declare(
                self.exchange, exchange_type="topic", durable=True, timeout=self.timeout
            )
        except Exception as error:
            await _quietly(connection.close(), self.timeout)
            raise self._error(f"cannot declare the exchange {self.exchange!r}", error) from None
        if self._closed:
            await _quietly(connection.close(), self.timeout)
            raise self._closed_error()
        self._connection = connection
        self._publish_channel = publish_channel
        self._admin_channel = admin_channel
        self._generation += 1
        self._lost.clear()
        connection.close_callbacks.add(self._on_connection_closed)
        if connection.is_closed or not connection.connected.is_set():
            self._lost.set()
            raise BrokerUnavailableError(f"rabbitmq broker {self.url}: the connection closed at once")
        self._ready.set()
        if self._connected_once:
            log.info("rabbitmq broker %s: reconnected", self.url)
        self._connected_once = True

    async def _new_channel(
        self, connection: aio_pika.abc.AbstractConnection, *, confirms: bool
    ) -> aio_pika.abc.AbstractChannel:
        channel = connection.channel(publisher_confirms=confirms)
        await within(channel.initialize(), self.timeout)
        return channel

    def _on_connection_closed(self, sender: Any, error: BaseException | None) -> None:
        if sender is not self._connection or self._closed:
            return
        self._ready.clear()
        self._lost.set()
        reason = "" if error is None else f" ({self._describe(error)})"
        log.warning("rabbitmq broker %s: connection lost%s; reconnecting", self.url, reason)

    async def _supervise(self) -> None:
        """Reconnect whenever the connection is lost, until the broker is closed."""
        pause = _RECONNECT_FIRST
        while not self._closed:
            await self._lost.wait()
            if self._closed:
                return
            old, self._connection = self._connection, None
            self._publish_channel = self._admin_channel = None
            if old is not None:
                await _quietly(old.close(), 1.0)
            try:
                await self._open()
            except TransportError as error:
                log.debug("rabbitmq broker %s: reconnect failed: %s", self.url, error)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RECONNECT_MAX)
                continue
            pause = _RECONNECT_FIRST

    async def _wait_ready(self, timeout: float | None) -> aio_pika.abc.AbstractConnection:
        """The open connection; waits up to ``timeout`` (None: for ever) while it reconnects."""
        if not self._ready.is_set() and not self._closed and not await wait_event(self._ready, timeout):
            raise BrokerUnavailableError(
                f"rabbitmq broker {self.url}: not connected (reconnecting) after {timeout:g}s"
            )
        connection = self._connection
        if self._closed or connection is None:
            raise self._closed_error()
        return connection

    async def _channel(self, which: str) -> aiormq.abc.AbstractChannel:
        """The connection's publishing (``"publish"``) or declaring (``"admin"``) channel, reopened
        if a channel error closed it."""
        connection = await self._wait_ready(self.timeout)
        attribute = f"_{which}_channel"
        channel: aio_pika.abc.AbstractChannel | None = getattr(self, attribute)
        if channel is None or channel.is_closed:
            async with self._channel_lock:
                channel = getattr(self, attribute)
                if channel is None or channel.is_closed:
                    try:
                        channel = await self._new_channel(connection, confirms=which == "publish")
                    except Exception as error:
                        raise self._error("cannot open a channel", error) from None
                    setattr(self, attribute, channel)
        try:
            return await channel.get_underlay_channel()
        except Exception as error:
            raise self._error("channel unavailable", error) from None

    async def _admin(self, what: str, operation: Callable[[aiormq.abc.AbstractChannel], Awaitable[T]]) -> T:
        """Run one declaring operation on the admin channel, errors translated."""
        channel = await self._channel("admin")
        try:
            return await within(operation(channel), self.timeout)
        except Exception as error:
            raise self._error(what, error) from None

    # -- topology -------------------------------------------------------------------------------

    def _queue(self, topic: str, group: str) -> str:
        return queue_name(self.exchange, topic, group)

    async def _declare_queue(self, topic: str, group: str, *, ephemeral: bool) -> str:
        _check_topic(topic)
        queue = self._queue(topic, group)

        async def declare(channel: aiormq.abc.AbstractChannel) -> None:
            if ephemeral:
                # Not auto-delete: a channel that closes alone would take the queue and its replies
                # with it. Exclusive: the connection's end deletes it; the subscription's close does.
                await channel.queue_declare(queue, exclusive=True, timeout=self.timeout)
            else:
                await channel.queue_declare(
                    queue, durable=True, arguments={"x-queue-type": "quorum"}, timeout=self.timeout
                )
            await channel.queue_bind(queue, self.exchange, routing_key=topic, timeout=self.timeout)

        await self._admin(f"cannot declare queue {queue!r}", declare)
        return queue

    async def _retry_queue(self, reader: _GroupReader, milliseconds: int, *, fresh: bool = False) -> str:
        """The reader's retry bucket for ``milliseconds``, declared if this connection has not (or
        not lately) declared it."""
        queue = retry_queue_name(reader.queue, milliseconds)
        known = self._retry_declared.get(queue)
        now = time.monotonic()
        if (
            not fresh
            and known is not None
            and known[0] == self._generation
            and now - known[1] < _RETRY_REDECLARE
        ):
            return queue
        arguments: dict[str, Any] = {
            "x-message-ttl": milliseconds,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": reader.queue,
        }

        async def declare(channel: aiormq.abc.AbstractChannel) -> None:
            if reader.ephemeral:
                await channel.queue_declare(queue, exclusive=True, arguments=arguments, timeout=self.timeout)
            else:
                arguments.update(
                    {
                        "x-queue-type": "quorum",
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                        "x-expires": milliseconds + _RETRY_EXPIRES_MS,
                    }
                )
                await channel.queue_declare(queue, durable=True, arguments=arguments, timeout=self.timeout)

        generation = self._generation
        await self._admin(f"cannot declare retry queue {queue!r}", declare)
        self._retry_declared[queue] = (generation, now)
        if reader.ephemeral:
            reader.retry_queues.add(queue)
        return queue

    async def _republish(
        self, reader: _GroupReader, message: aiormq.abc.DeliveredMessage, delay_ms: int, attempts: int
    ) -> None:
        """Store a copy of ``message`` in the reader's retry bucket for ``delay_ms``, stamped with
        the ``attempts`` made so far; returns once RabbitMQ confirmed it."""
        for fresh in (False, True):
            queue = await self._retry_queue(reader, delay_ms, fresh=fresh)
            channel = await self._channel("publish")
            try:
                result = await within(
                    channel.basic_publish(
                        message.body,
                        exchange="",
                        routing_key=queue,
                        properties=_retry_properties(message.header.properties, attempts),
                        mandatory=True,
                    ),
                    self.timeout,
                )
            except Exception as error:
                raise PublishError(
                    f"rabbitmq broker {self.url}: retry copy not confirmed: {self._describe(error)}"
                ) from None
            if isinstance(result, spec.Basic.Ack):
                return
            self._retry_declared.pop(queue, None)  # returned: the bucket is gone, declare it again
        raise PublishError(f"rabbitmq broker {self.url}: retry queue {queue!r} does not take messages")

    # -- the seam -------------------------------------------------------------------------------

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        if self._closing:
            raise self._closed_error()
        _check_topic(topic)
        if not envelopes:
            return
        exchange, routing_key = (self.exchange, topic) if group is None else ("", self._queue(topic, group))
        messages = [(envelope.data, amqp_properties(envelope)) for envelope in envelopes]
        # The concrete channel's basic_publish can skip waiting for each frame to drain.
        channel = cast(aiormq.Channel, await self._channel("publish"))
        try:
            with alarms.timeout(self.timeout):
                if len(messages) == 1:
                    body, properties = messages[0]
                    outcomes: list[Any] = [
                        await channel.basic_publish(
                            body,
                            exchange=exchange,
                            routing_key=routing_key,
                            properties=properties,
                            wait=False,
                        )
                    ]
                else:
                    # All frames go out in order (the channel's lock is fair) before the first
                    # confirm is awaited: one pipelined burst, its confirms in flight together.
                    outcomes = await asyncio.gather(
                        *(
                            channel.basic_publish(
                                body,
                                exchange=exchange,
                                routing_key=routing_key,
                                properties=properties,
                                wait=False,
                            )
                            for body, properties in messages
                        ),
                        return_exceptions=True,
                    )
        except Exception as error:
            raise PublishError(
                f"rabbitmq broker {self.url}: publish to {topic!r} not confirmed: {self._describe(error)}"
            ) from None
        failures = [outcome for outcome in outcomes if not isinstance(outcome, spec.Basic.Ack)]
        if failures:
            if self._closing:
                raise self._closed_error()
            first = failures[0]
            reason = self._describe(first) if isinstance(first, BaseException) else repr(first)
            raise PublishError(
                f"rabbitmq broker {self.url}: {len(failures)} of {len(messages)} envelope(s) to {topic!r} "
                f"not confirmed: {reason}"
            )

    async def declare(self, topic: str, group: str) -> None:
        if self._closing:
            raise self._closed_error()
        await self._declare_queue(topic, group, ephemeral=False)

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        prefetch: int = 32,
        ephemeral: bool = False,
        holding: Holding | None = None,
    ) -> _RabbitSubscription:
        if self._closing:
            raise self._closed_error()
        _check_topic(topic)
        subscription = _RabbitSubscription(max(1, min(prefetch, 65535)), holding)
        while True:
            async with self._subscribe_lock:
                reader = self._readers.get((topic, group))
                if reader is None or reader.closing:
                    reader = _GroupReader(self, topic, group, ephemeral)
                    await reader.start(subscription)
                    self._readers[(topic, group)] = reader
                    break
            if await reader.join(subscription):
                break
        self._subscriptions.add(subscription)
        if self._closing:  # close() began meanwhile and did not see this subscription
            await subscription.close()
            raise self._closed_error()
        return subscription

    async def close(self) -> None:
        self._closing = True
        await self._close_once.run(self._shutdown)

    async def _shutdown(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()
        self._closed = True
        self._ready.set()  # wakes waiters, who then see the broker closed
        self._lost.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        connection, self._connection = self._connection, None
        if connection is not None:
            await _quietly(connection.close(), self.timeout)


# -- consumer groups ------------------------------------------------------------------------------


class _GroupReader:
    """The subscriptions of one (topic, group) in one broker object: one channel, one consumer per
    subscription (``basic.qos`` = its prefetch), one buffer that whichever asks first takes from."""

    def __init__(self, broker: RabbitBroker, topic: str, group: str, ephemeral: bool) -> None:
        self.broker = broker
        self.topic = topic
        self.group = group
        self.ephemeral = ephemeral
        self.queue = broker._queue(topic, group)
        self.retry_prefix = self.queue + "/retry/"
        self.members: dict[_RabbitSubscription, str | None] = {}  # subscription -> consumer tag
        self.buffer: deque[_RabbitDelivery] = deque()
        self.changed = asyncio.Event()
        self.lock = asyncio.Lock()
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self.generation = 0
        self.closing = False
        self.restoring: asyncio.Task[None] | None = None
        self.failure: TransportError | None = None
        self.counts: dict[str, int] = {}  # ephemeral queues: deliveries per message id
        self.unsettled: dict[int, None] = {}
        """Delivery tags of the channel that no ack or nack was written for yet, in delivery order."""
        self.acks: _Acks | None = None  # the batch of acks gathering
        self.last_acks: _Acks | None = None  # the batch made last (gathering or being written)
        self.retry_queues: set[str] = set()
        self.background: set[asyncio.Task[None]] = set()

    def _next_generation(self) -> int:
        """A new channel (or none): deliveries of the old one are stale (RabbitMQ requeues them)."""
        self.generation += 1
        self.unsettled = {}
        return self.generation

    def _settled(self, generation: int, tags: Iterable[int]) -> None:
        """An ack or nack of ``tags`` was written on the channel of ``generation``."""
        if generation == self.generation:
            for tag in tags:
                self.unsettled.pop(tag, None)

    def wake(self) -> None:
        # Set the event the waiters hold and give later ones a fresh one (no wake-up is lost).
        self.changed.set()
        self.changed = asyncio.Event()

    def _holdings(self) -> list[Holding]:
        """Whom to tell about buffered deliveries: any member may take them."""
        return [member.holding for member in self.members if member.holding is not None]

    def _drop_buffer(self) -> None:
        """The channel's buffered deliveries are gone (RabbitMQ requeues them with the channel)."""
        for holding in self._holdings():
            for delivery in self.buffer:
                holding.returned(delivery.envelope)
        self.buffer.clear()

    # -- the channel ----------------------------------------------------------------------------

    async def start(self, first: _RabbitSubscription) -> None:
        await self.broker._wait_ready(self.broker.timeout)
        first.reader = self
        self.members[first] = None
        async with self.lock:
            try:
                await self._open()
            except BaseException:
                self.members.clear()
                self.closing = True
                raise

    async def join(self, subscription: _RabbitSubscription) -> bool:
        """Add a subscription; False if this reader is closing (the caller makes a new one)."""
        async with self.lock:
            if self.closing:
                return False
            subscription.reader = self
            self.members[subscription] = None
            if subscription.holding is not None:
                # Any member may take what is buffered: the new one holds it too (this loop turn, so
                # nothing arrives in between unannounced or announced twice).
                for delivery in self.buffer:
                    subscription.holding.fetched(delivery.envelope)
            channel = self.channel
            if channel is None:
                return True  # restoring: the restore starts its consumer
            try:
                underlay = await channel.get_underlay_channel()
                self.members[subscription] = await self._consume(
                    underlay, subscription.prefetch, self.generation
                )
            except Exception as error:
                self.members.pop(subscription, None)
                for delivery in self.buffer:  # announced to it, and it is no member after all
                    subscription.returned(delivery)
                raise self.broker._error(f"cannot consume from {self.queue!r}", error) from None
            return True

    async def _open(self) -> None:
        """Declare the queue, open a channel, start one consumer per member. Under ``lock``."""
        broker = self.broker
        await broker._declare_queue(self.topic, self.group, ephemeral=self.ephemeral)
        connection = await broker._wait_ready(broker.timeout)
        channel: aio_pika.abc.AbstractChannel | None = None
        try:
            channel = await broker._new_channel(connection, confirms=False)
            underlay = await channel.get_underlay_channel()
            generation = self._next_generation()
            # Set before the consumers start: a delivery to the first may be settled while the
            # next one starts, and a settle takes ``channel None`` for a lost channel.
            self.channel = channel
            for member in self.members:
                self.members[member] = await self._consume(underlay, member.prefetch, generation)
        except Exception as error:
            self.channel = None
            self._next_generation()  # what that channel delivered meanwhile is stale
            self._drop_buffer()
            if channel is not None:
                await _quietly(channel.close(), broker.timeout)
            raise broker._error(f"cannot consume from {self.queue!r}", error) from None
        channel.close_callbacks.add(self._on_channel_closed)
        underlay.on_consumer_cancel_callbacks.add(self._on_cancelled_by_server)
        if channel.is_closed:
            self._on_channel_closed(channel, None)

    async def _consume(self, underlay: aiormq.abc.AbstractChannel, prefetch: int, generation: int) -> str:
        timeout = self.broker.timeout
        await underlay.basic_qos(prefetch_count=prefetch, timeout=timeout)
        ok = await underlay.basic_consume(
            self.queue, functools.partial(self._on_message, generation), timeout=timeout
        )
        tag = ok.consumer_tag
        if tag is None:
            raise TransportError(f"rabbitmq broker {self.broker.url}: consume gave no consumer tag")
        return tag

    def _on_cancelled_by_server(self, frame: spec.Basic.Cancel) -> None:
        """RabbitMQ cancelled a consumer (its queue was deleted): start over on a new channel."""
        if self.channel is not None and frame.consumer_tag in self.members.values():
            channel = self.channel
            self._on_channel_closed(channel, None)
            closing = asyncio.get_running_loop().create_task(_quietly(channel.close(), self.broker.timeout))
            self.background.add(closing)
            closing.add_done_callback(self.background.discard)

    def _on_channel_closed(self, sender: Any, error: BaseException | None) -> None:
        if sender is not self.channel:
            return
        self.channel = None
        self._next_generation()  # deliveries of the old channel are stale: RabbitMQ requeued them
        self._drop_buffer()
        self.counts.clear()
        for member in self.members:
            self.members[member] = None
        self.wake()
        if not self.closing and not self.broker._closed and self.restoring is None:
            self.restoring = asyncio.get_running_loop().create_task(
                self._restore(), name=f"callcast-rabbitmq-restore:{self.queue}"
            )

    async def _restore(self) -> None:
        """Reopen the channel and the consumers once the connection is back."""
        pause = _RECONNECT_FIRST
        try:
            while not self.closing and not self.broker._closed:
                try:
                    await self.broker._wait_ready(None)
                    async with self.lock:
                        if self.closing or self.channel is not None:
                            return
                        await self._open()
                    self.failure = None
                    self.wake()
                    return
                except TransportError as error:
                    if not isinstance(error, BrokerUnavailableError):
                        self.failure = error
                        self.wake()
                        log.warning(
                            "rabbitmq broker %s: cannot resume %s: %s", self.broker.url, self.queue, error
                        )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _RECONNECT_MAX)
        finally:
            self.restoring = None

    # -- messages -------------------------------------------------------------------------------

    async def _on_message(self, generation: int, message: aiormq.abc.DeliveredMessage) -> None:
        if generation != self.generation:
            return  # a straggler of a channel being replaced: RabbitMQ requeues it
        tag = getattr(message.delivery, "delivery_tag", None)
        if tag is not None:  # unsettled from now on, even if it cannot be read
            self.unsettled[tag] = None
        try:
            delivery = self._delivery(message, generation)
        except Exception:  # never: decoding quarantines. Left unacked, it returns with the channel.
            log.exception("rabbitmq broker %s: cannot read a message of %s", self.broker.url, self.queue)
            return
        self.buffer.append(delivery)
        for holding in self._holdings():
            holding.fetched(delivery.envelope)
        self.wake()

    def _delivery(self, message: aiormq.abc.DeliveredMessage, generation: int) -> _RabbitDelivery:
        frame = message.delivery
        if not isinstance(frame, spec.Basic.Deliver):
            raise TypeError(f"not a delivery: {frame!r}")
        properties = message.header.properties
        headers: Mapping[str, Any] = properties.headers or {}
        prior = _count(headers[ATTEMPTS_HEADER]) if self._from_own_retry(headers) else 0
        if self.ephemeral:
            key = properties.message_id
            seen = self.counts.get(key, 1 if frame.redelivered else 0) if key else int(frame.redelivered)
            if key:
                self.counts[key] = seen + 1
            attempt = prior + seen + 1
        else:
            returned = max(
                _count(headers.get("x-delivery-count", 0)), _count(headers.get("x-acquired-count", 0))
            )
            attempt = prior + returned + 1
        envelope = envelope_of(properties, message.body)
        return _RabbitDelivery(self, generation, frame.delivery_tag or 0, message, envelope, attempt)

    def _from_own_retry(self, headers: Mapping[str, Any]) -> bool:
        """Whether RabbitMQ dead-lettered this message out of one of this group's retry buckets
        (the only messages whose attempts stamp is read)."""
        if ATTEMPTS_HEADER not in headers:
            return False
        deaths = headers.get("x-death")
        if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
            return False
        latest = deaths[0]
        return _text(latest.get("reason", "")) == "expired" and _text(latest.get("queue", "")).startswith(
            self.retry_prefix
        )

    def _forget(self, delivery: _RabbitDelivery) -> None:
        key = delivery.message.header.properties.message_id
        if self.ephemeral and key:
            self.counts.pop(key, None)

    async def settle(self, delivery: _RabbitDelivery, delay: float | None) -> None:
        """``ack`` (``delay`` None) or ``nack(delay)`` a delivery that a member handed out."""
        owner = delivery.owner
        if delivery.settled or owner is None:
            return
        delivery.settled = True
        owner.outstanding.discard(delivery)
        if owner.closed:
            return  # after close: ignored (close gave it back)
        self.wake()
        channel = self.channel
        if delivery.generation != self.generation or channel is None:
            owner.returned(delivery)  # RabbitMQ took it back with the channel
            if delay is None:
                raise BrokerUnavailableError(
                    f"rabbitmq broker {self.broker.url}: the channel was lost since this delivery; "
                    "RabbitMQ requeued it and delivers it again"
                )
            return  # RabbitMQ already gave it back
        try:
            if delay is None:
                self._forget(delivery)
                try:
                    await self._ack(delivery)
                except BrokerUnavailableError:
                    owner.returned(delivery)  # RabbitMQ took it back with the channel
                    raise
                owner.returned(delivery)  # written to the socket
                return
            underlay = await channel.get_underlay_channel()
            if delay < 0.0005:
                await underlay.basic_nack(delivery.tag, requeue=True)
            else:
                try:
                    await self.broker._republish(
                        self, delivery.message, retry_bucket(delay), delivery.attempt
                    )
                except TransportError as error:
                    await underlay.basic_nack(delivery.tag, requeue=True)
                    self._settled(delivery.generation, [delivery.tag])
                    owner.returned(delivery)
                    raise PublishError(
                        f"{error}; the envelope was given back for an immediate retry instead"
                    ) from None
                self._forget(delivery)
                await underlay.basic_ack(delivery.tag)
            self._settled(delivery.generation, [delivery.tag])
        except TransportError:
            raise
        except Exception as error:
            raise self.broker._error("cannot settle a delivery", error) from None
        owner.returned(delivery)  # written to the socket (aiormq drains before returning)

    async def _ack(self, delivery: _RabbitDelivery) -> None:
        """Ack ``delivery`` with the others of its batch; returns once its frame is written. A
        cancelled caller leaves the ack to be written all the same."""
        acks = self.acks
        if acks is None or acks.generation != delivery.generation:
            # The first ack since the last write began, or of a new channel: a batch of its own,
            # written after the channel's batch before it (another channel's does not matter).
            last = self.last_acks
            previous = last.written if last is not None and last.generation == delivery.generation else None
            acks = self.acks = self.last_acks = _Acks(delivery.generation)
            acks.written = asyncio.get_running_loop().create_task(self._write_acks(acks, previous))
            acks.written.add_done_callback(retrieved)
        outcome = acks.outcomes[delivery.tag] = asyncio.get_running_loop().create_future()
        await outcome

    async def _write_acks(self, acks: _Acks, previous: asyncio.Task[None] | None) -> None:
        """Once the loop turn that opened ``acks`` is over and the channel's batch before it is
        written (``acks`` gathers meanwhile), write it; each ack's caller learns how its own went."""
        if previous is not None:
            await asyncio.wait({previous})
        if self.acks is acks:
            self.acks = None  # acks from here on are the next batch
        try:
            await self._write_ack_frames(acks)
        except BaseException as error:
            for outcome in acks.outcomes.values():
                if outcome.done():
                    continue
                if isinstance(error, asyncio.CancelledError):
                    outcome.cancel()
                else:
                    outcome.set_exception(error)
            raise

    async def _write_ack_frames(self, acks: _Acks) -> None:
        """One ``multiple`` ack for the acked tags that lead :attr:`unsettled`, one ack for each
        of the others; each frame written within the broker's timeout."""
        channel = self.channel
        if acks.generation != self.generation or channel is None:
            raise BrokerUnavailableError(
                f"rabbitmq broker {self.broker.url}: the channel was lost before these acks were "
                "written; RabbitMQ requeued the deliveries and delivers them again"
            )
        underlay = await channel.get_underlay_channel()
        acked = acks.outcomes
        leading = 0  # the last tag of the run of acked tags that leads the unsettled ones
        for tag in self.unsettled:
            if tag not in acked:
                break
            leading = tag
        timeout = self.broker.timeout
        if leading:
            await within(underlay.basic_ack(leading, multiple=True), timeout)
            self._acks_written(acks, [tag for tag in acked if tag <= leading])
        for tag in [tag for tag in acked if tag > leading]:
            await within(underlay.basic_ack(tag), timeout)
            self._acks_written(acks, [tag])

    def _acks_written(self, acks: _Acks, tags: list[int]) -> None:
        self._settled(acks.generation, tags)
        for tag in tags:
            outcome = acks.outcomes[tag]
            if not outcome.done():  # not cancelled
                outcome.set_result(None)

    # -- leaving --------------------------------------------------------------------------------

    async def leave(self, member: _RabbitSubscription) -> None:
        """Remove a closed subscription: cancel its consumer, requeue what it held; the last one
        also hands the buffer back (uncounted) and closes the channel."""
        async with self.lock:
            tag = self.members.pop(member, None)
            buffered = list(self.buffer)
            try:
                await self._leave(member, tag)
            finally:
                for delivery in buffered:  # handed back, or left to the other members
                    member.returned(delivery)

    async def _leave(self, member: _RabbitSubscription, tag: str | None) -> None:
        """:meth:`leave` once ``member`` is no longer a member. Under ``lock``."""
        broker = self.broker
        last = not self.members
        if last:
            self.closing = True
            if broker._readers.get((self.topic, self.group)) is self:
                del broker._readers[(self.topic, self.group)]
            if self.restoring is not None:
                self.restoring.cancel()
        acks = self.last_acks
        if acks is not None and acks.generation == self.generation:  # acks made before go first
            await asyncio.wait({acks.written}, timeout=broker.timeout)
        held = sorted((d for d in member.outstanding if d.generation == self.generation), key=lambda d: d.tag)
        member.outstanding.clear()
        channel = self.channel
        if channel is None or channel.is_closed:
            if last:
                self.channel = None
                if self.ephemeral:  # its channel is being restored: the queue is still there
                    await self._delete_ephemeral_queues()
            self.wake()
            return
        timeout = broker.timeout
        with contextlib.suppress(Exception):
            underlay = await channel.get_underlay_channel()
            if tag is not None:
                await _quietly(underlay.basic_cancel(tag, timeout=timeout), timeout)
            for delivery in held:
                delivery.settled = True
                await underlay.basic_nack(delivery.tag, requeue=True)
                self._settled(delivery.generation, [delivery.tag])
            if last:
                buffered = [d for d in self.buffer if d.generation == self.generation]
                self.buffer.clear()
                if not self.ephemeral:
                    await self._hand_back(underlay, buffered)
        if last:
            self.channel = None
            await _quietly(channel.close(), timeout)
            if self.ephemeral:
                await self._delete_ephemeral_queues()
        self.wake()

    async def _hand_back(self, underlay: aiormq.abc.AbstractChannel, buffered: list[_RabbitDelivery]) -> None:
        """Give back deliveries that were fetched but never handed out, without counting an attempt:
        through the 0 ms retry bucket, stamped with the deliveries made before this one."""
        if not buffered:
            return
        with contextlib.suppress(TransportError):
            await self.broker._retry_queue(self, 0)  # once, so the copies go out in their order
        outcomes = await asyncio.gather(
            *(self.broker._republish(self, d.message, 0, d.attempt - 1) for d in buffered),
            return_exceptions=True,
        )
        for delivery, outcome in zip(buffered, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                await underlay.basic_nack(delivery.tag, requeue=True)  # counted, but not lost
            else:
                await underlay.basic_ack(delivery.tag)
            self._settled(delivery.generation, [delivery.tag])

    async def _delete_ephemeral_queues(self) -> None:
        """Delete the ephemeral queue and its retry buckets; one that cannot be deleted now is
        deleted by the server when this connection ends (they are exclusive to it)."""
        for queue in [self.queue, *sorted(self.retry_queues)]:
            try:
                await self.broker._admin(
                    f"cannot delete {queue!r}",
                    functools.partial(_delete_queue, queue=queue, timeout=self.broker.timeout),
                )
            except TransportError as error:
                log.warning("rabbitmq broker %s: %s (it goes with the connection)", self.broker.url, error)


async def _delete_queue(channel: aiormq.abc.AbstractChannel, *, queue: str, timeout: float) -> None:
    await channel.queue_delete(queue, timeout=timeout)


class _Acks:
    """A batch of acks of one channel of a group reader: the future of each acked tag, which learns
    how its frame went, and the task that writes them."""

    __slots__ = ("generation", "outcomes", "written")
    written: asyncio.Task[None]

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.outcomes: dict[int, asyncio.Future[None]] = {}


class _RabbitSubscription:
    """One subscriber of a group: a consumer of the group's queue with its own prefetch."""

    def __init__(self, prefetch: int, holding: Holding | None) -> None:
        self.prefetch = prefetch
        self.holding = holding
        self.reader: _GroupReader | None = None
        self.outstanding: set[_RabbitDelivery] = set()
        self.closed = False

    def __aiter__(self) -> _RabbitSubscription:
        return self

    async def __anext__(self) -> Delivery:
        reader = self.reader
        assert reader is not None
        while True:
            if self.closed:
                raise StopAsyncIteration
            if reader.buffer and len(self.outstanding) < self.prefetch:
                delivery = reader.buffer.popleft()
                delivery.owner = self
                self.outstanding.add(delivery)
                for holding in reader._holdings():
                    if holding is not self.holding:  # announced to every member: now it is ours
                        holding.returned(delivery.envelope)
                return delivery
            if reader.failure is not None:
                raise TransportError(str(reader.failure))
            await reader.changed.wait()

    def returned(self, delivery: _RabbitDelivery) -> None:
        if self.holding is not None:
            self.holding.returned(delivery.envelope)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        reader = self.reader
        if reader is not None:
            reader.wake()
            reader.broker._subscriptions.discard(self)
            await reader.leave(self)


class _RabbitDelivery:
    __slots__ = ("attempt", "envelope", "generation", "message", "owner", "reader", "settled", "tag")

    def __init__(
        self,
        reader: _GroupReader,
        generation: int,
        tag: int,
        message: aiormq.abc.DeliveredMessage,
        envelope: Envelope,
        attempt: int,
    ) -> None:
        self.reader = reader
        self.generation = generation
        self.tag = tag
        self.message = message
        self.envelope = envelope
        self.attempt = attempt
        self.owner: _RabbitSubscription | None = None
        self.settled = False

    async def ack(self) -> None:
        await self.reader.settle(self, None)

    async def nack(self, *, delay: float = 0.0) -> None:
        if not math.isfinite(delay):
            delay = _MAX_DELAY if delay > 0 else 0.0
        await self.reader.settle(self, min(max(0.0, delay), _MAX_DELAY))

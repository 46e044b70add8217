"""``nats://[user:pass@]host:4222``: NATS JetStream (nats-py) as callcast's broker.

Topology (what other tools see)
-------------------------------
Names are made from topics and groups by :func:`encode_name`, which maps a name to one *token*
that is legal as a NATS subject token, a consumer name and a file name: ASCII letters, digits and
``-`` stay, ``.`` becomes ``_``, every other byte of the UTF-8 name becomes ``=XX`` (two upper-case
hex digits). ``orders.v2`` → ``orders_v2``, ``emails.send_welcome`` → ``emails_send=5Fwelcome``.
A token longer than 120 characters is cut (at an escape boundary) and ends with ``=h`` plus 32 hex
digits of the name's SHA-256. The encoding is injective, so distinct names never share a token.

* **Stream** ``CALLCAST`` (``?stream=``) holds every envelope, on subjects ``callcast.>``
  (``?prefix=``), file storage, ``?replicas=`` (default 1), *interest* retention: an envelope is
  kept while a group that has not acked it exists, and an envelope published to a topic with no
  group is not kept at all.
* **Subject** ``<prefix>.<token(topic)>``: one per topic, e.g. ``callcast.UserSignedUp``. A tool
  reads a topic's traffic by subscribing to it.
* **Group** = a durable *pull* consumer named ``<token(topic)>==<token(group)>`` filtered on the
  topic's subject, deliver policy ``new`` (a group gets what is published after it was declared;
  ``replays_history`` is False), explicit acks, ``ack_wait`` = the lease (``?ack_wait=``, default
  30 s), unlimited ``max_deliver`` (dead letters are the framework's), ``max_ack_pending``
  (``?max_ack_pending=``, default 10000) as the group's overall bound. Its description names the
  topic and group in clear.
* **Messages**: CloudEvents in the *structured* mode (the JSON event format: attributes and
  extensions as members, the data byte for byte as ``data_base64``), with no headers: nats-py
  parses headers line by line in Python, which cost more per message than the rest of the event
  path. A message published with ``publish(group=G)`` carries one header, ``callcast-group: G``
  (see below). Subscriptions also read CloudEvents in the binary mode (``ce-*`` headers, the data
  as the body), as other tools and earlier callcast versions write them.
* **RPC** (native request/reply, ``capabilities.request_reply``): core NATS, nothing stored. A
  request is a message on ``<prefix>-rpc.<token(topic)>`` (outside the stream's subjects) with a
  reply subject, served by a queue subscription whose queue group is ``<token(group)>``; the reply
  is a message on the request's reply subject, both structured-mode events as above. A request
  that no server takes fails at once (no responders); one whose server dies, or that finds its
  server's backlog full (10,000 requests waiting to be handed out), is never answered
  (the caller's timeout).
* **Bucket** ``<stream>_uncounted`` (a JetStream key/value bucket, i.e. stream
  ``KV_<stream>_uncounted``; history 1, 7-day TTL): see attempts.

How the contract is met
-----------------------
durability
    ``publish`` returns once JetStream acknowledged every envelope (a JetStream publish ack is sent
    after the message is in the stream's file store) and named this adapter's stream. The batch is
    written back to back, each with a reply subject under one inbox of the connection, and the
    acks are awaited together: one round trip per call, not per envelope. A crash of any process,
    the server included, loses nothing acknowledged; a power cut can lose what the server had not
    yet synced to disk (it syncs periodically) unless the stream is replicated (``?replicas=3``).
fan-out / competing consumers
    Every group is its own consumer on the topic's subject, so each gets every envelope; the
    subscribers of a group pull from the same consumer, so they share its envelopes.
publish(group=G)
    NATS 2.9 has one filter subject per consumer, so a per-group subject would need a second
    consumer per group whose deliveries cannot be merged in order with the first. Instead such an
    envelope goes to the topic's subject with the header ``callcast-group: G``; the subscriptions of
    every other group ack it on arrival and never hand it out (so it is no attempt for them, and a
    group that was never declared keeps nothing). Tools reading a topic should honour the header.
ack / nack / delayed nack
    ``ack`` sends ``+ACK``; ``nack(delay=d)`` sends ``-NAK {"delay": d}``, so the *server* holds
    the envelope back for ``d`` seconds and then redelivers it to any subscriber of the group.
    Both are written to the connection without waiting for the server (JetStream does not answer
    them); ``holding`` hears of the settle once the server has read it (a ``PING``/``PONG`` shared
    by the settles written while the one before was under way). A settle lost with a dropped
    connection means one more delivery, never a loss.
attempts
    ``Delivery.attempt`` is the server's ``num_delivered`` (from the message's ack subject), so
    redeliveries after crashes count. A subscription pulls envelopes in batches of up to its free
    prefetch; one that closes while it still buffers envelopes it never handed out records, for
    each, one *uncounted* delivery in the bucket (key ``<consumer>.<stream sequence>``, value the
    count) before it gives them back; a redelivery (``num_delivered > 1``) subtracts what is
    recorded there (one key lookup, for redeliveries only), and an ack deletes the key. So a
    fetched-ahead envelope is no attempt, across processes. The lookup runs in the background and
    is awaited when the delivery is handed out, so a received envelope reaches the buffer (and
    ``holding``) at once. (A subscriber that is *killed* with envelopes in its buffer records
    nothing: those count, as a crash does, and ``holding`` knew of them.) Ephemeral groups skip
    the bucket: their consumer is deleted on close, so nothing they fetched is ever redelivered.
prefetch
    A subscription hands out at most ``prefetch`` unsettled deliveries, and pulls only when a
    consumer waits in ``__anext__`` and its buffer is empty, asking (one pull request at a time,
    ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>``, expiring after 1 s and then renewed) for as
    many as it has room for, so it never holds more than ``prefetch`` envelopes of the group.
lease / killed subscribers
    While a subscription lives it sends ``+WPI`` (in progress) for everything it holds every
    ``ack_wait / 3``, so it keeps its deliveries past the lease; a killed one stops, and the server
    redelivers after ``ack_wait``.
close
    ``Subscription.close()`` naks every delivery it held (handed out or buffered), in stream order,
    so they go back to the group. NATS 2.9.10 loses a *redelivery* that meets a pull request whose
    inbox has no listener (until ``ack_wait``, and delivers another envelope again with a delivery
    count of 1: nats-server PR #5305, fixed in later releases). So while the subscription's last
    pull request is still open on the server (at most 1 s), its inbox stays subscribed (what
    arrives is handed back too) and the naks carry a delay that ends just after that request has
    expired: the deliveries are back with the group within about 1.25 s, not at once.
    ``Broker.close()`` closes the subscriptions, drains the inboxes still kept open (handing back
    what was on the way), flushes, then closes the connection, leaving no task running. What the
    adapter cannot avoid: a process that is killed, loses its connection, or closes the broker
    while a pull request is open leaves that request without a listener for up to 1 s; a
    redelivery to the same group in that second can still meet the server bug (it is delayed by
    ``ack_wait`` and another envelope is delivered twice, at-least-once still holding).
per-key order
    Not guaranteed (``ordered_per_key=False``): competing subscribers of a group get a key's
    envelopes in parallel and a nack does not hold back the rest of its key. The framework's
    ordering gate provides per-key order on top.
ephemeral subscriptions
    The group's consumer is created like a durable one but with an inactivity threshold
    (``?ephemeral_ttl=``, default 30 s). ``publish`` needs to know nothing: the consumer reads the
    topic's subject like any group. The subscription always keeps a pull request open (which keeps
    the consumer active), deletes the consumer on close, and the server deletes it after the
    threshold if the process died. Nothing is kept while no one listens (interest retention).
reconnect
    nats-py reconnects by itself, forever, every ``?reconnect_wait=`` seconds (default 2). While it
    is disconnected ``publish`` raises :class:`BrokerUnavailableError` at once (nothing was sent);
    a publish whose ack does not come within ``?timeout=`` seconds (default 5) raises
    :class:`PublishError`. Subscriptions wait through the outage: on reconnect they renew their
    leases and pull again, and a pull request that went unanswered (lost with a restarted server)
    is replaced after it expires, the consumer re-declared if it has gone.

URL options (query string): ``stream``, ``prefix``, ``ack_wait``, ``max_ack_pending`` (``-1``:
unlimited), ``replicas``, ``timeout``, ``reconnect_wait``, ``ephemeral_ttl``. A user without a
password is sent as a token. The password (or token) never appears in ``url``, logs or errors.

Limits: the server's ``max_payload`` (1 MB by default) bounds one envelope as a structured event
(base64 makes the data a third larger), headers included; a larger one is refused by ``publish``
before anything is sent. Declaring a group again with other options (``ack_wait``,
``max_ack_pending``) updates its consumer: the last declaration wins. One server per URL (no seed
list of a cluster, no TLS). Names are case-sensitive, so on a server whose store is on a
case-insensitive file system two consumers whose names differ only in case would share a directory.
An ephemeral subscription whose buffer stays full (nobody consumes) for longer than
``ephemeral_ttl`` stops pulling, and the server deletes its consumer; it is declared again when the
subscription pulls next, without what was published meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import re
from collections import deque
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from callcast import alarms
from callcast.brokers import port_of, redact, scrub, seconds_option
from callcast.brokers.closing import CloseOnce
from callcast.envelope import (
    HEADER_PREFIX,
    Envelope,
    decode_or_quarantine,
    structured_or_quarantine,
    to_structured,
)
from callcast.exceptions import (
    BrokerUnavailableError,
    ConfigurationError,
    PublishError,
    TransportError,
)
from callcast.transport import Capabilities, Delivery, Holding
from callcast.waiting import wait_event, within

log = logging.getLogger("callcast.brokers.nats")

T = TypeVar("T")

CAPABILITIES = Capabilities(
    durable=True,
    shared=True,
    delayed_nack=True,
    delivery_count=True,
    ordered_per_key=False,
    request_reply=True,
    replays_history=False,
)

DEFAULT_PORT = 4222
GROUP_HEADER = "callcast-group"
"""Header of an envelope published with ``publish(group=...)``: the one group that may handle it."""
UNCOUNTED_TTL = 7 * 24 * 3600.0
"""How long the bucket keeps a record of deliveries that were fetched ahead and never handed out."""

_OPTIONS = (
    "stream",
    "prefix",
    "ack_wait",
    "max_ack_pending",
    "replicas",
    "timeout",
    "reconnect_wait",
    "ephemeral_ttl",
)
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_MAX_TOKEN = 120
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')
_NEEDS_QUOTING = re.compile(r'[^\x21-\x7e]|["%]')
"""A character :data:`_HEADER_SAFE` does not hold: outside printable ASCII, ``"`` or ``%``."""
_PULL_EXPIRES = 1.0
"""Seconds a pull request waits on the server for envelopes before it is renewed. Short, because a
closing subscription hands its deliveries back only once its open request has expired (see
``_NatsSubscription.close``)."""
_PULL_GRACE = 1.0
"""Seconds past a pull request's expiry after which an unanswered request counts as lost."""
_HANDBACK_MARGIN = 0.25
"""Seconds past the server-side expiry of a closed subscription's last pull request after which its
deliveries are available to the group again."""
_CLOSE_WAIT = 1.0
"""Seconds ``close`` waits for the server (flushing naks, deleting a consumer) before giving up."""
_HPUB_OVERHEAD = 128
"""Bytes of a message's header block besides its headers (``NATS/1.0``, line ends), with room to
spare."""
_ACK = b"+ACK"
_NAK = b"-NAK"
_IN_PROGRESS = b"+WPI"
_MAX_DELAY = 365 * 24 * 3600.0
_SERVER_BACKLOG = 10_000
"""Requests that may wait to be handed out by one server (a burst is served; memory stays bounded
under lasting overload); more are dropped (see :class:`_NatsServer`)."""


# -- names ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def encode_name(name: str) -> str:
    """One subject token / consumer-name part for a topic or group (see the module docstring)."""
    if not name:
        raise ConfigurationError("nats broker: topic and group names must not be empty")
    raw = name.encode("utf-8")
    token = "".join(chr(byte) if byte in _PLAIN else "_" if byte == 0x2E else f"={byte:02X}" for byte in raw)
    if len(token) <= _MAX_TOKEN:
        return token
    cut = token[:80]
    partial = cut.rfind("=", len(cut) - 2)
    if partial != -1:
        cut = cut[:partial]
    return f"{cut}=h{hashlib.sha256(raw).hexdigest()[:32]}"


def _header_value(value: str) -> str:
    if _NEEDS_QUOTING.search(value) is None:  # the common case: ids, types, times, sources
        return value
    return quote(value, safe=_HEADER_SAFE)


# -- the URL --------------------------------------------------------------------------------------


class _Settings:
    """What ``nats://[user:pass@]host:port?options`` asks for, checked before anything is opened."""

    def __init__(self, url: str) -> None:
        shown = redact(url, user_is_secret=True)
        parts = urlsplit(url)
        port = port_of("nats", url) or DEFAULT_PORT
        if parts.scheme != "nats":
            raise ConfigurationError(f"nats broker: not a nats:// URL: {shown!r}")
        if parts.path not in ("", "/"):
            raise ConfigurationError(f"nats broker: the URL takes no path, got {shown!r}")
        host = parts.hostname or "127.0.0.1"
        self.server = f"nats://{f'[{host}]' if ':' in host else host}:{port}"
        self.user = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None
        options = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ConfigurationError(
                f"nats broker: unknown option(s) {', '.join(unknown)} in {shown!r}; "
                f"the options are {', '.join(_OPTIONS)}"
            )
        self.stream = options.get("stream", "CALLCAST")
        if not _STREAM_NAME.fullmatch(self.stream):
            raise ConfigurationError(
                f"nats broker: stream must be 1-64 letters, digits, '_' or '-', got {self.stream!r}"
            )
        self.prefix = options.get("prefix", "callcast")
        if not _PREFIX.fullmatch(self.prefix):
            raise ConfigurationError(
                "nats broker: prefix must be dot-separated tokens of letters, digits, '_' or '-', "
                f"got {self.prefix!r}"
            )
        self.ack_wait = seconds_option("nats", options, "ack_wait", 30.0)
        self.timeout = seconds_option("nats", options, "timeout", 5.0)
        self.reconnect_wait = seconds_option("nats", options, "reconnect_wait", 2.0)
        self.ephemeral_ttl = seconds_option("nats", options, "ephemeral_ttl", 30.0)
        self.max_ack_pending = _integer(options, "max_ack_pending", 10000)
        if self.max_ack_pending == 0 or self.max_ack_pending < -1:
            raise ConfigurationError("nats broker: max_ack_pending must be a positive integer or -1")
        self.replicas = _integer(options, "replicas", 1)
        if not 1 <= self.replicas <= 5:
            raise ConfigurationError("nats broker: replicas must be an integer from 1 to 5")


def _integer(options: dict[str, str], name: str, default: int) -> int:
    try:
        return int(options.get(name, default))
    except ValueError:
        raise ConfigurationError(f"nats broker: {name} must be an integer") from None


# -- driver errors --------------------------------------------------------------------------------

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.NoRespondersError,
    nats.errors.AuthorizationError,
    nats.js.errors.ServiceUnavailableError,
    OSError,
)
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, OSError, TimeoutError)
_READ_ERRORS: tuple[type[BaseException], ...] = (*_DRIVER_ERRORS, ValueError)
_PULL_ERRORS: tuple[type[BaseException], ...] = (*_DRIVER_ERRORS, TransportError)


class NatsBroker:
    """NATS JetStream. Build with :func:`callcast.brokers.connect` (``nats://host:4222``)."""

    capabilities = CAPABILITIES

    def __init__(self, url: str = f"nats://127.0.0.1:{DEFAULT_PORT}") -> None:
        self.url = redact(url, user_is_secret=True)
        settings = _Settings(url)
        self.stream = settings.stream
        self.prefix = settings.prefix
        self.ack_wait = settings.ack_wait
        self.timeout = settings.timeout
        self.reconnect_wait = settings.reconnect_wait
        self.ephemeral_ttl = settings.ephemeral_ttl
        self.max_ack_pending = settings.max_ack_pending
        self.replicas = settings.replicas
        self.bucket = f"{self.stream}_uncounted"
        self._server = settings.server
        self._user = settings.user
        self._password = settings.password
        self._given_url = url  # with its password or token: for scrub() only, never shown
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._replies: _Replies | None = None
        self._kv: KeyValue | None = None
        self._subscriptions: set[_NatsSubscription] = set()
        self._lingering: set[_NatsSubscription] = set()  # closed, inbox kept until the last pull expires
        self._servers: set[_NatsServer] = set()
        self._housekeeping: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._flusher: asyncio.Future[None] | None = None
        self._unflushed: list[tuple[Holding, Envelope]] = []  # settles written since the last flush
        self._closing = False  # close() began: subscribe and serve refuse, or undo what they opened
        self._close_once = CloseOnce()
        self._closed = False

    # -- errors ---------------------------------------------------------------------------------

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, nats.js.errors.APIError):
            text = f"{error.description or 'JetStream API error'} (code {error.code}, error {error.err_code})"
        elif isinstance(error, TimeoutError):
            text = f"no answer within {self.timeout:g}s"
        else:
            text = str(error) or type(error).__name__
        return scrub(text, self._given_url)

    def _error(self, error: BaseException, doing: str, *, publishing: bool = False) -> TransportError:
        """The callcast exception for a driver exception; the driver's never leaves the adapter."""
        text = f"nats broker {self.url}: {doing}: {self._describe(error)}"
        if isinstance(error, _UNAVAILABLE) and not isinstance(error, TimeoutError):
            return BrokerUnavailableError(text)
        if publishing:
            return PublishError(text)
        return TransportError(text)

    # -- plumbing -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, and create the stream and the bucket unless they exist."""
        nc = Client()
        auth: dict[str, str] = {}
        if self._user is not None and self._password is not None:
            auth = {"user": self._user, "password": self._password}
        elif self._user is not None:
            auth = {"token": self._user}
        try:
            # Two tries at first (an outage at start-up is reported, not waited out); once connected,
            # the client reconnects forever (set below).
            await within(
                nc.connect(
                    servers=[self._server],
                    name="callcast",
                    allow_reconnect=True,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=self.reconnect_wait,  # type: ignore[arg-type]
                    connect_timeout=self.timeout,  # type: ignore[arg-type]
                    ping_interval=10,
                    max_outstanding_pings=3,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    **auth,  # type: ignore[arg-type]
                ),
                2 * self.timeout + self.reconnect_wait + 1,
            )
        except _DRIVER_ERRORS as error:
            cause = (
                nc.last_error if isinstance(error, nats.errors.NoServersError) and nc.last_error else error
            )
            with contextlib.suppress(*_DRIVER_ERRORS):
                await nc.close()
            raise BrokerUnavailableError(
                f"nats broker {self.url}: cannot connect: {self._describe(cause)}"
            ) from None
        nc.options["max_reconnect_attempts"] = -1  # from now on: reconnect forever
        self._nc = nc
        self._js = nc.jetstream(timeout=self.timeout)
        self._replies = _Replies(nc)
        try:
            await self._replies.start()
            await self._ensure_stream()
            self._kv = await self._ensure_bucket()
        except BaseException:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await nc.close()
            raise
        self._housekeeping = asyncio.create_task(self._renew_leases(), name="callcast-nats-leases")

    async def _ensure_stream(self) -> None:
        js = self._jetstream()
        config = api.StreamConfig(
            name=self.stream,
            description=(
                "callcast envelopes: subject <prefix>.<topic token>, one pull consumer "
                "<topic token>==<group token> per group (see callcast.brokers.nats)"
            ),
            subjects=[f"{self.prefix}.>"],
            retention=api.RetentionPolicy.INTEREST,
            storage=api.StorageType.FILE,
            discard=api.DiscardPolicy.OLD,
            num_replicas=self.replicas,
        )
        try:
            try:
                info = await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                try:
                    info = await js.add_stream(config)
                except nats.js.errors.BadRequestError as error:
                    # Created meanwhile by another process, or the subjects are another stream's.
                    try:
                        info = await js.stream_info(self.stream)
                    except nats.js.errors.NotFoundError:
                        raise ConfigurationError(
                            f"nats broker {self.url}: cannot create stream {self.stream!r} on "
                            f"{self.prefix}.>: {self._describe(error)}"
                        ) from None
        except nats.js.errors.ServiceUnavailableError:
            raise BrokerUnavailableError(
                f"nats broker {self.url}: JetStream is not enabled on the server (start it with -js)"
            ) from None
        except _DRIVER_ERRORS as error:
            raise self._error(error, f"looking up stream {self.stream!r}") from None
        subjects = info.config.subjects or []
        if not any(_covers(pattern, self.prefix) for pattern in subjects):
            raise ConfigurationError(
                f"nats broker {self.url}: stream {self.stream!r} exists but does not take "
                f"{self.prefix}.> (its subjects: {', '.join(subjects) or 'none'})"
            )
        if info.config.retention == api.RetentionPolicy.WORK_QUEUE:
            raise ConfigurationError(
                f"nats broker {self.url}: stream {self.stream!r} has work-queue retention, which "
                "cannot give every group its copy; use interest (or limits) retention"
            )

    async def _ensure_bucket(self) -> KeyValue:
        js = self._jetstream()
        config = api.KeyValueConfig(
            bucket=self.bucket,
            description="callcast: deliveries fetched ahead and handed back unseen (no attempt)",
            history=1,
            ttl=UNCOUNTED_TTL,
            storage=api.StorageType.FILE,
            replicas=self.replicas,
        )
        try:
            try:
                return await js.create_key_value(config)
            except nats.js.errors.BadRequestError:
                return await js.key_value(self.bucket)  # it exists with other settings: use it
        except _DRIVER_ERRORS as error:
            raise self._error(error, f"opening bucket {self.bucket!r}") from None

    def _jetstream(self) -> JetStreamContext:
        if self._closed or self._js is None:
            raise BrokerUnavailableError(f"nats broker {self.url} is closed")
        return self._js

    def _client(self) -> Client:
        if self._closed or self._nc is None:
            raise BrokerUnavailableError(f"nats broker {self.url} is closed")
        return self._nc

    def _open_client(self) -> Client:
        """The client, for something that would need closing: refused once ``close`` began."""
        if self._closing:
            raise BrokerUnavailableError(f"nats broker {self.url} is closed")
        return self._client()

    def _inbox(self) -> _Replies:
        if self._closed or self._replies is None:
            raise BrokerUnavailableError(f"nats broker {self.url} is closed")
        return self._replies

    def _spawn(self, coroutine: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run ``coroutine`` in a task that ``close`` cancels and awaits if it is still running."""
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _on_error(self, error: Exception) -> None:
        log.debug("nats broker %s: %s", self.url, self._describe(error))

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("nats broker %s: disconnected; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        log.warning("nats broker %s: reconnected", self.url)
        # Leases first: a restarted server must learn that what this process holds is in work
        # before the next pull request could get it redelivered.
        for subscription in list(self._subscriptions):
            await subscription.renew_leases()
        for subscription in list(self._subscriptions):
            subscription.reconnected()
        self._spawn(self._after_reconnect(), "callcast-nats-reconnected")

    async def _after_reconnect(self) -> None:
        with contextlib.suppress(TransportError, ConfigurationError):
            await self._ensure_stream()  # a server that lost its store gets the stream back

    async def _renew_leases(self) -> None:
        """Every ``ack_wait / 3``: tell the server the deliveries this process holds are in work."""
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            if self._nc is not None and self._nc.is_connected:
                for subscription in list(self._subscriptions):
                    await subscription.renew_leases()

    # -- the seam -------------------------------------------------------------------------------

    def subject(self, topic: str) -> str:
        """The subject a topic's envelopes are published on."""
        return f"{self.prefix}.{encode_name(topic)}"

    @staticmethod
    def consumer_name(topic: str, group: str) -> str:
        """The name of the JetStream consumer of ``group`` on ``topic``."""
        return f"{encode_name(topic)}=={encode_name(group)}"

    def _message(
        self, nc: Client, envelope: Envelope, group: str | None
    ) -> tuple[bytes, dict[str, str] | None]:
        """The body and headers of ``envelope``: a structured-mode body, and ``callcast-group``
        (the one header) for ``publish(group=...)``; :class:`PublishError` over max_payload."""
        if group is None:
            return self._structured(nc, envelope), None
        headers = {GROUP_HEADER: _header_value(group)}
        body = self._structured(nc, envelope, len(GROUP_HEADER) + len(headers[GROUP_HEADER]) + _HPUB_OVERHEAD)
        return body, headers

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        nc = self._client()
        replies = self._inbox()
        if not envelopes:
            return
        subject = self.subject(topic)
        if group is not None:
            encode_name(group)  # the same names are refused as by declare
        messages = [self._message(nc, envelope, group) for envelope in envelopes]
        if not nc.is_connected:
            raise BrokerUnavailableError(
                f"nats broker {self.url}: not connected (reconnecting); nothing was published"
            )
        waiting: list[tuple[str, asyncio.Future[Msg]]] = []
        try:
            # Written back to back, then the acks are awaited together: one round trip per batch.
            with alarms.timeout(self.timeout):
                for body, headers in messages:
                    reply, future = replies.expect()
                    waiting.append((reply, future))
                    await nc.publish(subject, body, reply=reply, headers=headers)
                for _, future in waiting:
                    error = _ack_error(await future, self.stream)
                    if error is not None:
                        raise error
        except TimeoutError:
            raise PublishError(
                f"nats broker {self.url}: publishing to {subject}: not confirmed within {self.timeout:g}s; "
                "some envelopes may be stored"
            ) from None
        except nats.js.errors.NoStreamResponseError:
            raise PublishError(
                f"nats broker {self.url}: publishing to {subject}: no stream answered "
                f"(is stream {self.stream!r} gone?)"
            ) from None
        except _DRIVER_ERRORS as error:
            raise self._error(error, f"publishing to {subject}", publishing=True) from None
        finally:
            replies.forget(waiting)

    async def declare(self, topic: str, group: str) -> None:
        self._jetstream()
        await self._declare(topic, group, ephemeral=False)

    async def _declare(self, topic: str, group: str, *, ephemeral: bool) -> str:
        js = self._jetstream()
        name = self.consumer_name(topic, group)
        kind = "ephemeral group" if ephemeral else "group"
        config = api.ConsumerConfig(
            name=name,
            durable_name=name,
            description=f"callcast {kind} {group!r} on topic {topic!r}"[:1000],
            deliver_policy=api.DeliverPolicy.NEW,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            max_ack_pending=self.max_ack_pending,
            filter_subject=self.subject(topic),
            inactive_threshold=self.ephemeral_ttl if ephemeral else None,
        )
        try:
            await js.add_consumer(self.stream, config)
        except _DRIVER_ERRORS as error:
            raise self._error(error, f"declaring group {group!r} on topic {topic!r}") from None
        return name

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        prefetch: int = 32,
        ephemeral: bool = False,
        holding: Holding | None = None,
    ) -> _NatsSubscription:
        nc = self._open_client()
        consumer = await self._declare(topic, group, ephemeral=ephemeral)
        subscription = _NatsSubscription(
            self, nc, topic, group, consumer, max(1, prefetch), ephemeral, holding
        )
        try:
            await subscription.start()
        except _DRIVER_ERRORS as error:
            raise self._error(error, f"subscribing to group {group!r} on topic {topic!r}") from None
        self._subscriptions.add(subscription)
        if self._closing:  # close() began meanwhile and did not see this subscription
            await subscription.close()
            raise BrokerUnavailableError(f"nats broker {self.url} is closed")
        return subscription

    # -- native request/reply: core NATS, nothing stored ------------------------------------------

    def request_subject(self, topic: str) -> str:
        """The core-NATS subject of ``topic``'s requests: outside the stream, so never stored."""
        return f"{self.prefix}-rpc.{encode_name(topic)}"

    async def request(self, topic: str, envelope: Envelope, *, timeout: float) -> Envelope:
        nc = self._client()
        replies = self._inbox()
        body = self._structured(nc, envelope)
        reply, future = replies.expect()
        try:
            with alarms.timeout(timeout):
                await nc.publish(self.request_subject(topic), body, reply=reply)
                msg = await future
        except TimeoutError:
            raise TimeoutError(f"nats broker {self.url}: no reply on {topic!r} within {timeout:g}s") from None
        except _DRIVER_ERRORS as error:
            raise self._error(error, f"requesting on {topic!r}") from None
        finally:
            replies.forget([(reply, future)])
        if _no_responders(msg):
            raise BrokerUnavailableError(f"nats broker {self.url}: no server listens on {topic!r}")
        return structured_or_quarantine(msg.data)

    def _structured(self, nc: Client, envelope: Envelope, extra: int = 0) -> bytes:
        """``envelope`` as one structured-mode body; :class:`PublishError` if it and ``extra``
        bytes of headers exceed max_payload."""
        body = to_structured(envelope)
        if len(body) + extra > nc.max_payload:
            raise PublishError(
                f"nats broker {self.url}: envelope {envelope.id} is {len(body) + extra} bytes as a "
                f"structured event, over the server's max_payload of {nc.max_payload}; nothing was sent"
            )
        return body

    async def serve(self, topic: str, group: str, *, prefetch: int = 32) -> _NatsServer:
        nc = self._open_client()
        server = _NatsServer(self, nc, max(1, prefetch))
        try:
            server.sub = await nc.subscribe(
                self.request_subject(topic), queue=encode_name(group), cb=server.receive
            )
        except _DRIVER_ERRORS as error:
            raise self._error(error, f"serving requests of {topic!r}") from None
        self._servers.add(server)
        if self._closing:  # close() began meanwhile and did not see this server
            await server.close()
            raise BrokerUnavailableError(f"nats broker {self.url} is closed")
        return server

    async def close(self) -> None:
        self._closing = True
        await self._close_once.run(self._shutdown)

    async def _shutdown(self) -> None:
        for server in list(self._servers):
            await server.close()
        for subscription in list(self._subscriptions):
            await subscription.close()
        for subscription in list(self._lingering):
            await subscription._unsubscribe()  # what is still on the way is handed back first
        self._closed = True
        tasks = [task for task in (self._housekeeping, *self._background) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, TransportError):
                await task
        nc = self._nc
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(*_DRIVER_ERRORS):
                if nc.is_connected:
                    await within(nc.flush(), _CLOSE_WAIT)  # the last acks and naks
        await self._stop_flusher()
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await nc.close()

    def _when_read(self, holding: Holding, envelope: Envelope) -> None:
        """Tell ``holding`` that the settle of ``envelope`` just written was returned, once the server
        has read it: after a ``flush`` (``PING``, then the ``PONG``) that starts after this call.
        One flush is under way at a time, for all settles written before it: one round trip per
        batch, and none of them waits for it. A lost connection ends the wait (what it did not
        carry is lost with it, and comes back counted), and so does ``close``."""
        if self._closed:
            holding.returned(envelope)
            return
        self._unflushed.append((holding, envelope))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        while self._unflushed:
            written, self._unflushed = self._unflushed, []
            nc = self._nc
            try:
                if nc is not None and not self._closed:
                    with contextlib.suppress(*_DRIVER_ERRORS):
                        await nc.flush(self.timeout)  # type: ignore[arg-type]
            finally:
                for holding, envelope in written:
                    holding.returned(envelope)

    async def _stop_flusher(self) -> None:
        """At close, once the connection was flushed: end the flush under way (nats-py never
        answers one whose ``PONG`` is lost) and tell ``holding`` of every settle still waiting."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None and not flusher.done():
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        unflushed, self._unflushed = self._unflushed, []
        for holding, envelope in unflushed:
            holding.returned(envelope)

    # -- deliveries the server counted but callcast does not ------------------------------------

    async def _uncounted(self, consumer: str, seq: int) -> int:
        """How many deliveries of envelope ``seq`` to ``consumer`` were fetched ahead, never handed
        out and handed back (recorded in the bucket)."""
        kv = self._kv
        if kv is None:
            return 0
        try:
            entry = await within(kv.get(f"{consumer}.{seq}"), self.timeout)
            return int(entry.value or b"0")
        except nats.js.errors.KeyNotFoundError:
            return 0
        except _READ_ERRORS as error:
            log.warning(
                "nats broker %s: cannot read uncounted deliveries of %s.%d, attempt may count them: %s",
                self.url,
                consumer,
                seq,
                self._describe(error),
            )
            return 0

    async def _record_uncounted(self, consumer: str, deliveries: Iterable[tuple[int, int]]) -> None:
        """Record one more uncounted delivery of each ``(stream sequence, uncounted so far)``."""
        kv = self._kv
        if kv is None:
            return
        puts = [kv.put(f"{consumer}.{seq}", str(uncounted + 1).encode()) for seq, uncounted in deliveries]
        try:
            await within(asyncio.gather(*puts), self.timeout)
        except _DRIVER_ERRORS as error:
            log.warning(
                "nats broker %s: cannot record envelopes handed back unseen; their next attempt "
                "will count one more: %s",
                self.url,
                self._describe(error),
            )

    def _forget_uncounted(self, delivery: _NatsDelivery) -> None:
        kv = self._kv
        if kv is None or self._closed:
            return  # after close: the record expires with the bucket's TTL

        async def forget() -> None:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await within(kv.purge(f"{delivery.consumer}.{delivery.seq}"), self.timeout)

        self._spawn(forget(), "callcast-nats-forget")


class _Replies:
    """Replies to this connection's requests (publish acks, RPC requests): one wildcard inbox
    subscription, and a future per request resolved by the message whose subject names it.

    What nats-py's ``request`` and ``publish_async`` do, without what they pay per message: a
    system call for random bytes, ``wait_for`` (with a task, for ``publish_async``'s stall
    semaphore), and the ``Nats-Expected-Stream`` header (the stream an ack names is checked instead,
    by :func:`_ack_error`).
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = f"{nc.new_inbox()}."
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._count = 0

    async def start(self) -> None:
        await self._nc.subscribe(f"{self._prefix}*", cb=self._on_reply)

    def expect(self) -> tuple[str, asyncio.Future[Msg]]:
        """A reply subject for one request, and the future its reply resolves."""
        self._count += 1
        token = str(self._count)
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        return self._prefix + token, future

    def forget(self, expected: Iterable[tuple[str, asyncio.Future[Msg]]]) -> None:
        """Stop waiting for these replies (come or not); a late one is then ignored."""
        start = len(self._prefix)
        for reply, future in expected:
            self._waiting.pop(reply[start:], None)
            future.cancel()

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)


def _no_responders(msg: Msg) -> bool:
    """Whether ``msg`` is the server's answer that no one listens on the request's subject."""
    headers = msg.headers
    return headers is not None and headers.get("Status") == "503"


def _ack_error(msg: Msg, stream: str) -> Exception | None:
    """What went wrong with a JetStream publish, from its ack ``msg`` (``None``: stored in ``stream``)."""
    if _no_responders(msg):  # no stream takes the subject
        return nats.js.errors.NoStreamResponseError()
    try:
        answer = orjson.loads(msg.data)
        error, stored_in = answer.get("error"), answer.get("stream")
    except (ValueError, AttributeError):
        error, stored_in = f"unreadable publish ack {msg.data[:200]!r}", None
    if error is not None:
        return _api_error(error)
    if stored_in != stream:
        return nats.js.errors.APIError(description=f"stored in stream {stored_in!r}, not {stream!r}")
    return None


def _api_error(error: object) -> nats.js.errors.APIError:
    """The nats-py exception for the ``error`` of a JetStream API answer: what
    ``APIError.from_error`` raises for it, or a plain ``APIError`` for an answer it cannot read."""
    try:
        nats.js.errors.APIError.from_error(error)  # type: ignore[arg-type]  # raises, always
    except nats.js.errors.APIError as raised:
        return raised
    except (KeyError, TypeError):
        pass
    description = error.get("description", error) if isinstance(error, dict) else error
    return nats.js.errors.APIError(description=str(description))


def _covers(pattern: str, prefix: str) -> bool:
    """Whether a stream subject ``pattern`` takes every subject ``<prefix>.<token>``."""
    wanted = [*prefix.split("."), "*"]
    for position, token in enumerate(pattern.split(".")):
        if token == ">":
            return True
        if position >= len(wanted) or (token != "*" and token != wanted[position]):
            return False
    return pattern.split(".")[-1] == "*" and len(pattern.split(".")) == len(wanted)


def _delivery_numbers(reply: str) -> tuple[int, int]:
    """(deliveries so far, stream sequence) of a JetStream message, from its ack subject
    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``, or
    the longer form with a domain and account hash after ``ACK``; ``ValueError`` for anything else."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[4]) or 1, int(tokens[5])
    if len(tokens) >= 11:
        return int(tokens[6]) or 1, int(tokens[7])
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


class _NatsSubscription:
    """One subscriber of a group: pulls from the group's consumer into a buffer, hands out."""

    def __init__(
        self,
        broker: NatsBroker,
        nc: Client,
        topic: str,
        group: str,
        consumer: str,
        prefetch: int,
        ephemeral: bool,
        holding: Holding | None,
    ) -> None:
        self.broker = broker
        self.holding = holding
        self.nc = nc
        self.topic = topic
        self.group = group
        self.consumer = consumer
        self.prefetch = prefetch
        self.ephemeral = ephemeral
        self.buffer: deque[_NatsDelivery] = deque()
        self.outstanding: dict[_NatsDelivery, None] = {}  # handed out, not settled; in order
        self.waiters = 0
        self.closed = False
        self.pull_subject = f"$JS.API.CONSUMER.MSG.NEXT.{broker.stream}.{consumer}"
        self.inbox = nc.new_inbox()
        self.pull_expires = min(_PULL_EXPIRES, broker.ephemeral_ttl / 3) if ephemeral else _PULL_EXPIRES
        self._inbox_sub: NatsSubscription | None = None
        self._in_flight = 0  # envelopes asked for by the live pull request and not yet received
        self._expires_at = 0.0  # when the server expires the live pull request
        self._deadline = 0.0  # when the live pull request counts as lost
        self._handback_at = 0.0  # after close: when deliveries handed back become available
        self._answered = False  # the live pull request got any answer
        self._suspect = False  # the consumer may be gone: declare it again before pulling
        self._paused_until = 0.0
        self._changed = asyncio.Event()  # for consumers waiting in __anext__
        self._kick = asyncio.Event()  # for the puller
        self._puller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._inbox_sub = await self.nc.subscribe(self.inbox, cb=self._on_message)
        self._puller = asyncio.create_task(self._pull_loop(), name=f"callcast-nats-pull:{self.consumer}")

    # -- handing out ----------------------------------------------------------------------------

    def __aiter__(self) -> _NatsSubscription:
        return self

    async def __anext__(self) -> Delivery:
        self.waiters += 1
        try:
            while not self.closed:
                if self.buffer and len(self.outstanding) < self.prefetch:
                    delivery = self.buffer[0]
                    if delivery.lookup is not None and not delivery.lookup.done():
                        # Cancelling this wait loses nothing: the delivery stays first in the buffer.
                        await asyncio.wait({delivery.lookup})
                        continue
                    self.buffer.popleft()
                    delivery.counted()
                    self.outstanding[delivery] = None
                    return delivery
                changed = self._changed
                self._kick.set()
                await changed.wait()
        finally:
            self.waiters -= 1
        raise StopAsyncIteration

    def _wake(self) -> None:
        # Set the event the waiters hold and give later ones a fresh one, so no wake-up is lost
        # (with no waiter, nobody holds it: nothing to do).
        if self.waiters:
            self._changed.set()
            self._changed = asyncio.Event()

    # -- pulling --------------------------------------------------------------------------------

    async def _pull_loop(self) -> None:
        while not self.closed:
            self._kick.clear()
            try:
                timeout = await self._pull()
            except _PULL_ERRORS as error:
                log.warning(
                    "nats broker %s: pulling for group %r on topic %r failed, retrying: %s",
                    self.broker.url,
                    self.group,
                    self.topic,
                    self.broker._describe(error),
                )
                self._in_flight = 0
                timeout = 1.0
            if self.closed:
                return
            await wait_event(self._kick, timeout)

    async def _pull(self) -> float | None:
        """Ask the server for envelopes if a consumer waits and there is room; return how long
        until the live request must be looked at again (``None``: when something changes)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if not self.nc.is_connected:
            return None  # reconnected() kicks
        if self._in_flight and now >= self._deadline:
            self._in_flight = 0  # lost (a restarted server forgets pull requests)
            if not self._answered:
                self._suspect = True
        if self._in_flight:
            return self._deadline - now
        if now < self._paused_until:
            return self._paused_until - now
        room = self.prefetch - len(self.outstanding) - len(self.buffer)
        if self.ephemeral:
            # Always keep a request open: it is what keeps an ephemeral consumer alive.
            batch = max(1, room) if len(self.buffer) < self.prefetch else 0
        else:
            batch = room if self.waiters and not self.buffer else 0
        if batch <= 0:
            return None
        if self._suspect:
            await self.broker._declare(self.topic, self.group, ephemeral=self.ephemeral)
            self._suspect = False
        request = {"batch": batch, "expires": int(self.pull_expires * 1e9)}
        self._in_flight = batch
        self._answered = False
        self._expires_at = now + self.pull_expires
        self._deadline = self._expires_at + _PULL_GRACE
        await self.nc.publish(self.pull_subject, json.dumps(request).encode(), reply=self.inbox)
        return self._deadline - now

    async def _on_message(self, msg: Msg) -> None:
        reply = msg.reply
        if not reply or not reply.startswith("$JS.ACK."):
            self._on_status(msg)
            return
        self._answered = True
        self._in_flight = max(0, self._in_flight - 1)
        if self._in_flight == 0:
            self._kick.set()
        try:
            delivered, seq = _delivery_numbers(reply)
        except ValueError:
            log.warning("nats broker %s: dropped a message with a malformed ack subject", self.broker.url)
            return
        headers: dict[str, str] = {}
        if msg.headers:  # publish(group=...), or a binary-mode envelope (another tool, an older callcast)
            headers = {name: unquote(value) for name, value in msg.headers.items()}
            addressee = headers.get(GROUP_HEADER)
            if addressee is not None and addressee != self.group:
                # publish(group=...) for another group: settled here, never handed out.
                with contextlib.suppress(*_DRIVER_ERRORS):
                    await self.nc.publish(reply, _ACK)
                return
        lookup = None
        if delivered > 1 and not self.ephemeral:
            # Looked up in the background and awaited when handed out: this callback does not wait,
            # so what the server sent is announced to ``holding`` without delay.
            lookup = self.broker._spawn(self.broker._uncounted(self.consumer, seq), "callcast-nats-lookup")
        if self.closed:
            await self._hand_back_late(reply, seq, 0 if lookup is None else await lookup)
            return
        binary = any(name[:3].lower() == HEADER_PREFIX for name in headers)
        envelope = decode_or_quarantine(headers, msg.data) if binary else structured_or_quarantine(msg.data)
        self.buffer.append(_NatsDelivery(self, reply, seq, envelope, delivered, lookup))
        if self.holding is not None:
            self.holding.fetched(envelope)
        self._wake()

    async def _hand_back_late(self, reply: str, seq: int, uncounted: int) -> None:
        """A delivery to the pull request of this closed subscription: never handed out, so it is
        recorded as uncounted and given back for when the request has expired."""
        if not self.ephemeral:
            await self.broker._record_uncounted(self.consumer, [(seq, uncounted)])
        with contextlib.suppress(*_DRIVER_ERRORS):
            await self.nc.publish(reply, self._handback())

    def _handback(self) -> bytes:
        """The nak that gives a delivery of this closed subscription back to the group."""
        delay = self._handback_at - asyncio.get_running_loop().time()
        return _NAK if delay <= 0 else _NAK + b" " + json.dumps({"delay": int(delay * 1e9)}).encode()

    def _on_status(self, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        self._answered = True
        if status == "100":  # idle heartbeat
            return
        self._in_flight = 0  # 404/408: expired or nothing; 409: refused or consumer deleted
        description = str(headers.get("Description", "")).lower()
        if status == "409":
            if "deleted" in description:
                self._suspect = True
            else:
                self._paused_until = asyncio.get_running_loop().time() + 0.25
        elif status == "503":
            self._suspect = True
        self._kick.set()

    def reconnected(self) -> None:
        self._in_flight = 0  # the request may not have survived: ask again
        self._kick.set()

    # -- settling -------------------------------------------------------------------------------

    async def settle(self, delivery: _NatsDelivery, payload: bytes) -> None:
        if self.closed or delivery not in self.outstanding:
            return
        del self.outstanding[delivery]
        self._wake()
        self._kick.set()
        try:
            await self.nc.publish(delivery.reply, payload)
        except _DRIVER_ERRORS as error:
            raise self.broker._error(error, f"settling a delivery of group {self.group!r}") from None
        if self.holding is not None:
            self.broker._when_read(self.holding, delivery.envelope)
        if payload == _ACK and delivery.uncounted:
            self.broker._forget_uncounted(delivery)

    async def renew_leases(self) -> None:
        """Tell the server that each delivery held is in work. Each is checked just before its
        send, and a publish is queued in call order without yielding first, so no renewal follows
        the delivery's settle (or the close's hand-back) on the wire: it would restart a delayed
        nak's wait at ``ack_wait``."""
        with contextlib.suppress(*_DRIVER_ERRORS):
            for delivery in [*self.outstanding, *self.buffer]:
                if self.closed:
                    return
                if delivery in self.outstanding or delivery in self.buffer:
                    await self.nc.publish(delivery.reply, _IN_PROGRESS)

    async def close(self) -> None:
        """Stop handing out and give back what this subscription holds.

        NATS 2.9 mishandles a *redelivery* that meets a pull request whose inbox has no interest
        (it is lost until ``ack_wait`` and another envelope is delivered again with a delivery
        count of 1; fixed in later servers). So a pull request of this subscription that is still
        open on the server keeps its inbox until it expires (what arrives meanwhile is handed back
        at once), and the deliveries are handed back with a nak delayed until just after that.
        """
        if self.closed:
            return
        self.closed = True
        self._wake()
        self._kick.set()
        self.broker._subscriptions.discard(self)
        if self._puller is not None:
            self._puller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._puller
        now = asyncio.get_running_loop().time()
        request_open = self._in_flight > 0  # the server may still deliver to it
        self._handback_at = max(now, self._expires_at) + _HANDBACK_MARGIN if request_open else 0.0
        held = list(self.outstanding)
        never_handed_out = list(self.buffer)
        self.outstanding.clear()
        self.buffer.clear()
        if self.ephemeral:
            self._returned(never_handed_out)
            with contextlib.suppress(*_DRIVER_ERRORS, TransportError):
                await within(
                    self.broker._jetstream().delete_consumer(self.broker.stream, self.consumer), _CLOSE_WAIT
                )
            await self._unsubscribe()
            return
        lookups = [d.lookup for d in never_handed_out if d.lookup is not None]
        if lookups:
            await asyncio.wait(lookups)
        for delivery in never_handed_out:
            delivery.counted()
        if never_handed_out and self.nc.is_connected:
            await self.broker._record_uncounted(
                self.consumer, [(d.seq, d.uncounted) for d in never_handed_out]
            )
        self._returned(never_handed_out)
        with contextlib.suppress(*_DRIVER_ERRORS):
            for delivery in sorted([*held, *never_handed_out], key=lambda d: d.seq):
                await self.nc.publish(delivery.reply, self._handback())
            if self.nc.is_connected:
                await within(self.nc.flush(), _CLOSE_WAIT)
        if request_open:
            self.broker._lingering.add(self)
            self.broker._spawn(self._unsubscribe(at=self._handback_at), "callcast-nats-unsubscribe")
        else:
            await self._unsubscribe()

    def _returned(self, deliveries: list[_NatsDelivery]) -> None:
        if self.holding is not None:
            for delivery in deliveries:
                self.holding.returned(delivery.envelope)

    async def _unsubscribe(self, at: float | None = None) -> None:
        if at is not None:
            await asyncio.sleep(max(0.0, at - asyncio.get_running_loop().time()))
        inbox_sub, self._inbox_sub = self._inbox_sub, None
        self.broker._lingering.discard(self)
        if inbox_sub is None:
            return
        with contextlib.suppress(*_DRIVER_ERRORS):
            if self.nc.is_connected:
                # Unsubscribe, and still hand back what arrived before the server saw that.
                await within(inbox_sub.drain(), _CLOSE_WAIT)  # type: ignore[no-untyped-call]
            else:
                await inbox_sub.unsubscribe()


class _NatsDelivery:
    """``attempt`` is the server's count less the uncounted deliveries, which a redelivery looks up
    (``lookup``) before it is handed out (:meth:`counted`)."""

    __slots__ = ("attempt", "delivered", "envelope", "lookup", "reply", "seq", "subscription", "uncounted")

    def __init__(
        self,
        subscription: _NatsSubscription,
        reply: str,
        seq: int,
        envelope: Envelope,
        delivered: int,
        lookup: asyncio.Future[int] | None,
    ) -> None:
        self.subscription = subscription
        self.reply = reply
        self.seq = seq
        self.envelope = envelope
        self.delivered = delivered
        self.lookup = lookup
        self.uncounted = 0
        self.attempt = delivered

    def counted(self) -> None:
        """Take the looked-up uncounted deliveries off ``attempt`` (none if the lookup failed)."""
        lookup, self.lookup = self.lookup, None
        if lookup is not None and lookup.done() and not lookup.cancelled() and lookup.exception() is None:
            self.uncounted = lookup.result()
            self.attempt = max(1, self.delivered - self.uncounted)

    @property
    def consumer(self) -> str:
        return self.subscription.consumer

    async def ack(self) -> None:
        await self.subscription.settle(self, _ACK)

    async def nack(self, *, delay: float = 0.0) -> None:
        if not math.isfinite(delay):
            delay = _MAX_DELAY if delay > 0 else 0.0
        delay = min(max(0.0, delay), _MAX_DELAY)
        payload = _NAK if delay == 0 else _NAK + b" " + json.dumps({"delay": int(delay * 1e9)}).encode()
        await self.subscription.settle(self, payload)


class _NatsServer:
    """The requests of one server of a group: a core-NATS queue subscription. At most ``prefetch``
    requests are handed out and unsettled; up to :data:`_SERVER_BACKLOG` more wait
    here to be handed out. A request that arrives while that backlog is full is dropped at once: its
    caller times out, as with any lost request (under overload, the requests least likely to be
    answered in time are not kept)."""

    def __init__(self, broker: NatsBroker, nc: Client, prefetch: int) -> None:
        self.broker = broker
        self.nc = nc
        self.sub: NatsSubscription | None = None
        self.free = asyncio.Semaphore(prefetch)
        self.arrived: asyncio.Queue[Msg | None] = asyncio.Queue(_SERVER_BACKLOG)
        self.closed = False

    async def receive(self, msg: Msg) -> None:
        if self.closed:
            return
        with contextlib.suppress(asyncio.QueueFull):  # the backlog is full: dropped
            self.arrived.put_nowait(msg)

    def __aiter__(self) -> _NatsServer:
        return self

    async def __anext__(self) -> _NatsRequest:
        """The next request, once fewer than ``prefetch`` are unsettled. Cancelling the wait takes
        nothing (the permit is given back, the request stays queued); ``close`` ends every wait."""
        if self.closed:
            raise StopAsyncIteration
        await self.free.acquire()
        try:
            msg = None if self.closed else await self.arrived.get()
        except BaseException:
            self.free.release()
            raise
        if msg is None:
            self.free.release()  # for a waiter in acquire(), which then sees closed
            if self.arrived.empty():
                self.arrived.put_nowait(None)  # for a waiter in get()
            raise StopAsyncIteration
        return _NatsRequest(self, msg.reply, structured_or_quarantine(msg.data))

    async def close(self) -> None:
        """Stop serving, ending every wait in ``__anext__``; requests not yet answered are dropped
        (their callers time out)."""
        if self.closed:
            return
        self.closed = True
        self.broker._servers.discard(self)
        while not self.arrived.empty():  # dropped; makes room for the end mark
            self.arrived.get_nowait()
        self.arrived.put_nowait(None)  # ends a wait in get(), which passes it on
        self.free.release()  # ends a wait in acquire(), which passes it on
        if self.sub is not None:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await self.sub.unsubscribe()


class _NatsRequest:
    __slots__ = ("_reply_to", "_server", "_settled", "attempt", "envelope")

    def __init__(self, server: _NatsServer, reply_to: str, envelope: Envelope) -> None:
        self._server = server
        self._reply_to = reply_to
        self._settled = False
        self.attempt = 1
        self.envelope = envelope

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._server.free.release()
        return True

    async def reply(self, envelope: Envelope) -> None:
        if not self._settle() or not self._reply_to or self._server.closed:
            return
        broker, nc = self._server.broker, self._server.nc
        body = broker._structured(nc, envelope)
        try:
            await nc.publish(self._reply_to, body)
        except _DRIVER_ERRORS as error:
            raise broker._error(error, "replying", publishing=True) from None

    async def ack(self) -> None:
        self._settle()

    async def nack(self, *, delay: float = 0.0) -> None:
        self._settle()

"""The transport seam: the only thing a broker adapter implements.

Adapters move envelopes between topics and consumer groups and honour ack/nack; nothing else.
Retries, dead letters, dedupe, ordering gates, request/reply and the rest are built once, above this
seam, in terms of the four operations below, so they work the same on every broker.

Vocabulary
----------
topic
    A named stream of envelopes. For events it is the event type (``UserSignedUp``).
group
    A durable consumer group on a topic. Every group gets its own copy of each envelope published
    after the group was declared (fan-out); the subscribers of one group share its envelopes
    (competing consumers): each envelope goes to one of them at a time.

Contract
--------
* ``publish(topic, envelopes)`` returns only once the broker has accepted every envelope *durably*
  (where ``capabilities.durable``): a crash of any process after it returns loses nothing. If it
  raises, any subset of the batch may have been stored: callers that retry must expect duplicates
  (the inbox absorbs them). Envelopes of one call to one topic keep their order.
* ``publish(topic, envelopes, group=G)`` stores the envelopes for group ``G`` of the topic only (if
  declared): how the framework sends a message back to one subscriber (dead-letter replay) without
  the topic's other groups seeing it again.
* A group receives the envelopes published after ``declare(topic, group)`` (or the first
  ``subscribe``) returned; declaring twice is harmless. ``capabilities.replays_history`` says whether a
  new group also sees older ones.
* Delivery is at least once. A delivery stays with its subscriber until it calls ``ack()`` (done:
  never delivered to this group again) or ``nack(delay=...)`` (make it available again after
  ``delay`` seconds, to any subscriber of the group). A subscriber that disappears without doing
  either (closed, crashed, killed) loses its deliveries to the other subscribers of the group,
  after the adapter's lease or heartbeat timeout.
* ``Delivery.attempt`` counts deliveries of this envelope to this group, starting at 1, as counted
  by the broker (a redelivery after a crash counts). It is never taken from a header alone.
* A subscription hands out at most ``prefetch`` (at least 1) deliveries that are neither acked nor
  nacked; iteration waits until one is settled. This is the consumer's memory bound. Envelopes an
  adapter fetched ahead but never handed out do not count as delivery attempts.
* ``subscribe(..., holding=H)`` tells ``H`` which deliveries the subscriber holds, that is, which
  the broker would count once more if the process died now: ``H.fetched(e)`` as soon as a delivery
  of envelope ``e`` is counted for this subscriber and known to the adapter (at the latest when it
  is handed out; for an adapter that fetches ahead, when it lands in the adapter's buffer), and
  ``H.returned(e)`` once the subscriber no longer holds it: its ``ack``/``nack`` reached the broker
  (which may be after the call returned, where the adapter writes settles without waiting), it was
  given back unhandled (on close, uncounted), or the broker took it back with a lost channel.
  Deliveries handed out and given back by ``close()`` are not reported. Both are plain calls on
  the event loop and must not block. The consumer journals them (:mod:`callcast.crashes`), so a
  process killed while holding deliveries leaves evidence of exactly those.
* ``__anext__`` waits through a broker outage (the adapter reconnects) or raises a
  ``TransportError`` that the caller may retry; it ends iteration (``StopAsyncIteration``) only
  when the subscription is closed.
* ``Subscription.close()`` ends iteration (a consumer waiting in ``__anext__`` gets
  ``StopAsyncIteration``) and hands deliveries that were not settled back to the group. Acks and
  nacks after close are ignored. ``Broker.close()`` closes every subscription, then the connection.
* Ephemeral subscriptions (``ephemeral=True``) exist only while subscribed: nothing is kept for them
  while no one listens, and they vanish on close. An ephemeral group has exactly one subscriber
  (closing it ends the group). Request/reply uses them for per-process reply topics.
* Adapters translate driver exceptions into :mod:`callcast.exceptions` (``TransportError`` tree).
* All methods are safe to call from concurrent tasks of the event loop the broker was connected on.

Native request/reply (optional)
-------------------------------
An adapter whose broker has request/reply of its own (``capabilities.request_reply``) also
implements :class:`RequestReply`; RPC then uses it instead of a request topic plus a reply topic.
Requests are *transient*: nothing is stored, a request goes to one server of the group listening
at that moment, and one that is lost (no server, a server that dies) is answered by no one: the
caller's ``request`` raises ``TimeoutError`` at its timeout, or ``BrokerUnavailableError`` at once
where the broker tells that no server listens. Served deliveries have ``attempt`` 1, ``reply()``
answers, ``ack()`` settles without answering and ``nack()`` drops the request (it is not handed to
another server). ``prefetch`` bounds the requests handed out and not yet settled, as for
``subscribe``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from callcast.envelope import Envelope


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an adapter guarantees, as data: read by the framework, the conformance suite and docs."""

    durable: bool
    """An accepted publish survives a crash of every process (and a broker restart)."""
    shared: bool
    """Several processes can share the broker (competing consumers across processes)."""
    delayed_nack: bool
    """``nack(delay=...)`` is honoured by the broker itself; else the framework schedules retries."""
    delivery_count: bool
    """``Delivery.attempt`` is counted by the broker, including redeliveries after a crash."""
    ordered_per_key: bool
    """Within a group, an envelope is not handed out while an earlier one of its partition key is
    not yet acked (handed out, or nacked and waiting for its retry): per-key order holds even across
    competing subscribers, and a retry holds back only the later envelopes of its own key."""
    request_reply: bool
    """The broker has native request/reply; else it is built on ephemeral reply topics."""
    replays_history: bool
    """A new group can read envelopes published before it was declared."""


@runtime_checkable
class Delivery(Protocol):
    """One envelope handed to one subscriber, until it is settled by ``ack`` or ``nack``.

    An ``ack`` or ``nack`` that raises :class:`~callcast.exceptions.TransportError` may not have
    reached the broker: the subscriber stops holding the delivery (it no longer renews its lease),
    and the group gets it back when the lease runs out or the connection closes."""

    @property
    def envelope(self) -> Envelope: ...

    @property
    def attempt(self) -> int:
        """1 for the first delivery to this group, counted by the broker."""
        ...

    async def ack(self) -> None:
        """Settle for good: the group never receives this envelope again. Idempotent."""
        ...

    async def nack(self, *, delay: float = 0.0) -> None:
        """Give the envelope back to the group, available again after ``delay`` seconds."""
        ...


@runtime_checkable
class Holding(Protocol):
    """Told by a subscription which deliveries it holds (see ``subscribe(..., holding=...)``)."""

    def fetched(self, envelope: Envelope) -> None:
        """The broker counted a delivery of ``envelope`` to this subscriber, which now holds it."""
        ...

    def returned(self, envelope: Envelope) -> None:
        """A delivery announced by :meth:`fetched` is no longer held: settled with the broker, or
        given back unhandled."""
        ...


@runtime_checkable
class Subscription(Protocol):
    """The deliveries of one subscriber in a group; iterate with ``async for``."""

    def __aiter__(self) -> AsyncIterator[Delivery]: ...

    async def __anext__(self) -> Delivery:
        """The next delivery; waits while none is due or ``prefetch`` are unsettled."""
        ...

    async def close(self) -> None:
        """Stop iterating; unsettled deliveries return to the group. Idempotent."""
        ...


@runtime_checkable
class ServedRequest(Delivery, Protocol):
    """A request handed to a server by :meth:`RequestReply.serve`."""

    async def reply(self, envelope: Envelope) -> None:
        """Send ``envelope`` back to the caller and settle the request. Idempotent."""
        ...


@runtime_checkable
class RequestReply(Protocol):
    """Native request/reply of a broker (see "Native request/reply" above)."""

    async def request(self, topic: str, envelope: Envelope, *, timeout: float) -> Envelope:
        """Send ``envelope`` to one server of ``topic`` and return its reply envelope."""
        ...

    async def serve(self, topic: str, group: str, *, prefetch: int = 32) -> Subscription:
        """Serve the requests of ``topic`` as one more server of ``group``; its deliveries are
        :class:`ServedRequest`."""
        ...


@runtime_checkable
class Broker(Protocol):
    """A connection to one broker. Build with :func:`callcast.brokers.connect` from a URL."""

    capabilities: Capabilities
    url: str
    """The broker's URL with any password redacted: safe to log."""

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        """Store ``envelopes`` on ``topic`` for every declared group (or only ``group``); return once
        durable."""
        ...

    async def declare(self, topic: str, group: str) -> None:
        """Make sure ``group`` exists on ``topic``, so publishes from now on are kept for it."""
        ...

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        prefetch: int = 32,
        ephemeral: bool = False,
        holding: Holding | None = None,
    ) -> Subscription:
        """Join ``group`` on ``topic`` (declaring it) as one more competing subscriber; ``holding``
        is told what it holds."""
        ...

    async def connect(self) -> None:
        """Open the connection (called once by :func:`callcast.brokers.connect`)."""
        ...

    async def close(self) -> None:
        """Close every subscription of this connection, then the connection. Idempotent."""
        ...

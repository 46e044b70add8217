"""The event side's consume loop: one consumer per event handler, many deliveries at once.

For each delivery: decode → validate → (order gate) → (inbox / sequence) → handler → settle.

* The message is acknowledged only after the handler returned (at least once) — and, for
  idempotent and sequenced handlers, after their transaction committed.
* A handler that raises gets the message back after the delay of its
  :class:`~callcast.retry.RetryPolicy`, until ``max_attempts`` deliveries; then it is dead-lettered.
* Undecodable or invalid payloads, an event type the handler does not take, and
  :class:`~callcast.PermanentError` are dead-lettered at once.
* A message delivered more than ``max_attempts`` times without being settled (its handler's
  process kept dying) is dead-lettered before the handler runs again: crash loops are bounded.
* Up to ``concurrency`` deliveries are handled at once (the subscription's prefetch bounds them).
  Messages of one partition key run one at a time, in the order they arrived: the broker
  guarantees that across processes where ``capabilities.ordered_per_key``; otherwise the
  :class:`~callcast.ordering.KeyGate` does within this process.
* ``stop`` stops taking deliveries, lets running handlers finish within a grace period, and gives
  the rest back to the broker, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable

from pydantic import BaseModel

from callcast import inbox, sequence
from callcast.codec import decode
from callcast.context import Context
from callcast.database import Database
from callcast.deadletter import dead_letter, dead_letter_envelope
from callcast.dispatch import Dispatcher
from callcast.envelope import UNDECODABLE_TYPE, Envelope, now_rfc3339
from callcast.exceptions import DecodeError, PermanentError, TransportError, UnknownEventError
from callcast.ordering import KeyGate
from callcast.service import EventHandler
from callcast.transport import Broker, Delivery

log = logging.getLogger("callcast.consumer")

FIRST_FAILURES_KEPT = 10_000
HOLD_MARGIN = 2.0
"""Seconds a key stays held past its retried message's delay, waiting for it to come back here."""

ContextFactory = Callable[[str, Envelope, int], Context]
"""Builds the context of one delivery: (service, envelope, attempt) -> Context."""


class Consumer:
    """Runs one :class:`~callcast.service.EventHandler` against its group's subscription.

    ``stats`` counts outcomes: ``handled``, ``duplicates`` (inbox), ``stale`` and ``parked``
    (sequenced), ``retried``, ``dead_lettered``.
    """

    def __init__(
        self,
        broker: Broker,
        handler: EventHandler,
        make_context: ContextFactory,
        database: Database | None = None,
    ) -> None:
        self.broker = broker
        self.handler = handler
        self.make_context = make_context
        self.database = database
        self.stats: Counter[str] = Counter()
        self._first_failures: dict[str, str] = {}  # message id -> first failure seen here (bounded)
        self._gate = None if broker.capabilities.ordered_per_key else KeyGate()
        self._dispatcher: Dispatcher | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        handler = self.handler
        subscription = await self.broker.subscribe(handler.topic, handler.group, prefetch=handler.concurrency)
        self._dispatcher = Dispatcher(subscription, self._handle, handler.group)
        if handler.sequencing is not None:
            self._sweeper = asyncio.create_task(self._sweep_parked(), name=f"parked:{handler.group}")

    async def stop(self, grace: float) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._dispatcher is not None:
            await self._dispatcher.stop(grace)

    async def _handle(self, delivery: Delivery) -> None:
        try:
            if self._gate is None:
                await self._process(delivery)
            else:
                async with self._gate.turn(delivery.envelope.partition_key, delivery.envelope.id):
                    await self._process(delivery)
        except TransportError as error:  # could not settle: the lease runs out, it comes back
            log.warning(
                "%s: could not settle message %s: %s", self.handler.group, delivery.envelope.id, error
            )
        except Exception:
            log.exception("%s: unexpected failure handling %s", self.handler.group, delivery.envelope.id)
            with contextlib.suppress(TransportError):
                await delivery.nack(delay=self.handler.retry.delay(delivery.attempt))

    async def _process(self, delivery: Delivery) -> None:
        handler = self.handler
        envelope = delivery.envelope
        if envelope.type == UNDECODABLE_TYPE:
            reason = envelope.extensions.get("decodeerror", "not a CloudEvent")
            await self._dead_letter(delivery, "undecodable", DecodeError(reason))
            return
        if envelope.type != handler.topic:
            unknown = UnknownEventError(f"{handler.group} handles {handler.topic!r}, got {envelope.type!r}")
            await self._dead_letter(delivery, "unknown-type", unknown)
            return
        if delivery.attempt > handler.retry.max_attempts:
            error = PermanentError(f"delivered {delivery.attempt} times without being settled")
            await self._dead_letter(delivery, "crashloop", error)
            return
        try:
            event = decode(handler.model, envelope.data)
            if handler.sequencing is not None:
                handler.sequencing.sequence_of(envelope, event)
        except DecodeError as error:
            await self._dead_letter(delivery, "invalid", error)
            return
        stamped = envelope.with_extensions(attempt=str(delivery.attempt))
        ctx = self.make_context(handler.service, stamped, delivery.attempt)
        try:
            outcome = await self._apply(event, ctx)
        except PermanentError as error:
            await self._dead_letter(delivery, "permanent", error)
        except Exception as error:
            if delivery.attempt >= handler.retry.max_attempts:
                await self._dead_letter(delivery, "error", error)
            else:
                log.info(
                    "%s: attempt %d of %s failed: %r", handler.group, delivery.attempt, envelope.id, error
                )
                self.stats["retried"] += 1
                delay = handler.retry.delay(delivery.attempt)
                if len(self._first_failures) >= FIRST_FAILURES_KEPT:
                    self._first_failures.pop(next(iter(self._first_failures)))
                self._first_failures.setdefault(envelope.id, now_rfc3339())
                await delivery.nack(delay=delay)
                if self._gate is not None:
                    self._gate.hold(envelope.partition_key, envelope.id, delay + HOLD_MARGIN)
        else:
            await delivery.ack()
            self.stats[outcome] += 1
            self._first_failures.pop(envelope.id, None)
            if outcome == "handled" and handler.sequencing is not None:
                await self._apply_parked(envelope.partition_key or "")

    async def _apply(self, event: BaseModel, ctx: Context) -> str:
        """Run the handler as the handler's options say; the outcome's name."""
        handler = self.handler
        envelope = ctx.envelope
        assert envelope is not None
        if not handler.idempotent:
            await handler.fn(event, ctx)
            return "handled"
        async with ctx.transaction() as conn:
            if handler.sequencing is None:
                if not await inbox.claim(conn, handler.group, envelope.id):
                    return "duplicates"
            else:
                key = envelope.partition_key or ""
                number = handler.sequencing.sequence_of(envelope, event)
                verdict = await sequence.admit(conn, handler.group, key, number, handler.sequencing.first)
                if verdict is sequence.Verdict.STALE:
                    return "stale"
                if verdict is sequence.Verdict.EARLY:
                    await sequence.park(conn, handler.group, key, number, envelope)
                    return "parked"
                await sequence.advance(conn, handler.group, key, number)
            await handler.fn(event, ctx)
        return "handled"

    async def _apply_parked(self, key: str) -> None:
        """Apply the parked messages of ``key`` that are now next, each in its own transaction.

        One that fails stays parked (its transaction rolled back); the sweeper tries it again, and
        the gap timeout dead-letters it if it never succeeds.
        """
        handler = self.handler
        assert handler.sequencing is not None
        while True:
            ctx = self.make_context(handler.service, Envelope(type=handler.topic, source="", data=b""), 1)
            try:
                async with ctx.transaction() as conn:
                    await sequence.admit(
                        conn, handler.group, key, 0, handler.sequencing.first
                    )  # lock the key
                    taken = await sequence.take_parked(conn, handler.group, key)
                    if taken is None:
                        return
                    number, envelope = taken
                    event = decode(handler.model, envelope.data)
                    ctx.envelope = envelope
                    ctx.correlation_id = envelope.correlation_id or ctx.correlation_id
                    ctx.causation_id = envelope.id
                    await sequence.advance(conn, handler.group, key, number)
                    await handler.fn(event, ctx)
            except Exception as error:
                log.warning(
                    "%s: parked message of key %r failed, stays parked: %r", handler.group, key, error
                )
                return
            self.stats["handled"] += 1

    async def _sweep_parked(self) -> None:
        """Retry parked messages that became next, and dead-letter those waiting past the gap timeout."""
        handler = self.handler
        assert handler.sequencing is not None
        assert self.database is not None
        interval = max(0.2, min(5.0, handler.sequencing.gap_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                async with self.database.transaction() as conn:
                    keys = await sequence.parked_keys(conn, handler.group)
                for key in keys:
                    await self._apply_parked(key)
                async with self.database.transaction() as conn:
                    expired = await sequence.take_expired(conn, handler.group, handler.sequencing.gap_timeout)
                    for key, number, envelope in expired:
                        error = PermanentError(
                            f"sequence {number} of key {key!r} waited {handler.sequencing.gap_timeout:g}s "
                            "for a missing predecessor"
                        )
                        letter = dead_letter_envelope(
                            envelope,
                            subscriber=handler.group,
                            topic=handler.topic,
                            reason="gap",
                            error=error,
                            attempt=1,
                        )
                        await self.broker.publish(letter.topic, [letter.envelope])
                        self.stats["dead_lettered"] += 1
            except Exception:
                log.exception("%s: sweeping parked messages failed", handler.group)

    async def _dead_letter(self, delivery: Delivery, reason: str, error: BaseException) -> None:
        log.warning("%s: dead-lettering %s (%s): %s", self.handler.group, delivery.envelope.id, reason, error)
        await dead_letter(
            self.broker,
            delivery,
            subscriber=self.handler.group,
            topic=self.handler.topic,
            reason=reason,
            error=error,
            first_failure=self._first_failures.pop(delivery.envelope.id, None),
        )
        self.stats["dead_lettered"] += 1

"""The event side's consume loop: one consumer per event handler, many deliveries at once.

For each delivery: decode → validate → handler → settle.

* The message is acknowledged only after the handler returned (at least once).
* A handler that raises gets the message back after the delay of its
  :class:`~callcast.retry.RetryPolicy`, until ``max_attempts`` deliveries; then it is dead-lettered.
* Undecodable or invalid payloads and :class:`~callcast.PermanentError` are dead-lettered at once.
* A message delivered more than ``max_attempts`` times without being settled (its handler's
  process kept dying) is dead-lettered before the handler runs again: crash loops are bounded.
* Up to ``concurrency`` deliveries are handled at once (the subscription's prefetch bounds them);
  per-key order is the broker's ``ordered_per_key`` guarantee.
* ``stop`` stops taking deliveries, lets running handlers finish within a grace period, and gives
  the rest back to the broker, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from callcast.codec import decode
from callcast.context import Context
from callcast.deadletter import dead_letter
from callcast.dispatch import Dispatcher
from callcast.envelope import UNDECODABLE_TYPE, Envelope
from callcast.exceptions import DecodeError, PermanentError, TransportError
from callcast.service import EventHandler
from callcast.transport import Broker, Delivery

log = logging.getLogger("callcast.consumer")

ContextFactory = Callable[[str, Envelope, int], Context]
"""Builds the context of one delivery: (service, envelope, attempt) -> Context."""


class Consumer:
    """Runs one :class:`~callcast.service.EventHandler` against its group's subscription."""

    def __init__(self, broker: Broker, handler: EventHandler, make_context: ContextFactory) -> None:
        self.broker = broker
        self.handler = handler
        self.make_context = make_context
        self._dispatcher: Dispatcher | None = None

    async def start(self) -> None:
        handler = self.handler
        subscription = await self.broker.subscribe(handler.topic, handler.group, prefetch=handler.concurrency)
        self._dispatcher = Dispatcher(subscription, self._handle, handler.group)

    async def stop(self, grace: float) -> None:
        if self._dispatcher is not None:
            await self._dispatcher.stop(grace)

    async def _handle(self, delivery: Delivery) -> None:
        try:
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
        if delivery.attempt > handler.retry.max_attempts:
            await self._dead_letter(
                delivery,
                "crashloop",
                PermanentError(f"delivered {delivery.attempt} times without being settled"),
            )
            return
        try:
            event = decode(handler.model, envelope.data)
        except DecodeError as error:
            await self._dead_letter(delivery, "invalid", error)
            return
        stamped = envelope.with_extensions(attempt=str(delivery.attempt))
        ctx = self.make_context(handler.service, stamped, delivery.attempt)
        try:
            await handler.fn(event, ctx)
        except PermanentError as error:
            await self._dead_letter(delivery, "permanent", error)
        except Exception as error:
            if delivery.attempt >= handler.retry.max_attempts:
                await self._dead_letter(delivery, "error", error)
            else:
                log.info(
                    "%s: attempt %d of %s failed: %r", handler.group, delivery.attempt, envelope.id, error
                )
                await delivery.nack(delay=self.handler.retry.delay(delivery.attempt))
        else:
            await delivery.ack()

    async def _dead_letter(self, delivery: Delivery, reason: str, error: BaseException) -> None:
        log.warning("%s: dead-lettering %s (%s): %s", self.handler.group, delivery.envelope.id, reason, error)
        await dead_letter(
            self.broker,
            delivery,
            subscriber=self.handler.group,
            topic=self.handler.topic,
            reason=reason,
            error=error,
        )

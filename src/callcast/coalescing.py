"""Publish coalescing: concurrent single publishes to one topic become one batch for the broker.

Every broker takes a batch for about the price of one message (one pipeline, one burst of frames,
one fsync), so a process whose handlers, requests and RPC calls each publish one envelope at a time
gets the broker's batch throughput without asking for it:

* while fewer than ``max_in_flight`` publishes of a topic are in flight, a publish goes out at once,
  alone (no added latency at low load);
* beyond that, the publishes that arrive wait and go out together, as one batch (at most
  ``max_batch`` envelopes), as soon as an in-flight one returns.

Contract (the seam's, unchanged for the caller): ``publish`` returns once the broker durably accepted
the envelope; if it raises, the envelope may or may not have been stored (as for any batch). A batch
the broker refuses (other than for being unavailable) is sent again one envelope at a time, so one
envelope's refusal (too large, say) fails only its own caller.
Successive publishes of one task keep their order (each waits for the one before); publishes made
concurrently may reach the broker in any order, as they may without coalescing (with
``max_in_flight=1`` they keep the order of their calls). A caller cancelled while its envelope is
still waiting takes it out of the batch: it is not published.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

from callcast.envelope import Envelope
from callcast.exceptions import BrokerUnavailableError, TransportError
from callcast.forwarding import ForwardingBroker
from callcast.transport import Broker
from callcast.waiting import retrieved

DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_IN_FLIGHT = 4


class _Waiting:
    __slots__ = ("envelope", "outcome")

    def __init__(self, envelope: Envelope, outcome: asyncio.Future[None]) -> None:
        self.envelope = envelope
        self.outcome = outcome


class _Topic:
    """One topic's queue of waiting publishes and how many of its publishes are in flight."""

    __slots__ = ("in_flight", "waiting")

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiting: deque[_Waiting] = deque()


class CoalescingBroker(ForwardingBroker):
    """A :class:`~callcast.transport.Broker` that merges concurrent single-envelope publishes per
    topic (see the module doc); batches and publishes to one group pass straight through, and so
    does everything else. The runtime wraps the broker it connects with one of these."""

    def __init__(
        self,
        broker: Broker,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        super().__init__(broker)
        self.max_in_flight = max(1, max_in_flight)
        self.max_batch = max_batch
        self._topics: dict[str, _Topic] = {}

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        if len(envelopes) != 1 or group is not None:
            await self.broker.publish(topic, envelopes, group=group)
        else:
            await self._coalesced(topic, envelopes[0])

    async def _coalesced(self, topic: str, envelope: Envelope) -> None:
        state = self._topics.get(topic)
        if state is None:
            state = self._topics[topic] = _Topic()
        if state.in_flight < self.max_in_flight and not state.waiting:
            state.in_flight += 1
            try:
                await self.broker.publish(topic, [envelope])
            finally:
                state.in_flight -= 1
                self._next(topic, state)
            return
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = _Waiting(envelope, outcome)
        state.waiting.append(waiting)
        try:
            await outcome
        except asyncio.CancelledError:
            if not outcome.done():  # still waiting: it will not be sent
                outcome.cancel()
            raise

    def _next(self, topic: str, state: _Topic) -> None:
        """A publish of ``topic`` returned: send what waits while there is room, or forget the topic."""
        while state.waiting and state.in_flight < self.max_in_flight:
            batch: list[_Waiting] = []
            while state.waiting and len(batch) < self.max_batch:
                waiting = state.waiting.popleft()
                if not waiting.outcome.cancelled():
                    batch.append(waiting)
            if batch:
                state.in_flight += 1
                task = asyncio.get_running_loop().create_task(self._send(topic, state, batch))
                task.add_done_callback(retrieved)
        if not state.in_flight and not state.waiting:
            self._topics.pop(topic, None)

    async def _send(self, topic: str, state: _Topic, batch: list[_Waiting]) -> None:
        try:
            await self.broker.publish(topic, [waiting.envelope for waiting in batch])
        except asyncio.CancelledError:  # the loop is shutting down: so are the waiters
            for waiting in batch:
                waiting.outcome.cancel()
            raise
        except Exception as error:
            if (
                len(batch) > 1
                and isinstance(error, TransportError)
                and not isinstance(error, BrokerUnavailableError)
            ):
                await self._send_one_by_one(topic, batch)  # one envelope's refusal is not the others'
                return
            for waiting in batch:
                if not waiting.outcome.done():
                    waiting.outcome.set_exception(error)
        else:
            for waiting in batch:
                if not waiting.outcome.done():
                    waiting.outcome.set_result(None)
        finally:
            state.in_flight -= 1
            self._next(topic, state)

    async def _send_one_by_one(self, topic: str, batch: list[_Waiting]) -> None:
        """Publish each envelope of a refused batch alone, for each caller's own outcome (any of
        them may have been stored by the batch already: a duplicate, as after any failed publish)."""
        try:
            for waiting in batch:
                if waiting.outcome.done():
                    continue
                try:
                    await self.broker.publish(topic, [waiting.envelope])
                except Exception as error:
                    if not waiting.outcome.done():
                        waiting.outcome.set_exception(error)
                else:
                    if not waiting.outcome.done():
                        waiting.outcome.set_result(None)
        except asyncio.CancelledError:  # the loop is shutting down: so are the waiters
            for waiting in batch:
                waiting.outcome.cancel()
            raise

"""Operating the dead letters: list, show, replay and purge, the same on every broker.

Dead letters live on the broker (:mod:`callcast.deadletter`), so these work wherever the broker is
reachable, across hosts, without the app's code. Browsing takes the dead letters as a subscriber of
their group with a large prefetch and gives back (closes without settling) those it does not
replay or purge — so two operators browsing at the same moment may each see only part of them.

Replay sends the original envelope (its ``dlq*`` diagnostics removed, ``dlqreplays`` counted up)
back to its topic for its one subscriber only (``publish(..., group=subscriber)``): the broker
counts attempts from 1 again, and the other subscribers of the topic do not see it twice.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from callcast.deadletter import DEAD_LETTER_GROUP, DEAD_LETTER_TOPIC
from callcast.envelope import Envelope
from callcast.transport import Broker, Delivery

BROWSE_LIMIT = 100_000
FIRST_WAIT = 1.0
"""Seconds to wait for the first dead letter before concluding there are none."""
NEXT_WAIT = 0.3
"""Seconds without a further dead letter after which the browse ends."""


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    delivery: Delivery

    @property
    def envelope(self) -> Envelope:
        return self.delivery.envelope

    @property
    def id(self) -> str:
        return self.envelope.id

    def diagnostic(self, name: str) -> str:
        return self.envelope.extensions.get(name, "")

    @property
    def subscriber(self) -> str:
        return self.diagnostic("dlqsubscriber")

    @property
    def error_type(self) -> str:
        return self.diagnostic("dlqerror").split(":", 1)[0] or self.diagnostic("dlqreason")

    def matches(self, service: str | None, event: str | None) -> bool:
        if service is not None and self.subscriber.split(".", 1)[0] != service:
            return False
        return event is None or self.envelope.type == event


@asynccontextmanager
async def browse(broker: Broker, *, limit: int = BROWSE_LIMIT) -> AsyncIterator[list[DeadLetterView]]:
    """The dead letters (at most ``limit``); those not settled inside the block go back."""
    subscription = await broker.subscribe(DEAD_LETTER_TOPIC, DEAD_LETTER_GROUP, prefetch=limit)
    letters: list[DeadLetterView] = []
    try:
        wait = FIRST_WAIT
        while len(letters) < limit:
            try:
                async with asyncio.timeout(wait):
                    delivery = await subscription.__anext__()
            except (TimeoutError, StopAsyncIteration):
                break
            letters.append(DeadLetterView(delivery))
            wait = NEXT_WAIT
        yield letters
    finally:
        await subscription.close()


def summarize(letters: Iterable[DeadLetterView]) -> Counter[tuple[str, str]]:
    """How many dead letters per (subscriber, error type): what failed for the same reason."""
    return Counter((letter.subscriber, letter.error_type) for letter in letters)


def original(envelope: Envelope) -> Envelope:
    """The envelope as it was before dead-lettering (its partition key back), with the replay counted."""
    replays = int(envelope.extensions.get("dlqreplays", "0") or 0) + 1
    removed: dict[str, str | None] = {name: None for name in envelope.extensions if name.startswith("dlq")}
    removed["attempt"] = None
    restored: dict[str, str | None] = {"dlqreplays": str(replays)}
    if "dlqpartitionkey" in envelope.extensions:
        restored["partitionkey"] = envelope.extensions["dlqpartitionkey"]
    return envelope.with_extensions(**removed).with_extensions(**restored)


async def replay(broker: Broker, letter: DeadLetterView) -> None:
    """Send the original back to its one subscriber, then drop the dead letter. The subscriber's
    group is declared first: a group that is gone (its handler renamed, a fresh broker) keeps the
    message until someone consumes it, instead of the broker dropping it. Such a group, declared
    again, also keeps every later message of its topic: delete it if no handler will consume it."""
    topic, subscriber = letter.diagnostic("dlqtopic"), letter.subscriber
    if not topic or not subscriber:
        raise ValueError(f"dead letter {letter.id} does not say where it came from")
    await broker.declare(topic, subscriber)
    await broker.publish(topic, [original(letter.envelope)], group=subscriber)
    await letter.delivery.ack()


async def purge(letter: DeadLetterView) -> None:
    await letter.delivery.ack()

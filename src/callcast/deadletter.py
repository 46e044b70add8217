"""Dead letters: messages a subscriber cannot handle, kept with the reason instead of lost.

A dead letter is the original envelope, untouched (same id, type, data and extensions), published on
the topic :data:`DEAD_LETTER_TOPIC` — one topic for the whole system, kept for the group
:data:`DEAD_LETTER_GROUP`, so ``callcast dlq`` can list, show, replay and purge them on any broker
without knowing the app — with diagnostics added as extensions:

================ ==============================================================
dlqsubscriber    the consumer group that gave up (``<service>.<handler>``)
dlqtopic         the topic the message came from
dlqreason        ``error`` (handler kept failing), ``permanent`` (PermanentError),
                 ``invalid`` (payload failed validation), ``undecodable``, ``unknown-type``,
                 ``crashloop`` (delivered too often without being settled), ``gap``
                 (a sequenced message whose predecessor never came)
dlqerror         exception type and message, truncated
dlqtraceback     the end of the traceback, truncated
dlqattempts      the message's own deliveries: counted by the broker, less those cut short by
                 another message crashing the process (:mod:`callcast.crashes`)
dlqdeliveries    every delivery the broker counted
dlqfirstfailure  when the first failure was seen (by the process that dead-lettered it; absent
                 when that process saw only the last one)
dlqtime          when it was dead-lettered: the last failure (RFC 3339)
dlqreplays       how often it was replayed before (``callcast dlq replay``)
================ ==============================================================

The dead letter is stored before the original delivery is acknowledged, so a crash in between
leaves a duplicate dead letter, never none. If the broker refuses it (not because it is away: too
large, say), it is tried once more without ``dlqerror`` and ``dlqtraceback``; if it still cannot
be stored, the original goes back to its group (after :data:`RETRY_AFTER` seconds), to be
dead-lettered again when it returns (its handler may then run again).

A dead letter does not keep the original's ``partitionkey`` (it is kept as ``dlqpartitionkey``, and
put back by a replay): on brokers that keep per-key order, the dead letters of one key would
otherwise be handed out one at a time, and ``callcast dlq`` would see only the first.
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass

from callcast.envelope import Envelope, now_rfc3339
from callcast.exceptions import BrokerUnavailableError, TransportError
from callcast.transport import Broker, Delivery

DEAD_LETTER_TOPIC = "callcast.deadletter"
DEAD_LETTER_GROUP = "callcast.deadletter"
RETRY_AFTER = 30.0
"""Seconds after which a message whose dead letter could not be stored comes back."""
_MAX_ERROR = 1000
_MAX_TRACEBACK = 4000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    envelope: Envelope


def dead_letter_envelope(
    envelope: Envelope,
    *,
    subscriber: str,
    topic: str,
    reason: str,
    error: BaseException | None,
    attempt: int,
    first_failure: str | None = None,
    own_attempts: int | None = None,
) -> DeadLetter:
    """The dead letter for ``envelope``: the original plus the diagnostics."""
    extensions: dict[str, str | None] = {
        "attempt": str(attempt),
        "dlqsubscriber": subscriber,
        "dlqtopic": topic,
        "dlqreason": reason,
        "dlqattempts": str(attempt if own_attempts is None else own_attempts),
        "dlqdeliveries": str(attempt),
        "dlqtime": now_rfc3339(),
        "dlqfirstfailure": first_failure,
        "partitionkey": None,
        "dlqpartitionkey": envelope.partition_key,
    }
    if error is not None:
        extensions["dlqerror"] = f"{type(error).__name__}: {error}"[:_MAX_ERROR]
        text = "".join(traceback.format_exception(error))
        extensions["dlqtraceback"] = text[-_MAX_TRACEBACK:]
    return DeadLetter(DEAD_LETTER_TOPIC, envelope.with_extensions(**extensions))


async def store(broker: Broker, letter: DeadLetter) -> None:
    """Publish ``letter``; if the broker refuses it (not because it is away), once more without
    ``dlqerror`` and ``dlqtraceback``. Raises :class:`TransportError` if it is not stored."""
    try:
        await broker.publish(letter.topic, [letter.envelope])
    except BrokerUnavailableError:
        raise
    except TransportError:  # refused: without the error texts, it may fit
        slim = letter.envelope.with_extensions(dlqerror=None, dlqtraceback=None)
        await broker.publish(letter.topic, [slim])


async def dead_letter(
    broker: Broker,
    delivery: Delivery,
    *,
    subscriber: str,
    topic: str,
    reason: str,
    error: BaseException | None = None,
    first_failure: str | None = None,
    attempts: int | None = None,
) -> None:
    """Store ``delivery``'s envelope as a dead letter, then acknowledge the delivery; if the dead
    letter cannot be stored, give the delivery back (:data:`RETRY_AFTER`) and raise."""
    letter = dead_letter_envelope(
        delivery.envelope,
        subscriber=subscriber,
        topic=topic,
        reason=reason,
        error=error,
        attempt=delivery.attempt,
        first_failure=first_failure,
        own_attempts=attempts,
    )
    try:
        await store(broker, letter)
    except TransportError:
        with contextlib.suppress(TransportError):  # if this fails too, its lease runs out
            await delivery.nack(delay=RETRY_AFTER)
        raise
    await delivery.ack()

"""Dead letters: messages a subscriber cannot handle, kept with the reason instead of lost.

A dead letter is the original envelope, untouched (same id, type, data and extensions), published on
the topic :data:`DEAD_LETTER_TOPIC` with diagnostics added as extensions:

============== ==============================================================
dlqsubscriber  the consumer group that gave up (``<service>.<handler>``)
dlqtopic       the topic the message came from
dlqreason      ``error`` (handler kept failing), ``permanent`` (PermanentError),
               ``invalid`` (payload failed validation), ``undecodable``,
               ``crashloop`` (delivered too often without being settled)
dlqerror       exception type and message, truncated
dlqtraceback   the end of the traceback, truncated
dlqattempts    deliveries counted by the broker
dlqtime        when it was dead-lettered (RFC 3339)
============== ==============================================================

The dead letter is stored before the original delivery is acknowledged, so a crash in between
leaves a duplicate dead letter, never none.
"""

from __future__ import annotations

import traceback

from callcast.envelope import now_rfc3339
from callcast.transport import Broker, Delivery

DEAD_LETTER_TOPIC = "callcast.deadletter"
DEAD_LETTER_GROUP = "callcast.deadletter"
_MAX_ERROR = 1000
_MAX_TRACEBACK = 4000


async def dead_letter(
    broker: Broker,
    delivery: Delivery,
    *,
    subscriber: str,
    topic: str,
    reason: str,
    error: BaseException | None = None,
) -> None:
    """Store ``delivery``'s envelope as a dead letter, then acknowledge the delivery."""
    extensions = {
        "attempt": str(delivery.attempt),
        "dlqsubscriber": subscriber,
        "dlqtopic": topic,
        "dlqreason": reason,
        "dlqattempts": str(delivery.attempt),
        "dlqtime": now_rfc3339(),
    }
    if error is not None:
        extensions["dlqerror"] = f"{type(error).__name__}: {error}"[:_MAX_ERROR]
        text = "".join(traceback.format_exception(error))
        extensions["dlqtraceback"] = text[-_MAX_TRACEBACK:]
    await broker.publish(DEAD_LETTER_TOPIC, [delivery.envelope.with_extensions(**extensions)])
    await delivery.ack()

"""Retry policy of an event handler: how often and how late a failed message comes back.

::

    @emails.on(UserSignedUp, retry=RetryPolicy(max_attempts=8, base_delay=0.5))

A message whose handler raised is given back to the broker with ``nack(delay=d)``, where
``d = min(max_delay, base_delay × 2^(attempt-1))`` scaled by a random factor in [0.5, 1] (jitter,
so retries of many messages do not arrive together). The delay lives in the broker, not in a
sleeping task: it does not block other messages and survives a restart. The exception: a keyed
message on a broker without per-key order waits out its delay in its key's lane, so the later
messages of its key cannot pass it (:mod:`callcast.consumer`). After ``max_attempts`` runs of its
own the message is dead-lettered: the broker's count of deliveries, less those cut short or lost
when another message killed the process (:mod:`callcast.crashes`), plus its runs in the lane.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from callcast.exceptions import ConfigurationError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ConfigurationError("need 0 <= base_delay <= max_delay")

    def delay(self, attempt: int) -> float:
        """Seconds before the message comes back after its ``attempt``-th delivery failed."""
        ceiling: float = min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 60))
        return ceiling * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()

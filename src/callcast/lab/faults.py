"""Injected faults that live inside the downstream services: added latency and random failures.

A downstream handler calls :meth:`Faults.disturb` before it applies its effect. ``slow`` adds real
latency (``await asyncio.sleep``) and ``flaky`` makes a share of the calls raise
:class:`InjectedFailure`, seeded so a run can be repeated. A service that is *down* is not a fault
of this kind: the orchestrator stops that service's runtime, so it genuinely does not answer.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field


class InjectedFailure(Exception):
    """A failure the lab injected on purpose (``flaky``)."""


@dataclass
class Faults:
    """The faults currently switched on, per service name. Mutable while a run goes on."""

    seed: int = 7
    slow: dict[str, float] = field(default_factory=dict)
    """Service name → seconds added before each effect."""
    flaky: dict[str, float] = field(default_factory=dict)
    """Service name → share (0–1) of calls or deliveries that fail."""
    injected_failures: int = 0
    """How many failures were injected so far."""

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    async def disturb(self, service: str) -> None:
        """Apply ``service``'s faults: sleep for its added latency, then maybe raise."""
        delay = self.slow.get(service, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        share = self.flaky.get(service, 0.0)
        if share > 0 and self._random.random() < share:
            self.injected_failures += 1
            raise InjectedFailure(f"{service}: injected failure")

"""Named fault scenarios, composable with ``+`` (``slow-downstream+spike``).

==================  ===========================================================================
``baseline``        no fault: the reference
``slow-downstream`` the target downstream adds ``slow_seconds`` (200 ms) to every effect, all run
``down-downstream`` the target downstream's runtime is stopped during the fault window, then back
``flaky-downstream`` a share (20 %) of the target's calls and deliveries raise, all run
``spike``           the offered load is multiplied (×4) during the fault window
``add-consumer``    a new consumer (``loyalty``) joins half way; the producer changes if it must
==================  ===========================================================================

The fault window is the middle of the run: from ``window[0]`` to ``window[1]`` as shares of the
duration (default 30 %–60 %). Composing takes every fault of every part.
"""

from __future__ import annotations

from dataclasses import dataclass

from callcast.exceptions import ConfigurationError

PRESETS = (
    "baseline",
    "slow-downstream",
    "down-downstream",
    "flaky-downstream",
    "spike",
    "add-consumer",
)


@dataclass(frozen=True)
class Scenario:
    """What one run injects. Build with :func:`parse`."""

    name: str
    slow: bool = False
    down: bool = False
    flaky: bool = False
    spike: bool = False
    add_consumer: bool = False

    @property
    def has_window(self) -> bool:
        """Whether something happens only inside the fault window."""
        return self.down or self.spike or self.add_consumer


def parse(spec: str) -> Scenario:
    """``"slow-downstream+spike"`` → a scenario with both; :class:`ConfigurationError` if unknown."""
    parts = [part.strip() for part in spec.split("+") if part.strip()]
    if not parts:
        raise ConfigurationError("empty scenario")
    unknown = [part for part in parts if part not in PRESETS]
    if unknown:
        raise ConfigurationError(f"unknown scenario {', '.join(unknown)}; known: {', '.join(PRESETS)}")
    return Scenario(
        name="+".join(parts),
        slow="slow-downstream" in parts,
        down="down-downstream" in parts,
        flaky="flaky-downstream" in parts,
        spike="spike" in parts,
        add_consumer="add-consumer" in parts,
    )


def parse_all(specs: list[str] | None) -> list[Scenario]:
    """The scenarios named (each maybe composed; comma-separated lists allowed), default all presets."""
    names = [name for spec in specs or [] for name in spec.split(",") if name.strip()]
    return [parse(name) for name in (names or list(PRESETS))]

"""The goals of issue 5, as data, and their verdict on a result row.

A goal applies to rows of one ``path`` and ``metric`` (and optionally one broker). It compares one of
the row's fields (``ratio_raw``, ``ratio_faststream`` or ``callcast``) with a threshold. A ratio goal
does not apply where the baseline was not measured (``raw``/``faststream`` null); it is *missed*
when the baseline was measured and callcast was not (its trials failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Field = Literal["ratio_raw", "ratio_faststream", "callcast"]
BASELINE = {"ratio_raw": "raw", "ratio_faststream": "faststream"}


@dataclass(frozen=True)
class Goal:
    path: str
    metric: str
    field: Field
    at_least: bool
    """True: the value must be ≥ threshold; False: ≤ threshold."""
    threshold: float
    broker: str | None = None
    """Only rows of this broker (``None``: every broker)."""

    @property
    def label(self) -> str:
        sign = "≥" if self.at_least else "≤"
        if self.field == "callcast":
            return f"{sign}{self.threshold:,g}"
        return f"{sign}{self.threshold:g}×{BASELINE[self.field]}"

    def applies_to(self, row: dict[str, Any]) -> bool:
        if row["path"] != self.path or row["metric"] != self.metric:
            return False
        if self.broker is not None and row["broker"] != self.broker:
            return False
        return self.field == "callcast" or row.get(BASELINE[self.field]) is not None

    def met(self, row: dict[str, Any]) -> bool:
        value = row.get(self.field)
        if value is None:
            return False
        return bool(value >= self.threshold if self.at_least else value <= self.threshold)


GOALS: tuple[Goal, ...] = (
    Goal("event", "throughput", "ratio_raw", True, 0.8),
    Goal("event", "throughput", "ratio_faststream", True, 2.5),
    Goal("latency", "p99", "ratio_raw", False, 1.5),
    Goal("rpc", "throughput_c64", "ratio_raw", True, 0.7),
    Goal("rpc", "throughput_c64", "ratio_faststream", True, 2.0),
    Goal("http", "throughput", "ratio_raw", True, 0.9),
    Goal("io-bound", "throughput", "ratio_raw", True, 50.0),
    Goal("event", "throughput", "callcast", True, 15_000, broker="sqlite"),
    Goal("event", "worker_peak_rss", "callcast", False, 200.0, broker="sqlite"),
)


def verdicts(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals that apply to ``row``: ``[{"goal": label, "met": bool}]``."""
    return [{"goal": goal.label, "met": goal.met(row)} for goal in GOALS if goal.applies_to(row)]

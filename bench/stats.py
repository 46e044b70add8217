"""Statistics of samples: medians, percentiles, min–max, ratios. Pure functions."""

from __future__ import annotations

import math
from collections.abc import Sequence


def median(samples: Sequence[float]) -> float | None:
    """The median, or ``None`` without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def percentile(samples: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` (0..1) percentile by the nearest-rank method, or ``None`` without samples."""
    if not samples:
        return None
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within 0..1, got {fraction}")
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def spread(samples: Sequence[float]) -> tuple[float, float] | None:
    """(min, max), or ``None`` without samples."""
    return (min(samples), max(samples)) if samples else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator

"""From raw observations to the figures of one run: percentiles, availability, consistency,
lost/duplicated/orphaned effects, and a timeline.

Inputs are what was observed, nothing modelled: the user requests' records
(:class:`~callcast.lab.load.RequestRecord`) and every application of every effect, read back from
the downstream services' databases (service → order id → the times it was applied).

Definitions (all times in milliseconds):

* latency: answer time − send time of every request that got an answer or gave up (failures
  included: the user waited that long); availability: requests answered 2xx ÷ requests offered;
  throughput: requests answered 2xx per second between the first send and the last answer.
* an order is *accepted* when its request was answered 2xx. Its expected effects are the four
  downstream ones (plus the added consumer's, for orders sent after it joined).
* time to consistency, per accepted order with every expected effect: the first application of its
  last effect − the user's answer, floored at 0 (effects done before the answer count as 0).
* lost: expected effects of accepted orders missing after the drain; duplicated: (order, effect)
  pairs applied more than once; orphaned: effects applied for an order the user was told failed.
* backlog at time *t*: expected effects of orders accepted by *t* and not yet applied at *t*.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from callcast.lab.load import RequestRecord

Applied = dict[str, dict[str, list[float]]]
"""service → order id → the wall-clock times the service's effect was applied to it."""


def percentile(values: Sequence[float], share: float) -> float | None:
    """The ``share`` (0–1) quantile with linear interpolation; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 2)


def consistency_times(
    records: Sequence[RequestRecord], applied: Applied, expected: Callable[[RequestRecord], Sequence[str]]
) -> dict[str, float]:
    """Accepted order id → seconds from its answer until its last expected effect (floored at 0),
    for the orders whose every expected effect was applied."""
    times: dict[str, float] = {}
    for record in records:
        if not record.ok:
            continue
        firsts = [applied.get(service, {}).get(record.order_id) for service in expected(record)]
        if all(firsts):
            last = max(min(stamps) for stamps in firsts if stamps)
            times[record.order_id] = max(0.0, last - record.answered_at)
    return times


def missing_effects(
    records: Sequence[RequestRecord], applied: Applied, expected: Callable[[RequestRecord], Sequence[str]]
) -> list[tuple[str, str]]:
    """(service, order id) of every expected effect of an accepted order that was never applied."""
    return [
        (service, record.order_id)
        for record in records
        if record.ok
        for service in expected(record)
        if not applied.get(service, {}).get(record.order_id)
    ]


def summarize(
    records: Sequence[RequestRecord], applied: Applied, expected: Callable[[RequestRecord], Sequence[str]]
) -> dict[str, Any]:
    """The figures of one run (see the module docstring for their definitions)."""
    latencies = [record.latency for record in records]
    ok = [record for record in records if record.ok]
    consistency = consistency_times(records, applied, expected)
    accepted = {record.order_id for record in ok}
    span = (max(r.answered_at for r in records) - min(r.sent_at for r in records)) if records else 0.0
    duplicated = sum(1 for by_order in applied.values() for stamps in by_order.values() if len(stamps) > 1)
    orphaned = sum(1 for by_order in applied.values() for order_id in by_order if order_id not in accepted)
    expected_count = sum(len(expected(record)) for record in ok)
    lost = len(missing_effects(records, applied, expected))
    statuses: dict[str, int] = {}
    for record in records:
        statuses[str(record.status)] = statuses.get(str(record.status), 0) + 1
    values = list(consistency.values())
    return {
        "requests_offered": len(records),
        "requests_ok": len(ok),
        "requests_failed": len(records) - len(ok),
        "statuses": dict(sorted(statuses.items())),
        "availability": round(len(ok) / len(records), 4) if records else None,
        "throughput_rps": round(len(ok) / span, 2) if span > 0 else None,
        "latency_p50_ms": _ms(percentile(latencies, 0.50)),
        "latency_p95_ms": _ms(percentile(latencies, 0.95)),
        "latency_p99_ms": _ms(percentile(latencies, 0.99)),
        "latency_max_ms": _ms(max(latencies) if latencies else None),
        "consistency_p50_ms": _ms(percentile(values, 0.50)),
        "consistency_p99_ms": _ms(percentile(values, 0.99)),
        "consistency_max_ms": _ms(max(values) if values else None),
        "orders_consistent": len(values),
        "effects_expected": expected_count,
        "effects_lost": lost,
        "effects_duplicated": duplicated,
        "effects_orphaned": orphaned,
        "generator_lag_max_ms": _ms(max((record.lag for record in records), default=0.0)),
        "latency_samples_ms": [round(latency * 1000.0, 2) for latency in latencies],
        "consistency_samples_ms": [round(value * 1000.0, 2) for value in values],
    }


def timeline(
    records: Sequence[RequestRecord],
    applied: Applied,
    expected: Callable[[RequestRecord], Sequence[str]],
    *,
    start: float,
    step: float,
) -> list[dict[str, float | int | None]]:
    """Per ``step`` seconds from ``start`` (wall clock) until the last answer or effect: requests
    sent, failed, their median and p95 latency, and the backlog at the step's end."""
    if not records:
        return []
    end = max(record.answered_at for record in records)
    pending: list[tuple[float, float]] = []  # (accepted at, applied at or inf) per expected effect
    for record in records:
        if record.ok:
            for service in expected(record):
                stamps = applied.get(service, {}).get(record.order_id)
                pending.append((record.answered_at, min(stamps) if stamps else math.inf))
    end = max([end, *(done for _, done in pending if done < math.inf)])
    points: list[dict[str, float | int | None]] = []
    moment = start
    while moment < end:
        upto = moment + step
        sent = [r for r in records if moment <= r.sent_at < upto]
        latencies = [r.latency for r in sent]
        points.append(
            {
                "t": round(moment - start, 3),
                "sent": len(sent),
                "failed": sum(1 for r in sent if not r.ok),
                "latency_p50_ms": _ms(percentile(latencies, 0.5)),
                "latency_p95_ms": _ms(percentile(latencies, 0.95)),
                "backlog": sum(1 for accepted, done in pending if accepted <= upto < done),
            }
        )
        moment = upto
    return points

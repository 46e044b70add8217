"""The plain-words verdict: which style wins on what, in this run, generated from the figures.

Every sentence names the figures it rests on, so a reader can check it against the table; a
comparison that the run did not measure (a scenario that was not run) is left out, not guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _find(runs: Sequence[dict[str, Any]], style: str, scenario: str) -> dict[str, Any] | None:
    for run in runs:
        if run["style"] == style and run["scenario"] == scenario:
            return run
    return None


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _styles(runs: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(run["style"] for run in runs))


def _listing(values: dict[str, str]) -> str:
    return ", ".join(f"{style} {value}" for style, value in values.items())


def verdict(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Sentences, most important first."""
    styles = _styles(runs)
    lines: list[str] = []
    base = {style: _find(runs, style, "baseline") for style in styles}
    if all(base.values()):
        p50 = {style: run["latency_p50_ms"] for style, run in base.items() if run}
        best = min(p50, key=lambda style: p50[style] or 0.0)
        lines.append(
            f"Latency: {best} answers the user fastest without faults "
            f"(p50 {_listing({s: _ms(v) for s, v in p50.items()})})."
        )
        consistency = {style: run["consistency_p99_ms"] for style, run in base.items() if run}
        immediate = [style for style, value in consistency.items() if value == 0]
        if immediate:
            lines.append(
                f"Consistency: {', '.join(immediate)} is consistent when it answers; the others catch up "
                "afterwards (time to consistency p99 "
                f"{_listing({s: _ms(v) for s, v in consistency.items()})})."
            )
    for scenario in dict.fromkeys(run["scenario"] for run in runs):
        if scenario == "baseline":
            continue
        lines.extend(_scenario_lines(runs, styles, scenario, base))
    lines.extend(_integrity_lines(runs, styles))
    lines.extend(_coupling_lines(runs, styles))
    return lines


def _scenario_lines(
    runs: Sequence[dict[str, Any]], styles: list[str], scenario: str, base: dict[str, dict[str, Any] | None]
) -> list[str]:
    chosen = {style: _find(runs, style, scenario) for style in styles}
    present = {style: run for style, run in chosen.items() if run}
    if not present:
        return []
    faulty = ("slow-downstream", "down-downstream", "flaky-downstream")
    hits_target = any(part in scenario.split("+") for part in faulty)
    target = f" ({next(iter(present.values())).get('fault_target')})" if hits_target else ""
    availability = {style: run["availability"] for style, run in present.items()}
    best = max(availability.values(), key=lambda value: value or 0.0)
    keepers = [style for style, value in availability.items() if value == best]
    lines = [
        f"{scenario}{target}: availability {_listing({s: _pct(v) for s, v in availability.items()})}; "
        f"{' and '.join(keepers)} kept the most requests answered."
    ]
    if all(base.get(style) for style in present):
        rises = {
            style: (run["latency_p50_ms"] or 0.0) - (base[style] or {}).get("latency_p50_ms", 0.0)
            for style, run in present.items()
        }
        lines.append(
            f"  p50 latency moved by {_listing({s: f'{v:+.0f} ms' for s, v in rises.items()})} "
            "against baseline."
        )
    slowest = {style: run["consistency_max_ms"] for style, run in present.items()}
    lines.append(f"  Time to consistency (max): {_listing({s: _ms(v) for s, v in slowest.items()})}.")
    change = next((run["add_consumer"] for run in present.values() if run.get("add_consumer")), None)
    if change is not None:
        for style, run in present.items():
            info = run.get("add_consumer") or {}
            what = (
                "the producer had to change: " + "; ".join(info.get("changed_handlers", []))
                if info.get("producer_changed")
                else "no existing service changed (the new consumer only subscribes)"
            )
            lines.append(f"  Adding {info.get('consumer', 'a consumer')} in {style}: {what}.")
    return lines


def _integrity_lines(runs: Sequence[dict[str, Any]], styles: list[str]) -> list[str]:
    totals = {
        style: {
            key: sum(run[key] for run in runs if run["style"] == style)
            for key in ("effects_lost", "effects_dead_lettered", "effects_duplicated", "effects_orphaned")
        }
        for style in styles
    }
    parts = [
        f"{style} missing after the drain {t['effects_lost']} ({t['effects_dead_lettered']} dead-lettered), "
        f"duplicated {t['effects_duplicated']}, "
        f"orphaned {t['effects_orphaned']}"
        for style, t in totals.items()
    ]
    line = "Side effects over all scenarios: " + "; ".join(parts) + "."
    orphans = [style for style, t in totals.items() if t["effects_orphaned"]]
    if orphans:
        line += (
            f" Orphaned effects ({', '.join(orphans)}) were applied for orders whose user got a failure or"
            " no answer in time: work done before the request failed or timed out stays done."
        )
    return [line]


def _coupling_lines(runs: Sequence[dict[str, Any]], styles: list[str]) -> list[str]:
    radius = {}
    for style in styles:
        run = next((r for r in runs if r["style"] == style), None)
        if run is not None:
            radius[style] = run["coupling"]["blast_radius"]
    if not radius:
        return []
    smallest = min(radius.values())
    winners = [style for style, value in radius.items() if value == smallest]
    return [
        f"Coupling: the user's request fails when any of {_listing({s: str(v) for s, v in radius.items()})} "
        f"services fails (blast radius); {' and '.join(winners)} depend{'s' if len(winners) == 1 else ''} "
        "on the fewest."
    ]

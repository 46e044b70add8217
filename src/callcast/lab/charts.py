"""The report's charts as PNG files, drawn with matplotlib's Agg backend from ``results.json`` data.

* ``latency.png``: user-facing latency per style (empirical CDF, log scale), one panel per scenario;
* ``availability.png``: availability per scenario and style (bars);
* ``consistency.png``: time to consistency per style (empirical CDF), one panel per scenario;
* ``timeline.png``: one fault scenario over time, per style: latency (p50, p95) and backlog,
  with the fault window shaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

COLOURS = {"request": "#d1495b", "event": "#00798c", "hybrid": "#edae49"}
TIMELINE_PREFERENCE = ("down-downstream", "spike", "slow-downstream", "flaky-downstream", "add-consumer")


def draw_all(runs: Sequence[dict[str, Any]], out: Path) -> dict[str, Path]:
    """Draw every chart into ``out``; chart name → file."""
    files = {
        "latency": _ecdf_panels(runs, "latency_samples_ms", "user-facing latency (ms)", out / "latency.png"),
        "availability": _availability(runs, out / "availability.png"),
        "consistency": _ecdf_panels(
            runs, "consistency_samples_ms", "time to consistency (ms)", out / "consistency.png"
        ),
    }
    scenario = timeline_scenario(runs)
    if scenario is not None:
        files["timeline"] = _timeline(runs, scenario, out / "timeline.png")
    return files


def timeline_scenario(runs: Sequence[dict[str, Any]]) -> str | None:
    """The scenario the timeline shows: the first fault scenario run, by :data:`TIMELINE_PREFERENCE`."""
    names = [run["scenario"] for run in runs]
    for preferred in TIMELINE_PREFERENCE:
        for name in names:
            if preferred in name.split("+"):
                return str(name)
    return str(names[0]) if names else None


def _scenarios(runs: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(run["scenario"] for run in runs))


def _styles(runs: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(run["style"] for run in runs))


def _ecdf_panels(runs: Sequence[dict[str, Any]], key: str, label: str, path: Path) -> Path:
    scenarios = _scenarios(runs)
    columns = min(3, len(scenarios))
    rows = (len(scenarios) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for index, scenario in enumerate(scenarios):
        axis: Axes = axes[index // columns][index % columns]
        for run in runs:
            if run["scenario"] != scenario:
                continue
            samples = sorted(max(value, 0.1) for value in run[key])
            if samples:
                shares = [(rank + 1) / len(samples) for rank in range(len(samples))]
                axis.step(samples, shares, where="post", label=run["style"], color=COLOURS.get(run["style"]))
        axis.set_xscale("log")
        axis.set_title(scenario, fontsize=10)
        axis.set_xlabel(label, fontsize=8)
        axis.set_ylabel("share of orders ≤ x", fontsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for index in range(len(scenarios), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _availability(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    scenarios, styles = _scenarios(runs), _styles(runs)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.4 * len(scenarios)), 3.6))
    width = 0.8 / max(1, len(styles))
    for offset, style in enumerate(styles):
        values = []
        for scenario in scenarios:
            match = [run for run in runs if run["style"] == style and run["scenario"] == scenario]
            values.append(100.0 * (match[0]["availability"] or 0.0) if match else 0.0)
        positions = [index + offset * width - 0.4 + width / 2 for index in range(len(scenarios))]
        axis.bar(positions, values, width, label=style, color=COLOURS.get(style))
    axis.set_xticks(range(len(scenarios)), scenarios, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("requests answered 2xx (%)")
    axis.set_ylim(0, 105)
    axis.set_title("availability per scenario")
    axis.legend(fontsize=8, loc="lower left")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _timeline(runs: Sequence[dict[str, Any]], scenario: str, path: Path) -> Path:
    chosen = [run for run in runs if run["scenario"] == scenario]
    figure, axes = plt.subplots(len(chosen), 1, figsize=(8.0, 2.6 * len(chosen)), squeeze=False, sharex=True)
    for index, run in enumerate(chosen):
        axis: Axes = axes[index][0]
        points = run["timeline"]
        moments = [point["t"] for point in points]
        for key, style in (("latency_p50_ms", "-"), ("latency_p95_ms", ":")):
            values = [point[key] if point[key] is not None else float("nan") for point in points]
            axis.plot(moments, values, style, color=COLOURS.get(run["style"]), label=key[8:11] + " latency")
        axis.set_ylabel("latency (ms)", fontsize=8)
        backlog_axis = axis.twinx()
        backlog_axis.fill_between(
            moments, [point["backlog"] for point in points], step="post", color="grey", alpha=0.25
        )
        backlog_axis.set_ylabel("backlog (effects)", fontsize=8)
        window = run.get("fault_window_s")
        if window:
            start, end = window
            axis.axvspan(start, max(end, start + 0.05), color="#d1495b", alpha=0.12, label="fault window")
        axis.set_title(f"{run['style']} — {scenario}", fontsize=10)
        axis.legend(fontsize=7, loc="upper left")
        axis.grid(alpha=0.3)
    axes[-1][0].set_xlabel("seconds since the load started")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path

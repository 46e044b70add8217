"""How a measurement runs: the sides alternate (callcast, raw, FastStream, callcast, raw, …) for
``repeats`` rounds, each trial in a fresh process; the samples become one result row per metric
with medians, min–max, the ratios callcast÷raw and callcast÷FastStream and the goals' verdicts.

A trial that fails or overruns its time limit is stopped (its process group, by the PID the
harness started) and leaves no sample; the row says so in ``notes``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.goals import verdicts
from bench.stats import median, ratio, spread

SIDES = ("callcast", "raw", "faststream")
ROOT = Path(__file__).resolve().parent.parent


class TrialError(Exception):
    """A trial ended without figures (failed, or stopped at its time limit)."""


@dataclass
class Config:
    """One run's settings."""

    workdir: Path
    prefix: str
    """Every namespace of this run starts with it (so one sweep finds all that the run created)."""
    repeats: int
    quick: bool
    window: int = 64
    """Publishes in flight (or pipelined) on the event and io-bound paths, the same for every side."""
    log: Callable[[str], None] = print
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def namespace(self) -> str:
        """A fresh namespace for one trial."""
        return f"{self.prefix}t{next(self.counter)}"


@dataclass(frozen=True)
class Measurement:
    """One (path, broker): which sides exist there (side → what it is) and how one trial runs."""

    path: str
    broker: str
    metrics: tuple[tuple[str, str], ...]
    """(metric, unit) pairs, each one result row."""
    sides: dict[str, str]
    trial: Callable[[str], dict[str, Any]]
    """Run one trial of a side; its figures by metric name (plus ``notes``)."""
    repeats: int | None = None
    """Rounds for this measurement (``None``: the run's ``repeats``)."""


def run_trial(
    config: Config, workload: str, side: str, broker: str, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Run ``workload`` for ``side`` in a fresh ``python -m bench.trial`` process under a new
    namespace; stop it after ``timeout`` seconds. Its output goes to ``<workdir>/logs/``."""
    return run_in_process(config, config.namespace(), workload, side, broker, params, timeout)


def run_in_process(
    config: Config,
    namespace: str,
    workload: str,
    side: str,
    broker: str,
    params: dict[str, Any],
    timeout: float,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> dict[str, Any]:
    """:func:`run_trial` under a given namespace; ``on_start(process)`` runs once it started and
    may watch it (it must return before the process ends for the timeout to hold)."""
    stem = f"{namespace}-{workload}-{side}"
    spec_path = config.workdir / f"{stem}.spec.json"
    result_path = config.workdir / f"{stem}.result.json"
    log_path = config.workdir / "logs" / f"{stem}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spec = {
        "workload": workload,
        "side": side,
        "broker": broker,
        "namespace": namespace,
        "workdir": str(config.workdir),
        "params": params,
    }
    spec_path.write_text(json.dumps(spec))
    with log_path.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.trial", str(spec_path), str(result_path)],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            if on_start is not None:
                on_start(process)
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(process)
            raise TrialError(f"stopped after {timeout:.0f}s (log: {log_path})") from None
        except BaseException:
            stop_process(process)
            raise
    if code != 0 or not result_path.exists():
        raise TrialError(f"exit {code}: {last_line(log_path)} (log: {log_path})")
    figures: dict[str, Any] = json.loads(result_path.read_text())
    return figures


def stop_process(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop a process this harness started, and its children: SIGTERM to its process group (its
    id is the PID we started, see ``start_new_session``), SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_line(path: Path) -> str:
    """The last non-blank line of a log, shortened."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def measure(measurement: Measurement, config: Config) -> list[dict[str, Any]]:
    """Alternate the sides for ``config.repeats`` rounds (or the measurement's own); one row per metric."""
    samples: dict[str, dict[str, list[float]]] = {
        side: {metric: [] for metric, _ in measurement.metrics} for side in SIDES
    }
    notes: list[str] = []
    for round_number in range(1, (measurement.repeats or config.repeats) + 1):
        for side in measurement.sides:
            started = time.monotonic()
            try:
                figures = measurement.trial(side)
            except TrialError as error:
                notes.append(f"{side}: {error}")
                config.log(f"    {side:<10} #{round_number}: FAILED {error}")
                continue
            notes.extend(f"{side}: {note}" for note in figures.get("notes", []))
            shown = []
            for metric, unit in measurement.metrics:
                value = figures.get(metric)
                if isinstance(value, int | float):
                    samples[side][metric].append(float(value))
                    shown.append(f"{metric}={value:,.2f} {unit}")
            config.log(
                f"    {side:<10} #{round_number}: {', '.join(shown)}  ({time.monotonic() - started:.1f}s)"
            )
    return [
        build_row(measurement.path, measurement.broker, metric, unit, samples, notes, measurement.sides)
        for metric, unit in measurement.metrics
    ]


def build_row(
    path: str,
    broker: str,
    metric: str,
    unit: str,
    samples: dict[str, dict[str, list[float]]],
    notes: list[str],
    implementations: dict[str, str],
) -> dict[str, Any]:
    """One result row (the format documented in bench/README.md)."""
    per_side = {side: samples.get(side, {}).get(metric, []) for side in SIDES}
    medians = {side: median(values) for side, values in per_side.items()}
    row: dict[str, Any] = {
        "path": path,
        "broker": broker,
        "metric": metric,
        "unit": unit,
        **medians,
        "samples": per_side,
        "min_max": {side: spread(values) for side, values in per_side.items()},
        "ratio_raw": ratio(medians["callcast"], medians["raw"]),
        "ratio_faststream": ratio(medians["callcast"], medians["faststream"]),
        "implementations": {side: implementations.get(side) for side in SIDES},
        "notes": list(dict.fromkeys(notes)),
    }
    row["goals"] = verdicts(row)
    return row

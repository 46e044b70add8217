"""The results: a Markdown table (terminal and ``latest.md``) and ``latest.json`` (format in
bench/README.md), with the run's metadata."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from bench.harness import SIDES

PACKAGES = (
    "callcast", "faststream", "aio-pika", "nats-py", "redis", "asyncpg", "pydantic", "orjson",
    "starlette", "fastapi", "uvicorn", "uvloop", "httptools", "aiosqlite",
)  # fmt: skip


def machine() -> dict[str, Any]:
    """What the figures were taken on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": memory,
        "python": sys.version.split()[0],
    }


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def meta(settings: dict[str, Any], started: datetime.datetime, seconds: float) -> dict[str, Any]:
    return {
        "date": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "machine": machine(),
        "versions": versions(),
        "settings": settings,
    }


def number(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(row: dict[str, Any], side: str) -> str:
    value = row.get(side)
    if value is None:
        return "—"
    low_high = row.get("min_max", {}).get(side)
    if low_high and len(row["samples"][side]) > 1:
        return f"{number(value)} ({number(low_high[0])}–{number(low_high[1])})"
    return number(value)


def goals_cell(row: dict[str, Any]) -> str:
    return ", ".join(f"{verdict['goal']} {'met' if verdict['met'] else 'MISSED'}" for verdict in row["goals"])


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table: medians with (min–max), ratios and goals."""
    lines = [
        "| path | broker | metric | unit | callcast | raw | faststream "
        "| callcast÷raw | callcast÷faststream | goals |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratios = [number(row["ratio_raw"]), number(row["ratio_faststream"])]
        lines.append(
            f"| {row['path']} | {row['broker']} | {row['metric']} | {row['unit']} | "
            + " | ".join(cell(row, side) for side in SIDES)
            + f" | {' | '.join(ratios)} | {goals_cell(row)} |"
        )
    return "\n".join(lines)


def markdown(document: dict[str, Any]) -> str:
    """The whole report: settings, table, goal summary, notes."""
    info = document["meta"]
    settings = info["settings"]
    rows = document["rows"]
    verdicts = [verdict for row in rows for verdict in row["goals"]]
    met = sum(verdict["met"] for verdict in verdicts)
    parts = [
        "# callcast benchmarks",
        "",
        f"{info['date']} · {info['machine']['cpus']} CPUs ({info['machine']['cpu']}) · Python "
        f"{info['machine']['python']} · {'quick' if settings['quick'] else 'full'} run, "
        f"{settings['repeats']} repeat(s), {info['duration_s']:.0f} s",
        "",
        "Medians with (min–max) over the repeats; columns: `raw` = the broker's client written by hand "
        "(HTTP: plain Starlette; io-bound: callcast with concurrency=1), `faststream` = FastStream 0.7.8 "
        "(HTTP: FastAPI). Latencies in ms; lower is better there.",
        "",
        table(rows),
        "",
        f"Goals met: {met} of {len(verdicts)}.",
    ]
    skipped = settings.get("skipped") or {}
    if skipped:
        parts += ["", "Skipped: " + "; ".join(f"{name} ({why})" for name, why in skipped.items())]
    noted = [row for row in rows if row["notes"]]
    if noted:
        parts += ["", "Notes:", ""]
        seen: set[tuple[str, str, str]] = set()
        for row in noted:
            for note in row["notes"]:
                key = (row["path"], row["broker"], note)
                if key not in seen:
                    seen.add(key)
                    parts.append(f"- {row['path']} / {row['broker']}: {note}")
    return "\n".join(parts) + "\n"


def write(document: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    """Write ``latest.json`` and ``latest.md`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "latest.json", directory / "latest.md"
    json_path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    md_path.write_text(markdown(document))
    return json_path, md_path


ROW_FIELDS = {
    "path": str,
    "broker": str,
    "metric": str,
    "unit": str,
    "samples": dict,
    "goals": list,
    "notes": list,
}
PATHS = ("event", "latency", "rpc", "http", "io-bound")


def check(document: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``document`` has the documented shape of ``latest.json``."""
    if not isinstance(document.get("meta"), dict) or not isinstance(document.get("rows"), list):
        raise ValueError("expected {'meta': {...}, 'rows': [...]}")
    for key in ("date", "machine", "versions", "settings"):
        if key not in document["meta"]:
            raise ValueError(f"meta has no {key!r}")
    for number_, row in enumerate(document["rows"]):
        where = f"row {number_}"
        for key, kind in ROW_FIELDS.items():
            if not isinstance(row.get(key), kind):
                raise ValueError(f"{where}: {key!r} must be a {kind.__name__}")
        if row["path"] not in PATHS:
            raise ValueError(f"{where}: unknown path {row['path']!r}")
        for key in (*SIDES, "ratio_raw", "ratio_faststream"):
            if key not in row or not (row[key] is None or isinstance(row[key], int | float)):
                raise ValueError(f"{where}: {key!r} must be a number or null")
        for side in SIDES:
            values = row["samples"].get(side)
            if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
                raise ValueError(f"{where}: samples[{side!r}] must be a list of numbers")

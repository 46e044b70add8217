"""What ``callcast compare`` writes: ``results.json``, the charts, ``report.html`` and a terminal table.

``results.json`` (format 1; scripts read it, so fields are only ever added)::

    {
      "format": 1,
      "created": "2025-01-01T12:00:00+00:00",
      "settings": {"duration": 4.0, "rate": 20.0, "target": "payments", "slow_seconds": 0.2, ...},
      "versions": {"callcast": "0.1.0", "python": "3.11.9", "platform": "...", "broker": "sqlite"},
      "styles": ["request", "event", "hybrid"],
      "scenarios": ["baseline", ...],
      "runs": [                                  # one per style × scenario
        {"style": "request", "scenario": "baseline",
         "requests_offered": 80, "requests_ok": 80, "requests_failed": 0, "statuses": {"201": 80},
         "availability": 1.0,                    # requests answered 2xx / offered, 0–1
         "throughput_rps": 19.9,                 # 2xx answers per second
         "latency_p50_ms": 23.2, "latency_p95_ms": ..., "latency_p99_ms": ..., "latency_max_ms": ...,
         "consistency_p50_ms": 0.0, "consistency_p99_ms": 0.0, "consistency_max_ms": 0.0,
         "orders_consistent": 80, "effects_expected": 320,
         "effects_lost": 0, "effects_duplicated": 0, "effects_orphaned": 0,
         "effects_dead_lettered": 0, "backlog_left": 0, "drain_seconds": 0.01,
         "injected_failures": 0, "fault_target": "payments", "fault_window_s": null,
         "generator_lag_max_ms": 2.0,
         "coupling": {"services": {"orders": {"knows": 4, "calls": [...], ...}, ...},
                      "blast_radius": 5, "blast_radius_services": [...]},
         "add_consumer": null | {"consumer": "loyalty", "producer_changed": true,
                                 "changed_services": [...], "changed_handlers": [...],
                                 "added_services": [...]},
         "timeline": [{"t": 0.0, "sent": 2, "failed": 0, "latency_p50_ms": ..., "latency_p95_ms": ...,
                       "backlog": 0}, ...],
         "latency_samples_ms": [...], "consistency_samples_ms": [...],
         "broker_cleanup": null | {...}}       # see below
      ],
      "failed_runs": [                           # one per style × scenario that raised; [] if none
        {"style": "hybrid", "scenario": "spike", "error": "BrokerUnavailableError: ...",
         "broker_cleanup": null | {...}}
      ],
      "verdict": ["Latency: event answers the user fastest ...", ...],
      "charts": {"latency": "latency.png", "availability": "availability.png", ...}
    }

``styles`` and ``scenarios`` list those of every run, failed ones included; ``runs`` holds only
the runs that completed (each with every figure), so the verdict and the charts rest on those.
``broker_cleanup`` is ``null`` where nothing outlives the run (the fresh embedded broker of the
default, ``memory://``); on a user's broker (``--broker``) it says what the run removed from it
(:mod:`callcast.lab.namespace`)::

    {"namespace": "callcast_lab_r0123456789ab",
     "removed": ["queue callcast_lab_r0123456789ab/OrderPlaced/emails.apply and its retry buckets",
                 ..., "exchange callcast_lab_r0123456789ab"],
     "not_removed": []}                          # else "what: why" for each

Definitions of the figures: :mod:`callcast.lab.metrics`. ``report.html`` embeds the PNGs as
``data:`` URIs, so it is one self-contained file that opens offline.
"""

from __future__ import annotations

import base64
import html
import json
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import callcast
from callcast.lab.charts import draw_all

FORMAT = 1
COLUMNS = (
    ("style", "style", None),
    ("scenario", "scenario", None),
    ("offered", "requests_offered", None),
    ("avail.", "availability", "pct"),
    ("p50", "latency_p50_ms", "ms"),
    ("p99", "latency_p99_ms", "ms"),
    ("consist. p50", "consistency_p50_ms", "ms"),
    ("consist. p99", "consistency_p99_ms", "ms"),
    ("missing", "effects_lost", None),
    ("dup.", "effects_duplicated", None),
    ("orphan", "effects_orphaned", None),
    ("backlog", "backlog_left", None),
    ("blast", "blast_radius", None),
)


def assemble(
    entries: Sequence[dict[str, Any]], settings: dict[str, Any], broker_scheme: str
) -> dict[str, Any]:
    """The ``results.json`` document of the matrix's ``entries`` (a failed run's has ``error``)."""
    from callcast.lab.verdict import verdict

    runs = [entry for entry in entries if "error" not in entry]
    return {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "versions": {
            "callcast": callcast.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "broker": broker_scheme,
        },
        "styles": list(dict.fromkeys(entry["style"] for entry in entries)),
        "scenarios": list(dict.fromkeys(entry["scenario"] for entry in entries)),
        "runs": runs,
        "failed_runs": [entry for entry in entries if "error" in entry],
        "verdict": verdict(runs) if runs else [],
        "charts": {},
    }


def write(results: dict[str, Any], out: Path) -> None:
    """Write the charts, ``results.json`` and ``report.html`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    charts = draw_all(results["runs"], out) if results["runs"] else {}
    results["charts"] = {name: path.name for name, path in charts.items()}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "report.html").write_text(render_html(results, charts))


def cell(run: dict[str, Any], key: str, unit: str | None) -> str:
    """One table cell of ``run``, formatted."""
    value = run["coupling"]["blast_radius"] if key == "blast_radius" else run.get(key)
    if value is None:
        return "–"
    if unit == "pct":
        return f"{100 * value:.1f}%"
    if unit == "ms":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    return str(value)


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs and the failed runs, in the order of the matrix (scenario by scenario)."""
    scenarios, styles = results["scenarios"], results["styles"]
    return sorted(
        [*results["runs"], *results["failed_runs"]],
        key=lambda run: (scenarios.index(run["scenario"]), styles.index(run["style"])),
    )


def cells(run: dict[str, Any]) -> list[str]:
    """A table row: the figures of a run; ``failed`` and dashes for a failed one."""
    if "error" in run:
        return [run["style"], run["scenario"], "failed", *("–" for _ in COLUMNS[3:])]
    return [cell(run, key, unit) for _header, key, unit in COLUMNS]


def print_table(results: dict[str, Any], console: Console) -> None:
    """The summary table, the failed runs with their reasons, and the verdict, on the terminal."""
    table = Table(title="callcast compare (latency and consistency in ms)")
    for header, _key, _unit in COLUMNS:
        table.add_column(header, justify="left" if header in ("style", "scenario") else "right")
    for run in rows(results):
        table.add_row(*cells(run))
    console.print(table)
    for run in results["failed_runs"]:
        console.print(f"FAILED {run['style']} / {run['scenario']}: {run['error']}", markup=False)
    for line in results["verdict"]:
        console.print(line, markup=False)


def render_html(results: dict[str, Any], charts: dict[str, Path]) -> str:
    """``report.html``: settings, table, verdict and the charts inline (no network)."""
    head = "".join(f"<th>{html.escape(header)}</th>" for header, _key, _unit in COLUMNS)
    body = "".join(
        f'<tr class="failed"><td>{html.escape(run["style"])}</td><td>{html.escape(run["scenario"])}</td>'
        f'<td colspan="{len(COLUMNS) - 2}">failed: {html.escape(run["error"])}</td></tr>'
        if "error" in run
        else "<tr>" + "".join(f"<td>{html.escape(text)}</td>" for text in cells(run)) + "</tr>"
        for run in rows(results)
    )
    verdict = "".join(f"<li>{html.escape(line.strip())}</li>" for line in results["verdict"])
    images = "".join(
        f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
        f'src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
        for name, path in charts.items()
    )
    settings = html.escape(json.dumps(results["settings"], indent=1))
    versions = html.escape(json.dumps(results["versions"], indent=1))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>callcast compare</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 75em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }}
td:nth-child(-n+2), th:nth-child(-n+2) {{ text-align: left; }}
tr.failed td:nth-child(3) {{ text-align: left; color: #b00; }}
img {{ max-width: 100%; }}
pre {{ background: #f6f6f6; padding: 0.5em; }}
</style></head><body>
<h1>callcast compare: request-driven, event-driven, hybrid</h1>
<p>Created {html.escape(results["created"])}. Latency and time to consistency in milliseconds;
availability is the share of user requests answered 2xx; lost, duplicated and orphaned count side
effects; blast radius is how many services' failure fails the user's request.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<h2>Verdict for this run</h2><ul>{verdict}</ul>
{images}
<h2>Settings</h2><pre>{settings}</pre>
<h2>Versions</h2><pre>{versions}</pre>
</body></html>
"""

"""``callcast compare``: the command line of the trade-off lab.

callcast compare [--broker URL] [--scenario NAME[+NAME]] ... [--style S] ... [--duration S] [--rate R]
                 [--target SERVICE] [--quick] --out DIR

Runs every style under every scenario (default: all), writes ``DIR/results.json``, the charts,
``DIR/report.html``, and prints the summary table and the verdict.

On a broker of the user's (``--broker``), each run's names live in a namespace of its own
(``callcast_lab_<run tag>``), which the run removes when it ends, fails or is interrupted; what was
removed, and what could not be, is printed on stderr as each run ends and kept in ``results.json``.

A run that fails does not stop the others: it is listed as failed, with its reason, in the table,
the report and ``results.json`` (``failed_runs``), and the rest are written as usual.

Exit status: 0 when every run completed; 1 when some failed (the report of the others is written);
2 when nothing could run (the options or the broker URL refused, the ``lab`` extra missing: the
reason on stderr); 130 when interrupted (Ctrl-C), after the run in progress removed its namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from callcast.brokers import redact
from callcast.lab import namespace, workflow
from callcast.lab.scenarios import PRESETS, parse_all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``callcast compare``."""
    parser.add_argument("--out", required=True, help="directory for results.json, report.html and the charts")
    parser.add_argument("--broker", help="a callcast broker URL (default: a fresh embedded broker per run)")
    parser.add_argument(
        "--scenario",
        action="append",
        help=f"a scenario, composable with + (repeatable; default all: {', '.join(PRESETS)})",
    )
    parser.add_argument("--style", action="append", choices=workflow.STYLES, help="a style (default: all)")
    parser.add_argument("--duration", type=float, help="seconds of load per run (default 20, --quick 4)")
    parser.add_argument("--rate", type=float, help="requests per second offered (default 30, --quick 20)")
    parser.add_argument("--target", choices=workflow.DOWNSTREAM, help="the downstream the faults hit")
    parser.add_argument("--quick", action="store_true", help="short runs: all in under 2 minutes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the comparison ``args`` describe; the exit status. (The charts and the terminal need the
    ``lab`` extra, matplotlib and rich, imported here so the rest of the command line does not.)"""
    try:
        from rich.console import Console

        from callcast.lab import report
        from callcast.lab.run import Settings, run_matrix
    except ImportError as error:
        needs = "callcast compare needs the lab extra (pip install 'callcast[lab]')"
        return _refuse(f"{needs}: {error}")
    overrides: dict[str, Any] = {
        name: value
        for name, value in (
            ("duration", args.duration),
            ("rate", args.rate),
            ("target", args.target),
            ("broker", args.broker),
        )
        if value is not None
    }
    try:
        settings = Settings.quick(**overrides) if args.quick else Settings(**overrides)
    except ValueError as error:
        return _refuse(f"callcast compare: {error}")
    scenarios = parse_all(args.scenario)
    styles = args.style or list(workflow.STYLES)
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    progress = Console(stderr=True)
    if settings.broker and namespace.applies(settings.broker):
        progress.print(
            f"each run keeps its names on {redact(settings.broker)} under a namespace of its own, "
            f"{namespace.PREFIX}<run tag>, and removes it when it ends",
            markup=False,
            highlight=False,
        )
    logging.getLogger("callcast").setLevel(logging.CRITICAL)  # injected faults are expected, not news
    entries = asyncio.run(
        run_matrix(styles, scenarios, settings, console=progress, progress_bars=not args.quiet)
    )
    broker_scheme = redact(settings.broker).split(":", 1)[0] if settings.broker else "sqlite"
    results = report.assemble(entries, settings.public(), broker_scheme)
    out = Path(args.out)
    report.write(results, out)
    report.print_table(results, console)
    console.print(f"\nwrote {out / 'results.json'}, {out / 'report.html'} and the charts", markup=False)
    if results["failed_runs"]:
        total = len(entries)
        console.print(f"{len(results['failed_runs'])} of {total} runs failed", markup=False)
        return 1
    return 0


def _refuse(message: str) -> int:
    """Nothing can run: say why on stderr; exit status 2 (1 means runs failed)."""
    print(message, file=sys.stderr)
    return 2

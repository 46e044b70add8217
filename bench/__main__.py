"""``python -m bench``: run the benchmark suite and write ``bench/results/latest.{json,md}``.

    python -m bench                          # full run (≤ 15 minutes on a 2-core machine)
    python -m bench --quick                  # smoke run (~2 minutes)
    python -m bench --only event,rpc --broker nats,redis

Paths: event, latency, rpc, http, io-bound, sqlite (the SQLite broker's backlog memory). Brokers:
rabbitmq, nats, redis, postgres (servers on 127.0.0.1; one that is down is skipped, and the output
says so), sqlite, memory (the http and io-bound paths use it). A run over every path and broker
writes ``latest.*``; a quick or selective run writes ``partial.*`` instead, so it never replaces the
figures of the last full run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.brokers import BROKERS, sweep
from bench.harness import Config, measure
from bench.paths import PATH_NAMES, measurements_for

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short trials, 1 repeat (~2 minutes)")
    parser.add_argument("--only", help=f"comma-separated paths, of: {', '.join(PATH_NAMES)}")
    parser.add_argument("--broker", help=f"comma-separated brokers, of: {', '.join(BROKERS)}")
    parser.add_argument("--repeats", type=int, help="rounds of alternating trials (default 3, quick 1)")
    parser.add_argument(
        "--window",
        type=int,
        default=64,
        help="publishes in flight on the event and io-bound paths (default 64)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the results")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (trial logs)")
    return parser.parse_args(argv)


def choose(value: str | None, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    if not value:
        return list(allowed)
    chosen = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths = choose(args.only, PATH_NAMES, "path")
    wanted = choose(args.broker, list(BROKERS), "broker")
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1 or args.window < 1:
        raise SystemExit("--repeats and --window must be at least 1")
    skipped = {
        name: f"server down on 127.0.0.1:{BROKERS[name].port}"
        for name in wanted
        if not BROKERS[name].available()
    }
    brokers = [name for name in wanted if name not in skipped]
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="callcast-bench-"))
    config = Config(
        workdir=workdir,
        prefix="ccb" + secrets.token_hex(3),
        repeats=repeats,
        quick=args.quick,
        window=args.window,
        log=lambda line: print(line, flush=True),
    )
    started_at = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    try:
        for path in paths:
            for measurement in measurements_for(path, config, brokers):
                print(f"{path} / {measurement.broker} ({time.monotonic() - started:.0f}s)", flush=True)
                rows.extend(measure(measurement, config))
                clean(measurement.broker, config.prefix)
    finally:
        for name in brokers:
            clean(name, config.prefix)
    full = not (args.quick or args.only or args.broker or args.window != 64 or args.repeats not in (None, 3))
    settings = {
        "quick": args.quick,
        "repeats": repeats,
        "window": args.window,
        "paths": paths,
        "brokers": brokers,
        "skipped": skipped,
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    document = {"meta": report.meta(settings, started_at, time.monotonic() - started), "rows": rows}
    stem_dir = args.out
    json_path, md_path = report.write(document, stem_dir) if full else write_partial(document, stem_dir)
    print()
    print(report.markdown(document))
    print(f"written: {json_path} and {md_path}")
    failed = any(
        "FAILED" in note or "stopped after" in note or "exit " in note
        for row in rows
        for note in row["notes"]
    )
    if args.keep or failed:
        print(f"trial logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def write_partial(document: dict[str, Any], directory: Path) -> tuple[Path, Path]:
    """A quick or selective run's results, as ``partial.*`` next to ``latest.*``."""
    json_path, md_path = report.write(document, directory / ".partial")
    targets = directory / "partial.json", directory / "partial.md"
    json_path.replace(targets[0])
    md_path.replace(targets[1])
    (directory / ".partial").rmdir()
    return targets


def clean(broker: str, prefix: str) -> None:
    """Sweep what this run created on ``broker``; a failure is reported, not fatal."""
    try:
        asyncio.run(sweep(broker, prefix))
    except Exception as error:
        print(f"warning: cleaning {broker} failed: {error!r}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""The embedded SQLite broker's memory with a backlog (issue 5, point 3): ``count`` events are
published in batches of 1,000 with nobody consuming; then a worker process (the ``sink`` service
alone, callcast's defaults) drains them for a bounded time while the harness samples its resident
memory from /proc. One round, whatever ``--repeats`` says (it is long, and its figures vary
little). Rows (path ``event``, broker ``sqlite``): the worker's peak RSS (``VmHWM``, MB), its drain
rate and the backlog's publish rate. Its durable end-to-end throughput and latency are the
``event`` and ``latency`` rows of broker ``sqlite``."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

from bench.backlog import rss_mb
from bench.harness import Config, Measurement, run_in_process

BATCH = 1_000


def measurements(config: Config, brokers: list[str]) -> list[Measurement]:
    if "sqlite" not in brokers:
        return []
    count, seconds = (20_000, 15.0) if config.quick else (100_000, 30.0)

    def trial(side: str) -> dict[str, Any]:
        namespace = config.namespace()
        published = run_in_process(
            config, namespace, "backlog-publish", side, "sqlite", {"count": count, "batch": BATCH}, 300.0
        )
        sampled: list[float] = []
        watcher: list[threading.Thread] = []

        def watch(process: subprocess.Popen[bytes]) -> None:
            def sample() -> None:
                while process.poll() is None:
                    value = rss_mb(process.pid)
                    if value is not None:
                        sampled.append(value)
                    threading.Event().wait(0.1)

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            watcher.append(thread)

        drained = run_in_process(
            config,
            namespace,
            "backlog-drain",
            side,
            "sqlite",
            {"count": count, "seconds": seconds},
            seconds + 60.0,
            on_start=watch,
        )
        for thread in watcher:
            thread.join(timeout=5.0)
        notes = [*published.get("notes", []), *drained.get("notes", [])]
        if sampled:
            notes.append(f"sampled RSS max {max(sampled):.0f} MB over {len(sampled)} samples")
        return {**published, **drained, "notes": notes}

    return [
        Measurement(
            "event",
            "sqlite",
            (("worker_peak_rss", "MB"), ("drain_rate", "msg/s"), ("publish_rate", "msg/s")),
            {"callcast": f"callcast worker, {count:,} events backlogged"},
            trial,
            repeats=1,  # one long trial: ~100 s of the 15-minute budget would buy two more alike figures
        )
    ]

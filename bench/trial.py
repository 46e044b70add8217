"""One trial in a fresh process: ``python -m bench.trial SPEC.json RESULT.json``.

The spec names the ``workload`` (``throughput``, ``latency``, ``rpc``, ``backlog-publish``,
``backlog-drain``), the ``side`` (``callcast``, ``raw``, ``faststream``), the ``broker``, the
trial's ``namespace``, the ``workdir`` and the workload's ``params``. The figures (see
:mod:`bench.workloads`) are written to RESULT.json; anything the process prints (FastStream's
logging, say) goes wherever the harness sent its output (a log file).

Every trial runs on uvloop when it is installed, as ``callcast run`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from bench import backlog, workloads
from bench.sides import pipe, rpc_pair
from callcast.waiting import within

CLOSE_TIMEOUT = 15.0


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    workload, side, broker = spec["workload"], spec["side"], spec["broker"]
    namespace, workdir, params = spec["namespace"], Path(spec["workdir"]), dict(spec["params"])
    if workload == "backlog-publish":
        return await backlog.publish(namespace, workdir, **params)
    if workload == "backlog-drain":
        return await backlog.drain(namespace, workdir, **params)
    if workload == "rpc":
        pair = rpc_pair(side, broker, namespace, workdir)
        if pair is None:
            raise SystemExit(f"{side} has no RPC on {broker}")
        try:
            return await workloads.rpc(pair, **params)
        finally:
            with contextlib.suppress(Exception):
                await within(pair.close(), CLOSE_TIMEOUT)
    options = {"concurrency": params.pop("concurrency")} if "concurrency" in params else {}
    events = pipe(side, broker, namespace, workdir, options)
    if events is None:
        raise SystemExit(f"{side} has no event path on {broker}")
    try:
        if workload == "throughput":
            return await workloads.throughput(events, **params)
        if workload == "latency":
            return await workloads.latency(events, **params)
        raise SystemExit(f"unknown workload {workload!r}")
    finally:
        with contextlib.suppress(Exception):
            await within(events.close(), CLOSE_TIMEOUT)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    try:
        import uvloop
    except ImportError:
        figures = asyncio.run(run(spec))
    else:
        figures = uvloop.run(run(spec))
    Path(argv[2]).write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

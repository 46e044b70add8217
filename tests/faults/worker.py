"""A child process of the fault scenarios: some services of a scenario's app, on a broker wrapped by
:class:`callcast.testing.faults.FaultyBroker` when ``$CALLCAST_FAULTS`` asks for faults.

    python -m tests.faults.worker --module tests.faults.kills --run RUN --service NAME \\
        --broker URL --data-dir DIR --stats FILE [--config JSON] [--grace SECONDS]

Like ``callcast run ... --no-http``, except that it builds the app with ``MODULE.build(RUN, CONFIG)``
(fresh names per run) and passes ``App.start`` a broker object. Prints ``faults-worker: ready`` once
the services run; on SIGTERM/SIGINT it stops like ``callcast run`` and writes its consumers' stats
(``{group: {outcome: count}}``) to ``--stats``.

For a worker that seems stuck: ``kill -USR1 <pid>`` prints every thread's stack to its log,
``kill -USR2 <pid>`` every asyncio task's chain of awaits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from callcast import App
from callcast.brokers import connect
from callcast.consumer import Consumer
from callcast.testing.faults import FaultyBroker, active_plan
from callcast.transport import Broker

READY = "faults-worker: ready"


async def run(args: argparse.Namespace) -> None:
    module = importlib.import_module(args.module)
    app: App = module.build(args.run, json.loads(args.config))
    inner = await connect(args.broker)
    plan = active_plan()
    broker: Broker = FaultyBroker(inner, plan) if plan is not None else inner
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, dump_tasks)  # kill -USR2 <pid>: every asyncio task's stack
    try:
        runtime = await app.start(broker=broker, services=args.service, data_dir=args.data_dir)
        consumers = [item for item in runtime._consumers if isinstance(item, Consumer)]
        try:
            print(f"{READY} pid={os.getpid()} plan={plan!r}", flush=True)
            await stop.wait()
        finally:
            await runtime.stop(grace=args.grace)
        stats = {consumer.handler.group: dict(consumer.stats) for consumer in consumers}
        await asyncio.to_thread(Path(args.stats).write_text, json.dumps(stats))
    finally:
        await broker.close()
    print("faults-worker: stopped", flush=True)


def dump_tasks() -> None:
    """Print every asyncio task with the chain of awaits it is suspended in (innermost last)."""
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", flush=True)
        awaited: object = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                print(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.worker")
    parser.add_argument("--module", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--service", action="append", required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--config", default="{}")
    parser.add_argument("--grace", type=float, default=5.0)
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: every thread's stack
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fault suite's command line: run the scenarios on one or more brokers, print the figures.

See :mod:`tests.faults` for what it measures and how to run it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from callcast.brokers import connect, redact
from tests.brokers.conftest import server_is_up
from tests.real_brokers import BROKERS, HOST, new_run

from . import kills, ordering, outbox, poison
from .harness import Env, Result, render

SCENARIOS: dict[str, ModuleType] = {
    "kills": kills,
    "poison": poison,
    "ordering": ordering,
    "outbox": outbox,
}
SQLITE = "sqlite"
"""``--broker sqlite``: a fresh SQLite broker file (``?lease=1``) in each scenario's temp dir."""
SERVERS: dict[str, str] = {"rabbitmq": "", "nats": "&ack_wait=2", "redis": "", "postgres": "&lease=2"}
"""``--broker NAME`` (``all``: SQLite and every one): this machine's servers (see
:mod:`tests.real_brokers`), each scenario in a namespace of its own that is swept afterwards, with
these URL options on top: short leases, so a killed consumer's deliveries go to another one soon
(the adapters' defaults of 10-30 s make every kill that slow; Redis's namespaced URL has lease=2
already, RabbitMQ gives them back when the connection drops)."""


def sqlite_url(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'broker.db').resolve()}?lease=1"


async def reachable(url: str) -> str | None:
    """None if ``connect(url)`` works, else why not."""
    try:
        broker = await asyncio.wait_for(connect(url), 15.0)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    with contextlib.suppress(Exception):
        await asyncio.wait_for(broker.close(), 10.0)
    return None


async def run_scenario(
    name: str,
    *,
    broker: str = SQLITE,
    workdir: Path,
    seed: int,
    full: bool,
    progress: Callable[[str], None] = lambda message: None,
) -> Result:
    """One scenario on one broker, full or short sizes. ``broker``: ``sqlite`` (a fresh file under
    ``workdir``), a name of :data:`SERVERS` (a namespace of its own, swept afterwards) or a URL
    (used as it is: what the scenario creates there stays)."""
    module = SCENARIOS[name]
    params: Any = module.FULL if full else module.SHORT
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    namespace = new_run()
    if broker == SQLITE:
        url = sqlite_url(workdir)
    elif broker in SERVERS:
        url = BROKERS[broker].url(namespace) + SERVERS[broker]
    else:
        url = broker
    env = Env(
        broker_url=url,
        workdir=workdir,
        run=secrets.token_hex(4),
        seed=seed,
        time_limit=params.time_limit,
        progress=lambda message: progress(f"{name}: {message}"),
    )
    try:
        result: Result = await module.scenario(env, params)
    finally:
        if broker in SERVERS:
            await BROKERS[broker].cleanup(namespace)
    result.broker = redact(url) if broker != SQLITE else "sqlite (fresh file, lease=1)"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults",
        description="callcast's fault-injection suite: the reliability figures.",
    )
    parser.add_argument(
        "--broker",
        action="append",
        help="'sqlite' (a fresh file per scenario; the default), a server of this machine ("
        + ", ".join(SERVERS)
        + "), 'all' (all of them) or a broker URL (repeatable)",
    )
    parser.add_argument("--full", action="store_true", help="full sizes (default: the short ones of pytest)")
    parser.add_argument(
        "--scenario", action="append", choices=list(SCENARIOS), help="only these (repeatable)"
    )
    parser.add_argument("--seed", type=int, help="seed of the schedules and data (default: random)")
    parser.add_argument("--keep", type=Path, help="keep the work files (logs, databases) in this directory")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    brokers: list[str] = []
    for item in args.broker or [SQLITE]:
        for broker in [SQLITE, *SERVERS] if item == "all" else [item]:
            if broker not in brokers:
                brokers.append(broker)
    names = args.scenario or list(SCENARIOS)
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    command = ["python", "-m", "tests.faults"]
    for broker in brokers:
        command += ["--broker", broker]
    command += [*(["--full"] if args.full else []), "--seed", str(seed)]
    for name in args.scenario or []:
        command += ["--scenario", name]

    results: list[Result] = []
    skipped: list[str] = []
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="callcast-faults-")) if args.keep is None else args.keep
    try:
        for broker in brokers:
            why = _unreachable(broker)
            if why is not None:
                skipped.append(f"{redact(broker)}: skipped, {why}")
                progress(skipped[-1])
                continue
            for index, name in enumerate(names):
                workdir = root / f"{_slug(broker)}-{name}"
                progress(f"{name} on {redact(broker)}: starting (work files in {workdir})")
                result = asyncio.run(
                    run_scenario(
                        name,
                        broker=broker,
                        workdir=workdir,
                        seed=seed + index,
                        full=args.full,
                        progress=progress,
                    )
                )
                verdict = "ok" if result.ok else "FAILED"
                progress(f"{name} on {redact(broker)}: {result.elapsed:.1f}s, {verdict}")
                results.append(result)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"callcast fault-injection figures ({'full' if args.full else 'short'} sizes, seed {seed})")
    print(f"reproduce: .venv/bin/{shlex.join(command)}")
    by_broker: dict[str, list[Result]] = {}
    for result in results:
        by_broker.setdefault(result.broker, []).append(result)
    for broker, group in by_broker.items():
        print()
        print(f"broker: {broker}")
        print()
        print(render(group))
        for result in group:
            for note in result.notes:
                print(f"  note ({result.scenario}): {note}")
    for line in skipped:
        print(line)
    failed = [result for result in results if not result.ok]
    print()
    print(
        f"{len(results)} scenario run(s) in {time.monotonic() - began:.0f}s; "
        + (
            f"{len(failed)} with figures off their expected value"
            if failed
            else "every checked figure as expected"
        )
    )
    return 1 if failed else 0


def _unreachable(broker: str) -> str | None:
    """Why ``broker`` cannot be used, or None."""
    if broker == SQLITE:
        return None
    if broker in SERVERS:
        target = BROKERS[broker]
        return None if server_is_up(HOST, target.port) else f"nothing listens on {HOST}:{target.port}"
    why = asyncio.run(reachable(broker))
    return None if why is None else f"connect() failed: {why}"


def _slug(broker: str) -> str:
    return broker.split(":", 1)[0]

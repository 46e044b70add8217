"""The ``callcast`` command.

callcast run MODULE:APP [--broker URL] [--service NAME]... [--host H] [--port P] [--no-http]
                        [--data-dir DIR] [--database SERVICE=URL]... [--service-url SERVICE=URL]...
                        [--grace S] [--log-level LEVEL]
callcast topology MODULE:APP [--json]
callcast openapi MODULE:APP [--out FILE]
callcast dlq list|show|replay|purge ... [--broker URL]
callcast compare ... --out DIR             (the lab: ``callcast compare --help``)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from callcast import correlation, dlq, openapi
from callcast.app import App
from callcast.brokers import DEFAULT_URL, connect, default_url, redact
from callcast.exceptions import CallcastError
from callcast.lab import command as lab_command
from callcast.topology import describe, render
from callcast.transport import Broker

log = logging.getLogger("callcast")


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (the current directory is importable) and check it is an App."""
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise SystemExit(f"callcast: expected MODULE:APP, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    app = getattr(module, attribute or "app", None)
    if not isinstance(app, App):
        raise SystemExit(f"callcast: {spec!r} is not a callcast App")
    return app


SECOND_SIGNAL_AFTER = 2.0
"""Seconds after the first signal from which a second one ends the process at once (a process
manager may send SIGTERM right after the terminal's SIGINT: that pair is one request to stop)."""

STOP_MARGIN = 30.0
"""Seconds a stop may take past its grace period (closing connections, draining outboxes) before
``callcast run`` gives up on it and exits with an error."""


def service_map(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``SERVICE=URL`` arguments of ``flag`` as a dict; ``SystemExit`` naming the bad one."""
    mapping: dict[str, str] = {}
    for item in items or []:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise SystemExit(f"callcast: {flag} takes SERVICE=URL, got {redact(item)!r}")
        mapping[name] = url
    return mapping


async def _run(args: argparse.Namespace) -> None:
    """Run the app until SIGINT or SIGTERM, then stop it. A signal while it starts stops the start;
    a second signal ends the process at once (exit 130), without finishing the stop."""
    app = load_app(args.app)
    broker_url = args.broker or default_url()
    databases = service_map(args.database, "--database")
    service_urls = service_map(args.service_url, "--service-url")
    unknown = sorted((databases.keys() | service_urls.keys()) - app.services.keys())
    if unknown:
        names = ", ".join(unknown)
        raise SystemExit(f"callcast: --database/--service-url name no service of {args.app}: {names}")
    stop = asyncio.Event()
    first_signal_at: list[float] = []

    def on_signal() -> None:
        if not first_signal_at:
            first_signal_at.append(time.monotonic())
        elif time.monotonic() - first_signal_at[0] >= SECOND_SIGNAL_AFTER:
            print(
                "callcast: second signal: exiting now, without finishing the stop",
                file=sys.stderr,
                flush=True,
            )
            os._exit(130)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    starting = asyncio.create_task(
        app.start(
            broker=broker_url,
            services=args.service or None,
            data_dir=args.data_dir,
            databases=databases,
            service_urls=service_urls,
        )
    )
    signalled = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal while starting: the start stops what it started
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        print("callcast: stopped while starting", flush=True)
        return
    signalled.cancel()
    runtime = starting.result()
    try:
        names = ", ".join(service.name for service in runtime.running_services)
        print(f"callcast: running {names} on {redact(broker_url)}", flush=True)
        if not args.no_http:
            await runtime.serve_http(args.host, args.port)
            print(f"callcast: serving HTTP on http://{args.host}:{runtime.http_port}", flush=True)
        await stop.wait()
        print("callcast: stopping (in-flight work finishes, the rest goes back to the broker)", flush=True)
    finally:
        try:
            async with asyncio.timeout(args.grace + STOP_MARGIN):
                await runtime.stop(grace=args.grace)
        except TimeoutError:
            raise SystemExit(
                f"callcast: the stop did not finish within {args.grace + STOP_MARGIN:g}s"
            ) from None
    print("callcast: stopped", flush=True)


async def _dlq(args: argparse.Namespace) -> int:
    broker = await connect(args.broker or default_url())
    try:
        async with dlq.browse(broker) as letters:
            chosen = [letter for letter in letters if letter.matches(args.service, args.event)]
            if args.action in ("replay", "purge", "show"):
                if args.ids:
                    wanted = set(args.ids)
                    chosen = [letter for letter in chosen if letter.id in wanted]
                    missing = wanted - {letter.id for letter in chosen}
                    if missing:
                        print(
                            f"callcast: no dead letter with id {', '.join(sorted(missing))}", file=sys.stderr
                        )
                        return 1
                elif args.action == "show" or not args.all:
                    print("callcast: name the dead letters by id, or use --all", file=sys.stderr)
                    return 2
            return await _dlq_act(args.action, chosen, broker, as_json=getattr(args, "json", False))
    finally:
        await broker.close()


async def _dlq_act(action: str, letters: list[dlq.DeadLetterView], broker: Broker, *, as_json: bool) -> int:
    if action == "list":
        if as_json:
            rows = [{"id": x.id, "type": x.envelope.type, **dict(x.envelope.extensions)} for x in letters]
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{len(letters)} dead letter(s)")
        for (subscriber, error_type), count in dlq.summarize(letters).most_common():
            print(f"  {count:>6}  {subscriber:<40} {error_type}")
        if letters:
            print()
            print(f"  {'id':<36}  {'subscriber':<28} {'type':<22} {'reason':<11} {'tries':>5}  last failure")
            for x in letters:
                print(
                    f"  {x.id:<36}  {x.subscriber:<28} {x.envelope.type:<22} {x.diagnostic('dlqreason'):<11} "
                    f"{x.diagnostic('dlqattempts'):>5}  {x.diagnostic('dlqtime')}"
                )
        return 0
    if action == "show":
        for x in letters:
            print(f"id        {x.id}\ntype      {x.envelope.type}\nsource    {x.envelope.source}")
            print(f"time      {x.envelope.time}")
            for name, value in sorted(x.envelope.extensions.items()):
                if name != "dlqtraceback":
                    print(f"{name:<16}{value}")
            print("data")
            print("  " + x.envelope.data.decode("utf-8", "replace"))
            if x.diagnostic("dlqtraceback"):
                print("traceback (end)")
                print(x.diagnostic("dlqtraceback"))
        return 0
    replayed: set[tuple[str, str]] = set()
    copies = 0
    for x in letters:
        if action == "replay" and (x.id, x.subscriber) in replayed:
            await dlq.purge(x)  # a second copy (a crash between storing and acking): replayed once
            copies += 1
        elif action == "replay":
            await dlq.replay(broker, x)
            replayed.add((x.id, x.subscriber))
        else:
            await dlq.purge(x)
    verb = "replayed" if action == "replay" else "purged"
    print(
        f"{verb} {len(letters) - copies} dead letter(s)"
        + (f"; {copies} duplicate copies purged" if copies else "")
    )
    return 0


def _openapi(spec: str, out: str | None) -> None:
    text = json.dumps(openapi.document(load_app(spec)), indent=2)
    if out is None:
        print(text)
    else:
        Path(out).write_text(text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callcast", description="Services that talk both ways.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the services of an app in this process")
    run.add_argument("app", help="MODULE:APP, e.g. examples.shop:app")
    run.add_argument("--broker", help=f"broker URL (default $CALLCAST_BROKER, else {DEFAULT_URL})")
    run.add_argument("--service", action="append", help="run only this service (repeatable)")
    run.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    run.add_argument("--no-http", action="store_true", help="do not serve HTTP (event/RPC workers)")
    run.add_argument("--data-dir", help="where services keep their files (default .callcast)")
    run.add_argument(
        "--database",
        action="append",
        metavar="SERVICE=URL",
        help="a service's database (sqlite:///path.db or postgresql://...; default a file in --data-dir)",
    )
    run.add_argument(
        "--service-url",
        action="append",
        metavar="SERVICE=URL",
        help="call this service's RPC endpoints over HTTP at URL (repeatable; default: over the broker)",
    )
    run.add_argument("--grace", type=float, default=10.0, help="seconds in-flight work gets on stop")
    run.add_argument("--log-level", default="WARNING")

    described = commands.add_parser("openapi", help="print the OpenAPI 3.1 document of an app's HTTP side")
    described.add_argument("app", help="MODULE:APP")
    described.add_argument("--out", help="write it to this file instead of printing it")

    compare = commands.add_parser("compare", help="measure request-driven vs event-driven vs hybrid")
    lab_command.add_arguments(compare)

    topology = commands.add_parser("topology", help="print who serves, calls, publishes and consumes what")
    topology.add_argument("app", help="MODULE:APP")
    topology.add_argument("--json", action="store_true", help="print as JSON")

    dead = commands.add_parser("dlq", help="list, show, replay or purge dead letters")
    actions = dead.add_subparsers(dest="action", required=True)
    for action, help_text in [
        ("list", "list dead letters, grouped by subscriber and error"),
        ("show", "show one dead letter with its diagnostics"),
        ("replay", "send dead letters back to their subscriber (attempts start again)"),
        ("purge", "delete dead letters"),
    ]:
        sub = actions.add_parser(action, help=help_text)
        sub.add_argument("--broker", help="broker URL (default $CALLCAST_BROKER or the embedded broker)")
        if action != "show":
            sub.add_argument("--service", help="only dead letters of this service's handlers")
            sub.add_argument("--event", help="only dead letters of this event type")
        if action == "list":
            sub.add_argument("--json", action="store_true", help="print as JSON")
        else:
            sub.add_argument("ids", nargs="*" if action != "show" else 1, metavar="ID")
        if action in ("replay", "purge"):
            sub.add_argument("--all", action="store_true", help="every (matching) dead letter")

    args = parser.parse_args(argv)
    for name in ("service", "event", "ids", "all"):
        if not hasattr(args, name):
            setattr(args, name, None)
    try:
        if args.command == "run":
            logging.basicConfig(level=args.log_level.upper(), format=correlation.LOG_FORMAT)
            for handler in logging.getLogger().handlers:
                handler.addFilter(correlation.CorrelationFilter())
            try:
                import uvloop

                uvloop.install()
            except ImportError:
                pass
            asyncio.run(_run(args))
        elif args.command == "openapi":
            _openapi(args.app, args.out)
        elif args.command == "dlq":
            return asyncio.run(_dlq(args))
        elif args.command == "compare":
            return lab_command.run(args)
        else:
            app = load_app(args.app)
            print(json.dumps(describe(app), indent=2) if args.json else render(app))
    except CallcastError as error:
        print(f"callcast: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

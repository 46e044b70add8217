"""The ``callcast`` command.

callcast run MODULE:APP [--broker URL] [--service NAME ...] [--host H] [--port P] [--no-http]
callcast topology MODULE:APP [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from callcast.app import App
from callcast.brokers import default_url, redact
from callcast.exceptions import CallcastError
from callcast.topology import describe, render

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


async def _run(args: argparse.Namespace) -> None:
    app = load_app(args.app)
    broker_url = args.broker or default_url()
    runtime = await app.start(broker=broker_url, services=args.service or None, data_dir=args.data_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        names = ", ".join(service.name for service in runtime.running_services)
        print(f"callcast: running {names} on {redact(broker_url)}", flush=True)
        if not args.no_http:
            await runtime.serve_http(args.host, args.port)
            print(f"callcast: serving HTTP on http://{args.host}:{runtime.http_port}", flush=True)
        await stop.wait()
        print("callcast: stopping (in-flight work finishes, the rest goes back to the broker)", flush=True)
    finally:
        await runtime.stop(grace=args.grace)
    print("callcast: stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callcast", description="Services that talk both ways.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the services of an app in this process")
    run.add_argument("app", help="MODULE:APP, e.g. examples.shop:app")
    run.add_argument("--broker", help=f"broker URL (default $CALLCAST_BROKER or {default_url()})")
    run.add_argument("--service", action="append", help="run only this service (repeatable)")
    run.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    run.add_argument("--no-http", action="store_true", help="do not serve HTTP (event/RPC workers)")
    run.add_argument("--data-dir", help="where services keep their files (default .callcast)")
    run.add_argument("--grace", type=float, default=10.0, help="seconds in-flight work gets on stop")
    run.add_argument("--log-level", default="WARNING")

    topology = commands.add_parser("topology", help="print who serves, calls, publishes and consumes what")
    topology.add_argument("app", help="MODULE:APP")
    topology.add_argument("--json", action="store_true", help="print as JSON")

    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            logging.basicConfig(
                level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
            try:
                import uvloop

                uvloop.install()
            except ImportError:
                pass
            asyncio.run(_run(args))
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

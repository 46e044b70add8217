"""``http``: wrk (64 connections, 1 thread, so the server keeps the other core) against
``POST /orders`` served by uvicorn in a fresh subprocess per trial, 1 worker, uvloop (and httptools
if installed), access log off, log level warning, on 127.0.0.1: callcast's route under
``callcast run`` (memory broker), the same route in plain Starlette (the ``raw`` column) and in
FastAPI (the ``faststream`` column). Each trial warms up with a short wrk run first."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Config, Measurement, TrialError, stop_process
from bench.http.wrk import ensure_wrk, post_script, run_wrk

HTTP_SIDES = {
    "callcast": "callcast run (memory broker)",
    "raw": "Starlette + pydantic",
    "faststream": "FastAPI (in the faststream column)",
}
UVICORN_OPTIONS = [
    "--log-level",
    "warning",
    "--no-access-log",
    "--loop",
    "auto",
    "--http",
    "auto",
    "--workers",
    "1",
]


def server_command(side: str, port: int, workdir: Path) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if side == "callcast":
        return [
            str(bin_dir / "callcast"), "run", "bench.http.callcast_app:app", "--broker", "memory://",
            "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(workdir / f"http-{port}"),
        ]  # fmt: skip
    module = {"raw": "bench.http.starlette_app:app", "faststream": "bench.http.fastapi_app:app"}[side]
    return [
        sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port", str(port), *UVICORN_OPTIONS,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TrialError(f"server exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TrialError(f"server did not listen on {port} within {timeout:.0f}s")


def measurements(config: Config, brokers: list[str]) -> list[Measurement]:
    if "memory" not in brokers:  # callcast's side runs on the memory broker
        return []
    wrk = ensure_wrk(config.log)
    if wrk is None:
        return []
    seconds, warmup = (2, 1) if config.quick else (3, 1)
    script = post_script(config.workdir)
    logs = config.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    def trial(side: str) -> dict[str, Any]:
        port = free_port()
        with (logs / f"http-{side}-{port}.log").open("wb") as output:
            server = subprocess.Popen(
                server_command(side, port, config.workdir),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )
            try:
                wait_listening(port, server)
                url = f"http://127.0.0.1:{port}/orders"
                run_wrk(wrk, url, script, seconds=warmup)
                return run_wrk(wrk, url, script, seconds=seconds)
            except RuntimeError as error:
                raise TrialError(str(error)) from None
            finally:
                stop_process(server)

    return [
        Measurement(
            "http",
            "uvicorn",
            (("throughput", "req/s"), ("p50", "ms"), ("p99", "ms")),
            HTTP_SIDES,
            trial,
        )
    ]

"""Real ``callcast run`` processes for end-to-end tests: start, wait until ready, stop by PID.

Every process is started by this module with its own log file, and is stopped through its own
``Popen`` handle (SIGTERM, then wait; SIGKILL only if it does not stop in time). Nothing here ever
signals a process it did not start.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
_SERVING = re.compile(r"serving HTTP on http://127\.0\.0\.1:(\d+)")
_RUNNING = "callcast: running "

T = TypeVar("T")


def callcast_command() -> list[str]:
    """The ``callcast`` console script of this interpreter's environment (or ``python -m``)."""
    script = Path(sys.executable).parent / "callcast"
    if script.exists():
        return [str(script)]
    found = shutil.which("callcast")
    return [found] if found else [sys.executable, "-m", "callcast.cli"]


def sqlite_url(path: Path, **options: object) -> str:
    """``sqlite:////abs/path.db?lease=1``: the embedded broker on ``path``."""
    query = "&".join(f"{key}={value}" for key, value in options.items())
    return f"sqlite:///{path.resolve()}" + (f"?{query}" if query else "")


def wait_until(
    predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.01, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what or predicate!r}")
        time.sleep(interval)


def undelivered(broker_db: Path, groups: Sequence[str]) -> int:
    """Deliveries of ``groups`` not yet acknowledged, read from the SQLite broker's file (its
    ``deliveries`` table holds one row per group and message until the ack)."""
    conn = sqlite3.connect(broker_db, timeout=10)
    try:
        marks = ",".join("?" * len(groups))
        query = f"SELECT count(*) FROM deliveries WHERE grp IN ({marks})"
        return int(conn.execute(query, list(groups)).fetchone()[0])
    finally:
        conn.close()


class CallcastProcess:
    """One ``callcast run APP`` process. Restartable: each start gets a fresh log file."""

    def __init__(
        self,
        app: str,
        *,
        broker_url: str,
        data_dir: Path,
        log_dir: Path,
        name: str = "callcast",
        services: Sequence[str] = (),
        http: bool = True,
        port: int = 0,
        grace: float = 5.0,
    ) -> None:
        self.app = app
        self.broker_url = broker_url
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.name = name
        self.services = tuple(services)
        self.http = http
        self.port = port
        self.grace = grace
        self.popen: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.starts = 0
        self.returncodes: list[int] = []

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} is not started"
        return self.popen.pid

    @property
    def url(self) -> str:
        assert self.http, f"{self.name} serves no HTTP"
        assert self.port, f"{self.name} has not started serving"
        return f"http://{HOST}:{self.port}"

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def start(self, timeout: float = 20.0) -> CallcastProcess:
        """Start the process and return once it runs its services (and serves HTTP, if asked)."""
        assert not self.running(), f"{self.name} is already running"
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{self.name}-{self.starts}.log"
        args = [*callcast_command(), "run", self.app, "--broker", self.broker_url]
        args += ["--data-dir", str(self.data_dir), "--grace", str(self.grace)]
        for service in self.services:
            args += ["--service", service]
        args += ["--host", HOST, "--port", str(self.port)] if self.http else ["--no-http"]
        env = {key: value for key, value in os.environ.items() if not key.startswith("CALLCAST_")}
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if self.http:
                match = _SERVING.search(text)
                if match:
                    self.port = int(match.group(1))
                    break
            elif _RUNNING in text:
                break
            if self.popen.poll() is not None:
                self.returncodes.append(self.popen.returncode)
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode} on start:\n{text}")
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start within {timeout}s:\n{text}")
            time.sleep(0.01)
        if self.http:
            self.wait_healthy(deadline - time.monotonic())
        return self

    def wait_healthy(self, timeout: float) -> None:
        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1.0, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=max(timeout, 0.5), what=f"{self.url}/healthz")

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL (and an AssertionError) if it does not exit within ``timeout``."""
        assert self.popen is not None, f"{self.name} was never started"
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                self.returncodes.append(self.popen.returncode)
                raise AssertionError(f"{self.name} ignored SIGTERM for {timeout}s") from None
        self.returncodes.append(self.popen.returncode)
        return self.popen.returncode

    def kill9(self) -> None:
        """``kill -9`` this process (by its PID) and reap it."""
        assert self.popen is not None, f"{self.name} was never started"
        assert self.popen.poll() is None, f"{self.name} is not running"
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self.returncodes.append(self.popen.returncode)

    def stop(self) -> None:
        """Best-effort cleanup for fixtures: stop the process if it is still running."""
        if self.popen is None or self.popen.poll() is not None:
            return
        with contextlib.suppress(AssertionError):  # it was SIGKILLed after the timeout
            self.terminate(timeout=10.0)

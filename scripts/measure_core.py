"""Measure the shop demo end to end on the embedded SQLite broker, as a real server process.

    .venv/bin/python scripts/measure_core.py [--signups 200] [--orders 50] [--load 1000] ...

Run from anywhere; the server runs with the repo root as its working directory, on 127.0.0.1 only,
with its broker file and data dir in a temporary directory. Phases:

a. sign-ups one after another: time from the 201 until ``GET /emails?to=`` lists the welcome email;
b. orders: time from the 201 until the order is ``confirmed``; one short-stock order → ``rejected``;
c. concurrent sign-ups while the server is ``kill -9``-ed once and restarted on the same port,
   broker and data dir; a failed sign-up is retried (same address) once the server is back. Then,
   once every 201 has its email and the emails group is drained: 201s, failures, losses (201
   without email), addresses emailed twice, redeliveries the emails service's inbox recognised
   (``callcast_inbox.duplicates``), and users stored without their event (must be 0: the user row
   and its event commit together through the outbox);
d. ``callcast topology examples.shop:app``.

Every process it starts is stopped by its PID before it exits; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
APP = "examples.shop:app"
POLL = 0.005
CLIENT_CONNECTIONS = 4
EMAILS_GROUP = "emails.send_welcome"
_SERVING = re.compile(r"serving HTTP on http://127\.0\.0\.1:(\d+)")


def callcast_command() -> list[str]:
    script = Path(sys.executable).parent / "callcast"
    return [str(script)] if script.exists() else [sys.executable, "-m", "callcast.cli"]


# -- the server process -------------------------------------------------------------------------------


class Server:
    """``callcast run examples.shop:app``; restartable on the same port, broker and data dir."""

    def __init__(self, workdir: Path, broker_url: str) -> None:
        self.workdir = workdir
        self.broker_url = broker_url
        self.data_dir = workdir / "data"
        self.port = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_path(self) -> Path:
        return self.workdir / f"server-{self.starts}.log"

    def start(self, timeout: float = 20.0) -> float:
        """Start it and wait until ``/healthz`` answers; the seconds that took."""
        began = time.monotonic()
        self.starts += 1
        args = [
            *callcast_command(),
            "run",
            APP,
            "--broker",
            self.broker_url,
            "--data-dir",
            str(self.data_dir),
        ]
        args += ["--host", HOST, "--port", str(self.port)]
        env = {key: value for key, value in os.environ.items() if not key.startswith("CALLCAST_")}
        with self.log_path().open("wb") as log:
            self.popen = subprocess.Popen(
                args, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = began + timeout
        while True:
            match = _SERVING.search(self.log_path().read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                break
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log_path().read_text(errors='replace')}")
            time.sleep(0.01)
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1.0, trust_env=False).status_code == 200:
                    return time.monotonic() - began
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not answer /healthz in time")
            time.sleep(0.01)

    def kill9(self) -> None:
        assert self.popen is not None
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM, wait; (exit code, seconds). SIGKILL if it ignores SIGTERM for ``timeout``."""
        assert self.popen is not None
        began = time.monotonic()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode, time.monotonic() - began

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.terminate()


# -- figures --------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def latency_line(values: Sequence[float]) -> str:
    return (
        f"n={len(values)}  p50 {ms(percentile(values, 50))}  p99 {ms(percentile(values, 99))}  "
        f"max {ms(max(values))}"
    )


def client(url: str, *, connections: int = 10) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=10.0, limits=limits, trust_env=False)


async def poll(
    http: httpx.AsyncClient,
    path: str,
    params: dict[str, str] | None,
    done: Callable[[Any], bool],
    timeout: float,
) -> Any:
    """GET ``path`` every POLL seconds until ``done(json)``; the JSON, or None at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        body = (await http.get(path, params=params)).json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(POLL)


# -- a. sign-up → welcome email -------------------------------------------------------------------------


async def measure_signups(url: str, count: int) -> bool:
    print(f"\n[a] {count} sign-ups, one after another: 201 → welcome email listed (polled every 5 ms)")
    latencies: list[float] = []
    missing = 0
    async with client(url) as http:
        for i in range(count):
            email = f"measure-a-{i}@example.test"
            response = await http.post("/users", json={"name": f"A {i}", "email": email})
            assert response.status_code == 201, response.text
            answered = time.perf_counter()
            sent = await poll(http, "/emails", {"to": email}, bool, timeout=10.0)
            if sent is None:
                missing += 1
            else:
                latencies.append(time.perf_counter() - answered)
    if latencies:
        print(f"    {latency_line(latencies)}")
    ok = missing == 0 and bool(latencies) and percentile(latencies, 99) < 1.0
    print(f"    emails missing after 10 s: {missing};  goal p99 < 1 s: {'MET' if ok else 'NOT MET'}")
    return ok


# -- b. order → confirmed / rejected --------------------------------------------------------------------


async def measure_orders(url: str, count: int) -> bool:
    print(f"\n[b] {count} orders, one after another: 201 → status 'confirmed' (polled every 5 ms)")
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    async with client(url) as http:
        user = (await http.post("/users", json={"name": "Buyer", "email": "buyer@example.test"})).json()
        for _ in range(count):
            response = await http.post(
                "/orders", json={"user_id": user["id"], "items": [{"sku": "apple", "qty": 1}]}
            )
            assert response.status_code == 201, response.text
            answered = time.perf_counter()
            order = await poll(
                http,
                f"/orders/{response.json()['id']}",
                None,
                lambda o: o["status"] != "pending",
                timeout=10.0,
            )
            outcomes[order["status"] if order else "still pending after 10 s"] += 1
            if order and order["status"] == "confirmed":
                latencies.append(time.perf_counter() - answered)
        if latencies:
            print(f"    {latency_line(latencies)}")
        print(f"    outcomes: {dict(outcomes)}")
        response = await http.post(
            "/orders", json={"user_id": user["id"], "items": [{"sku": "fig", "qty": 10}]}
        )
        answered = time.perf_counter()
        short = await poll(
            http, f"/orders/{response.json()['id']}", None, lambda o: o["status"] != "pending", timeout=10.0
        )
        took = time.perf_counter() - answered
    rejected = short is not None and short["status"] == "rejected"
    print(
        f"    short-stock order (10 figs): HTTP {response.status_code}, then "
        f"{short['status'] if short else 'still pending'} after {ms(took).strip()}"
        f" — reason: {short['reason'] if short else None}"
    )
    return outcomes == Counter({"confirmed": count}) and rejected


# -- c. concurrent sign-ups across a kill -9 ------------------------------------------------------------


@dataclass
class Load:
    ok_first_try: set[int] = field(default_factory=set)
    ok_after_retry: set[int] = field(default_factory=set)
    never_ok: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    failed_attempts: Counter[str] = field(default_factory=Counter)
    killed_after: int = 0
    outage: float = 0.0
    restart: float = 0.0
    before_kill_rate: float = 0.0
    seconds: float = 0.0


def load_address(i: int) -> str:
    return f"measure-c-{i}@example.test"


async def signups_across_a_kill(server: Server, count: int, concurrency: int, kill_after: int) -> Load:
    """``count`` sign-ups from ``concurrency`` clients; after ``kill_after`` 201s: kill -9, restart.

    A sign-up that fails is counted as failed, then retried with the same address once the server is
    back (until a deadline); a retry that gets a 201 is counted separately.
    """
    load = Load()
    answered = 0
    began = time.monotonic()
    deadline = began + 90.0
    restarted = asyncio.Event()
    outage: list[asyncio.Task[None]] = []
    todo = list(range(count))
    todo.reverse()

    async def kill_and_restart() -> None:
        down = time.monotonic()
        await asyncio.to_thread(server.kill9)
        load.restart = await asyncio.to_thread(server.start)
        load.outage = time.monotonic() - down
        restarted.set()

    async def sign_up(http: httpx.AsyncClient, i: int) -> None:
        nonlocal answered
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            try:
                response = await http.post("/users", json={"name": f"C {i}", "email": load_address(i)})
            except httpx.TransportError as error:
                load.failed_attempts[type(error).__name__] += 1
            else:
                if response.status_code == 201:
                    (load.ok_first_try if attempt == 1 else load.ok_after_retry).add(i)
                    answered += 1
                    if answered == kill_after:
                        load.killed_after = answered
                        load.before_kill_rate = answered / (time.monotonic() - began)
                        outage.append(asyncio.create_task(kill_and_restart()))
                    return
                load.failed_attempts[f"HTTP {response.status_code}"] += 1
            load.failed.add(i)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(restarted.wait(), max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(0.05)
        load.never_ok.add(i)

    async def one_client(http: httpx.AsyncClient) -> None:
        while todo:
            await sign_up(http, todo.pop())

    # one httpx pool per CLIENT_CONNECTIONS clients: a single pool with dozens of connections makes
    # httpx itself the bottleneck (~120 requests/s at 64 connections, against ~800 with 16 pools of 4)
    pools = [
        client(server.url, connections=CLIENT_CONNECTIONS)
        for _ in range(-(-concurrency // CLIENT_CONNECTIONS))
    ]
    try:
        await asyncio.gather(*(one_client(pools[k % len(pools)]) for k in range(concurrency)))
    finally:
        for pool in pools:
            await pool.aclose()
    await asyncio.gather(*outage)
    load.seconds = time.monotonic() - began
    return load


async def emails_per_address(url: str, indexes: set[int], readers: int = 16) -> dict[int, int]:
    """How many emails each address got, asked over HTTP by ``readers`` concurrent clients."""
    todo = sorted(indexes)
    counts: dict[int, int] = {}

    async def reader(http: httpx.AsyncClient) -> None:
        while todo:
            i = todo.pop()
            response = await http.get("/emails", params={"to": load_address(i)})
            response.raise_for_status()
            counts[i] = len(response.json())

    pools = [client(url, connections=CLIENT_CONNECTIONS) for _ in range(-(-readers // CLIENT_CONNECTIONS))]
    try:
        await asyncio.gather(*(reader(pools[k % len(pools)]) for k in range(readers)))
    finally:
        for pool in pools:
            await pool.aclose()
    return counts


def emails_db_figures(emails_db: Path) -> tuple[int, int]:
    """(duplicate copies its inbox recognised, distinct events among them) of the emails service."""
    conn = sqlite3.connect(emails_db, timeout=10)
    try:
        rows, distinct = conn.execute(
            "SELECT coalesce(sum(duplicates), 0), count(*) FILTER (WHERE duplicates > 0) FROM callcast_inbox"
        ).fetchone()
        return int(rows), int(distinct)
    finally:
        conn.close()


def undelivered(broker_db: Path, group: str) -> int | None:
    """Deliveries of ``group`` not yet acknowledged, read from the SQLite broker's file (None if
    its layout is not the documented one)."""
    try:
        conn = sqlite3.connect(broker_db, timeout=10)
        try:
            return int(conn.execute("SELECT count(*) FROM deliveries WHERE grp = ?", (group,)).fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def users_without_their_email(data_dir: Path) -> int:
    """Users stored (users.db) beyond the welcome emails sent to their address (emails.db): a
    sign-up cut by the kill between storing the user and publishing its event."""
    conn = sqlite3.connect(data_dir / "users.db", timeout=10)
    try:
        conn.execute("ATTACH DATABASE ? AS mail", (str(data_dir / "emails.db"),))
        (missing,) = conn.execute(
            "SELECT coalesce(sum(max(u.n - coalesce(e.n, 0), 0)), 0) FROM "
            "(SELECT email, count(*) AS n FROM users WHERE email LIKE 'measure-c-%' GROUP BY email) AS u "
            "LEFT JOIN (SELECT recipient, count(*) AS n FROM mail.emails GROUP BY recipient) AS e "
            "ON e.recipient = u.email"
        ).fetchone()
        return int(missing)
    finally:
        conn.close()


async def measure_kill(server: Server, count: int, concurrency: int, lease: float) -> bool:
    kill_after = count * 2 // 5
    print(
        f"\n[c] {count} sign-ups from {concurrency} concurrent clients; kill -9 of the server (pid "
        f"{server.popen.pid if server.popen else '?'}) after {kill_after} answers, restart on the same "
        f"port, broker and data dir"
    )
    load = await signups_across_a_kill(server, count, concurrency, kill_after)
    created = load.ok_first_try | load.ok_after_retry
    print(
        f"    killed after {load.killed_after} 201s ({load.before_kill_rate:.0f} sign-ups/s until then); "
        f"down {load.outage:.2f} s (restart to /healthz {load.restart:.2f} s); "
        f"all answered in {load.seconds:.1f} s"
    )
    print(f"    201 on the first try      {len(load.ok_first_try):5d}")
    print(f"    failed (first or retry)   {len(load.failed):5d}   attempts: {dict(load.failed_attempts)}")
    print(f"    201 after a retry         {len(load.ok_after_retry):5d}")
    print(f"    never a 201               {len(load.never_ok):5d}")

    wait_for = lease + 30.0
    began = time.monotonic()
    deadline = began + wait_for
    while True:
        emails = await emails_per_address(server.url, created)
        missing = sorted(i for i, n in emails.items() if n == 0)
        if not missing or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    waited = time.monotonic() - began
    # then until the emails group has nothing left to deliver (what the killed process had leased
    # comes back after the lease), so late redeliveries are counted too
    while True:
        left = undelivered(server.workdir / "broker.db", EMAILS_GROUP)
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    drained = time.monotonic() - began
    emails = await emails_per_address(server.url, created)
    missing = sorted(i for i, n in emails.items() if n == 0)
    twice = sorted(i for i, n in emails.items() if n > 1)
    duplicates, duplicate_events = emails_db_figures(server.data_dir / "emails.db")
    print(
        f"    every 201'd address checked for its email (waited {waited:.1f} s of at most {wait_for:.0f} s):"
    )
    print(
        f"    emails group drained after {drained:.1f} s ({left if left is not None else 'unknown'} "
        "deliveries left), then counted again:"
    )
    orphans = users_without_their_email(server.data_dir)
    print(f"    lost (201, no email)      {len(missing):5d}   (must be 0)")
    print(
        f"    addresses emailed twice   {len(twice):5d}   (a sign-up done at the kill whose 201 was lost,"
        " then retried)"
    )
    print(
        f"    duplicate deliveries      {duplicates:5d}   (redelivered UserSignedUp events the emails "
        f"service recognised and did not send again; {duplicate_events} distinct)"
    )
    print(f"    users without their email {orphans:5d}   (must be 0: user row and event commit together)")
    return not missing and not load.never_ok and orphans == 0


# -- d. topology ----------------------------------------------------------------------------------------


def show_topology() -> bool:
    print("\n[d] callcast topology examples.shop:app\n")
    result = subprocess.run(
        [*callcast_command(), "topology", APP], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    print("    " + "\n    ".join((result.stdout or result.stderr).rstrip().splitlines()))
    return result.returncode == 0


# -- main -----------------------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, bool]:
    query = f"?lease={args.lease:g}" if args.lease else ""
    broker_url = f"sqlite:///{workdir / 'broker.db'}{query}"
    lease = args.lease or 10.0
    print(f"broker   {broker_url}   (lease {lease:g} s)")
    server = Server(workdir, broker_url)
    results: dict[str, bool] = {}
    try:
        async with asyncio.timeout(args.time_limit):
            started = await asyncio.to_thread(server.start)
            pid = server.popen.pid if server.popen else "?"
            print(f"server   {server.url}  pid {pid}  ready in {started:.2f} s")
            results["a. sign-up → email p99 < 1 s"] = await measure_signups(server.url, args.signups)
            results["b. orders confirmed, short stock rejected"] = await measure_orders(
                server.url, args.orders
            )
            results["c. kill -9: no 201 without email"] = await measure_kill(
                server, args.load, args.concurrency, lease
            )
            code, took = await asyncio.to_thread(server.terminate)
            print(f"\nserver stopped with SIGTERM: exit code {code} in {took:.2f} s")
            results["SIGTERM → exit 0"] = code == 0
    except TimeoutError:
        print(f"\nstopped: the time limit of {args.time_limit:g} s was reached")
        results[f"finished within {args.time_limit:g} s"] = False
    finally:
        server.stop()
    results["d. topology"] = show_topology()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--signups", type=int, default=200, help="phase a: sequential sign-ups")
    parser.add_argument("--orders", type=int, default=50, help="phase b: sequential orders")
    parser.add_argument("--load", type=int, default=1000, help="phase c: concurrent sign-ups")
    parser.add_argument("--concurrency", type=int, default=64, help="phase c: concurrent clients")
    parser.add_argument("--lease", type=float, default=0, help="broker lease seconds (default: the broker's)")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds for phases a-c together")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, broker, data)")
    args = parser.parse_args()

    print(
        f"callcast core measurements: Python {platform.python_version()}, {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPU(s)"
    )
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="callcast-measure-") as tmp:
        workdir = Path(tmp)
        try:
            results = asyncio.run(measure(args, workdir))
        finally:
            if args.keep:
                kept = Path(tempfile.mkdtemp(prefix="callcast-measure-kept-")) / "run"
                shutil.copytree(tmp, kept)
                print(f"\nkept: {kept}")
    print(f"\nsummary ({time.monotonic() - began:.1f} s)")
    for name, ok in results.items():
        print(f"    {'ok  ' if ok else 'FAIL'}  {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The shop stopped under concurrent sign-ups (kill -9, or SIGTERM), restarted on the same port and files.

Every sign-up that got a 201 must get its welcome email (losses: none). A request in flight at a
kill -9 may have been done without its answer reaching the client; its retry then signs the user up
twice and sends two emails: that, and redeliveries the emails service absorbs (its inbox's ``duplicates``
table), are reported, not failures. A SIGTERM finishes the requests in flight, so there none is done
without its answer, and no user is stored without the event of its sign-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from .conftest import Launcher
from .procs import CallcastProcess, sqlite_url, undelivered

SIGNUPS = 200
CONCURRENCY = 50
POOL_SIZE = 5
KILL_AFTER = 80
LEASE = 1
EMAILS_GROUP = "emails.send_welcome"


@dataclass
class Load:
    """What the clients saw."""

    ok_first_try: set[int] = field(default_factory=set)
    ok_after_retry: set[int] = field(default_factory=set)
    never_ok: set[int] = field(default_factory=set)
    failed_attempts: Counter[str] = field(default_factory=Counter)
    killed_after: int | None = None
    outage_seconds: float | None = None

    @property
    def created(self) -> set[int]:
        return self.ok_first_try | self.ok_after_retry


def address(i: int) -> str:
    return f"load-{i}@example.test"


async def sign_up_across_a_restart(
    server: CallcastProcess, stop: Callable[[], object], *, deadline: float
) -> Load:
    """SIGNUPS concurrent sign-ups; after KILL_AFTER answers, ``stop()`` the server and restart it.

    A failed sign-up is retried (same address) once the server is back, until ``deadline``.
    """
    load = Load()
    answered = 0
    restarted = asyncio.Event()
    outage: list[asyncio.Task[None]] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(SIGNUPS):
        queue.put_nowait(i)

    async def stop_and_restart() -> None:
        down = time.monotonic()
        await asyncio.to_thread(stop)
        await asyncio.to_thread(server.start)
        load.outage_seconds = time.monotonic() - down
        restarted.set()

    async def sign_up(http: httpx.AsyncClient, i: int) -> None:
        nonlocal answered
        attempt = 0
        while time.monotonic() < deadline:
            attempt += 1
            try:
                response = await http.post("/users", json={"name": f"Load {i}", "email": address(i)})
            except httpx.TransportError as error:
                load.failed_attempts[type(error).__name__] += 1
            else:
                if response.status_code == 201:
                    (load.ok_first_try if attempt == 1 else load.ok_after_retry).add(i)
                    answered += 1
                    if answered == KILL_AFTER:
                        load.killed_after = answered
                        outage.append(asyncio.create_task(stop_and_restart()))
                    return
                load.failed_attempts[f"HTTP {response.status_code}"] += 1
            with contextlib.suppress(TimeoutError):  # the server is not back: give up at the deadline
                await asyncio.wait_for(restarted.wait(), max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(0.05)
        load.never_ok.add(i)

    async def client_loop(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            await sign_up(http, queue.get_nowait())

    # several small pools: one httpx pool with dozens of connections is slow on the client side
    limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
    pools = [
        httpx.AsyncClient(base_url=server.url, timeout=10.0, trust_env=False, limits=limits)
        for _ in range(CONCURRENCY // POOL_SIZE)
    ]
    try:
        await asyncio.gather(*(client_loop(pools[k % len(pools)]) for k in range(CONCURRENCY)))
    finally:
        for pool in pools:
            await pool.aclose()
    await asyncio.gather(*outage)
    return load


async def emails_by_address(url: str, indexes: set[int]) -> dict[int, int]:
    """How many emails each address got, asked over HTTP."""
    gate = asyncio.Semaphore(20)
    async with httpx.AsyncClient(base_url=url, timeout=10.0, trust_env=False) as http:

        async def count(i: int) -> tuple[int, int]:
            async with gate:
                response = await http.get("/emails", params={"to": address(i)})
            assert response.status_code == 200, response.text
            return i, len(response.json())

        return dict(await asyncio.gather(*(count(i) for i in indexes)))


def duplicate_deliveries(data_dir: Path) -> int:
    """Redelivered events the emails service recognised (the duplicates its inbox counted)."""
    conn = sqlite3.connect(data_dir / "emails.db", timeout=10)
    try:
        return int(conn.execute("SELECT coalesce(sum(duplicates), 0) FROM callcast_inbox").fetchone()[0])
    finally:
        conn.close()


def outbox_backlog(data_dir: Path) -> int:
    """Events the users service committed but has not relayed yet (a killed relay's rows wait out
    their lease before another relay takes them)."""
    conn = sqlite3.connect(data_dir / "users.db", timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM callcast_outbox").fetchone()[0])
    finally:
        conn.close()


def users_without_their_email(data_dir: Path) -> int:
    """Users stored beyond the welcome emails sent to their address: sign-ups cut between storing
    the user and publishing its event (the client got no 201 for them)."""
    conn = sqlite3.connect(data_dir / "users.db", timeout=10)
    try:
        conn.execute("ATTACH DATABASE ? AS mail", (str(data_dir / "emails.db"),))
        (extra,) = conn.execute(
            "SELECT coalesce(sum(max(u.n - coalesce(e.n, 0), 0)), 0) FROM "
            "(SELECT email, count(*) AS n FROM users GROUP BY email) AS u "
            "LEFT JOIN (SELECT recipient, count(*) AS n FROM mail.emails GROUP BY recipient) AS e "
            "ON e.recipient = u.email"
        ).fetchone()
        return int(extra)
    finally:
        conn.close()


@dataclass
class Outcome:
    twice: list[int]
    """Indexes of addresses emailed more than once."""
    orphans: int
    """Users stored without their event (see :func:`users_without_their_email`)."""


async def check_every_signup_got_its_email(
    server: CallcastProcess, load: Load, tmp_path: Path, *, started: float, how: str
) -> Outcome:
    """Wait (bounded) until every 201 has its welcome email and the emails group has nothing left
    to deliver (redeliveries included) and the users service nothing left to relay; print the
    figures; assert none was lost."""
    created = load.created
    data_dir = tmp_path / "data"
    wait_deadline = time.monotonic() + LEASE + 15.0
    while True:
        emails = await emails_by_address(server.url, created)
        missing = sorted(i for i, n in emails.items() if n == 0)
        drained = outbox_backlog(data_dir) == 0 and undelivered(tmp_path / "broker.db", [EMAILS_GROUP]) == 0
        if (not missing and drained) or time.monotonic() >= wait_deadline:
            break
        await asyncio.sleep(0.1)
    twice = sorted(i for i, n in emails.items() if n > 1)
    orphans = users_without_their_email(data_dir)
    print(
        f"\n{how} under load: {SIGNUPS} sign-ups, {CONCURRENCY} concurrent, stopped after "
        f"{load.killed_after} answers, down {load.outage_seconds or 0:.2f}s"
        f"\n  201 first try {len(load.ok_first_try)}, 201 after retry {len(load.ok_after_retry)}, "
        f"never 201 {len(load.never_ok)}; failed attempts {dict(load.failed_attempts)}"
        f"\n  lost (201, no email) {len(missing)}; addresses emailed twice {len(twice)}; "
        f"redeliveries absorbed by the emails service {duplicate_deliveries(data_dir)}; "
        f"users stored without their event {orphans}; took {time.monotonic() - started:.1f}s"
    )
    assert load.killed_after == KILL_AFTER
    assert not load.never_ok
    assert len(created) == SIGNUPS
    assert missing == [], f"{len(missing)} sign-ups with a 201 got no welcome email"
    assert drained, "the users outbox or the emails group still has events to deliver"
    # only a sign-up whose first answer was lost may have been done twice
    assert set(twice) <= load.ok_after_retry
    # the user row and its event commit together (outbox): no stop can split them
    assert orphans == 0, f"{orphans} user(s) stored without their UserSignedUp event"
    return Outcome(twice, orphans)


@pytest.mark.slow
async def test_no_signup_loses_its_welcome_email_across_a_kill9(
    launch: Launcher, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    server = launch(name="shop", broker_url=sqlite_url(tmp_path / "broker.db", lease=LEASE))

    load = await sign_up_across_a_restart(server, server.kill9, deadline=started + 30.0)

    with capsys.disabled():
        await check_every_signup_got_its_email(server, load, tmp_path, started=started, how="kill -9")
    assert server.starts == 2
    assert server.returncodes == [-9]
    assert server.running()


@pytest.mark.slow
async def test_sigterm_under_load_finishes_in_flight_requests_and_loses_nothing(
    launch: Launcher, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    server = launch(name="shop", broker_url=sqlite_url(tmp_path / "broker.db", lease=LEASE))

    load = await sign_up_across_a_restart(server, server.terminate, deadline=started + 30.0)

    with capsys.disabled():
        outcome = await check_every_signup_got_its_email(
            server, load, tmp_path, started=started, how="SIGTERM"
        )
    assert server.starts == 2
    assert server.returncodes == [0]
    assert "Traceback" not in (server.log_dir / "shop-1.log").read_text()
    assert outcome.twice == [], "a request was done but not answered across a graceful stop"
    assert outcome.orphans == 0, "a graceful stop cut a sign-up between its two writes"

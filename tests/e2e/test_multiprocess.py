"""Several processes on one SQLite broker file: a competing group, a fan-out group, a kill -9.

Guarantees under test: every published event reaches every subscribing group (fan-out); within a
group each event is handled by one of its processes (competing consumers) — at least once, so a
process killed mid-handler may cause a redelivery (a duplicate, reported) but never a loss.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from examples.shop.contracts import UserSignedUp

from .backlog import wait_quiet
from .conftest import Launcher
from .procs import sqlite_url, undelivered, wait_until

FANOUT = "tests.e2e.fanout_app:app"
EVENTS = 2000
BATCH = 50
LEASE = 1


def handled(path: Path) -> list[tuple[str, int, int, int, float]]:
    """(event id, n, pid, attempt, at) rows a recording service committed so far."""
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=10)
    try:
        return conn.execute("SELECT event_id, n, pid, attempt, at FROM handled").fetchall()
    except sqlite3.OperationalError:  # the table is not created yet
        return []
    finally:
        conn.close()


@pytest.mark.slow
def test_competing_workers_and_fan_out_lose_nothing_when_a_worker_is_killed(
    launch: Launcher, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    common = {"broker_url": sqlite_url(tmp_path / "broker.db", lease=LEASE), "data_dir": tmp_path / "data"}
    workers_db = tmp_path / "data" / "workers.db"
    audit_db = tmp_path / "data" / "audit.db"
    victim = launch(FANOUT, name="worker-a", services=["workers"], http=False, **common)
    survivor = launch(FANOUT, name="worker-b", services=["workers"], http=False, **common)
    launch(FANOUT, name="audit", services=["audit"], http=False, **common)
    feed = launch(FANOUT, name="feed", services=["feed"], **common)

    killed_at: float | None = None
    shares_before_kill: Counter[int] = Counter()
    with httpx.Client(base_url=feed.url, timeout=30.0, trust_env=False) as http:
        for start in range(0, EVENTS, BATCH):
            response = http.post("/ticks", json={"start": start, "count": BATCH})
            assert response.status_code == 201, response.text
            if killed_at is None and start >= EVENTS // 3:
                # Mid-stream, once both competing workers have had a share (the stream goes on
                # meanwhile: a worker that wins every claim while the stream stands still would
                # leave the other none).
                shares = Counter(row[2] for row in handled(workers_db))
                if len(shares) == 2:
                    shares_before_kill = shares
                    victim.kill9()
                    killed_at = time.time()
    assert killed_at is not None, f"the stream ended before both workers had a share: {dict(shares)}"

    def everything_handled() -> bool:
        return {row[1] for row in handled(workers_db)} == set(range(EVENTS)) and {
            row[1] for row in handled(audit_db)
        } == set(range(EVENTS))

    wait_until(everything_handled, timeout=30.0, interval=0.1, what="every event to reach both groups")
    wait_until(
        lambda: undelivered(tmp_path / "broker.db", ["workers.record", "audit.record"]) == 0,
        timeout=10.0,
        interval=0.05,
        what="every delivery to be acknowledged",
    )
    elapsed = time.monotonic() - started

    work = handled(workers_db)
    audit = handled(audit_db)
    ids_by_n = {n: event_id for event_id, n, *_ in audit}
    per_event = Counter(event_id for event_id, *_ in work)
    duplicates = sum(count - 1 for count in per_event.values())
    audit_duplicates = len(audit) - len({row[0] for row in audit})
    by_pid = Counter(row[2] for row in work)
    redelivered = [row for row in work if row[3] > 1]
    with capsys.disabled():  # the figures belong in the test output, passed or not
        print(
            f"\nmulti-process: {EVENTS} events, lease {LEASE}s, kill -9 of pid {victim.pid} after "
            f"{sum(shares_before_kill.values())} handled (shares before the kill: {dict(shares_before_kill)})"
            f"\n  workers group: {len(per_event)} distinct handled, {duplicates} duplicate(s) "
            f"(handled again), {len(redelivered)} redelivered handling(s), per pid {dict(by_pid)}"
            f"\n  audit (fan-out): {len({row[0] for row in audit})} distinct handled, "
            f"{audit_duplicates} duplicate(s)"
            f"\n  lost: {EVENTS - len({row[1] for row in work})} (workers), "
            f"{EVENTS - len({row[1] for row in audit})} (audit); took {elapsed:.1f}s"
        )

    # none lost, in either group; both groups saw the very same events (same ids)
    assert {row[1] for row in work} == set(range(EVENTS))
    assert len(ids_by_n) == EVENTS
    assert {event_id: n for event_id, n, *_ in work} == {event_id: n for n, event_id in ids_by_n.items()}
    # competing consumers: both had a share before the kill, the survivor took over after it
    assert set(shares_before_kill) == {victim.pid, survivor.pid}
    assert all(count > 0 for count in shares_before_kill.values())
    assert set(by_pid) == {victim.pid, survivor.pid}
    assert not [row for row in work if row[2] == victim.pid and row[4] > killed_at]
    assert any(row[2] == survivor.pid and row[4] > killed_at for row in work)
    # every handling of one event is a delivery of its own, counted by the broker
    attempts: dict[str, list[int]] = {}
    for event_id, _, _, attempt, _ in work:
        attempts.setdefault(event_id, []).append(attempt)
    assert all(len(set(counts)) == len(counts) for counts in attempts.values())
    assert all(max(counts) > 1 for counts in attempts.values() if len(counts) > 1)


def emails_sent(emails_db: Path) -> dict[str, int]:
    """recipient → number of welcome emails in the emails service's own table."""
    if not emails_db.exists():
        return {}
    conn = sqlite3.connect(emails_db, timeout=10)
    try:
        return dict(conn.execute("SELECT recipient, count(*) FROM emails GROUP BY recipient").fetchall())
    except sqlite3.OperationalError:  # the table is not created yet
        return {}
    finally:
        conn.close()


@pytest.mark.slow
def test_two_emails_workers_share_the_stream_and_send_each_welcome_once_across_a_kill(
    launch: Launcher, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    signups = 400
    common = {"broker_url": sqlite_url(tmp_path / "broker.db", lease=LEASE), "data_dir": tmp_path / "data"}
    emails_db = tmp_path / "data" / "emails.db"
    users = launch(name="users", services=["users"], **common)
    victim = launch(name="emails-a", services=["emails"], http=False, **common)
    launch(name="emails-b", services=["emails"], http=False, **common)

    addresses = [f"mp-{i}@example.test" for i in range(signups)]
    with (
        httpx.Client(base_url=users.url, timeout=10.0, trust_env=False) as http,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        answers = [
            pool.submit(http.post, "/users", json={"name": f"MP {i}", "email": email})
            for i, email in enumerate(addresses)
        ]
        # mid-stream: some emails are out, sign-ups are still coming in
        sent_at_kill = len(
            wait_until(
                lambda: sent if len(sent := emails_sent(emails_db)) >= signups // 4 else None,
                timeout=20.0,
                what="a quarter of the emails",
            )
        )
        victim.kill9()
        answered_at_kill = sum(answer.done() for answer in answers)
        assert [answer.result().status_code for answer in answers] == [201] * signups

    wait_until(
        lambda: set(emails_sent(emails_db)) == set(addresses),
        timeout=20.0,
        interval=0.05,
        what="a welcome email for every sign-up",
    )
    # once every address has one, a redelivery of the killed worker's deliveries may still be
    # on its way: count only when the emails group has acknowledged every UserSignedUp
    wait_quiet(users, UserSignedUp, timeout=20.0)
    sent = emails_sent(emails_db)
    conn = sqlite3.connect(emails_db, timeout=10)
    try:
        duplicates = conn.execute("SELECT coalesce(sum(duplicates), 0) FROM callcast_inbox").fetchone()[0]
    finally:
        conn.close()
    with capsys.disabled():
        print(
            f"\nemails workers: {signups} sign-ups, kill -9 of one of two emails workers with "
            f"{answered_at_kill} sign-ups answered and {sent_at_kill} emails sent;"
            f"\n  {len(sent)} addresses emailed, "
            f"{sum(n > 1 for n in sent.values())} twice; {duplicates} redelivered event(s) recognised "
            f"and not sent again; took {time.monotonic() - started:.1f}s"
        )
    assert sent == dict.fromkeys(addresses, 1)
    assert victim.returncodes == [-9]

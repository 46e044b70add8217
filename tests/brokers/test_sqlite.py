"""The embedded ``sqlite:///path.db`` broker against the shared conformance suite, plus what only
this adapter has: its URL and options, sharing the file between real processes, and rows that
were written into the file by something other than callcast."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from callcast.brokers import connect
from callcast.brokers.sqlite import SqliteBroker, parse_url
from callcast.envelope import UNDECODABLE_TYPE, Envelope
from callcast.exceptions import BrokerUnavailableError, ConfigurationError, TransportError
from callcast.testing import BrokerConformance
from callcast.transport import Broker, Capabilities, Delivery, Subscription
from tests.brokers.conftest import Pause, close_during, next_delivery

LEASE = 1.0


class TestSqliteBroker(BrokerConformance):
    lease = LEASE

    @pytest.fixture(autouse=True)
    def _database(self, tmp_path: Path) -> None:
        self.path = tmp_path / "broker.db"
        self.url = f"sqlite:///{self.path}?lease={LEASE:g}"

    async def make_broker(self) -> Broker:
        return await connect(self.url)

    def process_url(self) -> str:
        return self.url

    async def test_capabilities(self) -> None:
        """The embedded broker is durable and shared by the processes of one machine."""
        broker = await self.open()
        assert isinstance(broker, SqliteBroker)
        assert broker.capabilities == Capabilities(
            durable=True,
            shared=True,
            delayed_nack=True,
            delivery_count=True,
            ordered_per_key=True,
            request_reply=False,
            replays_history=False,
        )


# -- the URL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path", "options"),
    [
        ("sqlite:///broker.db", Path("broker.db"), {}),
        ("sqlite:///.callcast/broker.db", Path(".callcast/broker.db"), {}),
        ("sqlite:////var/lib/app/broker.db", Path("/var/lib/app/broker.db"), {}),
        (
            "sqlite:////tmp/b.db?lease=2.5&synchronous=normal",
            Path("/tmp/b.db"),
            {"lease": "2.5", "synchronous": "normal"},
        ),
        ("sqlite:///b.db?lease=1&lease=3", Path("b.db"), {"lease": "3"}),
        ("sqlite://", Path(".callcast/broker.db"), {}),
    ],
)
def test_url_names_a_relative_or_absolute_path_and_options(
    url: str, path: Path, options: dict[str, str]
) -> None:
    """Three slashes then a relative path, four for an absolute one; the query holds options;
    no path at all means the default file."""
    assert parse_url(url) == (path, options)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("sqlite://somehost/broker.db", "takes no host"),
        ("postgres:///broker.db", "not a sqlite URL"),
        ("sqlite:///b.db?synchronous=sometimes", "synchronous must be"),
        ("sqlite:///b.db?lease=soon", "lease must be"),
        ("sqlite:///b.db?lease=0", "lease must be"),
        ("sqlite:///b.db?lease=-1", "lease must be"),
        ("sqlite:///b.db?lease=nan", "lease must be"),
        ("sqlite:///b.db?lease=inf", "lease must be"),
        ("sqlite:///b.db?leese=1", "unknown option(s) leese"),
    ],
)
def test_a_bad_url_or_option_is_a_configuration_error(url: str, complaint: str) -> None:
    """A URL the adapter cannot honour fails loudly before anything is opened, naming the
    problem; a misspelt option is not silently ignored."""
    with pytest.raises(ConfigurationError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        SqliteBroker(url)


async def test_options_are_read_and_an_unknown_scheme_is_refused(tmp_path: Path) -> None:
    """``?lease=`` and ``?synchronous=`` reach the adapter; ``connect`` refuses schemes it does
    not know."""
    broker = await connect(f"sqlite:///{tmp_path / 'b.db'}?lease=2.5&synchronous=normal")
    try:
        assert isinstance(broker, SqliteBroker)
        assert broker.lease == 2.5
        topic, group = "t", "g"
        subscription = await broker.subscribe(topic, group)
        await broker.publish(topic, [Envelope(type="T", source="/s", data=b"{}")])
        delivery = await next_delivery(subscription)
        await delivery.ack()
    finally:
        await broker.close()
    with pytest.raises(ConfigurationError, match="unknown broker URL scheme"):
        await connect("kafka://localhost:9092")


async def test_a_file_that_cannot_be_opened_is_broker_unavailable(tmp_path: Path) -> None:
    """When the database file cannot be created, ``connect`` raises
    :class:`BrokerUnavailableError` (not a driver exception)."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(BrokerUnavailableError, match="cannot open"):
        await connect(f"sqlite:///{blocker / 'broker.db'}")


# -- sharing the file between processes ----------------------------------------------------------

_PUBLISHER_SCRIPT = """
import asyncio, sys
from callcast.brokers import connect
from callcast.envelope import Envelope

async def main(url, topic, count):
    broker = await connect(url)
    await broker.publish(
        topic, [Envelope(type="T", source="/child", data=f"child{n}".encode()) for n in range(count)]
    )
    await broker.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.slow
async def test_a_publish_in_another_process_reaches_a_waiting_subscriber(tmp_path: Path) -> None:
    """Processes that open the same file share the broker: a subscriber here, already waiting, is
    woken by the commit of a publisher process and gets its batch in order."""
    url = f"sqlite:///{tmp_path / 'broker.db'}?lease={LEASE:g}"
    broker = await connect(url)
    try:
        subscription = await broker.subscribe("orders", "billing")
        waiting = asyncio.create_task(subscription.__anext__())
        child = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", _PUBLISHER_SCRIPT, url, "orders", "5"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == 0, child.stderr
        received = [await asyncio.wait_for(waiting, 5)]
        received += [await next_delivery(subscription) for _ in range(4)]
        assert [d.envelope.data for d in received] == [f"child{n}".encode() for n in range(5)]
        assert [d.envelope.source for d in received] == ["/child"] * 5
        for delivery in received:
            await delivery.ack()
    finally:
        await broker.close()


# -- what lives in the file -----------------------------------------------------------------------


async def test_a_delayed_retry_survives_a_restart(tmp_path: Path) -> None:
    """A ``nack(delay=...)`` is stored in the file: after every connection closed and a new one
    opened, the envelope is still held back until its delay ran out, then delivered as attempt 2."""
    url = f"sqlite:///{tmp_path / 'broker.db'}?lease={LEASE:g}"
    broker = await connect(url)
    subscription = await broker.subscribe("orders", "billing")
    await broker.publish("orders", [Envelope(type="T", source="/s", data=b"later")])
    delivery = await next_delivery(subscription)
    loop = asyncio.get_running_loop()
    nacked_at = loop.time()
    delay = 1.0
    await delivery.nack(delay=delay)
    await broker.close()

    reopened = await connect(url)
    try:
        subscription = await reopened.subscribe("orders", "billing")
        again = await next_delivery(subscription, delay + 5)
        waited = loop.time() - nacked_at
        assert again.envelope.data == b"later"
        assert again.attempt == 2
        assert waited >= delay - 0.02, f"redelivered {waited:.3f}s after the nack, before its delay"
        await again.ack()
    finally:
        await reopened.close()


async def one_delivery(broker: Broker) -> tuple[Subscription, Delivery]:
    """Subscribe group ``billing`` to ``orders``, publish one envelope (data ``x``) and take it."""
    subscription = await broker.subscribe("orders", "billing")
    await broker.publish("orders", [Envelope(type="T", source="/s", data=b"x")])
    return subscription, await next_delivery(subscription)


def _inject(path: Path, group: str, topic: str, rows: list[tuple[str, bytes]]) -> None:
    """Write messages (raw headers text, body) for ``group`` straight into the file, as a foreign
    or older writer could have."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn, conn:
        for headers, body in rows:
            seq = conn.execute(
                "INSERT INTO messages (topic, headers, body) VALUES (?, ?, ?)", (topic, headers, body)
            ).lastrowid
            conn.execute("INSERT INTO deliveries (grp, seq) VALUES (?, ?)", (group, seq))


async def test_an_undecodable_row_is_delivered_quarantined(tmp_path: Path) -> None:
    """A stored message whose headers are not a CloudEvent does not crash the subscription: it is
    delivered as a ``callcast.undecodable`` envelope that keeps the body, the original id where
    there is one, and the reason (extension ``decodeerror``); the next message follows normally."""
    path = tmp_path / "broker.db"
    broker = await connect(f"sqlite:///{path}?lease={LEASE:g}")
    try:
        subscription = await broker.subscribe("orders", "billing")
        no_type = {"ce-id": "bad-2", "ce-source": "/x", "ce-specversion": "1.0"}
        old_spec = {"ce-id": "bad-3", "ce-source": "/x", "ce-type": "T", "ce-specversion": "0.3"}
        await asyncio.to_thread(
            _inject,
            path,
            "billing",
            "orders",
            [
                ("{not json", b"body-1"),
                (json.dumps(no_type), b"body-2"),
                (json.dumps(old_spec), b"body-3"),
                (json.dumps(["a", "list"]), b"body-4"),
            ],
        )
        good = Envelope(type="T", source="/s", data=b"good")
        await broker.publish("orders", [good])
        received = [await next_delivery(subscription) for _ in range(5)]
        quarantined, last = received[:4], received[4]
        assert [d.envelope.type for d in quarantined] == [UNDECODABLE_TYPE] * 4
        assert [d.envelope.data for d in quarantined] == [b"body-1", b"body-2", b"body-3", b"body-4"]
        assert [d.envelope.id for d in quarantined][1:3] == ["bad-2", "bad-3"]
        reasons = [d.envelope.extensions["decodeerror"] for d in quarantined]
        assert "missing attribute" in reasons[0]
        assert "type" in reasons[1]
        assert "specversion" in reasons[2]
        assert "missing attribute" in reasons[3]
        assert last.envelope == good
        for delivery in received:
            await delivery.ack()
    finally:
        await broker.close()


async def test_acks_of_one_loop_turn_are_written_together_even_when_one_caller_is_cancelled(
    tmp_path: Path,
) -> None:
    """The acks of a loop turn share one write; cancelling one ack's caller neither stops that write
    nor fails the others: all three rows are gone, nothing is redelivered."""
    url = f"sqlite:///{tmp_path / 'broker.db'}?lease={LEASE:g}"
    broker = await connect(url)
    try:
        subscription = await broker.subscribe("orders", "billing")
        await broker.publish("orders", [Envelope(type="T", source="/s", data=b"%d" % n) for n in range(3)])
        deliveries = [await next_delivery(subscription) for _ in range(3)]
        acks = [asyncio.create_task(delivery.ack()) for delivery in deliveries]
        await asyncio.sleep(0)  # the three acks joined one turn's batch
        acks[1].cancel()
        outcomes = await asyncio.wait_for(asyncio.gather(*acks, return_exceptions=True), 5)
        assert outcomes[0] is None
        assert outcomes[2] is None
        assert isinstance(outcomes[1], asyncio.CancelledError)
        await subscription.close()
        with contextlib.closing(sqlite3.connect(tmp_path / "broker.db")) as conn:
            assert conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0
    finally:
        await broker.close()


async def test_an_ack_whose_write_is_cancelled_before_it_ran_fails_instead_of_hanging(
    tmp_path: Path,
) -> None:
    """If the loop turn's write is cancelled before it even started (the loop going away), the acks
    waiting on it fail with a TransportError; none waits forever."""
    broker = SqliteBroker(f"sqlite:///{tmp_path / 'broker.db'}?lease={LEASE:g}")
    await broker.connect()
    try:
        _, delivery = await one_delivery(broker)
        ack = asyncio.create_task(delivery.ack())
        await asyncio.sleep(0)  # the ack queued itself; the turn's write has not started yet
        batch = broker._settling
        assert batch is not None
        assert batch.written is not None
        batch.written.cancel()
        with pytest.raises(TransportError, match="interrupted"):
            await asyncio.wait_for(ack, 5)
    finally:
        await broker.close()


async def test_closing_while_a_claim_is_under_way_counts_no_attempt(tmp_path: Path) -> None:
    """A claim the writer thread is running when the subscription closes lands in the buffer, and
    close() hands it back as never handed out: the next subscriber gets attempt 1, not 2."""
    broker = await connect(f"sqlite:///{tmp_path / 'broker.db'}")
    try:
        await broker.declare("T", "g")
        await broker.publish("T", [Envelope(type="T", source="s", data=b"1")])
        first = await broker.subscribe("T", "g", prefetch=4)
        waiting = asyncio.create_task(first.__anext__())
        await asyncio.sleep(0)  # __anext__ starts the claim task
        await asyncio.sleep(0)  # the claim task queues its op for the writer thread
        claiming = first.claiming
        assert claiming is not None
        assert not claiming.done()
        await first.close()
        with contextlib.suppress(StopAsyncIteration):
            await waiting
        second = await broker.subscribe("T", "g")
        delivery = await next_delivery(second)
        assert (delivery.envelope.data, delivery.attempt) == (b"1", 1)
        await delivery.ack()
    finally:
        await broker.close()


# -- failures and races ---------------------------------------------------------------------------


def _rows(path: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def test_a_delivery_whose_settle_failed_comes_back_once_its_lease_runs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its subscriber no longer renews it (the consumer counts on that), also while it lives on."""
    broker = SqliteBroker(f"sqlite:///{tmp_path / 'broker.db'}?lease={LEASE:g}")
    await broker.connect()
    try:
        subscription, delivery = await one_delivery(broker)
        run = broker._run

        async def settles_fail(op: Any) -> Any:
            if getattr(op, "__name__", "") == "settle":
                raise TransportError("sqlite broker: disk I/O error")
            return await run(op)

        monkeypatch.setattr(broker, "_run", settles_fail)
        with pytest.raises(TransportError):
            await delivery.ack()
        monkeypatch.undo()
        again = await next_delivery(subscription, LEASE * 5)
        assert (again.envelope.data, again.attempt) == (b"x", 2)
        await again.ack()
    finally:
        await broker.close()


async def test_an_ack_in_the_loop_turn_of_the_close_is_not_undone_by_it(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    broker = await connect(f"sqlite:///{path}?lease={LEASE:g}")
    try:
        subscription, delivery = await one_delivery(broker)
        ack = asyncio.create_task(delivery.ack())
        await asyncio.sleep(0)  # the ack joined this turn's batch, whose write has not started
        await subscription.close()
        await asyncio.wait_for(ack, 5)
        assert await asyncio.to_thread(_rows, path, "deliveries") == 0
    finally:
        await broker.close()


async def test_a_subscriber_does_not_claim_again_what_it_holds_when_its_lease_ran_out(tmp_path: Path) -> None:
    """The lease can run out while the writer waits for another process's lock; the delivery is
    still being handled here, and must not be handed out here a second time."""
    path = tmp_path / "broker.db"
    broker = await connect(f"sqlite:///{path}?lease=30")  # no renewal during the test
    try:
        subscription = await broker.subscribe("orders", "billing", prefetch=4)
        await broker.publish("orders", [Envelope(type="T", source="/s", data=b"first")])
        held = await next_delivery(subscription)

        def lease_runs_out() -> None:
            with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn, conn:
                conn.execute("UPDATE deliveries SET lease_until = 0")

        await asyncio.to_thread(lease_runs_out)
        await broker.publish("orders", [Envelope(type="T", source="/s", data=b"second")])
        following = await next_delivery(subscription)
        assert following.envelope.data == b"second"
        await held.ack()
        await following.ack()
    finally:
        await broker.close()


async def test_when_the_writer_thread_dies_every_call_fails_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from callcast.brokers import sqlite as module

    broker = await connect(f"sqlite:///{tmp_path / 'broker.db'}")
    try:
        await broker.declare("orders", "billing")

        def broken(self: object, conn: sqlite3.Connection, batch: object) -> None:
            raise RuntimeError("a bug in the writer")

        monkeypatch.setattr(module._Writer, "_run_batch", broken)
        with pytest.raises(BrokerUnavailableError):
            await asyncio.wait_for(broker.publish("orders", [Envelope(type="T", source="/s", data=b"x")]), 5)
        with pytest.raises(BrokerUnavailableError):
            await asyncio.wait_for(broker.publish("orders", [Envelope(type="T", source="/s", data=b"y")]), 5)
    finally:
        monkeypatch.undo()
        await asyncio.wait_for(broker.close(), 5)


def test_a_change_count_that_cannot_be_read_is_taken_as_unchanged() -> None:
    from callcast.brokers.sqlite import _data_version

    conn = sqlite3.connect(":memory:")
    assert _data_version(conn, 7) == 1  # read
    conn.close()
    assert _data_version(conn, 7) == 7  # cannot be read: the last value


async def test_a_housekeeping_pass_deletes_every_settled_message_whatever_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten settled messages, three per op: the ops of one pass follow each other at once, not one
    pass (lease/3 = 1 s) apart."""
    from callcast.brokers import sqlite as module

    monkeypatch.setattr(module, "GARBAGE_BATCH", 3)
    deletions: list[tuple[float, int]] = []
    collect = module._collect_garbage

    def timed(conn: sqlite3.Connection) -> int:
        deleted = collect(conn)
        deletions.append((time.monotonic(), deleted))
        return deleted

    monkeypatch.setattr(module, "_collect_garbage", timed)
    broker = await connect(f"sqlite:///{tmp_path / 'broker.db'}?lease=3")
    try:
        subscription = await broker.subscribe("orders", "billing", prefetch=20)
        await broker.publish("orders", [Envelope(type="T", source="/s", data=b"%d" % n) for n in range(10)])
        for _ in range(10):
            await (await next_delivery(subscription)).ack()
        deadline = asyncio.get_running_loop().time() + 10
        while sum(deleted for _, deleted in deletions) < 10:
            assert asyncio.get_running_loop().time() < deadline, f"not all deleted: {deletions}"
            await asyncio.sleep(0.02)
        full = [i for i, (_, deleted) in enumerate(deletions) if deleted == 3]
        assert full, deletions
        spans = [deletions[i + 1][0] - deletions[i][0] for i in full]
        assert max(spans) < 0.5, f"the next op waited for the next pass: {deletions}"
    finally:
        await broker.close()


async def test_a_subscribe_racing_close_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``subscribe`` whose group declaration finishes after ``close`` began does not outlive the
    broker: it raises instead of returning a subscription no one closes."""
    declared = Pause(monkeypatch, SqliteBroker, "_declare")
    broker = await connect(f"sqlite:///{tmp_path / 'broker.db'}")
    await close_during(broker, broker.subscribe("orders", "billing"), declared)

"""Inbox, outbox, sequenced handlers, the per-key gate and dead-letter tooling, on the memory broker
with SQLite service databases."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from callcast import App, ConfigurationError, Context, RetryPolicy, Service, outbox, sequence
from callcast.brokers.memory import MemoryBroker
from callcast.database import Database
from callcast.deadletter import DEAD_LETTER_TOPIC
from callcast.dlq import DeadLetterView, browse, original, replay
from callcast.envelope import Envelope
from callcast.exceptions import PermanentError, PublishError
from callcast.ordering import KeyGate
from callcast.sequence import SequencePolicy
from tests.unit.conftest import StartApp, wait_until


class Credit(BaseModel):
    account: str
    amount: int
    fail: bool = False


class Versioned(BaseModel):
    account: str
    version: int
    value: int


bank = Service("bank", publishes=[Credit, Versioned], database=True)
ledger = Service("ledger", database=True)
applied: dict[str, list[int]] = defaultdict(list)
DIES = 999
"""A ``Versioned`` value whose handler never completes: as if it killed its process."""
dying: list[int] = []
REFUSED = -2
"""A ``Versioned`` value whose handler raises :class:`PermanentError`."""
HOLDS = 998
"""A ``Versioned`` value whose handler waits until the test sets :data:`released`."""
held: list[int] = []
released = asyncio.Event()


@bank.on_startup
async def bank_tables(ctx: Context) -> None:
    async with ctx.transaction() as db:
        await db.execute(text("CREATE TABLE IF NOT EXISTS notes (n INTEGER)"))


@ledger.on_startup
async def ledger_tables(ctx: Context) -> None:
    async with ctx.transaction() as db:
        await db.execute(text("CREATE TABLE IF NOT EXISTS balance (account TEXT PRIMARY KEY, total INTEGER)"))
        await db.execute(text("CREATE TABLE IF NOT EXISTS state (account TEXT PRIMARY KEY, value INTEGER)"))


@ledger.on(Credit, idempotent=True, retry=RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05))
async def credit(event: Credit, ctx: Context) -> None:
    await ctx.db.execute(
        text("INSERT INTO balance VALUES (:a, :n) ON CONFLICT (account) DO UPDATE SET total = total + :n"),
        {"a": event.account, "n": event.amount},
    )
    if event.fail:
        raise RuntimeError("the effect above must roll back")


@ledger.on(Versioned, sequenced=SequencePolicy(field="version", gap_timeout=3.0))
async def track(event: Versioned, ctx: Context) -> None:
    if event.value == REFUSED:
        raise PermanentError("this value is refused for good")
    if event.value < 0:
        raise RuntimeError("a negative value cannot be tracked")
    if event.value == DIES:
        dying.append(event.version)
        await asyncio.Event().wait()
    if event.value == HOLDS:
        held.append(event.version)
        await released.wait()
    applied[event.account].append(event.version)
    await ctx.db.execute(
        text("INSERT INTO state VALUES (:a, :v) ON CONFLICT (account) DO UPDATE SET value = :v"),
        {"a": event.account, "v": event.value},
    )


app = App([bank, ledger])


async def balance(ctx: Context, account: str) -> int | None:
    async with ctx.transaction() as db:
        row = (await db.execute(text("SELECT total FROM balance WHERE account = :a"), {"a": account})).first()
    return None if row is None else int(row[0])


async def test_an_idempotent_handler_applies_a_duplicate_once(start: StartApp, broker: MemoryBroker) -> None:
    runtime = await start(app)
    envelope = runtime.context("bank").envelope_for(Credit(account="a", amount=5))
    for _ in range(3):  # the same message id, three times: a redelivery or a re-publish
        await broker.publish("Credit", [envelope])
    ledger_ctx = runtime.context("ledger")
    await wait_until(lambda: _stats(runtime)["duplicates"] == 2)
    assert await balance(ledger_ctx, "a") == 5


async def test_a_failed_idempotent_handler_rolls_back_its_effect_and_record(start: StartApp) -> None:
    runtime = await start(app)
    await runtime.context("bank").publish(Credit(account="b", amount=7, fail=True))
    await wait_until(lambda: _stats(runtime)["dead_lettered"] == 1, timeout=10)
    assert await balance(runtime.context("ledger"), "b") is None


async def test_publish_in_a_transaction_is_sent_only_after_commit(
    start: StartApp, broker: MemoryBroker
) -> None:
    runtime = await start(app)
    ctx = runtime.context("bank")

    async def write_then_fail() -> None:
        async with ctx.transaction() as db:
            await db.execute(text("INSERT INTO notes VALUES (1)"))
            await ctx.publish(Credit(account="rolled-back", amount=1))
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await write_then_fail()
    async with ctx.transaction() as db:
        await db.execute(text("INSERT INTO notes VALUES (2)"))
        await ctx.publish(Credit(account="committed", amount=2))
        await asyncio.sleep(0.05)
        assert await balance(runtime.context("ledger"), "committed") is None  # not before the commit
    await wait_until(lambda: _stats(runtime)["handled"] >= 1)
    assert await balance(runtime.context("ledger"), "committed") == 2
    assert await balance(runtime.context("ledger"), "rolled-back") is None


async def test_two_relays_never_publish_a_row_twice(start: StartApp, broker: MemoryBroker) -> None:
    first = await start(app, services=["bank"])
    second = await start(app, services=["bank"])
    sink = await broker.subscribe("Credit", "sink", prefetch=1000)
    ctx = first.context("bank")
    for n in range(200):
        async with ctx.transaction():
            await ctx.publish(Credit(account=f"r{n}", amount=n))
    seen: list[str] = []
    while len(seen) < 200:
        delivery = await asyncio.wait_for(sink.__anext__(), 5)
        seen.append(delivery.envelope.id)
        await delivery.ack()
    assert len(set(seen)) == 200
    extra = asyncio.ensure_future(sink.__anext__())
    done, _ = await asyncio.wait({extra}, timeout=0.5)  # nothing more arrives
    extra.cancel()
    assert not done
    assert first._relays["bank"].published + second._relays["bank"].published == 200


async def test_sequenced_handler_applies_in_order_whatever_the_arrival_order(
    start: StartApp, broker: MemoryBroker
) -> None:
    runtime = await start(app)
    ctx = runtime.context("bank")
    rng = random.Random(7)
    sent = []
    for account in ("x", "y", "z"):
        for version in range(1, 21):
            sent.append(
                ctx.envelope_for(Versioned(account=account, version=version, value=version * 10), key=account)
            )
    window = [sent[i : i + 10] for i in range(0, len(sent), 10)]
    for chunk in window:
        rng.shuffle(chunk)
        await broker.publish("Versioned", chunk)
    await broker.publish("Versioned", [sent[0]])  # a stale duplicate
    await wait_until(lambda: all(len(applied[a]) == 20 for a in ("x", "y", "z")), timeout=10)
    assert all(applied[a] == list(range(1, 21)) for a in ("x", "y", "z"))
    await wait_until(lambda: _stats(runtime)["stale"] >= 1)


async def test_parked_messages_wait_while_a_suspect_runs_alone(start: StartApp) -> None:
    """The sweeper runs handlers too: beside a suspect, a crash of theirs would be blamed on it."""
    runtime = await start(app)
    bank_ctx = runtime.context("bank")
    for version in (1, 3):
        await bank_ctx.publish(Versioned(account="iso", version=version, value=0), key="iso")
    await wait_until(lambda: applied["iso"] == [1] and _stats(runtime)["parked"] == 1)
    isolation = runtime._isolation  # type: ignore[attr-defined]
    async with isolation.alone():  # this test is the suspect
        async with runtime.context("ledger").transaction() as conn:  # 2 applied by another process
            await sequence.advance(conn, "ledger.track", "iso", 2)
        await wait_until(lambda: isolation.held_up == 1)  # the sweeper found 3 next, and waits
        assert applied["iso"] == [1]
    await wait_until(lambda: applied["iso"] == [1, 3])


async def test_a_gap_that_never_closes_is_dead_lettered(start: StartApp, broker: MemoryBroker) -> None:
    runtime = await start(app)
    ctx = runtime.context("bank")
    await ctx.publish(Versioned(account="gap", version=2, value=0), key="gap")
    async with browse_when(broker, 1) as letters:
        assert letters[0].diagnostic("dlqreason") == "gap"
        assert "missing predecessor" in letters[0].diagnostic("dlqerror")


async def test_a_parked_message_whose_handler_keeps_failing_is_dead_lettered_with_its_error(
    start: StartApp, broker: MemoryBroker
) -> None:
    """Its predecessor came: the reason is the handler's failure, not a gap."""
    runtime = await start(app)
    ctx = runtime.context("bank")
    for version, value in ((1, 0), (3, -1), (2, 0)):  # 3 is parked, then fails when next
        await ctx.publish(Versioned(account="bad", version=version, value=value), key="bad")
    async with browse_when(broker, 1) as letters:
        assert letters[0].diagnostic("dlqreason") == "error"
        assert "a negative value cannot be tracked" in letters[0].diagnostic("dlqerror")
    assert applied["bad"] == [1, 2]


async def test_a_parked_message_refused_for_good_is_dead_lettered_at_its_first_start(
    start: StartApp, broker: MemoryBroker
) -> None:
    runtime = await start(app)
    ctx = runtime.context("bank")
    for version, value in ((1, 0), (3, REFUSED), (2, 0)):  # 3 is parked, then refused when next
        await ctx.publish(Versioned(account="refused", version=version, value=value), key="refused")
    async with browse_when(broker, 1) as letters:
        assert letters[0].diagnostic("dlqreason") == "permanent"
        assert letters[0].diagnostic("dlqattempts") == "1"
    assert applied["refused"] == [1, 2]


async def test_a_parked_message_that_keeps_dying_is_dead_lettered_not_started_for_ever(
    start: StartApp, broker: MemoryBroker
) -> None:
    """A parked message whose handler never completes (its process dies while it runs; here the
    run is cut off) has each start counted, durably, before it runs: after ``max_attempts`` starts
    it is dead-lettered as a crash loop instead of started again."""
    dying.clear()
    runtime = await start(app, services=["ledger"])
    consumer = next(
        c for c in runtime._consumers if getattr(c, "handler", None) and c.handler.group == "ledger.track"
    )
    parked = Envelope(type="Versioned", source="/test", data=b'{"account":"d","version":2,"value":999}')
    async with runtime.context("ledger").transaction() as conn:
        assert await sequence.admit(conn, "ledger.track", "d", 1, 1) is sequence.Verdict.APPLY
        await sequence.advance(conn, "ledger.track", "d", 1)
        assert await sequence.park(conn, "ledger.track", "d", 2, parked)
    limit = consumer.handler.retry.max_attempts
    for start_number in range(1, limit + 1):
        run = asyncio.ensure_future(consumer._apply_parked("d"))
        await wait_until(lambda start_number=start_number: len(dying) == start_number)
        run.cancel()  # the process dies
        with contextlib.suppress(asyncio.CancelledError):
            await run
    await asyncio.wait_for(consumer._apply_parked("d"), 5)
    assert len(dying) == limit  # not started again
    async with browse_when(broker, 1) as letters:
        assert letters[0].diagnostic("dlqreason") == "crashloop"
        assert letters[0].envelope.id == parked.id


def track_consumer(runtime: object) -> Any:
    return next(
        c
        for c in runtime._consumers  # type: ignore[attr-defined]
        if getattr(c, "handler", None) and c.handler.group == "ledger.track"
    )


async def park_behind(
    ctx: Context, key: str, version: int, *, applied_up_to: int, value: int = 0, waited: float = 0.0
) -> None:
    """In one transaction: ``key`` applied up to ``applied_up_to`` (bookkeeping only), and
    ``version`` parked ``waited`` seconds ago."""
    data = Versioned(account=key, version=version, value=value).model_dump_json().encode()
    envelope = Envelope("Versioned", "/test", data, extensions={"partitionkey": key})
    backdate = text("UPDATE callcast_parked SET parked_at = parked_at - :w WHERE key = :k")
    async with ctx.transaction() as conn:
        await sequence.admit(conn, "ledger.track", key, 1, 1)
        await sequence.advance(conn, "ledger.track", key, applied_up_to)
        assert await sequence.park(conn, "ledger.track", key, version, envelope)
        await conn.execute(backdate, {"w": waited, "k": key})


async def test_a_parked_message_that_became_next_before_it_expired_is_applied_not_dead_lettered(
    start: StartApp,
) -> None:
    """Its predecessor committed after the sweeper's apply phase, before its expiry phase."""
    runtime = await start(app, services=["ledger"])
    consumer = track_consumer(runtime)
    await park_behind(runtime.context("ledger"), "late", 3, applied_up_to=2, waited=60)
    await consumer._expire_parked()
    await wait_until(lambda: applied["late"] == [3])
    assert consumer.stats["dead_lettered"] == 0


async def test_a_gap_whose_predecessor_comes_as_its_letter_is_stored_is_still_applied(
    start: StartApp, broker: MemoryBroker
) -> None:
    """The letter is already stored, so the message is applied all the same; replaying the letter
    later is skipped as stale."""
    runtime = await start(app, services=["ledger"])
    consumer = track_consumer(runtime)
    ctx = runtime.context("ledger")
    send_letter = consumer._send_parked_letter

    async def predecessor_meanwhile(*args: Any) -> None:
        await send_letter(*args)
        async with ctx.transaction() as conn:
            await sequence.admit(conn, "ledger.track", "mid", 2, 1)
            await sequence.advance(conn, "ledger.track", "mid", 2)

    consumer._send_parked_letter = predecessor_meanwhile
    await park_behind(ctx, "mid", 3, applied_up_to=1, waited=60)
    await wait_until(lambda: applied["mid"] == [3])
    async with browse_when(broker, 1) as letters:
        assert letters[0].diagnostic("dlqreason") == "gap"
        await replay(broker, letters[0])
    await wait_until(lambda: _stats(runtime)["stale"] == 1)
    assert applied["mid"] == [3]


async def test_a_gap_letter_the_broker_holds_up_does_not_hold_the_service_database(
    start: StartApp, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The letter is published outside any transaction: a broker outage must not stall the
    service database's writers (on SQLite, one write transaction locks the whole file)."""
    runtime = await start(app, services=["ledger"])
    publish, letter_sent, broker_back = broker.publish, asyncio.Event(), asyncio.Event()

    async def held_up(topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        if topic == DEAD_LETTER_TOPIC:
            letter_sent.set()
            await broker_back.wait()
        await publish(topic, envelopes, group=group)

    monkeypatch.setattr(broker, "publish", held_up)
    ctx = runtime.context("ledger")
    await park_behind(ctx, "stall", 3, applied_up_to=1, waited=60)
    await asyncio.wait_for(letter_sent.wait(), 5)

    async def write() -> None:
        async with ctx.transaction() as conn:
            await conn.execute(text("INSERT INTO state VALUES ('other', 1)"))

    await asyncio.wait_for(write(), 5)
    broker_back.set()
    async with browse_when(broker, 1) as letters:
        assert letters[0].diagnostic("dlqreason") == "gap"
    async with ctx.transaction() as conn:
        assert await sequence.parked_keys(conn, "ledger.track") == []


async def test_a_parked_message_applied_by_another_start_is_not_dead_lettered_too(start: StartApp) -> None:
    """Two starts of one parked message at once (the sweeper's and a handler's, or another
    process's): the one that gave up on it looks under the key's lock before writing the letter."""
    runtime = await start(app, services=["ledger"])
    consumer = track_consumer(runtime)
    ctx = runtime.context("ledger")
    await park_behind(ctx, "twice", 2, applied_up_to=1)
    envelope = Envelope("Versioned", "/test", b"{}")
    async with ctx.transaction() as conn:  # the other start applied it
        assert await sequence.take_parked(conn, "ledger.track", "twice") is not None
        await sequence.advance(conn, "ledger.track", "twice", 2)
    await consumer._dead_letter_parked("twice", 2, envelope, consumer.handler.retry.max_attempts)
    assert consumer.stats["dead_lettered"] == 0


async def test_a_stop_lets_a_parked_message_the_sweeper_runs_complete_within_the_grace(
    start: StartApp,
) -> None:
    """Cut off, its start would count against ``max_attempts`` though it would have completed."""
    released.clear()
    runtime = await start(app, services=["ledger"])
    consumer = track_consumer(runtime)
    await park_behind(runtime.context("ledger"), "hold", 2, applied_up_to=1, value=HOLDS)
    await wait_until(lambda: 2 in held)
    stopping = asyncio.ensure_future(runtime.stop(grace=5))
    await wait_until(lambda: not consumer._sweep_again)
    released.set()
    await asyncio.wait_for(stopping, 10)
    assert applied["hold"] == [2]


async def test_dead_letters_replay_to_their_one_subscriber(start: StartApp, broker: MemoryBroker) -> None:
    runtime = await start(app)
    await broker.declare("Credit", "another.group")
    await runtime.context("bank").publish(Credit(account="c", amount=3, fail=True))
    async with browse_when(broker, 1) as letters:
        letter = letters[0]
        assert letter.subscriber == "ledger.credit"
        assert letter.diagnostic("dlqattempts") == "3"
        assert letter.diagnostic("dlqfirstfailure") <= letter.diagnostic("dlqtime")
        again = original(letter.envelope)
        assert not [name for name in again.extensions if name.startswith("dlq") and name != "dlqreplays"]
        assert again.extensions["dlqreplays"] == "1"
        await replay(broker, letter)
    async with browse_when(broker, 1) as letters:  # it fails again: the replay was delivered to it
        assert letters[0].diagnostic("dlqreplays") == "1"
    other = await broker.subscribe("Credit", "another.group")
    first = await asyncio.wait_for(other.__anext__(), 5)  # the original publish only, not the replay
    await first.ack()
    extra = asyncio.ensure_future(other.__anext__())
    done, _ = await asyncio.wait({extra}, timeout=0.3)
    extra.cancel()
    assert not done


async def test_key_gate_runs_one_key_in_order_and_holds_for_a_retry() -> None:
    gate = KeyGate()
    order: list[str] = []

    async def run(key: str, name: str, hold: float = 0.0) -> None:
        async with gate.turn(key, name):
            order.append(f"{name}+")
            await asyncio.sleep(hold)
            order.append(f"{name}-")

    await asyncio.gather(run("k", "a", 0.02), run("k", "b"), run("j", "c"))
    assert order.index("a-") < order.index("b+")
    assert order.index("c+") < order.index("a-")  # another key did not wait

    order.clear()
    gate.hold("k", "retried", 5.0)
    later = asyncio.ensure_future(run("k", "later"))
    await asyncio.sleep(0.05)
    assert order == []  # held for the retried message
    await run("k", "retried")
    await asyncio.wait_for(later, 1)
    assert order == ["retried+", "retried-", "later+", "later-"]


def test_idempotent_handlers_need_a_database() -> None:
    plain = Service("plain")
    with pytest.raises(ConfigurationError, match="database=True"):

        @plain.on(Credit, idempotent=True)
        async def handler(event: Credit, ctx: Context) -> None:
            return None


def _stats(runtime: object) -> dict[str, int]:
    total: dict[str, int] = defaultdict(int)
    for consumer in runtime._consumers:  # type: ignore[attr-defined]
        for name, count in getattr(consumer, "stats", {}).items():
            total[name] += count
    return total


class browse_when:
    """Browse the dead letters once at least ``count`` are there (with a deadline)."""

    def __init__(self, broker: MemoryBroker, count: int) -> None:
        self.broker, self.count = broker, count

    async def __aenter__(self) -> list[DeadLetterView]:
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            self._browse = browse(self.broker)
            letters = await self._browse.__aenter__()
            if len(letters) >= self.count:
                return letters
            await self._browse.__aexit__(None, None, None)
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"fewer than {self.count} dead letters within 10 s")

    async def __aexit__(self, *exc: object) -> None:
        await self._browse.__aexit__(None, None, None)


async def test_a_parked_copy_of_a_sequence_applied_since_is_dropped_not_dead_lettered(
    service_database: str,
) -> None:
    """Sequence 6 was parked while early; a redelivered copy of it was applied directly after 5
    (its lease ran out); the parked copy must go when the key's parked messages are next looked
    at, instead of waiting out the gap timeout to be dead-lettered as a gap."""
    database = Database(service_database)
    await database.setup()
    try:
        copy = Envelope(type="Versioned", source="test", data=b"{}", extensions={"sequence": "6"})
        async with database.transaction() as conn:
            assert await sequence.admit(conn, "g", "k", 6, 1) is sequence.Verdict.EARLY
            assert await sequence.park(conn, "g", "k", 6, copy)
            assert not await sequence.park(conn, "g", "k", 6, copy)  # a copy parked already
            assert await sequence.park(conn, "g", "k", 8, copy.with_extensions(sequence="8"))
            await sequence.advance(conn, "g", "k", 6)  # 1-5, then the redelivered 6, applied
        async with database.transaction() as conn:
            assert await sequence.take_parked(conn, "g", "k") is None  # 7 is missing
        async with database.transaction() as conn:
            assert await sequence.parked_keys(conn, "g") == ["k"]  # only 8 waits
            assert await sequence.expired(conn, "g", -1.0) == [
                ("k", 8, mock.ANY),
            ]
    finally:
        await database.close()


class RefusingBroker(MemoryBroker):
    """Refuses for good any publish holding an envelope whose data is ``poison``."""

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        if any(envelope.data == b"poison" for envelope in envelopes):
            raise PublishError("message too large for the broker")
        await super().publish(topic, envelopes, group=group)


async def published_data(broker: MemoryBroker, topic: str, count: int) -> list[bytes]:
    subscription = await broker.subscribe(topic, "seen", prefetch=count + 1)
    taken = [await asyncio.wait_for(subscription.__anext__(), 5) for _ in range(count)]
    await subscription.close()
    return [delivery.envelope.data for delivery in taken]


async def staged(database: Database, rows: list[tuple[str, bytes, str | None]]) -> None:
    async with database.transaction() as conn:
        for topic, data, key in rows:
            envelope = Envelope(type=topic, source="/test", data=data).with_extensions(partitionkey=key)
            await outbox.stage(conn, topic, envelope)


async def outbox_left(database: Database) -> list[bytes]:
    async with database.transaction() as conn:
        rows = await conn.execute(text("SELECT body FROM callcast_outbox ORDER BY id"))
        return [bytes(row[0]) for row in rows]


async def test_a_row_the_broker_refuses_for_good_holds_back_only_the_later_rows_of_its_key(
    tmp_path: Path,
) -> None:
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    await database.setup()
    broker = RefusingBroker()
    try:
        await broker.declare("T", "seen")
        await broker.declare("U", "seen")
        await staged(
            database,
            [
                ("T", b"a1", "a"),
                ("T", b"poison", "b"),
                ("T", b"b2", "b"),
                ("T", b"n1", None),
                ("U", b"u1", None),
            ],
        )
        relay = outbox.Relay(database, broker)
        assert await relay.relay_once() == 5
        assert await published_data(broker, "T", 2) == [b"a1", b"n1"]
        assert await published_data(broker, "U", 1) == [b"u1"]
        assert await outbox_left(database) == [b"poison", b"b2"]  # kept, in order, for another try
    finally:
        await broker.close()
        await database.close()


async def test_the_relay_outlives_errors_of_any_kind_and_sends_once_they_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused connection to a PostgreSQL database is no SQLAlchemy error (asyncpg raises OSError)."""
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    await database.setup()
    broker = MemoryBroker()
    relay = outbox.Relay(database, broker, poll=0.05)
    try:
        await broker.declare("T", "seen")
        await staged(database, [("T", b"later", None)])
        transaction = database.transaction
        refused = True

        @contextlib.asynccontextmanager
        async def refusing() -> AsyncIterator[AsyncConnection]:
            if refused:
                raise ConnectionRefusedError(111, "Connection refused")
            async with transaction() as conn:
                yield conn

        monkeypatch.setattr(database, "transaction", refusing)
        relay.start()
        await wait_until(lambda: relay.failures >= 2)
        refused = False
        assert await published_data(broker, "T", 1) == [b"later"]
    finally:
        await relay.stop()
        await broker.close()
        await database.close()


async def test_outbox_row_ids_are_never_used_again(tmp_path: Path) -> None:
    """A relay that deletes the rows it sent, by id, late, must not delete a newer row."""
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    await database.setup()
    try:
        envelope = Envelope(type="T", source="/test", data=b"{}")
        async with database.transaction() as conn:
            first = await outbox.stage(conn, "T", envelope)
            await conn.execute(text("DELETE FROM callcast_outbox"))
            second = await outbox.stage(conn, "T", envelope)
        assert second > first
    finally:
        await database.close()


async def commit_one_by_one(database: Database, relay: outbox.Relay, datas: list[bytes]) -> None:
    """Publish one event of key ``k`` on topic ``T`` per transaction, as ``ctx.publish`` inside
    ``ctx.transaction()`` does: staged for ``relay``, which is told of each commit."""
    for data in datas:
        envelope = Envelope(type="T", source="/test", data=data).with_extensions(partitionkey="k")
        async with database.transaction() as conn:
            row_id = await outbox.stage(conn, "T", envelope, relay)
        relay.committed([(row_id, "T", envelope)])


class SlowFirstBroker(MemoryBroker):
    """Holds the publish of an envelope whose data is ``first`` until ``go`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.holding = asyncio.Event()

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        if any(envelope.data == b"first" for envelope in envelopes):
            self.holding.set()
            await self.go.wait()
        await super().publish(topic, envelopes, group=group)


async def test_successive_transactions_of_one_task_reach_the_broker_in_their_order(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    await database.setup()
    broker = SlowFirstBroker()
    relay = outbox.Relay(database, broker)
    try:
        await broker.declare("T", "seen")
        await commit_one_by_one(database, relay, [b"first", b"second"])
        subscription = await broker.subscribe("T", "seen")
        waiting = asyncio.ensure_future(subscription.__anext__())
        done, _ = await asyncio.wait({waiting}, timeout=0.2)  # the second is not sent past the first
        assert not done
        broker.go.set()
        first = await asyncio.wait_for(waiting, 5)
        await first.ack()  # the next of its key comes after
        second = await asyncio.wait_for(subscription.__anext__(), 5)
        assert [first.envelope.data, second.envelope.data] == [b"first", b"second"]
        await subscription.close()
    finally:
        await relay.stop()
        await broker.close()
        await database.close()


async def test_rows_stay_claimed_while_their_publish_outlasts_the_lease(tmp_path: Path) -> None:
    """A publish slower than the relay's lease (0.3 s here) keeps its rows claimed: another relay
    claims none of them meanwhile (it would send them twice, and could overtake), and the rows are
    sent once, in order, when the publish ends."""
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    await database.setup()
    broker = SlowFirstBroker()
    slow = outbox.Relay(database, broker, lease=0.3)
    other = outbox.Relay(database, broker, lease=0.3)
    try:
        await broker.declare("T", "seen")
        await staged(database, [("T", b"first", None), ("T", b"second", None)])
        sending = asyncio.ensure_future(slow.relay_once())
        await asyncio.wait_for(broker.holding.wait(), 5)
        loop = asyncio.get_running_loop()
        watched_until = loop.time() + 4 * slow.lease
        while loop.time() < watched_until:  # four leases: long past the first claim's end
            assert await asyncio.wait_for(other.relay_once(), 2) == 0
            await asyncio.sleep(0.05)
        broker.go.set()
        assert await asyncio.wait_for(sending, 5) == 2
        assert await published_data(broker, "T", 2) == [b"first", b"second"]
        assert await outbox_left(database) == []
    finally:
        broker.go.set()
        await broker.close()
        await database.close()


async def test_a_shutdown_hook_may_publish_in_a_transaction(broker: MemoryBroker, tmp_path: Path) -> None:
    """Hooks run before the outbox relays stop, which then send what the hooks committed."""
    farewell = Service("farewell", publishes=[Credit], database=True)

    @farewell.on_shutdown
    async def last_word(ctx: Context) -> None:
        async with ctx.transaction():
            await ctx.publish(Credit(account="last", amount=1))

    await broker.declare("Credit", "seen")
    runtime = await App([farewell]).start(broker=broker, data_dir=tmp_path)
    await runtime.stop(grace=1)
    [data] = await published_data(broker, "Credit", 1)
    assert Credit.model_validate_json(data).account == "last"


async def test_a_key_held_for_a_message_that_never_came_back_is_forgotten() -> None:
    """Its retry went to another process, or to the dead-letter queue: the lane must not stay."""
    gate = KeyGate()
    gate.hold("k", "gone", 0.05)
    assert len(gate) == 1
    await wait_until(lambda: len(gate) == 0)


class FailsOnceBroker(MemoryBroker):
    """Refuses the first publish of an envelope whose data is ``first``, as a broker away for a moment."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = False

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        if not self.refused and any(envelope.data == b"first" for envelope in envelopes):
            self.refused = True
            raise PublishError("confirm timed out")
        await super().publish(topic, envelopes, group=group)


async def test_a_commit_whose_send_failed_is_not_overtaken_by_the_next_one(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    await database.setup()
    broker = FailsOnceBroker()
    relay = outbox.Relay(database, broker, lease=0.2, poll=0.05)
    try:
        await broker.declare("T", "seen")
        relay.start()
        await commit_one_by_one(database, relay, [b"first", b"second"])
        subscription = await broker.subscribe("T", "seen")
        first = await asyncio.wait_for(subscription.__anext__(), 5)
        await first.ack()
        second = await asyncio.wait_for(subscription.__anext__(), 5)
        await second.ack()
        assert [first.envelope.data, second.envelope.data] == [b"first", b"second"]
        await subscription.close()
    finally:
        await relay.stop()
        await broker.close()
        await database.close()

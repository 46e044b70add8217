"""``sqlite:///path.db``: the embedded, durable default broker for one machine.

Every process that opens the same file shares the broker: publish in one, consume in others.

Storage (WAL mode, so readers never block the writer):

* ``messages(seq, topic, headers, body)``: one row per published envelope;
* ``subscriptions(topic, grp, ephemeral, heartbeat)``: the declared groups;
* ``deliveries(grp, seq, pkey, available_at, attempts, owner, lease_until)``: one row per
  (group, envelope) still to be settled. Publishing fans out by inserting a delivery row for
  every group declared on the topic, in the same transaction as the message.

Claiming marks rows with the subscriber's ``owner`` id and a lease; a subscriber renews its leases
while it lives, so a subscriber that is killed loses its deliveries to the group once the lease
runs out (``?lease=`` seconds, default 10), and the next claim counts a new attempt. Only the
earliest unsettled delivery of a partition key can be claimed, so per-key order holds across
competing processes. ``ack`` deletes the row; ``nack(delay)`` clears the owner and sets
``available_at``, so delayed retries live in the file and survive restarts.

All statements of one process go through one writer thread, which commits whatever is queued in one
transaction (group commit): concurrent publishes, acks and claims share one fsync.
``publish`` returns after that commit. ``?synchronous=normal`` trades power-loss durability for speed
(a crash of the processes still loses nothing; a power cut may lose the last commits);
the default ``full`` also survives power loss.

Consumers in this process are woken at once by local commits; commits of other processes are seen
by watching SQLite's ``data_version`` every few milliseconds, which reads no table.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import orjson

from callcast.brokers import seconds_option
from callcast.brokers.closing import CloseOnce
from callcast.envelope import Envelope, decode_or_quarantine
from callcast.exceptions import BrokerUnavailableError, ConfigurationError, TransportError
from callcast.transport import Capabilities, Delivery, Holding
from callcast.waiting import wait_event

log = logging.getLogger("callcast.brokers.sqlite")

CAPABILITIES = Capabilities(
    durable=True,
    shared=True,
    delayed_nack=True,
    delivery_count=True,
    ordered_per_key=True,
    request_reply=False,
    replays_history=False,
)

DEFAULT_PATH = ".callcast/broker.db"
GARBAGE_BATCH = 20_000
"""Settled messages deleted by one op; a housekeeping pass runs ops until fewer are left."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS subscriptions (
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    ephemeral INTEGER NOT NULL DEFAULT 0,
    heartbeat REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (topic, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    pkey TEXT,
    available_at REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    PRIMARY KEY (grp, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_by_seq ON deliveries (seq);
CREATE INDEX IF NOT EXISTS deliveries_by_owner ON deliveries (owner) WHERE owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS deliveries_by_key ON deliveries (grp, pkey, seq) WHERE pkey IS NOT NULL;
"""

# A group is a group on a topic, but ``deliveries`` rows carry only the group's name: the topic is
# the message's, so every query of a group's rows also matches ``messages.topic``.
_OF_TOPIC = "EXISTS (SELECT 1 FROM messages AS m WHERE m.seq = {row}.seq AND m.topic = {topic})"

# The earliest unsettled delivery of each key is the only one of that key that may be claimed. A
# lease run out while the writer waited for another process's lock is not taken again by its own
# subscriber while it still holds the delivery (``:held``): it would be handled twice at once.
_CLAIM = f"""
UPDATE deliveries SET owner = :owner, lease_until = :lease_until, attempts = attempts + 1
WHERE grp = :grp AND seq IN (
    SELECT d.seq FROM deliveries AS d
    WHERE d.grp = :grp AND d.available_at <= :now
      AND (d.owner IS NULL OR (d.lease_until < :now
           AND NOT (d.owner = :owner AND d.seq IN (SELECT value FROM json_each(:held)))))
      AND {_OF_TOPIC.format(row="d", topic=":topic")}
      AND (d.pkey IS NULL OR NOT EXISTS (
            SELECT 1 FROM deliveries AS e
            WHERE e.grp = d.grp AND e.pkey = d.pkey AND e.seq < d.seq
              AND {_OF_TOPIC.format(row="e", topic=":topic")}))
    ORDER BY d.seq LIMIT :limit)
RETURNING seq, attempts
"""
_DROP_GROUP = f"DELETE FROM deliveries WHERE grp = ? AND {_OF_TOPIC.format(row='deliveries', topic='?')}"

T = TypeVar("T")
_Op = Callable[[sqlite3.Connection], Any]
_Batch = list[tuple[_Op, asyncio.Future[Any]]]
"""Queued operations and the futures their callers wait on."""
_Results = list[tuple[asyncio.Future[Any], Any, BaseException | None]]
"""Per future: the operation's value, or the exception it failed with."""


def parse_url(url: str) -> tuple[Path, dict[str, str]]:
    """``sqlite:///rel/path.db`` (relative), ``sqlite:////abs/path.db``; query holds options."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not a sqlite URL: {url!r}")
    raw = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.netloc:
        raise ConfigurationError(f"sqlite URL takes no host; use sqlite:///path.db, got {url!r}")
    options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    return Path(raw or DEFAULT_PATH), options


@dataclass(eq=False)
class _Settles:
    """The acks and nacks of one loop turn, the task that writes them in one op, and a future per
    settle that learns the outcome (a settle whose caller is cancelled leaves the others alone)."""

    acks: list[tuple[str, int, str]] = field(default_factory=list)
    nacks: list[tuple[float, str, int, str]] = field(default_factory=list)
    groups: set[str] = field(default_factory=set)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    written: asyncio.Task[None] | None = None

    def tell_waiters(self, written: asyncio.Task[None]) -> None:
        """The write ended: every settle still waiting learns how (cancelled before or while it
        ran, e.g. as the loop goes away, is a failure to them)."""
        if written.cancelled():
            error: BaseException | None = TransportError("sqlite broker: settling was interrupted")
        else:
            error = written.exception()
        for settled in self.waiters:
            if settled.done():  # its caller was cancelled
                continue
            if error is None:
                settled.set_result(None)
            else:
                settled.set_exception(error)


class _OpFailed(Exception):
    """An op of a batch run without savepoints raised: the batch is run again op by op."""


class _Writer(threading.Thread):
    """Owns the connection; runs queued operations in batches, one transaction per batch."""

    def __init__(self, path: Path, synchronous: str, on_foreign_commit: Callable[[], None]) -> None:
        super().__init__(name=f"callcast-sqlite:{path.name}", daemon=True)
        self.path = path
        self.synchronous = synchronous
        self.on_foreign_commit = on_foreign_commit
        self.ops: queue.SimpleQueue[tuple[_Op, asyncio.Future[Any]] | None] = queue.SimpleQueue()
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None
        self.stopped = False
        self.poll_interval = 0.004

    def run(self) -> None:
        try:
            conn = self._open()
        except BaseException as error:  # reported to connect()
            self.startup_error = error
            self.ready.set()
            return
        self.ready.set()
        data_version = _data_version(conn, 0)
        running: _Batch = []
        try:
            while True:
                try:
                    first = self.ops.get(timeout=self.poll_interval)
                except queue.Empty:
                    current = _data_version(conn, data_version)
                    if current != data_version:
                        data_version = current
                        self.on_foreign_commit()
                    continue
                batch = [first]
                with contextlib.suppress(queue.Empty):
                    while len(batch) < 512:
                        batch.append(self.ops.get_nowait())
                stop = None in batch
                running = [item for item in batch if item is not None]
                self._run_batch(conn, running)
                running = []
                data_version = _data_version(conn, data_version)
                if stop:
                    return
        except BaseException:
            log.exception("sqlite broker %s: the writer thread failed", self.path)
            failure = BrokerUnavailableError("sqlite broker: the writer thread failed")
            self._hand_back([(future, None, failure) for _, future in running])
        finally:
            self.stopped = True  # before failing what is queued: _run checks it after queueing
            self.fail_queued()
            conn.close()

    def fail_queued(self) -> None:
        """Fail every queued op (the writer has stopped): no caller waits forever."""
        failure = BrokerUnavailableError("sqlite broker is closed")
        failed: _Results = []
        with contextlib.suppress(queue.Empty):
            while True:
                item = self.ops.get_nowait()
                if item is not None:
                    failed.append((item[1], None, failure))
        self._hand_back(failed)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _run_batch(self, conn: sqlite3.Connection, batch: _Batch) -> None:
        try:
            results = self._run_together(conn, batch)
        except _OpFailed:  # one op failed: run them again, each in a savepoint, so only it fails
            results = self._run_isolated(conn, batch)
        self._hand_back(results)

    def _run_together(self, conn: sqlite3.Connection, batch: _Batch) -> _Results:
        """The common case: every op of the batch in one transaction, no savepoints."""
        results: _Results = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            return self._all_failed(conn, batch, error)
        for op, future in batch:
            try:
                results.append((future, op(conn), None))
            except Exception:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise _OpFailed from None
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            return self._all_failed(conn, batch, error)
        return results

    def _run_isolated(self, conn: sqlite3.Connection, batch: _Batch) -> _Results:
        """Each op in a savepoint of one transaction: a failing op is rolled back alone."""
        results: _Results = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op, future in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = op(conn)
                except sqlite3.Error as error:
                    conn.execute("ROLLBACK TO op")
                    results.append((future, None, TransportError(f"sqlite broker: {error}")))
                except Exception as error:
                    conn.execute("ROLLBACK TO op")
                    results.append((future, None, error))
                else:
                    results.append((future, value, None))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as error:
            return self._all_failed(conn, batch, error)
        return results

    @staticmethod
    def _all_failed(conn: sqlite3.Connection, batch: _Batch, error: sqlite3.Error) -> _Results:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        failure = TransportError(f"sqlite broker: commit failed: {error}")
        return [(future, None, failure) for _, future in batch]

    @staticmethod
    def _hand_back(results: _Results) -> None:
        """Hand the results to the futures' loops, one callback per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, _Results] = {}
        for item in results:
            by_loop.setdefault(item[0].get_loop(), []).append(item)
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(_resolve, items)


def _data_version(conn: sqlite3.Connection, last: int) -> int:
    """SQLite's count of commits by other connections, or ``last`` if it cannot be read now (the
    file busy in another process's recovery, say): the next look sees what this one missed."""
    try:
        return int(conn.execute("PRAGMA data_version").fetchone()[0])
    except sqlite3.Error:
        return last


def _resolve(items: _Results) -> None:
    for future, value, error in items:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class SqliteBroker:
    """The embedded broker. Build with :func:`callcast.brokers.connect` (``sqlite:///path.db``)."""

    capabilities = CAPABILITIES

    def __init__(self, url: str = f"sqlite:///{DEFAULT_PATH}") -> None:
        self.url = url
        self.path, options = parse_url(url)
        unknown = sorted(set(options) - {"lease", "synchronous"})
        if unknown:
            raise ConfigurationError(
                f"sqlite broker: unknown option(s) {', '.join(unknown)} in {url!r}; "
                "the options are lease and synchronous"
            )
        synchronous = options.get("synchronous", "full").upper()
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigurationError(
                f"sqlite broker: synchronous must be full|normal|extra, got {synchronous!r}"
            )
        self.lease = seconds_option("sqlite", options, "lease", 10.0)
        self._synchronous = synchronous
        self._writer: _Writer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriptions: set[_SqliteSubscription] = set()
        self._closing = False  # close() began: subscribe refuses what it would open
        self._close_once = CloseOnce()
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._settling: _Settles | None = None

    # -- plumbing -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the file (creating it and its schema); called by :func:`callcast.brokers.connect`."""
        self._loop = asyncio.get_running_loop()
        writer = _Writer(self.path, self._synchronous, self._wake_all_threadsafe)
        writer.start()
        await asyncio.to_thread(writer.ready.wait)
        if writer.startup_error is not None:
            raise BrokerUnavailableError(
                f"sqlite broker: cannot open {self.path}: {writer.startup_error}"
            ) from None
        self._writer = writer
        self._tasks = [
            asyncio.create_task(self._renew_forever(), name="callcast-sqlite-renew"),
            asyncio.create_task(self._collect_forever(), name="callcast-sqlite-gc"),
        ]

    async def _run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed or self._writer is None:
            raise BrokerUnavailableError("sqlite broker is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.ops.put((op, future))
        if self._writer.stopped:  # it stopped before it could take this op
            self._writer.fail_queued()
        return await future

    def _wake_all_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        for subscription in self._subscriptions:
            subscription.wake.set()

    def _wake_group(self, group: str) -> None:
        for subscription in self._subscriptions:
            if subscription.group == group:
                subscription.wake.set()

    # -- the seam -------------------------------------------------------------------------------

    async def publish(self, topic: str, envelopes: Sequence[Envelope], *, group: str | None = None) -> None:
        rows = [
            (orjson.dumps(envelope.headers()).decode(), envelope.data, envelope.partition_key)
            for envelope in envelopes
        ]

        def insert(conn: sqlite3.Connection) -> list[str]:
            groups = [
                row[0] for row in conn.execute("SELECT grp FROM subscriptions WHERE topic = ?", (topic,))
            ]
            if group is not None:
                groups = [name for name in groups if name == group]
            if not groups:
                return []
            for headers, body, key in rows:
                cursor = conn.execute(
                    "INSERT INTO messages (topic, headers, body) VALUES (?, ?, ?)", (topic, headers, body)
                )
                seq = cursor.lastrowid
                conn.executemany(
                    "INSERT INTO deliveries (grp, seq, pkey) VALUES (?, ?, ?)",
                    [(group, seq, key) for group in groups],
                )
            return groups

        for group in await self._run(insert):
            self._wake_group(group)

    async def declare(self, topic: str, group: str) -> None:
        await self._declare(topic, group, ephemeral=False)

    async def _declare(self, topic: str, group: str, *, ephemeral: bool) -> None:
        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO subscriptions (topic, grp, ephemeral, heartbeat) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (topic, grp) DO NOTHING",
                (topic, group, int(ephemeral), time.time()),
            )

        await self._run(upsert)

    async def subscribe(
        self,
        topic: str,
        group: str,
        *,
        prefetch: int = 32,
        ephemeral: bool = False,
        holding: Holding | None = None,
    ) -> _SqliteSubscription:
        if self._closing:
            raise BrokerUnavailableError("sqlite broker is closed")
        await self._declare(topic, group, ephemeral=ephemeral)
        if self._closing:  # close() began meanwhile: it would not see this subscription
            raise BrokerUnavailableError("sqlite broker is closed")
        subscription = _SqliteSubscription(self, topic, group, max(1, prefetch), ephemeral, holding)
        self._subscriptions.add(subscription)
        return subscription

    async def close(self) -> None:
        self._closing = True
        await self._close_once.run(self._shutdown)

    async def _shutdown(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._closed = True
        if self._writer is not None:
            self._writer.ops.put(None)
            await asyncio.to_thread(self._writer.join)

    # -- subscriber operations ------------------------------------------------------------------

    async def _claim(
        self, topic: str, group: str, owner: str, limit: int, held: Sequence[int]
    ) -> list[tuple[Envelope, int, int]]:
        lease = self.lease
        held_json = orjson.dumps(list(held)).decode()

        def claim(conn: sqlite3.Connection) -> list[tuple[int, int, str, bytes]]:
            now = time.time()
            claimed = conn.execute(
                _CLAIM,
                {
                    "owner": owner,
                    "lease_until": now + lease,
                    "grp": group,
                    "topic": topic,
                    "now": now,
                    "limit": limit,
                    "held": held_json,
                },
            ).fetchall()
            if not claimed:
                return []
            attempts = dict(claimed)
            marks = ",".join("?" * len(attempts))
            rows = conn.execute(
                f"SELECT seq, headers, body FROM messages WHERE seq IN ({marks}) ORDER BY seq",
                list(attempts),
            ).fetchall()
            return [(seq, attempts[seq], headers, body) for seq, headers, body in rows]

        return [
            (decode_or_quarantine(_load_headers(headers), body), seq, attempt)
            for seq, attempt, headers, body in await self._run(claim)
        ]

    async def _settle(self, group: str, seq: int, owner: str, delay: float | None) -> None:
        """Ack (``delay`` None) or nack one delivery. The settles of one loop turn share one op
        (one statement per kind), so a busy consumer costs the writer one op per turn, not per
        message."""
        batch = self._settling
        loop = asyncio.get_running_loop()
        if batch is None:  # the first settle of this loop turn: its task writes the turn's settles
            batch = self._settling = _Settles()
            batch.written = loop.create_task(self._write_settles(batch))
            batch.written.add_done_callback(batch.tell_waiters)
        if delay is None:
            batch.acks.append((group, seq, owner))
        else:
            batch.nacks.append((time.time() + delay, group, seq, owner))
            if delay and self._loop is not None:
                self._loop.call_later(delay, self._wake_group, group)
        batch.groups.add(group)
        settled: asyncio.Future[None] = loop.create_future()
        batch.waiters.append(settled)
        await settled

    async def _write_settles(self, batch: _Settles) -> None:
        """Starts once the loop turn that opened ``batch`` is over; writes its settles in one op."""
        if self._settling is batch:
            self._settling = None

        def settle(conn: sqlite3.Connection) -> None:
            if batch.acks:
                conn.executemany("DELETE FROM deliveries WHERE grp = ? AND seq = ? AND owner = ?", batch.acks)
            if batch.nacks:
                conn.executemany(
                    "UPDATE deliveries SET owner = NULL, lease_until = NULL, available_at = ? "
                    "WHERE grp = ? AND seq = ? AND owner = ?",
                    batch.nacks,
                )

        try:
            await self._run(settle)
        finally:
            for group in batch.groups:
                self._wake_group(group)

    async def _release(
        self, owner: str, group: str, topic: str, ephemeral: bool, never_handed_out: list[int]
    ) -> None:
        def release(conn: sqlite3.Connection) -> None:
            if ephemeral:
                conn.execute("DELETE FROM subscriptions WHERE topic = ? AND grp = ?", (topic, group))
                conn.execute(_DROP_GROUP, (group, topic))
            else:
                # Claimed into the buffer but never handed out: that was no delivery attempt.
                conn.executemany(
                    "UPDATE deliveries SET attempts = attempts - 1 WHERE grp = ? AND seq = ? AND owner = ?",
                    [(group, seq, owner) for seq in never_handed_out],
                )
                conn.execute(
                    "UPDATE deliveries SET owner = NULL, lease_until = NULL WHERE owner = ?", (owner,)
                )

        await self._run(release)
        self._wake_group(group)

    async def _renew_forever(self) -> None:
        """Every lease/3 seconds: renew this process's leases and heartbeats. A task of its own, so
        a long garbage collection never holds a renewal back past a live holder's lease."""
        while True:
            await asyncio.sleep(self.lease / 3)
            held = [
                (s.owner, s.group, s.topic, s.ephemeral, list(s.outstanding))
                for s in self._subscriptions
                if not s.closed
            ]
            with contextlib.suppress(TransportError):
                await self._run(functools.partial(_renew, held, self.lease))

    async def _collect_forever(self) -> None:
        """Every lease/3 seconds: delete the settled messages, all of them, one op per
        :data:`GARBAGE_BATCH` (renewals, claims and other processes get the write lock between)."""
        while True:
            await asyncio.sleep(self.lease / 3)
            with contextlib.suppress(TransportError):
                while await self._run(_collect_garbage) == GARBAGE_BATCH:
                    pass


def _renew(held: list[tuple[str, str, str, bool, list[int]]], lease: float, conn: sqlite3.Connection) -> None:
    """Extend the leases of the deliveries live subscribers hold, and the heartbeats of their
    ephemeral groups; drop the ephemeral groups of dead subscribers. A delivery its subscriber no
    longer tracks (its settle failed) is not renewed: its lease runs out and the group gets it back."""
    now = time.time()
    for owner, group, topic, ephemeral, seqs in held:
        conn.executemany(
            "UPDATE deliveries SET lease_until = ? WHERE grp = ? AND seq = ? AND owner = ?",
            [(now + lease, group, seq, owner) for seq in seqs],
        )
        if ephemeral:
            conn.execute(
                "UPDATE subscriptions SET heartbeat = ? WHERE topic = ? AND grp = ?", (now, topic, group)
            )
    stale = conn.execute(
        "SELECT topic, grp FROM subscriptions WHERE ephemeral = 1 AND heartbeat < ?",
        (now - max(60.0, 6 * lease),),
    ).fetchall()
    for topic, group in stale:
        conn.execute("DELETE FROM subscriptions WHERE topic = ? AND grp = ?", (topic, group))
        conn.execute(_DROP_GROUP, (group, topic))


def _collect_garbage(conn: sqlite3.Connection) -> int:
    """Delete up to :data:`GARBAGE_BATCH` messages no group still has to receive; how many."""
    return conn.execute(
        "DELETE FROM messages WHERE seq IN (SELECT m.seq FROM messages AS m WHERE NOT EXISTS "
        f"(SELECT 1 FROM deliveries AS d WHERE d.seq = m.seq) LIMIT {GARBAGE_BATCH})"
    ).rowcount


class _SqliteSubscription:
    def __init__(
        self,
        broker: SqliteBroker,
        topic: str,
        group: str,
        prefetch: int,
        ephemeral: bool,
        holding: Holding | None,
    ) -> None:
        self.broker = broker
        self.holding = holding
        self.topic = topic
        self.group = group
        self.prefetch = prefetch
        self.ephemeral = ephemeral
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.outstanding: set[int] = set()
        self.buffer: list[_SqliteDelivery] = []
        self.wake = asyncio.Event()
        self.claiming: asyncio.Task[None] | None = None
        self.closed = False
        self.poll_interval = 0.25  # leases of dead subscribers and due retries of other processes

    def __aiter__(self) -> _SqliteSubscription:
        return self

    async def __anext__(self) -> Delivery:
        while not self.closed:
            if self.buffer:
                return self.buffer.pop(0)
            self.wake.clear()  # before looking: whatever changes from here on sets it again
            room = self.prefetch - len(self.outstanding)
            if room > 0:
                if self.claiming is None:
                    self.claiming = asyncio.create_task(self._claim(room), name="callcast-sqlite-claim")
                claiming = self.claiming
                try:
                    # Shielded: if our caller is cancelled (a timeout), the claim still lands in the
                    # buffer for the next call, instead of leaving rows owned but never handed out.
                    await asyncio.shield(claiming)
                finally:
                    if claiming.done() and self.claiming is claiming:
                        self.claiming = None
                if self.buffer:
                    continue
            await wait_event(self.wake, self.poll_interval)
        raise StopAsyncIteration

    async def _claim(self, limit: int) -> None:
        if self.closed:  # checked before queueing the claim, so close()'s release comes after it
            return
        claimed = await self.broker._claim(self.topic, self.group, self.owner, limit, list(self.outstanding))
        # Kept even if the subscription closed meanwhile: close() waits for this claim and hands
        # these rows back as never handed out.
        for envelope, seq, attempt in claimed:
            self.outstanding.add(seq)
            self.buffer.append(_SqliteDelivery(self, seq, attempt, envelope))
            if self.holding is not None:
                self.holding.fetched(envelope)

    async def settle(self, delivery: _SqliteDelivery, delay: float | None) -> None:
        seq = delivery._seq
        if self.closed or seq not in self.outstanding:
            return
        self.outstanding.discard(seq)
        try:
            await self.broker._settle(self.group, seq, self.owner, delay)
        finally:  # settled; or, if the write failed, no longer renewed: its lease runs out
            if self.holding is not None:
                self.holding.returned(delivery.envelope)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        claiming = self.claiming
        if claiming is not None:
            await asyncio.wait({claiming})
        settling = self.broker._settling  # settles of this loop turn, not yet queued: before the release
        if settling is not None and settling.written is not None:
            await asyncio.wait({settling.written})
        never_handed_out = [delivery._seq for delivery in self.buffer]
        returned = [delivery.envelope for delivery in self.buffer]
        self.buffer.clear()
        self.outstanding.clear()
        self.wake.set()
        self.broker._subscriptions.discard(self)
        with contextlib.suppress(TransportError):
            await self.broker._release(self.owner, self.group, self.topic, self.ephemeral, never_handed_out)
        if self.holding is not None:  # after the release: a kill before it counts them
            for envelope in returned:
                self.holding.returned(envelope)


class _SqliteDelivery:
    __slots__ = ("_seq", "_subscription", "attempt", "envelope")

    def __init__(self, subscription: _SqliteSubscription, seq: int, attempt: int, envelope: Envelope) -> None:
        self._subscription = subscription
        self._seq = seq
        self.attempt = attempt
        self.envelope = envelope

    async def ack(self) -> None:
        await self._subscription.settle(self, None)

    async def nack(self, *, delay: float = 0.0) -> None:
        await self._subscription.settle(self, max(0.0, delay))


def _load_headers(text: str) -> dict[str, str]:
    try:
        headers = orjson.loads(text)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}

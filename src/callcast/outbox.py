"""The transactional outbox: events published inside a database transaction are sent if, and only
if, the transaction commits.

``ctx.publish`` inside ``async with ctx.transaction():`` (or in an idempotent handler) does not talk
to the broker: it inserts the envelope into ``callcast_outbox`` through the transaction's connection.
A :class:`Relay` in every process that runs the service then moves committed rows to the broker:

1. claim a batch of rows (``claimed_by``/``claimed_until``: a lease; ``FOR UPDATE SKIP LOCKED`` on
   PostgreSQL, the write lock on SQLite), so two relays never publish the same row at once;
2. publish them (returns once the broker stored them durably);
3. delete them.

Rows staged in this process are inserted already claimed by its relay, which publishes them right
after the commit (no claiming round trip, so the event leaves within a millisecond or two) and
deletes them in its next batch; other processes' rows and rows whose lease ran out (their process
died) go through the claiming path.

A crash between commit and publish loses nothing (the row waits; the lease of a crashed relay, 5 s
by default, runs out and another relay takes it). A live relay renews the lease of the rows it is
publishing every half lease, so a broker slower than the lease does not hand them to another relay
mid-send (which would send them twice, and could overtake them). A crash after publishing and
before deleting publishes the row again later, with the same envelope id: the consumers' inbox
absorbs the duplicate. Rows of one batch keep their commit order per topic; rows are never published for a
rolled-back transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from callcast.database import Database, outbox_table
from callcast.envelope import Envelope, decode_or_quarantine
from callcast.exceptions import BrokerUnavailableError, TransportError
from callcast.transport import Broker
from callcast.waiting import wait_event

log = logging.getLogger("callcast.outbox")


async def stage(conn: AsyncConnection, topic: str, envelope: Envelope, relay: Relay | None = None) -> int:
    """Insert ``envelope`` into the outbox, inside the caller's transaction; its row id.

    With ``relay``, the row is inserted already claimed by that relay (so no other relay takes it
    while its lease lasts), for :meth:`Relay.committed` to send straight after the commit.
    """
    now = time.time()
    result = await conn.execute(
        outbox_table.insert().values(
            topic=topic,
            headers=json.dumps(envelope.headers(), separators=(",", ":")),
            body=envelope.data,
            created_at=now,
            claimed_by=relay.relay_id if relay is not None else None,
            claimed_until=now + relay.lease if relay is not None else None,
        )
    )
    primary_key = result.inserted_primary_key
    assert primary_key is not None  # an INSERT of one row always has one
    return int(primary_key[0])


Staged = tuple[int, str, Envelope]
"""An outbox row written in this process: (row id, topic, envelope)."""


_CLAIM_POSTGRES = text(
    "UPDATE callcast_outbox SET claimed_by = :me, claimed_until = :until WHERE id IN ("
    " SELECT id FROM callcast_outbox WHERE claimed_until IS NULL OR claimed_until < :now"
    " ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED)"
    " RETURNING id, topic, headers, body"
)
_CLAIM_SQLITE = text(
    "UPDATE callcast_outbox SET claimed_by = :me, claimed_until = :until WHERE id IN ("
    " SELECT id FROM callcast_outbox WHERE claimed_until IS NULL OR claimed_until < :now"
    " ORDER BY id LIMIT :limit)"
    " RETURNING id, topic, headers, body"
)


class Relay:
    """Moves one database's committed outbox rows to the broker, until stopped."""

    def __init__(
        self, database: Database, broker: Broker, *, lease: float = 5.0, batch: int = 256, poll: float = 0.5
    ) -> None:
        self.database = database
        self.broker = broker
        self.lease = lease
        self.batch = batch
        self.poll = poll
        self.relay_id = uuid.uuid4().hex[:16]
        self.published = 0
        self.failures = 0
        """Relay passes that failed (the database or the broker away), each followed by a pause."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._queued: list[Staged] = []  # committed here, to send in commit order
        self._detoured: set[str] = set()  # topics whose send failed: later rows wait their turn
        self._sender: asyncio.Task[None] | None = None
        self._sent: set[int] = set()  # published, to delete
        self._unsent: set[int] = set()  # publish failed, to release for a retry

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay:{self.database.url}")

    def committed(self, rows: list[Staged]) -> None:
        """Rows staged for this relay were committed: publish them now, without claiming them. One
        sender publishes the commits of this process in their order (each send takes every row
        committed meanwhile), so events of one key published by successive transactions reach the
        broker in that order. Once a topic's send failed, its later rows take the claiming path
        too (which sends in commit order) until the outbox has drained."""
        self._queued.extend(rows)
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_queued())

    async def _send_queued(self) -> None:
        while self._queued:
            rows, self._queued = self._queued, []
            await self._send(rows)

    async def _send(self, rows: list[Staged]) -> None:
        by_topic: dict[str, list[Staged]] = defaultdict(list)
        for row in rows:
            by_topic[row[1]].append(row)
        async with self._kept_claimed([row_id for row_id, _, _ in rows]):
            await self._send_by_topic(by_topic)
        self._wake.set()

    async def _send_by_topic(self, by_topic: dict[str, list[Staged]]) -> None:
        for topic, items in by_topic.items():
            if topic in self._detoured:  # an earlier row failed: this one must not overtake it
                self._unsent.update(row_id for row_id, _, _ in items)
                continue
            try:
                await self.broker.publish(topic, [envelope for _, _, envelope in items])
            except TransportError as error:
                log.warning("outbox relay of %s: publish failed (%s); will retry", self.database.url, error)
                self._unsent.update(row_id for row_id, _, _ in items)
                self._detoured.add(topic)
            else:
                self._sent.update(row_id for row_id, _, _ in items)
                self.published += len(items)

    @contextlib.asynccontextmanager
    async def _kept_claimed(self, row_ids: list[int]) -> AsyncIterator[None]:
        """While the body runs (a publish), extend this relay's claim on ``row_ids`` every half
        lease. A claim another relay took meanwhile (this one's ran out) is left alone. Only a body
        that outlasts half a lease gets a renewal task: the usual quick publish costs one timer."""

        async def renew() -> None:
            while True:
                try:
                    async with self.database.transaction() as conn:
                        await conn.execute(
                            outbox_table.update()
                            .where(outbox_table.c.id.in_(row_ids), outbox_table.c.claimed_by == self.relay_id)
                            .values(claimed_until=time.time() + self.lease)
                        )
                except Exception as error:  # the database is away: the claim may run out
                    log.warning(
                        "outbox relay of %s: renewing a claim: %s", self.database.url, type(error).__name__
                    )
                await asyncio.sleep(self.lease / 2)

        renewing: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        timer = loop.call_later(
            self.lease / 2, lambda: renewing.append(loop.create_task(renew(), name="outbox-claim-renewal"))
        )
        try:
            yield
        finally:
            timer.cancel()
            for task in renewing:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def stop(self) -> None:
        """Finish sends in flight and record them, then stop relaying. Never raises: what it could
        not record is sent again by a relay later (a duplicate the inbox absorbs), never lost."""
        if self._sender is not None and not self._sender.done():
            await asyncio.wait({self._sender}, timeout=5.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self._settle_sent()
        except Exception as error:
            log.warning(
                "outbox relay of %s: recording sent rows at stop: %s", self.database.url, type(error).__name__
            )

    async def _settle_sent(self) -> None:
        """Delete rows sent by :meth:`committed`; release those it could not send."""
        sent, unsent = list(self._sent), list(self._unsent)
        if not sent and not unsent:
            return
        async with self.database.transaction() as conn:
            mine = outbox_table.c.claimed_by == self.relay_id
            if sent:
                await conn.execute(outbox_table.delete().where(outbox_table.c.id.in_(sent), mine))
            if unsent:
                await conn.execute(
                    outbox_table.update()
                    .where(outbox_table.c.id.in_(unsent), mine)
                    .values(claimed_until=None)
                )
        self._sent.difference_update(sent)
        self._unsent.difference_update(unsent)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._settle_sent()
                moved = await self.relay_once()
            except Exception as error:  # the database or the broker is away (refused, timed out...)
                log.warning("outbox relay of %s: %s; retrying", self.database.url, type(error).__name__)
                self.failures += 1
                moved = -1
                await asyncio.sleep(self.poll)
            if moved == 0 and not self._unsent:
                self._detoured.clear()  # nothing left behind: commits may go straight out again
            if moved < self.batch:  # drained: wait for a local commit or poll for other processes'
                await wait_event(self._wake, self.poll)

    async def drain(self) -> None:
        """Relay until the outbox is empty (at stop: send what was committed)."""
        while await self.relay_once():
            pass

    async def relay_once(self) -> int:
        """Claim, publish and delete one batch; the number of rows claimed.

        A topic whose publish fails is tried again one row at a time, so a row the broker refuses
        for good (too large for it, say) holds back only the later rows of its partition key; the
        rows not sent stay claimed, and are tried again when their lease runs out. While the broker
        is unavailable, the batch waits whole."""
        now = time.time()
        claim = _CLAIM_POSTGRES if self.database.dialect == "postgresql" else _CLAIM_SQLITE
        async with self.database.transaction() as conn:
            rows = (
                await conn.execute(
                    claim, {"me": self.relay_id, "until": now + self.lease, "now": now, "limit": self.batch}
                )
            ).all()
        if not rows:
            return 0
        by_topic: dict[str, list[tuple[int, Envelope]]] = defaultdict(list)
        for row_id, topic, headers, body in sorted(rows):
            by_topic[topic].append((row_id, decode_or_quarantine(json.loads(headers), bytes(body))))
        sent: list[int] = []
        async with self._kept_claimed([row[0] for row in rows]):
            for topic, items in by_topic.items():
                try:
                    await self.broker.publish(topic, [envelope for _, envelope in items])
                except BrokerUnavailableError:
                    if not sent:
                        raise
                    break  # the broker went away: delete what was sent, the rest waits its lease
                except TransportError as error:
                    log.warning(
                        "outbox relay of %s: publish to %s failed (%s); sending its rows one by one",
                        self.database.url,
                        topic,
                        error,
                    )
                    sent += await self._publish_one_by_one(topic, items, until=now + self.lease / 2)
                else:
                    sent += [row_id for row_id, _ in items]
        if sent:
            async with self.database.transaction() as conn:
                await conn.execute(
                    outbox_table.delete().where(
                        outbox_table.c.id.in_(sent), outbox_table.c.claimed_by == self.relay_id
                    )
                )
        self.published += len(sent)
        return len(rows)

    async def _publish_one_by_one(
        self, topic: str, items: list[tuple[int, Envelope]], *, until: float
    ) -> list[int]:
        """Publish ``items`` (in commit order) one at a time, until the UNIX time ``until`` (well
        within the claim's lease: a broker that times out on each row must not keep them claimed
        past it); the row ids sent. A row that fails holds back the later rows of its partition
        key (their order), not the others."""
        sent: list[int] = []
        held_back: set[str | None] = set()
        for row_id, envelope in items:
            key = envelope.partition_key
            if time.time() > until:
                break
            if key in held_back:
                continue
            try:
                await self.broker.publish(topic, [envelope])
            except BrokerUnavailableError:
                break
            except TransportError as error:
                log.warning(
                    "outbox relay of %s: row %d (to %s) cannot be published: %s; kept",
                    self.database.url,
                    row_id,
                    topic,
                    error,
                )
                if key is not None:
                    held_back.add(key)
            else:
                sent.append(row_id)
        return sent

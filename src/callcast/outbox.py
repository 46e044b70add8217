"""The transactional outbox: events published inside a database transaction are sent if, and only
if, the transaction commits.

``ctx.publish`` inside ``async with ctx.transaction():`` (or in an idempotent handler) does not talk
to the broker: it inserts the envelope into ``callcast_outbox`` through the transaction's connection.
A :class:`Relay` in every process that runs the service then moves committed rows to the broker:

1. claim a batch of rows (``claimed_by``/``claimed_until``: a lease; ``FOR UPDATE SKIP LOCKED`` on
   PostgreSQL, the write lock on SQLite), so two relays never publish the same row at once;
2. publish them (returns once the broker stored them durably);
3. delete them.

A crash between commit and publish loses nothing (the row waits; the lease of a crashed relay runs
out and another relay takes it). A crash after publishing and before deleting publishes the row
again later, with the same envelope id: the consumers' inbox absorbs the duplicate. Rows of one
batch keep their commit order per topic; rows are never published for a rolled-back transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from callcast.database import Database, outbox_table
from callcast.envelope import Envelope, decode_or_quarantine
from callcast.exceptions import TransportError
from callcast.transport import Broker

log = logging.getLogger("callcast.outbox")


async def stage(conn: AsyncConnection, topic: str, envelope: Envelope) -> None:
    """Insert ``envelope`` into the outbox, inside the caller's transaction."""
    await conn.execute(
        outbox_table.insert().values(
            topic=topic,
            headers=json.dumps(envelope.headers(), separators=(",", ":")),
            body=envelope.data,
            created_at=time.time(),
        )
    )


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
        self, database: Database, broker: Broker, *, lease: float = 30.0, batch: int = 256, poll: float = 0.5
    ) -> None:
        self.database = database
        self.broker = broker
        self.lease = lease
        self.batch = batch
        self.poll = poll
        self.relay_id = uuid.uuid4().hex[:16]
        self.published = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay:{self.database.url}")

    def notify(self) -> None:
        """Something was committed to the outbox in this process: relay it now."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                moved = await self.relay_once()
            except (SQLAlchemyError, TransportError) as error:
                log.warning("outbox relay of %s: %s; retrying", self.database.url, type(error).__name__)
                moved = 0
                await asyncio.sleep(self.poll)
            if moved < self.batch:  # drained: wait for a local commit or poll for other processes'
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll)

    async def drain(self) -> None:
        """Relay until the outbox is empty (at stop: send what was committed)."""
        while await self.relay_once():
            pass

    async def relay_once(self) -> int:
        """Claim, publish and delete one batch; the number of rows moved."""
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
        for topic, items in by_topic.items():
            await self.broker.publish(topic, [envelope for _, envelope in items])
        async with self.database.transaction() as conn:
            await conn.execute(
                outbox_table.delete().where(
                    outbox_table.c.id.in_([row[0] for row in rows]),
                    outbox_table.c.claimed_by == self.relay_id,
                )
            )
        self.published += len(rows)
        return len(rows)

"""Sequenced handlers: each partition key's messages applied in sequence order, whatever order the
broker delivers them in.

A message carries its sequence number in the ``sequence`` extension (``ctx.publish(e, key=k,
sequence=n)``) or in a field of the event (``SequencePolicy(field="version")``). The handler
declares ``@svc.on(Event, sequenced=True)``; per (subscriber, key) the service's database keeps the
last sequence applied (``callcast_sequences``). For each message, in one transaction that holds that
key's row lock:

* ``sequence <= last``: stale or a duplicate — acknowledged and skipped (this is also what makes a
  sequenced handler idempotent);
* ``sequence == last + 1``: applied (the handler runs; ``ctx.db`` is the transaction), ``last``
  moves on, and then any parked successors that are now next are applied, each in its own
  transaction (parked copies of sequences already applied are dropped then);
* ``sequence > last + 1``: a gap — the message is parked in ``callcast_parked`` and acknowledged;
  it is applied when the missing one arrives, or dead-lettered with reason ``gap`` after
  ``gap_timeout`` seconds.

Sequences start at ``first`` (default 1) for a key never seen.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel
from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from callcast.database import parked_table, sequence_table
from callcast.envelope import Envelope, decode_or_quarantine
from callcast.exceptions import ConfigurationError, DecodeError


@dataclass(frozen=True, slots=True)
class SequencePolicy:
    field: str | None = None
    """The event field holding the sequence number; ``None``: the envelope's ``sequence`` extension."""
    first: int = 1
    """The sequence number a key starts at."""
    gap_timeout: float = 60.0
    """Seconds a message may wait parked for a missing predecessor before it is dead-lettered."""

    def __post_init__(self) -> None:
        if self.gap_timeout <= 0:
            raise ConfigurationError("gap_timeout must be positive")

    def sequence_of(self, envelope: Envelope, event: BaseModel) -> int:
        """The message's sequence number; :class:`DecodeError` if it has none."""
        raw = getattr(event, self.field, None) if self.field else envelope.extensions.get("sequence")
        if raw is None or isinstance(raw, bool):
            where = f"field {self.field!r}" if self.field else "extension 'sequence'"
            raise DecodeError(f"a sequenced handler got a message without a sequence number ({where})")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise DecodeError(f"sequence number {raw!r} is not an integer") from None


class Verdict(Enum):
    APPLY = "apply"
    STALE = "stale"
    EARLY = "early"


async def admit(conn: AsyncConnection, subscriber: str, key: str, sequence: int, first: int) -> Verdict:
    """Lock the key's row (creating it) and say what to do with ``sequence``."""
    insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
    await conn.execute(
        insert(sequence_table)
        .values(subscriber=subscriber, key=key, last_sequence=first - 1)
        .on_conflict_do_nothing(index_elements=["subscriber", "key"])
    )
    query = select(sequence_table.c.last_sequence).where(
        sequence_table.c.subscriber == subscriber, sequence_table.c.key == key
    )
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    last = (await conn.execute(query)).scalar_one()
    if sequence <= last:
        return Verdict.STALE
    return Verdict.APPLY if sequence == last + 1 else Verdict.EARLY


async def lock_key(conn: AsyncConnection, subscriber: str, key: str, first: int) -> None:
    """Take ``key``'s row lock (creating its row) for the rest of the transaction."""
    await admit(conn, subscriber, key, 0, first)


async def advance(conn: AsyncConnection, subscriber: str, key: str, sequence: int) -> None:
    await conn.execute(
        sequence_table.update()
        .where(sequence_table.c.subscriber == subscriber, sequence_table.c.key == key)
        .values(last_sequence=sequence)
    )


async def park(conn: AsyncConnection, subscriber: str, key: str, sequence: int, envelope: Envelope) -> bool:
    """Keep an early message until its predecessors are applied; False if a copy of it is parked
    already (this one is ignored)."""
    insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
    result = await conn.execute(
        insert(parked_table)
        .values(
            subscriber=subscriber,
            key=key,
            sequence=sequence,
            headers=json.dumps(envelope.headers(), separators=(",", ":")),
            body=envelope.data,
            parked_at=time.time(),
        )
        .on_conflict_do_nothing(index_elements=["subscriber", "key", "sequence"])
    )
    return bool(result.rowcount == 1)


async def _last_applied(conn: AsyncConnection, subscriber: str, key: str) -> int | None:
    """The key's last applied sequence; ``None`` before the key was first admitted."""
    last: int | None = (
        await conn.execute(
            select(sequence_table.c.last_sequence).where(
                sequence_table.c.subscriber == subscriber, sequence_table.c.key == key
            )
        )
    ).scalar_one_or_none()
    return last


def _parked(subscriber: str, key: str, number: int) -> ColumnElement[bool]:
    """The row of parked message ``number`` of ``key``."""
    return and_(
        parked_table.c.subscriber == subscriber,
        parked_table.c.key == key,
        parked_table.c.sequence == number,
    )


STARTS = "x-callcast-parked-starts"
"""Kept in a parked message's stored headers (which envelopes do not read back): how often its
handler was started. A start that killed the process leaves no other trace, and this bounds it."""


async def start_parked(conn: AsyncConnection, subscriber: str, key: str) -> tuple[int, int, Envelope] | None:
    """Count one more start of the parked message that is next for ``key`` (its row lock must be
    held; commit before running the handler): its sequence, the starts counted before this one, and
    the envelope; ``None`` if none is next."""
    last = await _last_applied(conn, subscriber, key)
    if last is None:
        return None
    this = _parked(subscriber, key, last + 1)
    raw = (await conn.execute(select(parked_table.c.headers, parked_table.c.body).where(this))).first()
    if raw is None:
        return None
    headers = json.loads(raw[0])
    starts = int(headers.get(STARTS, 0))
    headers[STARTS] = str(starts + 1)
    await conn.execute(
        parked_table.update().where(this).values(headers=json.dumps(headers, separators=(",", ":")))
    )
    return last + 1, starts, decode_or_quarantine(headers, bytes(raw[1]))


async def is_next_parked(conn: AsyncConnection, subscriber: str, key: str, number: int) -> bool:
    """Whether parked message ``number`` of ``key`` is there and next (hold the key's row lock)."""
    last = await _last_applied(conn, subscriber, key)
    if last is None or number != last + 1:
        return False
    row = await conn.execute(select(parked_table.c.sequence).where(_parked(subscriber, key, number)))
    return row.first() is not None


async def drop_parked(conn: AsyncConnection, subscriber: str, key: str, number: int) -> bool:
    """Remove parked message ``number`` of ``key``; whether it was there."""
    result = await conn.execute(parked_table.delete().where(_parked(subscriber, key, number)))
    return bool(result.rowcount == 1)


async def take_parked(conn: AsyncConnection, subscriber: str, key: str) -> tuple[int, Envelope] | None:
    """Remove and return the parked message that is next for ``key`` (its row lock must be held).

    Parked copies of sequences already applied are removed too: a message parked while early can
    also be applied from a redelivered copy (its lease ran out, or its ack was lost)."""
    last = await _last_applied(conn, subscriber, key)
    if last is None:
        return None
    where = and_(
        parked_table.c.subscriber == subscriber,
        parked_table.c.key == key,
        parked_table.c.sequence <= last + 1,
    )
    rows = (  # what this transaction deleted: a concurrent sweep cannot take the same row too
        await conn.execute(
            parked_table.delete()
            .where(where)
            .returning(parked_table.c.sequence, parked_table.c.headers, parked_table.c.body)
        )
    ).all()
    for number, headers, body in rows:
        if number == last + 1:
            return number, decode_or_quarantine(json.loads(headers), bytes(body))
    return None


async def parked_keys(conn: AsyncConnection, subscriber: str) -> list[str]:
    """Keys that have parked messages."""
    rows = await conn.execute(
        select(parked_table.c.key).where(parked_table.c.subscriber == subscriber).distinct()
    )
    return [row[0] for row in rows]


async def expired(
    conn: AsyncConnection, subscriber: str, older_than: float
) -> list[tuple[str, int, Envelope]]:
    """The parked messages that waited longer than ``older_than`` seconds (read, not removed)."""
    cutoff = time.time() - older_than
    rows = await conn.execute(
        select(
            parked_table.c.key, parked_table.c.sequence, parked_table.c.headers, parked_table.c.body
        ).where(parked_table.c.subscriber == subscriber, parked_table.c.parked_at < cutoff)
    )
    return [
        (key, seq, decode_or_quarantine(json.loads(headers), bytes(body))) for key, seq, headers, body in rows
    ]

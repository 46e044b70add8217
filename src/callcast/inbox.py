"""The inbox: idempotent consumers, so a redelivered or re-published message has its effect once.

``@svc.on(Event, idempotent=True)`` runs the handler inside a transaction of the service's database
(:mod:`callcast.database`) that first records (subscriber, message id) in ``callcast_inbox``:

* the record and the handler's own writes through ``ctx.db`` commit together, or not at all;
* a message whose record exists is acknowledged without running the handler (a duplicate, counted
  in the record's ``duplicates`` column);
* two workers given the same message at the same moment cannot both apply it: the second one's
  insert waits on the first one's transaction (PostgreSQL row lock, SQLite write lock) and then
  finds the record.

Effects outside the database (an HTTP call, a sent email through a provider) are not covered by
the transaction: they may repeat if the process dies after them and before the commit.
"""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from callcast.database import inbox_table


async def claim(conn: AsyncConnection, subscriber: str, message_id: str) -> bool:
    """Record the message for ``subscriber`` in this transaction; False if it was already recorded."""
    insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = (
        insert(inbox_table)
        .values(subscriber=subscriber, message_id=message_id, handled_at=time.time())
        .on_conflict_do_nothing(index_elements=["subscriber", "message_id"])
    )
    if (await conn.execute(statement)).rowcount == 1:
        return True
    await conn.execute(
        inbox_table.update()
        .where(inbox_table.c.subscriber == subscriber, inbox_table.c.message_id == message_id)
        .values(duplicates=inbox_table.c.duplicates + 1)
    )
    return False


async def forget_older_than(conn: AsyncConnection, seconds: float) -> int:
    """Drop inbox records older than ``seconds``; a duplicate arriving later would be applied again."""
    result = await conn.execute(inbox_table.delete().where(inbox_table.c.handled_at < time.time() - seconds))
    return result.rowcount


async def recorded(conn: AsyncConnection, subscriber: str, message_id: str) -> bool:
    """Whether the message's effects already committed for ``subscriber``."""
    query = select(inbox_table.c.message_id).where(
        inbox_table.c.subscriber == subscriber, inbox_table.c.message_id == message_id
    )
    return (await conn.execute(query)).first() is not None

"""The downstream effects' durable record: one row per *application* of an effect to an order.

Each downstream service keeps the table in its own database (``Service(..., database=True)``), and
writes the row in the same transaction as the rest of its work (in an idempotent event handler, the
transaction that also records the message id in the inbox). There is deliberately no unique
constraint: an effect applied twice leaves two rows, so duplicates are counted, not hidden.
``applied_at`` is the wall-clock time (``time.time()``) the effect was applied.
"""

from __future__ import annotations

import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from callcast.runtime import Runtime

TABLE = "lab_effects"


async def create_table(db: AsyncConnection) -> None:
    """Create the effect table if it is missing."""
    await db.execute(
        text(f"CREATE TABLE IF NOT EXISTS {TABLE} (order_id TEXT NOT NULL, applied_at REAL NOT NULL)")
    )


async def record(db: AsyncConnection, order_id: str) -> None:
    """Record one application of this service's effect to ``order_id``, now."""
    await db.execute(
        text(f"INSERT INTO {TABLE} (order_id, applied_at) VALUES (:order_id, :now)"),
        {"order_id": order_id, "now": time.time()},
    )


async def read(runtime: Runtime, service: str) -> dict[str, list[float]]:
    """Every application of ``service``'s effect: order id → the times it was applied."""
    applied: dict[str, list[float]] = {}
    async with runtime.database(service).transaction() as db:
        rows = await db.execute(text(f"SELECT order_id, applied_at FROM {TABLE} ORDER BY applied_at"))
        for order_id, applied_at in rows:
            applied.setdefault(str(order_id), []).append(float(applied_at))
    return applied

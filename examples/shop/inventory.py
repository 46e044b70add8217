"""inventory: reserves stock for each placed order, all items or none, once per order."""

from __future__ import annotations

import sqlite3

from callcast import Context, Service
from examples.shop.contracts import INITIAL_STOCK, OrderPlaced, Stock, StockReserved, StockShort
from examples.shop.store import Database

inventory = Service("inventory", publishes=[StockReserved, StockShort])

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (order_id TEXT PRIMARY KEY, outcome TEXT NOT NULL);
"""


@inventory.on_startup
async def open_store(ctx: Context) -> None:
    db = Database(ctx.data_dir / "inventory.db", SCHEMA)
    await db.transaction(
        lambda conn: conn.executemany(
            "INSERT OR IGNORE INTO stock VALUES (?, ?)", list(INITIAL_STOCK.items())
        )
    )
    ctx.state.db = db


@inventory.on_shutdown
async def close_store(ctx: Context) -> None:
    ctx.state.db.close()


@inventory.on(OrderPlaced)
async def reserve(event: OrderPlaced, ctx: Context) -> None:
    """Reserve every item or none. Redelivery re-publishes the recorded outcome, never re-reserves."""

    def decide(conn: sqlite3.Connection) -> str:
        done = conn.execute(
            "SELECT outcome FROM reservations WHERE order_id = ?", (event.order_id,)
        ).fetchone()
        if done:
            return str(done[0])
        wanted: dict[str, int] = {}
        for item in event.items:
            wanted[item.sku] = wanted.get(item.sku, 0) + item.qty
        short = []
        for sku, qty in wanted.items():
            row = conn.execute("SELECT available FROM stock WHERE sku = ?", (sku,)).fetchone()
            if row is None or row[0] < qty:
                short.append(f"{sku}: wanted {qty}, available {row[0] if row else 0}")
        outcome = "short:" + "; ".join(short) if short else "reserved"
        if not short:
            conn.executemany(
                "UPDATE stock SET available = available - ? WHERE sku = ?",
                [(qty, sku) for sku, qty in wanted.items()],
            )
        conn.execute("INSERT INTO reservations VALUES (?, ?)", (event.order_id, outcome))
        return outcome

    outcome = await ctx.state.db.transaction(decide)
    if outcome == "reserved":
        await ctx.publish(StockReserved(order_id=event.order_id), key=event.order_id)
    else:
        await ctx.publish(
            StockShort(order_id=event.order_id, reason=outcome.removeprefix("short:")), key=event.order_id
        )


@inventory.get("/inventory")
async def list_stock(ctx: Context) -> list[Stock]:
    rows = await ctx.state.db.fetch("SELECT sku, available FROM stock ORDER BY sku")
    return [Stock(sku=sku, available=available) for sku, available in rows]

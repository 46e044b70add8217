"""inventory: reserves stock for each placed order, all items or none, once per order.

Idempotent (inbox) and keyed by order id: the reservation, its record and the outcome event
(``StockReserved`` or ``StockShort``, through the outbox) commit together.
"""

from __future__ import annotations

from sqlalchemy import text

from callcast import Context, Service
from examples.shop.contracts import INITIAL_STOCK, OrderPlaced, Stock, StockReserved, StockShort

inventory = Service("inventory", publishes=[StockReserved, StockShort], database=True)


@inventory.on_startup
async def create_tables(ctx: Context) -> None:
    async with ctx.transaction() as db:
        await db.execute(
            text("CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, available INTEGER NOT NULL)")
        )
        for sku, available in INITIAL_STOCK.items():
            await db.execute(
                text("INSERT INTO stock VALUES (:sku, :n) ON CONFLICT (sku) DO NOTHING"),
                {"sku": sku, "n": available},
            )


@inventory.on(OrderPlaced, idempotent=True)
async def reserve(event: OrderPlaced, ctx: Context) -> None:
    """Reserve every item or none, and say which."""
    wanted: dict[str, int] = {}
    for item in event.items:
        wanted[item.sku] = wanted.get(item.sku, 0) + item.qty
    short = []
    # Orders of different keys run at once: lock the rows read (in one order, so two orders cannot
    # deadlock), or two could both see the last items free. SQLite's write lock already serialises.
    lock = " FOR UPDATE" if ctx.db.dialect.name == "postgresql" else ""
    for sku, qty in sorted(wanted.items()):
        row = (
            await ctx.db.execute(text(f"SELECT available FROM stock WHERE sku = :sku{lock}"), {"sku": sku})
        ).first()
        available = row[0] if row else 0
        if available < qty:
            short.append(f"{sku}: wanted {qty}, available {available}")
    if short:
        await ctx.publish(StockShort(order_id=event.order_id, reason="; ".join(short)), key=event.order_id)
        return
    for sku, qty in wanted.items():
        await ctx.db.execute(
            text("UPDATE stock SET available = available - :qty WHERE sku = :sku"), {"qty": qty, "sku": sku}
        )
    await ctx.publish(StockReserved(order_id=event.order_id), key=event.order_id)


@inventory.get("/inventory")
async def list_stock(ctx: Context) -> list[Stock]:
    async with ctx.transaction() as db:
        rows = await db.execute(text("SELECT sku, available FROM stock ORDER BY sku"))
        return [Stock(sku=sku, available=available) for sku, available in rows]

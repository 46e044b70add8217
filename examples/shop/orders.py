"""orders: takes orders. Synchronous where the user needs the answer (the user exists, payment is
authorized: RPC), event-driven for the rest (``OrderPlaced`` → inventory → confirmed/rejected)."""

from __future__ import annotations

import sqlite3
import uuid

from callcast import Context, HTTPError, RemoteError, Service
from examples.shop.contracts import (
    PRICES_CENTS,
    Authorize,
    LookupUser,
    Order,
    OrderItem,
    OrderPlaced,
    PlaceOrder,
    StockReserved,
    StockShort,
)
from examples.shop.payments import authorize
from examples.shop.store import Database
from examples.shop.users import lookup

orders = Service("orders", publishes=[OrderPlaced], calls=["users", "payments"])

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, items TEXT NOT NULL, amount_cents INTEGER NOT NULL,
    status TEXT NOT NULL, reason TEXT);
"""


@orders.on_startup
async def open_store(ctx: Context) -> None:
    ctx.state.db = Database(ctx.data_dir / "orders.db", SCHEMA)


@orders.on_shutdown
async def close_store(ctx: Context) -> None:
    ctx.state.db.close()


def _row_to_order(row: tuple[str, str, str, int, str, str | None]) -> Order:
    items = [OrderItem.model_validate_json(item) for item in row[2].split("\n")]
    return Order(id=row[0], user_id=row[1], items=items, amount_cents=row[3], status=row[4], reason=row[5])


async def _save(ctx: Context, order: Order) -> None:
    items = "\n".join(item.model_dump_json() for item in order.items)
    await ctx.state.db.transaction(
        lambda conn: conn.execute(
            "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
            (order.id, order.user_id, items, order.amount_cents, order.status, order.reason),
        )
    )


@orders.post("/orders", status_code=201)
async def place_order(body: PlaceOrder, ctx: Context) -> Order:
    unknown = sorted({item.sku for item in body.items} - PRICES_CENTS.keys())
    if unknown:
        raise HTTPError(422, f"unknown sku(s): {', '.join(unknown)}")
    try:
        await ctx.call(lookup, LookupUser(user_id=body.user_id), timeout=2.0)
    except RemoteError as error:
        if error.status == 404:
            raise HTTPError(404, f"unknown user {body.user_id!r}") from None
        raise
    amount = sum(PRICES_CENTS[item.sku] * item.qty for item in body.items)
    order = Order(
        id=uuid.uuid4().hex, user_id=body.user_id, items=body.items, amount_cents=amount, status="pending"
    )
    auth = await ctx.call(
        authorize, Authorize(order_id=order.id, user_id=order.user_id, amount_cents=amount), timeout=2.0
    )
    if not auth.approved:
        order = order.model_copy(update={"status": "rejected", "reason": f"payment declined: {auth.reason}"})
        await _save(ctx, order)
        return order
    await _save(ctx, order)
    await ctx.publish(
        OrderPlaced(order_id=order.id, user_id=order.user_id, items=order.items, amount_cents=amount),
        key=order.id,
    )
    return order


@orders.get("/orders/{order_id}")
async def get_order(order_id: str, ctx: Context) -> Order:
    rows = await ctx.state.db.fetch(
        "SELECT id, user_id, items, amount_cents, status, reason FROM orders WHERE id = ?", (order_id,)
    )
    if not rows:
        raise HTTPError(404, f"no order {order_id!r}")
    return _row_to_order(rows[0])


async def _settle(ctx: Context, order_id: str, status: str, reason: str | None) -> None:
    def update(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE orders SET status = ?, reason = ? WHERE id = ? AND status = 'pending'",
            (status, reason, order_id),
        )

    await ctx.state.db.transaction(update)


@orders.on(StockReserved)
async def confirm(event: StockReserved, ctx: Context) -> None:
    await _settle(ctx, event.order_id, "confirmed", None)


@orders.on(StockShort)
async def reject(event: StockShort, ctx: Context) -> None:
    await _settle(ctx, event.order_id, "rejected", f"stock short: {event.reason}")

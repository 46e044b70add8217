"""orders: takes orders. Synchronous where the user needs the answer (the user exists, payment is
authorized: RPC), event-driven for the rest (``OrderPlaced`` → inventory → confirmed/rejected).

The order row and ``OrderPlaced`` commit together (the outbox); status updates are idempotent.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text

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
from examples.shop.users import lookup

orders = Service("orders", publishes=[OrderPlaced], calls=["users", "payments"], database=True)


@orders.on_startup
async def create_tables(ctx: Context) -> None:
    async with ctx.transaction() as db:
        await db.execute(
            text(
                "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, "
                "items TEXT NOT NULL, amount_cents INTEGER NOT NULL, status TEXT NOT NULL, reason TEXT)"
            )
        )


def _row_to_order(row: tuple[str, str, str, int, str, str | None]) -> Order:
    items = [OrderItem.model_validate_json(item) for item in row[2].split("\n")]
    return Order(id=row[0], user_id=row[1], items=items, amount_cents=row[3], status=row[4], reason=row[5])


async def _save(ctx: Context, order: Order) -> None:
    await ctx.db.execute(
        text("INSERT INTO orders VALUES (:id, :user_id, :items, :amount, :status, :reason)"),
        {
            "id": order.id,
            "user_id": order.user_id,
            "items": "\n".join(item.model_dump_json() for item in order.items),
            "amount": order.amount_cents,
            "status": order.status,
            "reason": order.reason,
        },
    )


@orders.post("/orders", status_code=201, idempotency="optional")
async def place_order(body: PlaceOrder, ctx: Context) -> Order:
    """Place an order: the user must exist and the payment be authorized (RPC); 201 ``pending``, or
    ``rejected`` when payment is declined. With ``Idempotency-Key``, a retry replays the first answer
    and places no second order."""
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
    async with ctx.transaction():
        if not auth.approved:
            order = order.model_copy(
                update={"status": "rejected", "reason": f"payment declined: {auth.reason}"}
            )
            await _save(ctx, order)
            return order
        await _save(ctx, order)
        placed = OrderPlaced(order_id=order.id, user_id=order.user_id, items=order.items, amount_cents=amount)
        await ctx.publish(placed, key=order.id)
    return order


@orders.get("/orders/{order_id}")
async def get_order(order_id: str, ctx: Context) -> Order:
    async with ctx.transaction() as db:
        row = (
            await db.execute(
                text("SELECT id, user_id, items, amount_cents, status, reason FROM orders WHERE id = :id"),
                {"id": order_id},
            )
        ).first()
    if row is None:
        raise HTTPError(404, f"no order {order_id!r}")
    return _row_to_order(tuple(row))  # type: ignore[arg-type]


async def _settle(ctx: Context, order_id: str, status: str, reason: str | None) -> None:
    await ctx.db.execute(
        text("UPDATE orders SET status = :status, reason = :reason WHERE id = :id AND status = 'pending'"),
        {"status": status, "reason": reason, "id": order_id},
    )


@orders.on(StockReserved, idempotent=True)
async def confirm(event: StockReserved, ctx: Context) -> None:
    await _settle(ctx, event.order_id, "confirmed", None)


@orders.on(StockShort, idempotent=True)
async def reject(event: StockShort, ctx: Context) -> None:
    await _settle(ctx, event.order_id, "rejected", f"stock short: {event.reason}")

"""The order workflow in three styles, as callcast services.

Placing an order has four downstream effects, each owned by its own service: ``payments``
(authorize the payment), ``stock`` (reserve the stock), ``emails`` (send the confirmation) and
``analytics`` (record the sale). The styles differ only in how ``orders`` reaches them:

* ``request``: ``POST /orders`` calls ``payments.apply`` and then the three others (concurrently)
  by RPC, and answers 201 once all four are done; any failed call fails the request.
* ``event``: ``POST /orders`` stores the order and ``OrderPlaced`` in one transaction (the outbox)
  and answers 202; the four services react to the event, each in its own consumer group.
* ``hybrid``: ``payments`` is called by RPC (the user needs the answer), the rest react to
  ``OrderPlaced``; the answer is 201.

The effect code is the same in every style (:func:`_apply`); only the entry point (``@svc.rpc`` or
``@svc.on(OrderPlaced)``) differs. An effect first does its outside work (where the injected faults
are met: the provider's latency, its failures), then records itself in a short transaction. Event
handlers are idempotent: that transaction also claims the message id in callcast's inbox, so a
redelivered event does not apply its effect twice. (``idempotent=True`` would hold the database's
write lock during the outside work too, which on SQLite serialises a slow effect's deliveries.)
Orders whose id does not start with the run's tag are acknowledged and ignored (left over on a
shared broker by an earlier run).

``extra`` adds consumers (``loyalty`` for the ``add-consumer`` scenario): in a style with an event
path the new consumer subscribes to ``OrderPlaced`` and no existing service changes; in the request
style ``orders`` itself must be changed to call it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import text

from callcast import inbox
from callcast.app import App
from callcast.context import Context
from callcast.exceptions import HTTPError
from callcast.lab import effects
from callcast.lab.faults import Faults, InjectedFailure
from callcast.retry import RetryPolicy
from callcast.service import RpcEndpoint, Service

STYLES = ("request", "event", "hybrid")
DOWNSTREAM = ("payments", "stock", "emails", "analytics")
"""The four downstream services, one effect each."""
NEW_CONSUMER = "loyalty"
"""The consumer the ``add-consumer`` scenario adds."""
SYNC_DOWNSTREAM = {"request": DOWNSTREAM, "event": (), "hybrid": ("payments",)}
"""Which downstreams ``orders`` calls synchronously, per style."""
HANDLER_RETRY = RetryPolicy(max_attempts=8, base_delay=0.05, max_delay=0.5)
"""The event handlers' retry policy in the lab (short delays, so runs stay short)."""
ORDER_ID_PATTERN = r"^[a-z0-9-]{1,64}$"


class _Order(BaseModel):
    """What every message about an order carries, validated the same way everywhere."""

    order_id: str = Field(pattern=ORDER_ID_PATTERN)
    amount_cents: int = Field(ge=0, le=10_000_000)


class PlaceOrder(_Order):
    """The user's request. The client chooses the order id, so every request can be followed."""


class OrderAnswer(BaseModel):
    order_id: str
    status: str
    """``placed`` (every effect done) or ``accepted`` (some effects will follow)."""


class OrderPlaced(_Order):
    """The event the event-driven paths react to."""


class EffectRequest(_Order):
    """A synchronous call to one downstream effect."""


class EffectDone(BaseModel):
    order_id: str
    service: str


def sync_downstream(style: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The services ``orders`` calls synchronously in ``style`` (with the ``extra`` consumers)."""
    if style not in SYNC_DOWNSTREAM:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    added = tuple(extra) if style == "request" else ()
    return SYNC_DOWNSTREAM[style] + added


def expected_effects(extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The services that must apply their effect to every accepted order."""
    return DOWNSTREAM + tuple(extra)


def build(
    style: str, faults: Faults, run_tag: str, *, call_timeout: float = 1.0, extra: Sequence[str] = ()
) -> App:
    """The app of ``style``: ``orders`` plus one service per downstream effect (plus ``extra``);
    ``orders`` gives each call ``call_timeout`` seconds."""
    sync = sync_downstream(style, extra)
    downstream = [_downstream(name, name in sync, faults, run_tag) for name in (*DOWNSTREAM, *extra)]
    endpoints = {service.name: service.endpoints["apply"] for service in downstream if service.name in sync}
    return App([_orders(style, endpoints, run_tag, call_timeout), *downstream], name=f"lab-{style}")


async def _create_tables(ctx: Context) -> None:
    async with ctx.transaction() as db:
        await effects.create_table(db)


async def _apply(ctx: Context, faults: Faults, order_id: str, *, inbox_group: str | None = None) -> None:
    """The one effect of ``ctx.service``: the outside work (faults are met here), then the durable
    record in a transaction that, for an event (``inbox_group``), first claims the message id."""
    await faults.disturb(ctx.service)
    async with ctx.transaction() as db:
        duplicate = (
            inbox_group is not None
            and ctx.envelope is not None
            and not await inbox.claim(db, inbox_group, ctx.envelope.id)
        )
        if duplicate:
            return
        await effects.record(db, order_id)


def _downstream(name: str, synchronous: bool, faults: Faults, run_tag: str) -> Service:
    service = Service(name, database=True)
    service.on_startup(_create_tables)
    if synchronous:

        async def apply(request: EffectRequest, ctx: Context) -> EffectDone:
            if not request.order_id.startswith(run_tag):
                raise HTTPError(409, "order of another run")
            try:
                await _apply(ctx, faults, request.order_id)
            except InjectedFailure as failure:
                raise HTTPError(503, str(failure)) from None
            return EffectDone(order_id=request.order_id, service=name)

        service.rpc(name="apply")(apply)
    else:

        async def react(event: OrderPlaced, ctx: Context) -> None:
            if event.order_id.startswith(run_tag):
                await _apply(ctx, faults, event.order_id, inbox_group=f"{name}.apply")

        service.on(OrderPlaced, name="apply", retry=HANDLER_RETRY)(react)
    return service


def _orders(
    style: str, endpoints: dict[str, RpcEndpoint[Any, Any]], run_tag: str, call_timeout: float
) -> Service:
    publishes = [OrderPlaced] if style != "request" else []
    orders = Service("orders", publishes=publishes, calls=sorted(endpoints), database=True)

    @orders.on_startup
    async def create_orders_table(ctx: Context) -> None:
        async with ctx.transaction() as db:
            await db.execute(
                text("CREATE TABLE IF NOT EXISTS lab_orders (order_id TEXT PRIMARY KEY, amount INTEGER)")
            )

    async def call(name: str, body: PlaceOrder, ctx: Context) -> None:
        request = EffectRequest(order_id=body.order_id, amount_cents=body.amount_cents)
        await ctx.call(endpoints[name], request, timeout=call_timeout)

    async def place(body: PlaceOrder, ctx: Context) -> OrderAnswer:
        if not body.order_id.startswith(run_tag):
            raise HTTPError(409, "order of another run")
        if "payments" in endpoints:  # the user needs to know the payment went through
            await call("payments", body, ctx)
        others = [name for name in endpoints if name != "payments"]
        if others:
            calls = (call(name, body, ctx) for name in others)
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
            if failed:
                raise failed[0]
        async with ctx.transaction() as db:
            await db.execute(
                text("INSERT INTO lab_orders (order_id, amount) VALUES (:id, :amount)"),
                {"id": body.order_id, "amount": body.amount_cents},
            )
            if style != "request":
                await ctx.publish(OrderPlaced(order_id=body.order_id, amount_cents=body.amount_cents))
        return OrderAnswer(order_id=body.order_id, status="placed" if style == "request" else "accepted")

    orders.post("/orders", status_code=202 if style == "event" else 201)(place)
    return orders

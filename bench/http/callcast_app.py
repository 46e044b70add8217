"""The route as a callcast service: ``callcast run bench.http.callcast_app:app --broker memory://``."""

from __future__ import annotations

from bench.http.models import Order, Receipt, receipt_for
from callcast import App, Context, Service

shop = Service("shop")


@shop.post("/orders")
async def place(body: Order, ctx: Context) -> Receipt:
    return receipt_for(body)


app = App([shop], name="bench-http")

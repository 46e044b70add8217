"""The JSON route every HTTP server serves: ``POST /orders`` validates an :class:`Order` and
answers a :class:`Receipt`."""

from __future__ import annotations

from pydantic import BaseModel


class Item(BaseModel):
    sku: str
    qty: int


class Order(BaseModel):
    customer: str
    items: list[Item]
    note: str | None = None


class Receipt(BaseModel):
    customer: str
    lines: int
    units: int


def receipt_for(order: Order) -> Receipt:
    return Receipt(
        customer=order.customer, lines=len(order.items), units=sum(item.qty for item in order.items)
    )


BODY = (
    '{"customer":"ann@example.com","items":[{"sku":"apple","qty":2},{"sku":"pear","qty":1}],'
    '"note":"leave at the door"}'
)
"""The request body wrk sends."""

"""What the shop's services say to each other: request bodies, RPC messages and events.

Services import each other's contracts, never each other's code or stores.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Email = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Sku = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=r"^[a-z0-9-]+$")]

PRICES_CENTS = {"apple": 120, "pear": 150, "plum": 90, "fig": 400}
"""The catalogue: what orders charge per unit."""

INITIAL_STOCK = {"apple": 1000, "pear": 500, "plum": 200, "fig": 3}
"""What inventory holds when it starts on an empty store."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- users ------------------------------------------------------------------------------------------


class SignupRequest(Strict):
    name: Name
    email: Email


class User(BaseModel):
    id: str
    name: str
    email: str


class LookupUser(BaseModel):
    user_id: str


class UserSignedUp(BaseModel):
    user_id: str
    name: str
    email: str


# -- emails -----------------------------------------------------------------------------------------


class SentEmail(BaseModel):
    to: str
    subject: str
    body: str
    sent_at: str
    cause: str
    """The id of the event that made the email go out."""


# -- orders and payments ----------------------------------------------------------------------------


class OrderItem(Strict):
    sku: Sku
    qty: int = Field(ge=1, le=1000)


class PlaceOrder(Strict):
    user_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    items: list[OrderItem] = Field(min_length=1, max_length=50)


class Order(BaseModel):
    id: str
    user_id: str
    items: list[OrderItem]
    amount_cents: int
    status: str
    """``pending`` until inventory answered, then ``confirmed`` or ``rejected``."""
    reason: str | None = None


class Authorize(BaseModel):
    order_id: str
    user_id: str
    amount_cents: int = Field(ge=0)


class Authorization(BaseModel):
    approved: bool
    authorization_id: str | None = None
    reason: str | None = None


class OrderPlaced(BaseModel):
    order_id: str
    user_id: str
    items: list[OrderItem]
    amount_cents: int


class StockReserved(BaseModel):
    order_id: str


class StockShort(BaseModel):
    order_id: str
    reason: str


# -- inventory --------------------------------------------------------------------------------------


class Stock(BaseModel):
    sku: str
    available: int

"""The messages every implementation sends: the same pydantic models, the same ~200-byte JSON."""

from __future__ import annotations

import time

from pydantic import BaseModel

RPC_TIMEOUT = 5.0
"""Seconds every side's RPC client waits for an answer."""

NOTE = "n" * 60
"""Padding that brings an event's JSON to about 200 bytes."""


class Event(BaseModel):
    """A ~200-byte event. ``sent_at`` is ``time.perf_counter()`` at publish (latency path)."""

    seq: int
    sent_at: float
    order_id: str
    customer: str
    amount_cents: int
    currency: str
    note: str


class Ping(BaseModel):
    """An RPC request."""

    seq: int
    order_id: str
    amount_cents: int


class Pong(BaseModel):
    """An RPC answer."""

    seq: int
    approved: bool


def make_event(seq: int, sent_at: float | None = None) -> Event:
    """Event number ``seq``; ``sent_at`` defaults to now."""
    return Event(
        seq=seq,
        sent_at=time.perf_counter() if sent_at is None else sent_at,
        order_id=f"ord-{seq:012d}",
        customer=f"customer-{seq % 1_000_000:06d}@example.com",
        amount_cents=1000 + seq % 90_000,
        currency="EUR",
        note=NOTE,
    )


def answer(request: Ping) -> Pong:
    """What every RPC server answers."""
    return Pong(seq=request.seq, approved=request.amount_cents < 50_000)


def to_json(model: BaseModel) -> bytes:
    """The JSON bytes of ``model`` (pydantic's serializer straight to bytes)."""
    return model.__pydantic_serializer__.to_json(model)

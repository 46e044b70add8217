"""The route in FastAPI, its idiomatic form: a pydantic body parameter and a return annotation."""

from __future__ import annotations

from fastapi import FastAPI

from bench.http.models import Order, Receipt, receipt_for

app = FastAPI()


@app.post("/orders")
async def place(body: Order) -> Receipt:
    return receipt_for(body)

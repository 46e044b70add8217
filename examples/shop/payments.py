"""payments: authorizes an order's amount, synchronously (RPC) because the user waits for it."""

from __future__ import annotations

import uuid

from callcast import Context, Service
from examples.shop.contracts import Authorization, Authorize

payments = Service("payments")

LIMIT_CENTS = 100_000
"""Orders above this amount are declined."""


@payments.rpc
async def authorize(req: Authorize, ctx: Context) -> Authorization:
    if req.amount_cents > LIMIT_CENTS:
        return Authorization(approved=False, reason=f"amount over the limit of {LIMIT_CENTS} cents")
    return Authorization(approved=True, authorization_id=uuid.uuid4().hex)

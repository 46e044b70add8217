"""The route in plain Starlette, validating with pydantic as a competent engineer would (422 with
the errors on a bad body)."""

from __future__ import annotations

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.http.models import Order, receipt_for


async def place(request: Request) -> Response:
    try:
        order = Order.model_validate_json(await request.body())
    except ValidationError as error:
        return Response(error.json(), status_code=422, media_type="application/json")
    receipt = receipt_for(order)
    return Response(receipt.__pydantic_serializer__.to_json(receipt), media_type="application/json")


app = Starlette(routes=[Route("/orders", place, methods=["POST"])])

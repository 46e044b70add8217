"""The example's services and its FastAPI app (see the package docstring)."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field

from callcast import App, Context, HTTPError, Service
from callcast.fastapi import Callcast
from callcast.transport import Broker

log = logging.getLogger("examples.fastapi_app")


class Greet(BaseModel):
    name: str = Field(min_length=1, max_length=100)


class Greeting(BaseModel):
    text: str


class Greeted(BaseModel):
    name: str
    text: str


class Signature(BaseModel):
    name: str
    correlation_id: str


greeter = Service("greeter")


@greeter.rpc
async def greet(req: Greet, ctx: Context) -> Greeting:
    if req.name.lower() == "nobody":
        raise HTTPError(404, "nobody is here")
    return Greeting(text=f"Hello, {req.name}!")


guestbook = Service("guestbook")


@guestbook.on_startup
async def open_book(ctx: Context) -> None:
    ctx.state.signatures = []


@guestbook.on(Greeted)
async def sign(event: Greeted, ctx: Context) -> None:
    log.info("signing for %s", event.name)
    ctx.state.signatures.append(Signature(name=event.name, correlation_id=ctx.correlation_id))


@guestbook.get("/guestbook")
async def read_book(ctx: Context) -> list[Signature]:
    """Who was greeted, oldest first, with the correlation id of the request that greeted them."""
    return list(ctx.state.signatures)


frontdesk = Service("frontdesk", publishes=[Greeted], calls=["greeter"])
"""No routes of its own: FastAPI's routes act as this service."""

services = App([greeter, guestbook, frontdesk], name="fastapi-example")


def create_api(broker: str | Broker | None = None, data_dir: str | Path | None = None) -> FastAPI:
    """The FastAPI app with the callcast services inside (``broker``: URL, broker, or the default)."""
    cc = Callcast(services, broker=broker, data_dir=data_dir)
    api = FastAPI(title="fastapi-example", lifespan=cc.lifespan)
    cc.mount(api)
    front_desk = Depends(cc.context("frontdesk"))

    @api.get("/")
    async def index() -> dict[str, str]:
        return {"try": "POST /hello {'name': ...}, then GET /guestbook"}

    @api.post("/hello")
    async def hello(body: Greet, ctx: Context = front_desk) -> Greeting:
        """A FastAPI route: calls greeter over callcast's RPC, publishes Greeted for the guestbook."""
        greeting = await ctx.call(greet, body, timeout=2.0)
        await ctx.publish(Greeted(name=body.name, text=greeting.text))
        return greeting

    return api


api = create_api()

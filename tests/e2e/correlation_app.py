"""An app whose route and event handler log a warning: the e2e test reads them in ``callcast run``'s log."""

from __future__ import annotations

import logging

from pydantic import BaseModel

from callcast import App, Context, Service

log = logging.getLogger("tests.e2e.correlation_app")


class Said(BaseModel):
    words: str


speaker = Service("speaker", publishes=[Said])
listener = Service("listener")


@speaker.post("/say", status_code=202)
async def say(body: Said, ctx: Context) -> None:
    log.warning("saying %s", body.words)
    await ctx.publish(body)


@listener.on(Said)
async def hear(event: Said, ctx: Context) -> None:
    log.warning("heard %s", event.words)


app = App([speaker, listener], name="correlation")

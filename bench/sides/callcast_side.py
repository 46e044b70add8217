"""callcast's side, written as a user would: an App of Services, ``@svc.on(Event)`` with the default
reliability (ack after the handler, retries and dead letters armed), ``ctx.publish``, ``@svc.rpc``
and ``ctx.call``. Everything runs in this process on the broker URL of the trial's namespace."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.brokers import callcast_url
from bench.payload import RPC_TIMEOUT, Event, Ping, Pong, answer
from bench.sides import Handler, windowed
from callcast import App, Context, Runtime, Service


class CallcastPipe:
    """Service ``bench`` publishes :class:`Event`; service ``sink`` handles it (``concurrency``:
    the handler's setting, ``None`` for callcast's default)."""

    def __init__(self, broker: str, namespace: str, workdir: Path, *, concurrency: int | None = None) -> None:
        self.url = callcast_url(broker, namespace, workdir)
        self.data_dir = workdir / namespace
        self.concurrency = concurrency
        self.runtime: Runtime | None = None
        self.context: Context | None = None

    def app(self, handler: Handler) -> App:
        bench = Service("bench", publishes=[Event])
        sink = Service("sink")
        subscribe = (
            sink.on(Event) if self.concurrency is None else sink.on(Event, concurrency=self.concurrency)
        )

        @subscribe
        async def handle(event: Event, ctx: Context) -> None:
            await handler(event)

        return App([bench, sink], name="bench")

    async def open(self, handler: Handler) -> None:
        await self.start(handler)

    async def start(self, handler: Handler, services: Sequence[str] | None = None) -> Runtime:
        """Start ``services`` of the app (default: both); every process declares both groups."""
        self.runtime = await self.app(handler).start(
            broker=self.url, data_dir=self.data_dir, services=services
        )
        self.context = self.runtime.context("bench")
        return self.runtime

    async def publish(self, event: Event) -> None:
        assert self.context is not None, "open() first"
        await self.context.publish(event)

    async def publish_all(self, events: Sequence[Event], window: int) -> None:
        await windowed(self.publish, events, window)

    async def close(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop(grace=5)
            self.runtime = None


class CallcastRpc:
    """Service ``pricing`` serves ``quote`` over the broker; service ``shop`` calls it."""

    def __init__(self, broker: str, namespace: str, workdir: Path) -> None:
        self.url = callcast_url(broker, namespace, workdir)
        self.data_dir = workdir / namespace
        self.runtime: Runtime | None = None
        self.context: Context | None = None
        pricing = Service("pricing")

        @pricing.rpc
        async def quote(request: Ping, ctx: Context) -> Pong:
            return answer(request)

        self.endpoint = quote
        self.app = App([pricing, Service("shop", calls=["pricing"])], name="bench")

    async def open(self) -> None:
        self.runtime = await self.app.start(broker=self.url, data_dir=self.data_dir)
        self.context = self.runtime.context("shop")

    async def call(self, request: Ping) -> Pong:
        assert self.context is not None, "open() first"
        return await self.context.call(self.endpoint, request, timeout=RPC_TIMEOUT)

    async def close(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop(grace=5)
            self.runtime = None

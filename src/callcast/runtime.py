"""A running app: the services of an :class:`~callcast.App` that run in this process.

Start order: connect the broker → declare every consumer group of the *whole* app (so nothing
published from now on is lost for a service that is not up yet) → open the services' databases and
start their outbox relays → run the startup hooks → start the RPC client, RPC servers and event
consumers → serve HTTP (when asked).

Stop order (SIGTERM/SIGINT under ``callcast run``): stop accepting HTTP requests and finish the ones
in flight → stop taking messages and let running handlers finish, giving the rest back to the broker
(requests and handlers share one ``grace`` period) → shutdown hooks → send what the outboxes hold
(for at most ``min(grace, 5)`` seconds per service; what is left waits in the outbox for the next
start) → close the broker. Nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import uvicorn
from starlette.applications import Starlette

from callcast import correlation, inbox
from callcast.app import App
from callcast.brokers import connect
from callcast.coalescing import CoalescingBroker
from callcast.consumer import Consumer
from callcast.context import Context
from callcast.database import Database, database_url
from callcast.deadletter import DEAD_LETTER_GROUP, DEAD_LETTER_TOPIC
from callcast.envelope import Envelope
from callcast.exceptions import ConfigurationError
from callcast.http import build_asgi
from callcast.isolation import Isolation
from callcast.outbox import Relay
from callcast.resilience import CallPolicy, CallStats
from callcast.rpc import RpcClient, RpcServer
from callcast.service import Hook, Service
from callcast.transport import Broker

log = logging.getLogger("callcast")

DEFAULT_DATA_DIR = ".callcast"
INBOX_RETENTION = 7 * 24 * 3600.0
"""Seconds an inbox record is kept: the window in which a duplicate is recognised."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the runtime decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


async def _serve(server: _Server, host: str, port: int) -> None:
    """Serve until told to stop. uvicorn ends the process (``SystemExit``) when it cannot listen;
    that becomes a :class:`ConfigurationError` here, so the runtime stops as on any failed start."""
    try:
        await server.serve()
    except SystemExit:
        raise ConfigurationError(
            f"cannot serve HTTP on {host}:{port} (the address is in use, or not this machine's)"
        ) from None


@contextlib.contextmanager
def _logged(doing: str) -> Iterator[None]:
    """Log a failure of ``doing`` and go on: one step of a stop that fails must not keep the others."""
    try:
        yield
    except Exception:
        log.exception("%s failed", doing)


class Runtime:
    """Some or all services of an app, live in this process. Build with :meth:`App.start`."""

    def __init__(
        self,
        app: App,
        *,
        services: Sequence[str] | None = None,
        data_dir: str | Path | None = None,
        service_urls: dict[str, str] | None = None,
        databases: dict[str, str] | None = None,
        call_policies: Mapping[str, CallPolicy] | None = None,
    ) -> None:
        self.app = app
        self.call_policies = {**app.call_policies, **(call_policies or {})}
        """Per target service, the policy of calls from this process: the app's, then ``call_policies``."""
        names = list(dict.fromkeys(services)) if services else list(app.services)
        self.running_services: list[Service] = [app.service(name) for name in names]
        self.data_dir = Path(data_dir or os.environ.get("CALLCAST_DATA") or DEFAULT_DATA_DIR)
        self.service_urls = dict(service_urls or {})
        self.database_urls = dict(databases or {})
        self._databases: dict[str, Database] = {}
        self._relays: dict[str, Relay] = {}
        self._housekeeping: asyncio.Task[None] | None = None
        self.instance_id = uuid.uuid4().hex[:12]
        self.state: dict[str, SimpleNamespace] = {s.name: SimpleNamespace() for s in self.running_services}
        self._broker: Broker | None = None
        self._owns_broker = False
        self._rpc: RpcClient | None = None
        self._consumers: list[Consumer | RpcServer] = []
        self._isolation = Isolation()
        """Shared by the event consumers: a crash suspect runs with no other event handler of the
        process running, or another group's crash would be blamed on it."""
        self._asgi: Starlette | None = None
        self._server: _Server | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._started_hooks: list[Service] = []

    # -- accessors ----------------------------------------------------------------------------------

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            raise RuntimeError("runtime is not started")
        return self._broker

    @property
    def rpc(self) -> RpcClient:
        if self._rpc is None:
            raise RuntimeError("runtime is not started")
        return self._rpc

    @property
    def asgi(self) -> Starlette:
        """The ASGI app of the running services (for ``httpx.ASGITransport`` in tests)."""
        if self._asgi is None:
            self._asgi = build_asgi(self)
        return self._asgi

    def call_stats(self) -> dict[str, CallStats]:
        """Per service this process called: its breaker state, transitions and call counters."""
        return {} if self._rpc is None else self._rpc.guards.stats()

    def database(self, service: str) -> Database:
        """``service``'s own database (it must be declared with ``database=True`` and run here)."""
        try:
            return self._databases[service]
        except KeyError:
            raise ConfigurationError(
                f"service {service!r} has no database here: declare Service({service!r}, database=True) "
                "and run it in this process"
            ) from None

    def relay(self, service: str) -> Relay:
        """The outbox relay of ``service``'s database in this process."""
        self.database(service)  # a clear error for a service without a database
        return self._relays[service]

    def source(self, service: str) -> str:
        """The CloudEvents ``source`` of what ``service`` publishes."""
        return f"/{self.app.name}/{service}"

    def context(
        self, service: str, *, correlation_id: str | None = None, deadline: float | None = None
    ) -> Context:
        """A fresh context for new work of ``service`` (a request, a test, a script); its correlation id
        becomes the current one of the calling task (:mod:`callcast.correlation`)."""
        ctx = Context(self, service, correlation_id=correlation_id, deadline=deadline)
        correlation.bind(ctx.correlation_id)
        return ctx

    def _delivery_context(self, service: str, envelope: Envelope, attempt: int) -> Context:
        ctx = Context(
            self,
            service,
            correlation_id=correlation.accept(envelope.correlation_id),
            causation_id=envelope.id,
            envelope=envelope,
            attempt=attempt,
            stamp_attempt=True,
        )
        correlation.bind(ctx.correlation_id)
        return ctx

    def _rpc_context(self, service: str, envelope: Envelope, deadline: float | None) -> Context:
        ctx = Context(
            self,
            service,
            correlation_id=correlation.accept(envelope.correlation_id),
            causation_id=envelope.id,
            envelope=envelope,
            deadline=deadline,
        )
        correlation.bind(ctx.correlation_id)
        return ctx

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self, broker: str | Broker | None = None) -> None:
        if isinstance(broker, str) or broker is None:
            connected = await connect(broker)
            self._owns_broker = True
        else:
            connected = broker
        self._broker = CoalescingBroker(connected)  # concurrent single publishes go out as batches
        try:
            await self._start_services()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start_services(self) -> None:
        broker = self.broker
        # First of all: what is published from now on (by an outbox relay sending rows an earlier
        # process left, by a startup hook) must find every group of the app, or brokers drop it.
        await broker.declare(DEAD_LETTER_TOPIC, DEAD_LETTER_GROUP)
        for service in self.app.services.values():
            for handler in service.handlers:
                await broker.declare(handler.topic, handler.group)
            if not broker.capabilities.request_reply:  # requests wait in a group for their server
                for endpoint in service.endpoints.values():
                    await broker.declare(endpoint.topic, endpoint.topic)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for service in self.running_services:
            if service.database:
                url = database_url(service.name, self.data_dir, self.database_urls)
                database = Database(url)
                self._databases[service.name] = database
                await database.setup()
                relay = Relay(database, broker)
                relay.start()
                self._relays[service.name] = relay
        if self._databases:
            self._housekeeping = asyncio.create_task(self._forget_old_inbox_records(), name="inbox-retention")
        for service in self.running_services:
            for hook in service.startup_hooks:
                await self._run_hook(hook, service.name)
            self._started_hooks.append(service)
        self._rpc = RpcClient(
            broker,
            self.instance_id,
            self.service_urls,
            f"/{self.app.name}/{self.instance_id}",
            self.call_policies,
        )
        await self._rpc.start()
        for service in self.running_services:
            for endpoint in service.endpoints.values():
                server = RpcServer(
                    broker,
                    endpoint,
                    functools.partial(self._rpc_context, service.name),
                    self.source(service.name),
                )
                await server.start()
                self._consumers.append(server)
            for handler in service.handlers:
                consumer = Consumer(
                    broker,
                    handler,
                    self._delivery_context,
                    self._databases.get(service.name),
                    crash_dir=self.data_dir / "crashes",
                    isolation=self._isolation,
                )
                await consumer.start()
                self._consumers.append(consumer)

    async def _run_hook(self, hook: Hook, service: str) -> None:
        """Run a startup or shutdown hook under a correlation id of its own, which the tasks started
        after it (consumers, servers) do not inherit."""
        previous = correlation.current.get()
        try:
            await hook(self.context(service))
        finally:
            correlation.current.set(previous)

    async def _forget_old_inbox_records(self) -> None:
        """Hourly: drop inbox records older than :data:`INBOX_RETENTION` (a duplicate arriving later
        than that would be applied again)."""
        while True:
            for name, database in self._databases.items():
                try:
                    async with database.transaction() as conn:
                        await inbox.forget_older_than(conn, INBOX_RETENTION)
                except Exception as error:
                    log.warning("inbox retention of %s failed: %s", name, type(error).__name__)
            await asyncio.sleep(3600)

    async def serve_http(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        """Start serving HTTP on ``host:port`` (returns once listening)."""
        config = uvicorn.Config(
            self.asgi,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
        )
        server = _Server(config)
        self._server = server
        self._server_task = asyncio.create_task(_serve(server, host, port), name="http")
        while not server.started:
            if self._server_task.done():
                self._server_task.result()  # raises the bind error
                raise RuntimeError(f"HTTP server on {host}:{port} stopped before it started")
            await asyncio.sleep(0.01)

    @property
    def http_port(self) -> int | None:
        """The port HTTP is served on (useful with ``port=0``)."""
        if self._server is None or not self._server.servers:
            return None
        sockets = self._server.servers[0].sockets
        return int(sockets[0].getsockname()[1]) if sockets else None

    async def stop(self, grace: float = 10.0) -> None:
        """Stop serving; see the module docstring for the order. HTTP requests and handlers in
        flight share one ``grace`` period: what the HTTP drain uses, the handlers no longer have.
        Idempotent."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._server is not None and self._server_task is not None:
            # Read by uvicorn when it shuts down (None would wait without end). Requests still
            # running then are cancelled.
            self._server.config.timeout_graceful_shutdown = max(grace, 0.01)  # type: ignore[assignment]
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._server_task
            self._server = None
        # All at once, within what is left of the grace period; every one, whatever the others do.
        left = max(0.0, deadline - loop.time())
        outcomes = await asyncio.gather(
            *(consumer.stop(left) for consumer in self._consumers), return_exceptions=True
        )
        for consumer, outcome in zip(self._consumers, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.error("stopping %s failed", consumer, exc_info=outcome)
        self._consumers.clear()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        for service in reversed(self._started_hooks):
            for hook in service.shutdown_hooks:
                try:
                    await self._run_hook(hook, service.name)
                except Exception:
                    log.exception("shutdown hook of %s failed", service.name)
        self._started_hooks.clear()
        for relay in self._relays.values():
            await relay.stop()
            with contextlib.suppress(Exception):  # send what is committed now, if the broker lets us
                async with asyncio.timeout(min(grace, 5.0)):
                    await relay.drain()
        self._relays.clear()
        if self._rpc is not None:
            with _logged("stopping the RPC client"):
                await self._rpc.stop()
            self._rpc = None
        for name, database in self._databases.items():
            with _logged(f"closing the database of {name}"):
                await database.close()
        self._databases.clear()
        if self._broker is not None and self._owns_broker:
            with _logged("closing the broker"):
                await self._broker.close()
        self._broker = None

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

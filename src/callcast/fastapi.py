"""callcast inside an existing FastAPI app (the ``callcast[fastapi]`` extra).

::

    from fastapi import Depends, FastAPI
    from callcast import Context
    from callcast.fastapi import Callcast

    cc = Callcast(app)                              # a callcast App: some services, one broker
    api = FastAPI(lifespan=cc.lifespan)             # starts and stops the services with FastAPI
    cc.mount(api)                                   # their routes and RPC endpoints, served by FastAPI

    @api.post("/checkout")                          # a FastAPI route acting as callcast service "orders"
    async def checkout(body: Cart, ctx: Context = Depends(cc.context("orders"))) -> Receipt:
        await ctx.call(authorize, ...)              # publish, call, transaction: as in any handler
        ...

What :meth:`Callcast.mount` adds to the FastAPI app: the routes and RPC endpoints of the services
running here (the same endpoints ``callcast run`` serves, ahead of none of FastAPI's own: a path and
method served by both is a :class:`~callcast.ConfigurationError`); exception handlers so that
:class:`~callcast.HTTPError` raised in a FastAPI route answers with its status and detail, and a failed
``ctx.call`` with 502/503/504 (or the callee's own 4xx); and callcast's operations in FastAPI's
``/openapi.json``.

The context a FastAPI route gets from :meth:`Callcast.context` is that of a new unit of work of the
named service: its correlation id comes from ``X-Correlation-Id`` (or is new), is echoed in the
answer, and is the current one for the request's log records (:mod:`callcast.correlation`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.routing import Route as StarletteRoute

from callcast import openapi
from callcast.app import App
from callcast.context import Context
from callcast.correlation import accept
from callcast.exceptions import (
    CallError,
    ConfigurationError,
    HTTPError,
)
from callcast.http import error_response, service_routes
from callcast.rpc import CORRELATION_HEADER, public_call_error
from callcast.runtime import Runtime
from callcast.transport import Broker


class Callcast:
    """Services of a callcast :class:`~callcast.App` running inside a FastAPI app.

    The arguments are those of :meth:`App.start`; the services start when FastAPI starts (its
    lifespan) and stop, in-flight work first (``grace`` seconds), when it stops.
    """

    def __init__(
        self,
        app: App,
        *,
        broker: str | Broker | None = None,
        services: Sequence[str] | None = None,
        data_dir: str | Path | None = None,
        databases: dict[str, str] | None = None,
        service_urls: dict[str, str] | None = None,
        grace: float = 10.0,
    ) -> None:
        self.app = app
        self.runtime = Runtime(
            app, services=services, data_dir=data_dir, service_urls=service_urls, databases=databases
        )
        self._broker = broker
        self._grace = grace

    @asynccontextmanager
    async def lifespan(self, api: FastAPI) -> AsyncIterator[None]:
        """``FastAPI(lifespan=cc.lifespan)``, or ``async with cc.lifespan(api):`` inside your own."""
        await self.runtime.start(self._broker)
        try:
            yield
        finally:
            await self.runtime.stop(grace=self._grace)

    def mount(self, api: FastAPI) -> None:
        """Serve the running services' routes and RPC endpoints from ``api``; map callcast's errors;
        describe them in ``api``'s OpenAPI document."""
        taken = {
            (method, route.path)
            for route in api.router.routes
            if isinstance(route, StarletteRoute)
            for method in route.methods or ()
        }
        routes = service_routes(self.runtime)
        for route in routes:
            assert isinstance(route, StarletteRoute)
            for method in route.methods or ():
                if (method, route.path) in taken and method != "HEAD":
                    raise ConfigurationError(f"{method} {route.path} is served by both FastAPI and callcast")
        api.router.routes.extend(routes)
        api.add_exception_handler(HTTPError, _http_error)
        api.add_exception_handler(CallError, _call_error)
        _describe(api, openapi.document(self.app, self.runtime.running_services))

    def context(self, service: str) -> Callable[[Request, Response], Awaitable[Context]]:
        """A FastAPI dependency giving a route the context of a new unit of work of ``service``
        (which must run here): ``ctx: Context = Depends(cc.context("orders"))``."""
        if service not in {running.name for running in self.runtime.running_services}:
            raise ConfigurationError(f"service {service!r} does not run in this FastAPI app")
        runtime = self.runtime

        async def callcast_context(request: Request, response: Response) -> Context:
            ctx = runtime.context(service, correlation_id=accept(request.headers.get(CORRELATION_HEADER)))
            response.headers[CORRELATION_HEADER] = ctx.correlation_id
            return ctx

        return callcast_context


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPError)
    return error_response(error.status, error.detail)


async def _call_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, CallError)
    return error_response(*public_call_error(error))


def _describe(api: FastAPI, ours: dict[str, Any]) -> None:
    """Make ``api.openapi()`` include ``ours``' paths and components (FastAPI's own win no clash:
    one that differs is a ConfigurationError, raised when the document is first built)."""
    fastapi_document = api.openapi

    def merged() -> dict[str, Any]:
        if api.openapi_schema is not None:
            return api.openapi_schema
        spec = fastapi_document()
        for path, operations in ours["paths"].items():
            spec.setdefault("paths", {}).setdefault(path, {}).update(operations)
        for section, entries in ours["components"].items():
            existing = spec.setdefault("components", {}).setdefault(section, {})
            for name, entry in entries.items():
                if existing.setdefault(name, entry) != entry:
                    raise ConfigurationError(
                        f"OpenAPI component {section}/{name} differs in FastAPI and callcast"
                    )
        api.openapi_schema = spec
        return spec

    api.openapi = merged  # type: ignore[method-assign]

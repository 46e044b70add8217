"""The HTTP side: services' routes and RPC endpoints as one Starlette (ASGI) application.

Parameters of a route function are bound once, when the app is built, from names and annotations:

* a pydantic model: the JSON body, parsed and validated in one pass (``model_validate_json``);
* ``Context``: the context of this request (correlation id from ``X-Correlation-Id`` or new);
* a name that appears in the path (``/users/{user_id}``): that path segment, validated;
* any other name: the query parameter of that name, validated; required unless it has a default.

Answers: the return value as JSON (by its return annotation; without one, as pydantic serializes
the value) with the route's status code; a route annotated ``-> None``, or one without annotation
that returns ``None``: no body, 204 (or the route's status code, if it set one). Bad input never
reaches the handler: invalid JSON or fields → 422 with the field errors; a body over 1 MiB → 413;
unknown path → 404; wrong method → 405. :class:`~callcast.HTTPError` → its status and detail; a
failed ``ctx.call`` → 502/503/504 (a callee's own 4xx passed on); any other exception (or a value
that cannot be serialized) → 500 with no internals (logged with its traceback).

Every answer carries ``X-Correlation-Id`` (the request's, when acceptable, else a new one). Routes
declared with ``idempotency=`` honour ``Idempotency-Key`` (:mod:`callcast.idempotency`); the others
do not look at it. ``GET /openapi.json`` serves the OpenAPI document of the running services.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive, Scope, Send

from callcast import correlation
from callcast.binding import UNTYPED, Param
from callcast.codec import MAX_MESSAGE_BYTES, field_errors
from callcast.correlation import accept
from callcast.envelope import new_id
from callcast.exceptions import (
    CallError,
    HTTPError,
)
from callcast.idempotency import (
    KEY_HEADER,
    Claim,
    ClaimLostError,
    IdempotencyGuard,
    IdempotencyPolicy,
    KeyRejectedError,
    check_key,
    fingerprint,
)
from callcast.openapi import document
from callcast.rpc import CORRELATION_HEADER, DEADLINE_HEADER, execute, public_call_error
from callcast.service import Route as ServiceRoute
from callcast.service import RpcEndpoint

if TYPE_CHECKING:
    from callcast.runtime import Runtime

log = logging.getLogger("callcast.http")
JSON_TYPE = "application/json"
_CORRELATION_HEADER_BYTES = CORRELATION_HEADER.lower().encode()
_KEY_HEADER_BYTES = KEY_HEADER.lower().encode()
_DEADLINE_HEADER_BYTES = DEADLINE_HEADER.lower().encode()


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class OwnResponse(Response):
    """A response callcast made for one request, so the correlation id can be added to it. Any
    other (a route's own object, perhaps one it returns to every request) is left as it is."""


def json_response(status: int, payload: Any) -> Response:
    return OwnResponse(orjson.dumps(payload), status_code=status, media_type=JSON_TYPE)


def error_response(status: int, detail: Any) -> Response:
    return json_response(status, {"detail": detail})


def _too_large() -> Response:
    return error_response(413, f"request body exceeds {MAX_MESSAGE_BYTES} bytes")


def _not_json(headers: Mapping[bytes, bytes]) -> Response | None:
    """415 for a body not declared as JSON (``application/json``, ``*/*+json``), else None; a
    request without a body needs no ``Content-Type``. Refusing the others also refuses the requests
    a web page may send to another site without asking it first (``text/plain``, forms, a
    ``no-cors`` fetch of an untyped blob): a local service cannot be driven by a page the user
    happens to visit."""
    declared = headers.get(b"content-type")
    if declared is None:
        if headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers:
            return None
        return error_response(415, "a request body must be declared as JSON (Content-Type: application/json)")
    media_type = declared.split(b";", 1)[0].strip().lower()
    if media_type == b"application/json" or (
        media_type.startswith(b"application/") and media_type.endswith(b"+json")
    ):
        return None
    shown = media_type.decode("latin-1")[:100]
    return error_response(
        415, f"the request body must be JSON (Content-Type: application/json), not {shown!r}"
    )


async def receive_body(receive: Receive, declared: bytes | None, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """The request body, refusing (:class:`BodyTooLarge`) more than ``limit`` bytes, declared in
    ``Content-Length`` or sent; :class:`ClientGone` if the client left first."""
    if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


def _bind(params: list[Param], scope: Scope, body: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The route function's arguments except its context, and the field errors."""
    kwargs: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    query: QueryParams | None = None
    for param in params:
        if param.kind == "context":
            continue
        if param.kind == "body":
            assert param.model is not None
            try:
                kwargs[param.name] = param.model.model_validate_json(body)
            except ValidationError as error:
                errors.extend({**item, "loc": ["body", *item["loc"]]} for item in field_errors(error))
            continue
        if param.kind == "path":
            source: Mapping[str, Any] = scope["path_params"]
        else:
            if query is None:
                query = QueryParams(scope["query_string"])
            source = query
        if param.name not in source:  # for many values too: none given
            if param.default is inspect.Parameter.empty:
                errors.append({"loc": [param.kind, param.name], "msg": "Field required", "type": "missing"})
            else:
                kwargs[param.name] = param.default
            continue
        assert param.adapter is not None
        try:
            given = query.getlist(param.name) if param.many and query is not None else source[param.name]
            kwargs[param.name] = param.adapter.validate_python(given)
        except ValidationError as error:
            errors.extend(
                {**item, "loc": [param.kind, param.name, *item["loc"]]} for item in field_errors(error)
            )
    return kwargs, errors


async def _answer(route: ServiceRoute, returns: TypeAdapter[Any] | None, kwargs: dict[str, Any]) -> Response:
    """Run the route function; its answer, or the error answer its exception maps to."""
    try:
        result = await route.fn(**kwargs)
    except HTTPError as error:
        return error_response(error.status, error.detail)
    except CallError as error:
        return error_response(*public_call_error(error))
    except ClaimLostError:
        raise
    except Exception:
        log.exception("%s %s failed", route.method, route.path)
        return error_response(500, "internal error")
    if isinstance(result, Response):
        return result
    if returns is None or (result is None and returns is UNTYPED):
        return OwnResponse(status_code=204 if route.status_code == 200 else route.status_code)
    try:
        body = returns.dump_json(result)
    except Exception:  # a value pydantic cannot serialize: a bug in the route
        log.exception("%s %s returned a value that cannot be serialized", route.method, route.path)
        return error_response(500, "internal error")
    return OwnResponse(body, status_code=route.status_code, media_type=JSON_TYPE)


def _correlation_id(headers: dict[bytes, bytes]) -> str | None:
    """The request's acceptable ``X-Correlation-Id``, or ``None``."""
    value = headers.get(_CORRELATION_HEADER_BYTES)
    return accept(value.decode("latin-1")) if value is not None else None


def _bound_correlation_id(headers: dict[bytes, bytes]) -> str:
    """The request's correlation id (a new one if it brought none acceptable), made the task's."""
    correlation_id = _correlation_id(headers) or new_id()
    correlation.bind(correlation_id)
    return correlation_id


class _Endpoint:
    """A route or RPC endpoint as a plain ASGI app (no per-request Starlette ``Request``): the
    headers looked at once, the answer sent with ``X-Correlation-Id``; nothing is sent to a client
    that left before its body arrived."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response, correlation_id = await self.respond(scope, receive, dict(scope["headers"]))
        except ClientGone:
            return
        header = (_CORRELATION_HEADER_BYTES, correlation_id.encode())
        if isinstance(response, OwnResponse):
            response.raw_headers.append(header)
            await response(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        await response(scope, receive, send_with_header)

    async def respond(
        self, scope: Scope, receive: Receive, headers: dict[bytes, bytes]
    ) -> tuple[Response, str]:
        """The answer and the correlation id of the request; ``headers`` by lower-case name."""
        raise NotImplementedError


class _RouteEndpoint(_Endpoint):
    """A service's route: the body read whole (bounded), the arguments bound, the function run."""

    def __init__(self, runtime: Runtime, route: ServiceRoute) -> None:
        self.runtime = runtime
        self.route = route
        self.params, self.returns = route.binding
        self.context_names = [param.name for param in self.params if param.kind == "context"]
        self.reads_body = any(param.kind == "body" for param in self.params)
        # A route that changes things refuses a body declared as a form or text even when it reads
        # none: a page on another site could send those without asking (see _not_json).
        self.checks_type = self.reads_body or route.method not in ("GET", "HEAD")

    async def respond(
        self, scope: Scope, receive: Receive, headers: dict[bytes, bytes]
    ) -> tuple[Response, str]:
        ctx = self.runtime.context(self.route.service, correlation_id=_correlation_id(headers))
        if self.checks_type and (refused := _not_json(headers)) is not None:
            return refused, ctx.correlation_id
        try:
            body = await receive_body(receive, headers.get(b"content-length")) if self.reads_body else b""
        except BodyTooLarge:
            return _too_large(), ctx.correlation_id
        kwargs, errors = _bind(self.params, scope, body)
        if errors:
            return error_response(422, errors), ctx.correlation_id
        for name in self.context_names:
            kwargs[name] = ctx
        return await _answer(self.route, self.returns, kwargs), ctx.correlation_id


class _IdempotentRouteEndpoint(_RouteEndpoint):
    """A route declared with ``idempotency=``: without ``Idempotency-Key`` a plain route; with one,
    at most one run per key (see :mod:`callcast.idempotency`)."""

    def __init__(self, runtime: Runtime, route: ServiceRoute, policy: IdempotencyPolicy) -> None:
        super().__init__(runtime, route)
        self.policy = policy
        self.guard = IdempotencyGuard(
            route.service, f"{route.method} {route.path}", policy, lambda: runtime.database(route.service)
        )

    async def respond(
        self, scope: Scope, receive: Receive, headers: dict[bytes, bytes]
    ) -> tuple[Response, str]:
        raw_key = headers.get(_KEY_HEADER_BYTES)
        try:
            key = check_key(None if raw_key is None else raw_key.decode("latin-1"), self.policy)
        except KeyRejectedError as error:
            return error_response(400, str(error)), _bound_correlation_id(headers)
        if key is None:
            return await super().respond(scope, receive, headers)
        correlation_id = _bound_correlation_id(headers)
        if self.checks_type and (refused := _not_json(headers)) is not None:
            return refused, correlation_id
        try:
            body = await receive_body(receive, headers.get(b"content-length")) if self.reads_body else b""
        except BodyTooLarge:
            return _too_large(), correlation_id
        kwargs, errors = _bind(self.params, scope, body)
        if errors:
            return error_response(422, errors), correlation_id

        async def execute(claim: Claim) -> Response:
            ctx = claim.context(self.runtime, self.route.service, correlation_id)
            for name in self.context_names:
                kwargs[name] = ctx
            return await _answer(self.route, self.returns, kwargs)

        query = scope["query_string"].decode("latin-1")
        signature = fingerprint(self.route.method, scope["path"], query, body)
        return await self.guard.run(key, signature, execute), correlation_id


class _RpcEndpoint(_Endpoint):
    """``POST /rpc/<service>/<name>``: an RPC endpoint over HTTP; ``X-Callcast-Deadline`` (UNIX
    time) is the caller's deadline."""

    def __init__(self, runtime: Runtime, rpc: RpcEndpoint[Any, Any]) -> None:
        self.runtime = runtime
        self.rpc = rpc

    async def respond(
        self, scope: Scope, receive: Receive, headers: dict[bytes, bytes]
    ) -> tuple[Response, str]:
        correlation_id = _correlation_id(headers) or new_id()
        deadline: float | None = None
        raw_deadline = headers.get(_DEADLINE_HEADER_BYTES)
        if raw_deadline:
            try:
                deadline = float(raw_deadline)
            except ValueError:
                deadline = math.nan
            if not math.isfinite(deadline):
                return error_response(
                    400, f"{DEADLINE_HEADER} must be a UNIX time in seconds"
                ), correlation_id
            if deadline <= time.time():
                return error_response(504, "deadline already passed"), correlation_id
        if (refused := _not_json(headers)) is not None:
            return refused, correlation_id
        ctx = self.runtime.context(self.rpc.service, correlation_id=correlation_id, deadline=deadline)
        try:
            data = await receive_body(receive, headers.get(b"content-length"))
        except BodyTooLarge:
            return _too_large(), ctx.correlation_id
        status, body = await execute(self.rpc, data, ctx)
        return OwnResponse(body, status_code=status, media_type=JSON_TYPE), ctx.correlation_id


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail)


def service_routes(runtime: Runtime) -> list[BaseRoute]:
    """The routes and RPC endpoints of the services running in ``runtime`` (to mount elsewhere)."""
    routes: list[BaseRoute] = []
    for service in runtime.running_services:
        for route in service.routes:
            endpoint = (
                _RouteEndpoint(runtime, route)
                if route.idempotency is None
                else _IdempotentRouteEndpoint(runtime, route, route.idempotency)
            )
            routes.append(Route(route.path, endpoint, methods=[route.method], name=route.fn.__name__))
        for rpc in service.endpoints.values():
            routes.append(Route(rpc.http_path, _RpcEndpoint(runtime, rpc), methods=["POST"], name=rpc.name))
    return routes


def build_asgi(runtime: Runtime) -> Starlette:
    """One ASGI app for the routes and RPC endpoints of the services running in ``runtime``, with
    ``GET /healthz`` and ``GET /openapi.json`` (the OpenAPI 3.1 document of those services)."""
    routes = service_routes(runtime)
    described: list[bytes] = []

    async def health(request: Request) -> Response:
        return json_response(200, {"status": "ok", "services": [s.name for s in runtime.running_services]})

    async def openapi(request: Request) -> Response:
        if not described:
            described.append(orjson.dumps(document(runtime.app, runtime.running_services)))
        return OwnResponse(described[0], media_type=JSON_TYPE)

    routes.append(Route("/healthz", health, methods=["GET"]))
    routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})

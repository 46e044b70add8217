"""The HTTP side: services' routes and RPC endpoints as one Starlette (ASGI) application.

Parameters of a route function are bound once, when the app is built, from names and annotations:

* a pydantic model: the JSON body, parsed and validated in one pass (``model_validate_json``);
* ``Context``: the context of this request (correlation id from ``X-Correlation-Id`` or new);
* a name that appears in the path (``/users/{user_id}``): that path segment, validated;
* any other name: the query parameter of that name, validated; required unless it has a default.

Answers: the return value as JSON (by its annotation) with the route's status code; ``None`` with
no return annotation: 204. Bad input never reaches the handler: invalid JSON or fields → 422 with
the field errors; a body over 1 MiB → 413; unknown path → 404; wrong method → 405.
:class:`~callcast.HTTPError` → its status and detail; a failed ``ctx.call`` → 502/503/504; any other
exception → 500 with no internals (logged with its traceback).

Every answer carries ``X-Correlation-Id`` (the request's, when acceptable, else a new one). Routes
declared with ``idempotency=`` honour ``Idempotency-Key`` (:mod:`callcast.idempotency`); the others
do not look at it. ``GET /openapi.json`` serves the OpenAPI document of the running services.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from callcast import correlation
from callcast.binding import Param
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
from callcast.rpc import CORRELATION_HEADER, DEADLINE_HEADER, call_error_status, execute
from callcast.service import Route as ServiceRoute
from callcast.service import RpcEndpoint

if TYPE_CHECKING:
    from callcast.runtime import Runtime

log = logging.getLogger("callcast.http")
JSON_TYPE = "application/json"
_CORRELATION_HEADER_BYTES = CORRELATION_HEADER.encode()


class BodyTooLarge(Exception):
    pass


def json_response(status: int, payload: Any) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type=JSON_TYPE)


def error_response(status: int, detail: Any) -> Response:
    return json_response(status, {"detail": detail})


async def read_body(request: Request, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """The request body, refusing (:class:`BodyTooLarge`) more than ``limit`` bytes, declared or sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise BodyTooLarge
        # The HTTP server holds the body to its declared length, so it can be read whole.
        return await request.body()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _bind(
    params: list[Param], request: Request, body: bytes | None
) -> tuple[dict[str, Any], list[dict[str, Any]]] | Response:
    """The route function's arguments except its context, and the field errors; or a 413 answer.
    ``body``: the request body if already read."""
    kwargs: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    for param in params:
        if param.kind == "context":
            continue
        if param.kind == "body":
            assert param.model is not None
            try:
                data = body if body is not None else await read_body(request)
                kwargs[param.name] = param.model.model_validate_json(data)
            except BodyTooLarge:
                return error_response(413, f"request body exceeds {MAX_MESSAGE_BYTES} bytes")
            except ValidationError as error:
                errors.extend({**item, "loc": ["body", *item["loc"]]} for item in field_errors(error))
            continue
        source = request.path_params if param.kind == "path" else request.query_params
        if param.name not in source:
            if param.default is inspect.Parameter.empty:
                errors.append({"loc": [param.kind, param.name], "msg": "Field required", "type": "missing"})
            else:
                kwargs[param.name] = param.default
            continue
        assert param.adapter is not None
        try:
            kwargs[param.name] = param.adapter.validate_python(source[param.name])
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
        return error_response(call_error_status(error), str(error))
    except ClaimLostError:
        raise
    except Exception:
        log.exception("%s %s failed", route.method, route.path)
        return error_response(500, "internal error")
    if isinstance(result, Response):
        return result
    if returns is None:
        return Response(status_code=204 if route.status_code == 200 else route.status_code)
    return Response(returns.dump_json(result), status_code=route.status_code, media_type=JSON_TYPE)


def _echo(response: Response, correlation_id: str) -> Response:
    response.raw_headers.append((_CORRELATION_HEADER_BYTES, correlation_id.encode()))
    return response


def _make_endpoint(runtime: Runtime, route: ServiceRoute) -> Callable[[Request], Awaitable[Response]]:
    params, returns = route.binding
    context_names = [param.name for param in params if param.kind == "context"]

    async def endpoint(request: Request) -> Response:
        ctx = runtime.context(route.service, correlation_id=accept(request.headers.get(CORRELATION_HEADER)))
        bound = await _bind(params, request, None)
        if isinstance(bound, Response):
            return _echo(bound, ctx.correlation_id)
        kwargs, errors = bound
        if errors:
            return _echo(error_response(422, errors), ctx.correlation_id)
        for name in context_names:
            kwargs[name] = ctx
        return _echo(await _answer(route, returns, kwargs), ctx.correlation_id)

    endpoint.__name__ = route.fn.__name__
    if route.idempotency is None:
        return endpoint
    return _make_idempotent_endpoint(runtime, route, endpoint, route.idempotency)


def _make_idempotent_endpoint(
    runtime: Runtime,
    route: ServiceRoute,
    plain: Callable[[Request], Awaitable[Response]],
    policy: IdempotencyPolicy,
) -> Callable[[Request], Awaitable[Response]]:
    """``plain`` for requests without a key; with one, at most one run per key (see
    :mod:`callcast.idempotency`)."""
    params, returns = route.binding
    context_names = [param.name for param in params if param.kind == "context"]
    reads_body = any(param.kind == "body" for param in params)
    guard = IdempotencyGuard(
        route.service, f"{route.method} {route.path}", policy, lambda: runtime.database(route.service)
    )

    async def endpoint(request: Request) -> Response:
        rejected: KeyRejectedError | None = None
        try:
            key = check_key(request.headers.get(KEY_HEADER), policy)
        except KeyRejectedError as error:
            key, rejected = None, error
        else:
            if key is None:
                return await plain(request)
        correlation_id = accept(request.headers.get(CORRELATION_HEADER)) or new_id()
        correlation.bind(correlation_id)
        if rejected is not None:
            return _echo(error_response(400, str(rejected)), correlation_id)
        assert key is not None
        try:
            body = await read_body(request) if reads_body else b""
        except BodyTooLarge:
            return _echo(
                error_response(413, f"request body exceeds {MAX_MESSAGE_BYTES} bytes"), correlation_id
            )
        bound = await _bind(params, request, body)
        if isinstance(bound, Response):
            return _echo(bound, correlation_id)
        kwargs, errors = bound
        if errors:
            return _echo(error_response(422, errors), correlation_id)

        async def execute(claim: Claim) -> Response:
            ctx = claim.context(runtime, route.service, correlation_id)
            for name in context_names:
                kwargs[name] = ctx
            return await _answer(route, returns, kwargs)

        signature = fingerprint(route.method, request.url.path, request.url.query, body)
        return _echo(await guard.run(key, signature, execute), correlation_id)

    endpoint.__name__ = route.fn.__name__
    return endpoint


def _make_rpc_endpoint(
    runtime: Runtime, rpc: RpcEndpoint[Any, Any]
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        deadline: float | None = None
        raw_deadline = request.headers.get(DEADLINE_HEADER)
        if raw_deadline:
            try:
                deadline = float(raw_deadline)
            except ValueError:
                return error_response(400, f"{DEADLINE_HEADER} must be a UNIX time in seconds")
            if deadline <= time.time():
                return error_response(504, "deadline already passed")
        try:
            data = await read_body(request)
        except BodyTooLarge:
            return error_response(413, f"request body exceeds {MAX_MESSAGE_BYTES} bytes")
        ctx = runtime.context(
            rpc.service, correlation_id=accept(request.headers.get(CORRELATION_HEADER)), deadline=deadline
        )
        status, body = await execute(rpc, data, ctx)
        return _echo(Response(body, status_code=status, media_type=JSON_TYPE), ctx.correlation_id)

    return endpoint


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail)


def service_routes(runtime: Runtime) -> list[BaseRoute]:
    """The routes and RPC endpoints of the services running in ``runtime`` (to mount elsewhere)."""
    routes: list[BaseRoute] = []
    for service in runtime.running_services:
        for route in service.routes:
            routes.append(Route(route.path, _make_endpoint(runtime, route), methods=[route.method]))
        for rpc in service.endpoints.values():
            routes.append(Route(rpc.http_path, _make_rpc_endpoint(runtime, rpc), methods=["POST"]))
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
        return Response(described[0], media_type=JSON_TYPE)

    routes.append(Route("/healthz", health, methods=["GET"]))
    routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})

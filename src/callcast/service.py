"""Services: one place that declares both styles a service speaks.

::

    users = Service("users", publishes=[UserSignedUp])

    @users.post("/users", status_code=201)          # request-driven: HTTP route
    async def signup(body: SignupRequest, ctx: Context) -> User: ...

    payments = Service("payments")

    @payments.rpc                                   # request-driven: RPC, over the broker or HTTP
    async def authorize(req: Authorize, ctx: Context) -> Authorization: ...

    emails = Service("emails")

    @emails.on(UserSignedUp)                        # event-driven: every subscribing handler
    async def send_welcome(event: UserSignedUp, ctx: Context) -> None: ...   # gets its own copy

A service declares what it publishes (``publishes=``) and whom it calls (``calls=``); ``ctx.publish``
and ``ctx.call`` refuse anything undeclared, so ``callcast topology`` shows the real coupling map.
Declaring does nothing at import time beyond checking signatures: an :class:`~callcast.App` runs
services.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, get_type_hints, overload

from pydantic import BaseModel, TypeAdapter

from callcast.binding import Binding, plan
from callcast.codec import event_type
from callcast.exceptions import ConfigurationError
from callcast.idempotency import IdempotencyPolicy
from callcast.retry import DEFAULT_RETRY, RetryPolicy
from callcast.sequence import SequencePolicy

if TYPE_CHECKING:
    from callcast.context import Context

Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp")
E = TypeVar("E", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

Idempotency = IdempotencyPolicy | Literal["required", "optional"] | None
"""What a route decorator's ``idempotency=`` takes."""


@dataclass(frozen=True, eq=False)
class Route:
    """An HTTP route of a service. ``fn``'s parameters are bound by name and annotation:
    a pydantic model is the JSON body, a name in the path is a path parameter, ``Context`` is the
    context, anything else is a query parameter (validated; required unless it has a default)."""

    service: str
    method: str
    path: str
    fn: Callable[..., Awaitable[Any]]
    status_code: int
    binding: Binding
    idempotency: IdempotencyPolicy | None = None
    """How the route treats ``Idempotency-Key`` (:mod:`callcast.idempotency`); ``None``: ignores it."""


@dataclass(frozen=True, eq=False)
class RpcEndpoint(Generic[Req, Resp]):
    """An RPC endpoint: ``await ctx.call(endpoint, request)`` from any service that declares it
    calls ``service``. Calling the endpoint object directly runs the function (handy in tests).

    ``idempotent``: running it twice for one request has the effect of running it once, so callers
    may retry a failed attempt (see :class:`~callcast.CallRetryPolicy`)."""

    service: str
    name: str
    fn: Callable[[Req, Context], Awaitable[Resp]]
    request_model: type[Req]
    response_adapter: TypeAdapter[Resp]
    idempotent: bool = False

    @property
    def topic(self) -> str:
        """The broker topic its requests travel on."""
        return f"callcast.rpc.{self.service}.{self.name}"

    @property
    def http_path(self) -> str:
        return f"/rpc/{self.service}/{self.name}"

    async def __call__(self, request: Req, ctx: Context) -> Resp:
        return await self.fn(request, ctx)


@dataclass(frozen=True, eq=False)
class EventHandler:
    """An event handler: its own consumer group (``<service>.<handler>``) on the event's topic.

    Delivery is at least once and the message is acknowledged only after ``fn`` returns. Up to
    ``concurrency`` messages are handled at once; messages with one partition key one at a time,
    in publish order (across processes where the broker has ``capabilities.ordered_per_key``;
    otherwise within each process). A handler that raises gets its message again (with backoff) up
    to ``retry.max_attempts`` runs of its own; then, or at once for a
    :class:`~callcast.PermanentError` or an invalid payload, the message is dead-lettered.
    """

    service: str
    model: type[BaseModel]
    fn: Callable[[Any, Context], Awaitable[None]]
    name: str
    concurrency: int
    retry: RetryPolicy
    idempotent: bool = False
    """Run in a transaction of the service's database that records the message id (the inbox)."""
    sequencing: SequencePolicy | None = None
    """Apply each key's messages in sequence order: stale ones skipped, early ones parked."""

    @functools.cached_property
    def topic(self) -> str:
        return event_type(self.model)

    @functools.cached_property
    def group(self) -> str:
        return f"{self.service}.{self.name}"


Hook = Callable[["Context"], Awaitable[None]]


DEFAULT_CONCURRENCY = 100
"""Deliveries one event handler runs at once (and its broker prefetch): enough that an I/O-bound
handler is not one-at-a-time; messages of one partition key still run one at a time."""


@dataclass(eq=False)
class Service:
    """A named service: its HTTP routes, RPC endpoints, event handlers and lifecycle hooks."""

    name: str
    publishes: Iterable[type[BaseModel]] = ()
    calls: Iterable[str] = ()
    database: bool = False
    """The service has its own SQL database (``ctx.transaction()``, ``ctx.db``, inbox, outbox)."""
    routes: list[Route] = field(default_factory=list, init=False)
    endpoints: dict[str, RpcEndpoint[Any, Any]] = field(default_factory=dict, init=False)
    handlers: list[EventHandler] = field(default_factory=list, init=False)
    startup_hooks: list[Hook] = field(default_factory=list, init=False)
    shutdown_hooks: list[Hook] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigurationError(f"service name must be alphanumeric (with - or _): {self.name!r}")
        self.publishes = tuple(self.publishes)
        self.calls = tuple(self.calls)
        for model in self.publishes:
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ConfigurationError(f"{self.name}: publishes= takes pydantic models, got {model!r}")

    @property
    def published_types(self) -> dict[str, type[BaseModel]]:
        return {event_type(model): model for model in self.publishes}

    # -- HTTP ---------------------------------------------------------------------------------------

    def route(
        self, method: str, path: str, *, status_code: int = 200, idempotency: Idempotency = None
    ) -> Callable[[F], F]:
        """Serve ``method path`` with the decorated function.

        ``idempotency="optional"`` (or ``"required"``, or an :class:`~callcast.IdempotencyPolicy`):
        the route honours ``Idempotency-Key`` (see :mod:`callcast.idempotency`); needs ``database=True``.
        """
        method = method.upper()
        if method not in HTTP_METHODS:
            raise ConfigurationError(f"unsupported HTTP method {method}")
        if not path.startswith("/"):
            raise ConfigurationError(f"route path must start with '/': {path!r}")
        try:
            policy = IdempotencyPolicy.of(idempotency)
        except ValueError as error:
            raise ConfigurationError(f"{method} {path}: {error}") from None
        if policy is not None and not self.database:
            raise ConfigurationError(
                f"{method} {path}: idempotency keys are kept in the service's database: "
                f"Service({self.name!r}, database=True)"
            )

        def register(fn: F) -> F:
            _require_async(fn)
            self.routes.append(
                Route(self.name, method, path, fn, status_code, plan(fn, path), idempotency=policy)
            )
            return fn

        return register

    def get(self, path: str, *, status_code: int = 200) -> Callable[[F], F]:
        return self.route("GET", path, status_code=status_code)

    def post(self, path: str, *, status_code: int = 200, idempotency: Idempotency = None) -> Callable[[F], F]:
        return self.route("POST", path, status_code=status_code, idempotency=idempotency)

    def put(self, path: str, *, status_code: int = 200, idempotency: Idempotency = None) -> Callable[[F], F]:
        return self.route("PUT", path, status_code=status_code, idempotency=idempotency)

    def patch(
        self, path: str, *, status_code: int = 200, idempotency: Idempotency = None
    ) -> Callable[[F], F]:
        return self.route("PATCH", path, status_code=status_code, idempotency=idempotency)

    def delete(
        self, path: str, *, status_code: int = 200, idempotency: Idempotency = None
    ) -> Callable[[F], F]:
        return self.route("DELETE", path, status_code=status_code, idempotency=idempotency)

    # -- RPC ----------------------------------------------------------------------------------------

    @overload
    def rpc(self, fn: Callable[[Req, Context], Awaitable[Resp]], /) -> RpcEndpoint[Req, Resp]: ...

    @overload
    def rpc(
        self, *, name: str | None = None, idempotent: bool = False
    ) -> Callable[[Callable[[Req, Context], Awaitable[Resp]]], RpcEndpoint[Req, Resp]]: ...

    def rpc(  # type: ignore[misc]
        self, fn: Any = None, /, *, name: str | None = None, idempotent: bool = False
    ) -> Any:
        """Declare an RPC endpoint ``fn(request: Model, ctx: Context) -> Response``.

        ``idempotent=True`` declares that running it more than once for one request is harmless:
        callers then retry attempts that failed in a retryable way (unreachable, timed out with time
        left, 502/503/504) within their deadline and retry budget. Without it a call is made once.
        """

        def register(fn: Callable[[Any, Context], Awaitable[Any]]) -> RpcEndpoint[Any, Any]:
            _require_async(fn)
            hints = get_type_hints(fn)
            params = list(inspect.signature(fn).parameters)
            if len(params) != 2:
                raise ConfigurationError(f"RPC {fn.__qualname__} must take (request, ctx)")
            request_model = hints.get(params[0])
            if not (isinstance(request_model, type) and issubclass(request_model, BaseModel)):
                raise ConfigurationError(f"RPC {fn.__qualname__}: the request must be a pydantic model")
            endpoint_name = name or fn.__name__
            if endpoint_name in self.endpoints:
                raise ConfigurationError(f"{self.name} already has an RPC named {endpoint_name!r}")
            endpoint: RpcEndpoint[Any, Any] = RpcEndpoint(
                self.name,
                endpoint_name,
                fn,
                request_model,
                TypeAdapter(hints.get("return", Any)),
                idempotent=idempotent,
            )
            self.endpoints[endpoint_name] = endpoint
            return endpoint

        return register(fn) if fn is not None else register

    def __getattr__(self, name: str) -> RpcEndpoint[Any, Any]:
        endpoints = self.__dict__.get("endpoints", {})
        if name in endpoints:
            return endpoints[name]  # type: ignore[no-any-return]
        raise AttributeError(f"service {self.__dict__.get('name')!r} has no attribute or RPC {name!r}")

    # -- events -------------------------------------------------------------------------------------

    def on(
        self,
        model: type[E],
        *,
        name: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        retry: RetryPolicy = DEFAULT_RETRY,
        idempotent: bool = False,
        sequenced: SequencePolicy | bool = False,
    ) -> Callable[[Callable[[E, Context], Awaitable[None]]], Callable[[E, Context], Awaitable[None]]]:
        """Handle every ``model`` event published by anyone: ``fn(event, ctx)``.

        ``idempotent=True``: the handler runs in a transaction of the service's database (``ctx.db``)
        that also records the message id, so a duplicate is acknowledged without running it again.
        ``sequenced=True`` (or a :class:`~callcast.sequence.SequencePolicy`): messages of one
        partition key are applied in their sequence order (``sequence=`` on publish, or a field of
        the event); implies ``idempotent``.
        """
        sequencing = SequencePolicy() if sequenced is True else sequenced or None
        if (idempotent or sequencing) and not self.database:
            raise ConfigurationError(
                f"{self.name}: idempotent/sequenced handlers need the service's database: "
                f"Service({self.name!r}, database=True)"
            )
        if (
            sequencing is not None
            and sequencing.field is not None
            and sequencing.field not in model.model_fields
        ):
            raise ConfigurationError(f"{model.__name__} has no field {sequencing.field!r} to sequence by")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigurationError(f"{self.name}.on() takes a pydantic model class, got {model!r}")
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")

        def register(fn: Callable[[E, Context], Awaitable[None]]) -> Callable[[E, Context], Awaitable[None]]:
            _require_async(fn)
            handler_name = name or fn.__name__
            if any(handler.name == handler_name for handler in self.handlers):
                raise ConfigurationError(f"{self.name} already has a handler named {handler_name!r}")
            self.handlers.append(
                EventHandler(
                    self.name,
                    model,
                    fn,
                    handler_name,
                    concurrency,
                    retry,
                    idempotent=idempotent or sequencing is not None,
                    sequencing=sequencing,
                )
            )
            return fn

        return register

    # -- lifecycle ----------------------------------------------------------------------------------

    def on_startup(self, fn: Hook) -> Hook:
        """Run ``fn(ctx)`` when the service starts, before it serves anything (open stores here)."""
        self.startup_hooks.append(fn)
        return fn

    def on_shutdown(self, fn: Hook) -> Hook:
        """Run ``fn(ctx)`` after the service stopped serving and its handlers finished."""
        self.shutdown_hooks.append(fn)
        return fn


def _require_async(fn: Callable[..., Any]) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise ConfigurationError(f"{getattr(fn, '__qualname__', fn)!r} must be an async function")

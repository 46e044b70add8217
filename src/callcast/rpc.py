"""RPC: request/reply over the broker (native where it has it, else built on topics) or over HTTP.

Over the broker
    A request is an envelope of type ``callcast.rpc.<service>.<name>`` published on the topic of the
    same name, where the endpoint's service consumes it as one group (its processes share the load).
    Extensions ``replyto`` (the caller process's ephemeral reply topic) and ``deadline`` (UNIX time)
    travel with it. The reply is an envelope of type ``callcast.reply`` on ``replyto`` with
    extensions ``inreplyto`` (the request's id) and ``status`` (HTTP-style: 200, 4xx, 5xx).
    A request found past its deadline is dropped unanswered: its caller has given up.

Over the broker's own request/reply (``capabilities.request_reply``, e.g. NATS)
    The same request and reply envelopes (without ``replyto``) go through
    :class:`~callcast.transport.RequestReply`: nothing is stored and there are no reply topics. A
    request no server is listening for fails at once (:class:`~callcast.ServiceUnavailableError`).

Over HTTP
    ``POST /rpc/<service>/<name>`` with the request's JSON; the answer's status and JSON body are the
    same as the broker reply's. Used by ``ctx.call`` when the app is given a URL for the service.

Error bodies are ``{"error": "<type>", "detail": "<message>"}``; tracebacks never leave the process.
RPC is at most once per call from the caller's view, except that, on topics, a request whose server
process dies mid-handler is redelivered to another server process while the deadline allows (over a
broker's own request/reply it is lost, and the caller times out; idempotent calls are retried, see
:mod:`callcast.resilience`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httpx
import orjson
from pydantic import BaseModel, ValidationError

from callcast import alarms
from callcast.codec import MAX_MESSAGE_BYTES, decode, summarize
from callcast.dispatch import Dispatcher
from callcast.envelope import Envelope
from callcast.exceptions import (
    CallError,
    CallTimeoutError,
    CircuitOpenError,
    DecodeError,
    HTTPError,
    RemoteError,
    ServiceUnavailableError,
    TransportError,
)
from callcast.resilience import CallGuards, CallPolicy
from callcast.service import RpcEndpoint
from callcast.transport import Broker, Delivery, RequestReply, ServedRequest

if TYPE_CHECKING:
    from callcast.context import Context

log = logging.getLogger("callcast.rpc")

Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp")

REPLY_TYPE = "callcast.reply"
DEADLINE_HEADER = "x-callcast-deadline"
CORRELATION_HEADER = "x-correlation-id"


def call_error_status(error: CallError) -> int:
    """The status a route or endpoint answers when a call it made failed: 504 timeout, 503
    unavailable (an open circuit or a full bulkhead included), the remote's own 4xx (it refused
    what it was handed on: not this service's failure, so its callers neither retry it nor count
    it against its circuit breaker), 502 any other remote error."""
    if isinstance(error, CallTimeoutError):
        return 504
    if isinstance(error, ServiceUnavailableError):
        return 503
    if isinstance(error, RemoteError) and 400 <= error.status < 500:
        return error.status
    return 502


def public_call_error(error: CallError) -> tuple[int, str]:
    """The status and detail a route or RPC endpoint answers its (perhaps external) caller when a
    call it made failed: a 4xx passed on carries the callee's own reason; a 5xx says only which
    kind of failure it was, since the full text names internal services, error types and broker
    addresses. That text is logged at WARNING (with the correlation id), for the operator."""
    status = call_error_status(error)
    if isinstance(error, RemoteError) and status < 500:
        return status, error.detail or f"refused with {status}"
    log.warning("call failed: %s", error)
    if isinstance(error, CircuitOpenError):
        wait = math.ceil(error.retry_after)
        return status, f"a service this request needs is unavailable (circuit open, retry in {wait} s)"
    if isinstance(error, ServiceUnavailableError):
        return status, "a service this request needs is unavailable"
    if isinstance(error, CallTimeoutError):
        return status, "a service this request needs did not answer in time"
    return status, "a service this request needs failed"


def error_body(kind: str, detail: str) -> bytes:
    return orjson.dumps({"error": kind, "detail": detail})


async def execute(endpoint: RpcEndpoint[Any, Any], data: bytes, ctx: Context) -> tuple[int, bytes]:
    """Run ``endpoint`` on request bytes; the (status, JSON body) answer. Never raises."""
    try:
        request = decode(endpoint.request_model, data)
    except DecodeError as error:
        return 422, error_body("DecodeError", str(error))
    remaining = ctx.remaining()
    try:
        if remaining is not None:
            with alarms.timeout(remaining):
                result = await endpoint.fn(request, ctx)
        else:
            result = await endpoint.fn(request, ctx)
        return 200, endpoint.response_adapter.dump_json(result)
    except HTTPError as error:
        return error.status, error_body("HTTPError", error.detail)
    except TimeoutError:
        return 504, error_body("CallTimeoutError", "deadline exceeded")
    except CallError as error:  # a call the endpoint made failed
        status, detail = public_call_error(error)
        if isinstance(error, RemoteError) and status < 500:  # passed on as the callee said it
            return status, error_body(error.error_type or "RemoteError", detail)
        return status, error_body(type(error).__name__, detail)
    except Exception as error:
        log.exception("RPC %s.%s failed", endpoint.service, endpoint.name)
        return 500, error_body(type(error).__name__, "internal error")


class RpcServer:
    """Serves one endpoint's requests from the broker."""

    def __init__(
        self,
        broker: Broker,
        endpoint: RpcEndpoint[Any, Any],
        make_context: Callable[[Envelope, float | None], Context],
        source: str,
    ) -> None:
        self.broker = broker
        self.endpoint = endpoint
        self.make_context = make_context
        self.source = source
        self._dispatcher: Dispatcher | None = None
        self._native = native_requests(broker)

    @property
    def group(self) -> str:
        return self.endpoint.topic

    async def start(self, concurrency: int = 64) -> None:
        if self._native is not None:
            subscription = await self._native.serve(self.endpoint.topic, self.group, prefetch=concurrency)
        else:
            subscription = await self.broker.subscribe(self.endpoint.topic, self.group, prefetch=concurrency)
        self._dispatcher = Dispatcher(subscription, self._serve, self.group)

    async def stop(self, grace: float) -> None:
        if self._dispatcher is not None:
            await self._dispatcher.stop(grace)

    async def _serve(self, delivery: Delivery) -> None:
        envelope = delivery.envelope
        reply_to = envelope.extensions.get("replyto")
        try:
            deadline = float(envelope.extensions.get("deadline", "") or "nan")
        except ValueError:
            deadline = math.nan
        if (self._native is None and not reply_to) or not math.isfinite(deadline):  # cannot be answered
            log.warning("RPC %s: dropping request %s without replyto/deadline", self.group, envelope.id)
            await _settle(delivery)
            return
        if time.time() >= deadline:
            await _settle(delivery)
            return
        status, body = await execute(self.endpoint, envelope.data, self.make_context(envelope, deadline))
        reply = Envelope(
            type=REPLY_TYPE,
            source=self.source,
            data=body,
            extensions={
                "inreplyto": envelope.id,
                "status": str(status),
                "correlationid": envelope.extensions.get("correlationid", envelope.id),
            },
        )
        try:
            if self._native is not None:  # replying settles it
                await cast(ServedRequest, delivery).reply(reply)
                return
            assert reply_to is not None
            await self.broker.publish(reply_to, [reply])
        except TransportError as error:
            log.warning("RPC %s: reply to %s lost: %s", self.group, envelope.id, error)
        await _settle(delivery)


def native_requests(broker: Broker) -> RequestReply | None:
    """The broker's own request/reply, where it has one (see :mod:`callcast.transport`)."""
    if broker.capabilities.request_reply and isinstance(broker, RequestReply):
        return broker
    return None


def _status(reply: Envelope) -> int:
    """The HTTP-style status a reply envelope carries (500 if it carries none that parses)."""
    try:
        return int(reply.extensions.get("status", "500"))
    except ValueError:
        return 500


async def _settle(delivery: Delivery) -> None:
    with contextlib.suppress(TransportError):
        await delivery.ack()


class RpcClient:
    """Makes the calls of one process: one ephemeral reply topic, one HTTP connection pool."""

    def __init__(
        self,
        broker: Broker,
        instance_id: str,
        service_urls: dict[str, str],
        source: str,
        call_policies: Mapping[str, CallPolicy] | None = None,
    ) -> None:
        self.broker = broker
        self.reply_topic = f"callcast.reply.{instance_id}"
        self.service_urls = {name: url.rstrip("/") for name, url in service_urls.items()}
        self.source = source
        self.guards = CallGuards(call_policies)
        """Per target service: its policy, breaker, bulkhead, retry budget and counters."""
        self._pending: dict[str, asyncio.Future[tuple[int, bytes]]] = {}
        self._dispatcher: Dispatcher | None = None
        self._http: httpx.AsyncClient | None = None
        self._native = native_requests(broker)

    async def start(self) -> None:
        if self._native is None:  # replies come back on this process's own topic
            subscription = await self.broker.subscribe(
                self.reply_topic, self.reply_topic, prefetch=256, ephemeral=True
            )
            self._dispatcher = Dispatcher(subscription, self._receive, "rpc-replies")
        if self.service_urls:
            self._http = httpx.AsyncClient()

    async def _receive(self, delivery: Delivery) -> None:
        envelope = delivery.envelope
        future = self._pending.get(envelope.extensions.get("inreplyto", ""))
        if future is not None and not future.done():
            future.set_result((_status(envelope), envelope.data))
        await _settle(delivery)

    async def stop(self) -> None:
        if self._dispatcher is not None:
            await self._dispatcher.stop(grace=0)
        if self._http is not None:
            await self._http.aclose()
        for future in self._pending.values():
            future.cancel()

    async def call(
        self,
        endpoint: RpcEndpoint[Req, Resp],
        request: Req,
        *,
        timeout: float | None,
        caller: Context,
        idempotent: bool | None = None,
        policy: CallPolicy | None = None,
    ) -> Resp:
        """Call ``endpoint`` under the target's policies (:mod:`callcast.resilience`): the answer, or
        one of the :class:`~callcast.CallError` exceptions (see ``Context.call``)."""
        if timeout is not None and not 0 < timeout < math.inf:
            raise ValueError(f"timeout must be a positive, finite number of seconds, not {timeout!r}")
        guard = self.guards.guard(endpoint.service)
        effective = policy or guard.policy
        budget = effective.timeout if timeout is None else timeout
        remaining = caller.remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        target = f"{endpoint.service}.{endpoint.name}"
        if budget <= 0:
            raise CallTimeoutError(f"call to {target}: deadline already passed", target=target)
        data = request.__pydantic_serializer__.to_json(request)
        over_http = endpoint.service in self.service_urls

        def attempt(seconds: float) -> Awaitable[tuple[int, bytes]]:
            if over_http:
                return self._over_http(endpoint, data, seconds, caller, target)
            return self._over_broker(endpoint, data, seconds, caller, target)

        status, body = await guard.call(
            attempt,
            budget,
            idempotent=endpoint.idempotent if idempotent is None else idempotent,
            policy=policy,
        )
        if status == 200:
            try:
                return endpoint.response_adapter.validate_json(body)
            except ValidationError as error:  # its summary: the fields, not the values sent
                raise RemoteError(
                    f"{target} answered with an invalid response: {summarize(error)}",
                    target=target,
                    status=502,
                    error_type="ValidationError",
                ) from None
        kind, detail = _parse_error(body)
        if status == 504:  # the callee gave up at the deadline we sent: a timeout, seen from here
            raise CallTimeoutError(
                f"call to {target}: no answer within {budget:.3g}s ({detail})", target=target
            )
        raise RemoteError(
            f"{target} failed with {status} {kind}: {detail}",
            target=target,
            status=status,
            error_type=kind,
            detail=detail,
        )

    async def _over_broker(
        self, endpoint: RpcEndpoint[Any, Any], data: bytes, budget: float, caller: Context, target: str
    ) -> tuple[int, bytes]:
        extensions = {"deadline": repr(time.time() + budget), "correlationid": caller.correlation_id}
        if caller.causation_id:
            extensions["causationid"] = caller.causation_id
        if self._native is None:
            extensions["replyto"] = self.reply_topic
        envelope = Envelope(type=endpoint.topic, source=self.source, data=data, extensions=extensions)
        if self._native is not None:
            return await self._natively(self._native, endpoint.topic, envelope, budget, target)
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[envelope.id] = future
        try:
            with alarms.timeout(budget):  # the publish too: a stalled broker must not outlast the call
                try:
                    await self.broker.publish(endpoint.topic, [envelope])
                except TransportError as error:
                    raise ServiceUnavailableError(
                        f"call to {target}: broker failed: {error}", target=target
                    ) from None
                return await future
        except TimeoutError:
            raise CallTimeoutError(
                f"call to {target}: no answer within {budget:.3g}s", target=target
            ) from None
        finally:
            self._pending.pop(envelope.id, None)

    @staticmethod
    async def _natively(
        native: RequestReply, topic: str, envelope: Envelope, budget: float, target: str
    ) -> tuple[int, bytes]:
        try:
            reply = await native.request(topic, envelope, timeout=budget)
        except TimeoutError:
            raise CallTimeoutError(
                f"call to {target}: no answer within {budget:.3g}s", target=target
            ) from None
        except TransportError as error:
            raise ServiceUnavailableError(f"call to {target}: {error}", target=target) from None
        return _status(reply), reply.data

    async def _over_http(
        self, endpoint: RpcEndpoint[Any, Any], data: bytes, budget: float, caller: Context, target: str
    ) -> tuple[int, bytes]:
        assert self._http is not None
        url = self.service_urls[endpoint.service] + endpoint.http_path
        headers = {
            "content-type": "application/json",
            CORRELATION_HEADER: caller.correlation_id,
            DEADLINE_HEADER: repr(time.time() + budget),
        }
        try:
            async with asyncio.timeout(budget):  # httpx's timeout is per phase, this one is in total
                return await self._post(url, data, headers, budget, target)
        except (TimeoutError, httpx.TimeoutException):
            raise CallTimeoutError(
                f"call to {target}: no answer within {budget:.3g}s", target=target
            ) from None
        except httpx.HTTPError as error:  # refused, reset, a body that cannot be decoded...
            raise ServiceUnavailableError(
                f"call to {target}: {type(error).__name__}", target=target
            ) from None

    async def _post(
        self, url: str, data: bytes, headers: dict[str, str], budget: float, target: str
    ) -> tuple[int, bytes]:
        """POST ``data``; the status and the body, read up to :data:`MAX_MESSAGE_BYTES` (a larger
        answer is a 502, not read whole into memory)."""
        assert self._http is not None
        async with self._http.stream("POST", url, content=data, headers=headers, timeout=budget) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_MESSAGE_BYTES:
                    raise RemoteError(
                        f"{target} answered with more than {MAX_MESSAGE_BYTES} bytes",
                        target=target,
                        status=502,
                        error_type="TooLarge",
                    )
            return response.status_code, bytes(body)


def _parse_error(body: bytes) -> tuple[str, str]:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "Error", body[:200].decode("utf-8", "replace")
    if isinstance(parsed, dict):
        detail = parsed.get("detail", "")
        return str(parsed.get("error", "Error")), detail if isinstance(detail, str) else orjson.dumps(
            detail
        ).decode()
    return "Error", str(parsed)[:200]

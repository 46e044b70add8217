"""The context handed to every route, RPC endpoint, event handler and hook.

A context belongs to one service and one unit of work (an HTTP request, an RPC request or an
event delivery). Everything published or called through it carries the same correlation id, and
names the unit of work as its cause, so a chain of requests and events can be followed end to end.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from callcast import outbox
from callcast.codec import MAX_MESSAGE_BYTES, encode, event_type
from callcast.envelope import Envelope, new_id
from callcast.exceptions import ConfigurationError, DecodeError

if TYPE_CHECKING:
    from callcast.resilience import CallPolicy
    from callcast.runtime import Runtime
    from callcast.service import RpcEndpoint

Req = TypeVar("Req", bound=BaseModel)
Resp = TypeVar("Resp")


class Context:
    """What a unit of work of one service may do: publish events, call other services, read state."""

    __slots__ = (
        "_envelope",
        "_runtime",
        "_staged",
        "_stamp_attempt",
        "_tx",
        "attempt",
        "causation_id",
        "correlation_id",
        "deadline",
        "service",
    )

    def __init__(
        self,
        runtime: Runtime,
        service: str,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        envelope: Envelope | None = None,
        attempt: int = 1,
        deadline: float | None = None,
        stamp_attempt: bool = False,
    ) -> None:
        self._runtime = runtime
        self.service = service
        self.correlation_id = correlation_id or new_id()
        self.causation_id = causation_id
        self._envelope = envelope
        self._stamp_attempt = stamp_attempt and envelope is not None
        self.attempt = attempt
        """Which attempt at ``envelope`` this is (1 = first): the broker's count of its deliveries,
        plus, for an event handler, its retries in the lane of its key (:mod:`callcast.consumer`)."""
        self.deadline = deadline
        """UNIX time by which the caller gives up (RPC), or ``None``."""
        self._tx: AsyncConnection | None = None
        self._staged: list[outbox.Staged] = []

    @property
    def envelope(self) -> Envelope | None:
        """The envelope being handled, in an event handler or RPC endpoint. With
        ``stamp_attempt`` (event deliveries) it carries the extension ``attempt``, added when it is
        first read (most handlers never read it)."""
        if self._stamp_attempt:
            assert self._envelope is not None
            self._envelope = self._envelope.with_extensions(attempt=str(self.attempt))
            self._stamp_attempt = False
        return self._envelope

    @envelope.setter
    def envelope(self, envelope: Envelope | None) -> None:
        self._envelope = envelope
        self._stamp_attempt = False

    @property
    def state(self) -> SimpleNamespace:
        """This service's mutable state in this process (stores opened by a startup hook)."""
        return self._runtime.state[self.service]

    @property
    def data_dir(self) -> Path:
        """Where this process keeps files (``--data-dir``, default ``.callcast``)."""
        return self._runtime.data_dir

    def remaining(self) -> float | None:
        """Seconds left before ``deadline``, or ``None`` without one."""
        return None if self.deadline is None else self.deadline - time.time()

    def envelope_for(
        self, event: BaseModel, *, key: str | None = None, sequence: int | None = None
    ) -> Envelope:
        """The envelope ``publish`` would send for ``event`` (for outboxes and batch publishing)."""
        kind = event_type(type(event))
        if kind not in self._runtime.app.service(self.service).published_types:
            raise ConfigurationError(
                f"service {self.service!r} publishes {kind!r} but does not declare it in publishes="
            )
        data = encode(event)
        if len(data) > MAX_MESSAGE_BYTES:
            raise DecodeError(f"{kind} event of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES} bytes")
        extensions = {"correlationid": self.correlation_id}
        if self.causation_id:
            extensions["causationid"] = self.causation_id
        if key is not None:
            extensions["partitionkey"] = str(key)
        if sequence is not None:
            extensions["sequence"] = str(sequence)
        return Envelope(
            type=kind, source=self._runtime.source(self.service), data=data, extensions=extensions
        )

    async def publish(self, event: BaseModel, *, key: str | None = None, sequence: int | None = None) -> None:
        """Publish ``event`` to every subscribing handler.

        Outside a transaction it returns once the broker stored the event. Inside
        ``ctx.transaction()`` (or an idempotent handler) it goes to the service's outbox in that
        transaction, and is sent after the commit — never if the transaction rolls back.
        ``key`` is the partition key: handlers see events of one key one at a time, in this order;
        ``sequence`` numbers the events of a key for sequenced handlers.
        """
        envelope = self.envelope_for(event, key=key, sequence=sequence)
        if self._tx is not None:
            relay = self._runtime.relay(self.service)
            row_id = await outbox.stage(self._tx, envelope.type, envelope, relay)
            self._staged.append((row_id, envelope.type, envelope))
        else:
            await self._runtime.broker.publish(envelope.type, [envelope])

    @property
    def db(self) -> AsyncConnection:
        """The service database connection of the current transaction (SQLAlchemy ``AsyncConnection``)."""
        if self._tx is None:
            raise ConfigurationError(
                "ctx.db is only available inside ctx.transaction() or an idempotent handler"
            )
        return self._tx

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction of this service's database: what runs inside it, and the events published
        inside it, commit together; an exception rolls all of it back. Nested use joins the
        transaction already open."""
        if self._tx is not None:
            yield self._tx
            return
        database = self._runtime.database(self.service)
        try:
            async with database.transaction() as conn:
                self._tx = conn
                yield conn
        except BaseException:
            self._staged = []  # rolled back: those rows are gone
            raise
        finally:
            self._tx = None
        if self._staged:
            staged, self._staged = self._staged, []
            self._runtime.relay(self.service).committed(staged)

    async def call(
        self,
        endpoint: RpcEndpoint[Req, Resp],
        request: Req,
        *,
        timeout: float | None = None,
        idempotent: bool | None = None,
        policy: CallPolicy | None = None,
    ) -> Resp:
        """Call an RPC endpoint of another service and wait for its answer.

        The call follows the target service's :class:`~callcast.CallPolicy` (``App.start``'s
        ``call_policies``), or ``policy`` for this call's timeouts and retries. ``timeout``: seconds
        in all (default: the policy's, 10 s), never beyond this context's own deadline; the time
        left travels with the request so the callee gives up with the caller. ``idempotent``:
        whether failed attempts may be retried (default: the endpoint's ``idempotent=``).

        Raises :class:`~callcast.CallTimeoutError` when no answer came in time,
        :class:`~callcast.RemoteError` when the endpoint answered with an error (its status and
        message kept), :class:`~callcast.ServiceUnavailableError` when it cannot be reached, and
        two kinds of it raised without a request made: :class:`~callcast.CircuitOpenError` while the
        target's circuit breaker is open, :class:`~callcast.BulkheadFullError` when too many calls
        to it are in flight.
        """
        if endpoint.service not in self._runtime.app.service(self.service).calls:
            raise ConfigurationError(
                f"service {self.service!r} calls {endpoint.service!r} but does not declare it in calls="
            )
        return await self._runtime.rpc.call(
            endpoint, request, timeout=timeout, caller=self, idempotent=idempotent, policy=policy
        )

    def __repr__(self) -> str:
        return f"<Context service={self.service} correlation_id={self.correlation_id}>"

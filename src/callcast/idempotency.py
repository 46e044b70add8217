"""Idempotency keys on HTTP routes: a client that retries a request gets the first answer again, and
the effect happens once.

A route opts in (its service needs ``database=True``)::

    @orders.post("/orders", status_code=201, idempotency="optional")    # or "required"
    async def place_order(body: PlaceOrder, ctx: Context) -> Order: ...

A request carrying ``Idempotency-Key: <key>`` (1–255 printable ASCII characters, spaces included;
otherwise 400) is fingerprinted (SHA-256 of method, path, query and body). Then, per (service,
route, key):

* the first request *claims* the key in ``callcast_idempotency`` (the service's database), runs the
  handler, and stores its answer (status, media type, body);
* a later request with the same fingerprint gets the stored answer replayed, with the header
  ``Idempotent-Replayed: true``; the handler does not run;
* a request with the same key and another fingerprint gets 422, and the handler does not run;
* requests arriving while the key's first request runs wait for it (up to ``wait`` seconds: in
  this process on an event, across processes by polling the table) and get its answer replayed;
  past ``wait`` they get 409 ("in progress") and may retry;
* answers with a 5xx status are not stored (the key is released, so a retry runs again) unless the
  handler's transaction had already committed; invalid requests (422, 413) never claim the key.

Exactly once, and its window. When the handler writes inside ``ctx.transaction()``, that
transaction also marks the claim *applied* (only while this request still owns it), so its writes
commit at most once per key, even if a claim's lease ran out and another request took the key
over: the loser's transaction fails and it answers 409. The answer is stored right after the handler
returns; if the process dies between the commit and that store, a retry gets 409 "applied, answer
lost" instead of a second effect. A handler that writes without ``ctx.transaction()`` gets no such
guard: if its process dies mid-request, a retry after the lease (``lease`` seconds) runs it again.

While its handler runs, a request renews its claim's lease every third of it, so a slow handler
keeps its key. A claim whose process died is taken over after its lease (30 s by default), so a
crash never wedges a key. Keys are kept ``retention`` seconds (24 h by default); an expired key is free again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import orjson
from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.responses import Response

from callcast.context import Context
from callcast.database import Database, idempotency_table
from callcast.waiting import within

if TYPE_CHECKING:
    from callcast.runtime import Runtime

log = logging.getLogger("callcast.idempotency")

KEY_HEADER = "idempotency-key"
REPLAYED_HEADER = "idempotent-replayed"
MAX_KEY_LENGTH = 255

_table = idempotency_table
_PURGE_EVERY = 3600.0


@dataclass(frozen=True)
class IdempotencyPolicy:
    """How a route treats ``Idempotency-Key``: ``required`` (400 without one) or optional; how long a
    claim is leased to its request, how long keys are kept, and how long a duplicate waits."""

    required: bool = False
    lease: float = 30.0
    retention: float = 24 * 3600.0
    wait: float = 10.0

    def __post_init__(self) -> None:
        if min(self.lease, self.retention, self.wait) <= 0:
            raise ValueError("lease, retention and wait must be positive")

    @classmethod
    def of(
        cls, value: IdempotencyPolicy | Literal["required", "optional"] | None
    ) -> IdempotencyPolicy | None:
        """The policy a route decorator's ``idempotency=`` names."""
        if value is None or isinstance(value, IdempotencyPolicy):
            return value
        if value not in ("required", "optional"):
            raise ValueError(f"idempotency must be 'required', 'optional' or an IdempotencyPolicy: {value!r}")
        return cls(required=value == "required")


class KeyRejectedError(ValueError):
    """The ``Idempotency-Key`` header is missing where required, or not an acceptable key (400)."""


def check_key(value: str | None, policy: IdempotencyPolicy) -> str | None:
    """The key to use, ``None`` to run without one, or :class:`KeyRejectedError` with the reason."""
    if value is None:
        if policy.required:
            raise KeyRejectedError("this route requires an Idempotency-Key header")
        return None
    if not value or len(value) > MAX_KEY_LENGTH:
        raise KeyRejectedError(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
    if not (value.isascii() and value.isprintable()):
        raise KeyRejectedError("Idempotency-Key must be printable ASCII")
    return value


def fingerprint(method: str, path: str, query: str, body: bytes) -> str:
    """What makes two requests "the same request": method, path, query string and body bytes."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query.encode()):
        digest.update(part)
        digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredAnswer:
    status: int
    media_type: str | None
    body: bytes

    def replay(self) -> Response:
        response = Response(self.body, status_code=self.status, media_type=self.media_type)
        response.headers[REPLAYED_HEADER] = "true"
        return response


def _error(status: int, detail: str) -> Response:
    return Response(orjson.dumps({"detail": detail}), status_code=status, media_type="application/json")


class ClaimLostError(Exception):
    """This request no longer owns its key (its lease ran out and another request took it over)."""


class Claim:
    """One request's ownership of a key, until its answer is stored or it is released."""

    def __init__(self, guard: IdempotencyGuard, key: str) -> None:
        self.guard = guard
        self.key = key
        self.token = uuid.uuid4().hex
        self.applied = False
        """A transaction of the handler committed while owning the key."""

    def owned_row(self) -> ColumnElement[bool]:
        return and_(
            _table.c.service == self.guard.service,
            _table.c.route == self.guard.route,
            _table.c.key == self.key,
            _table.c.owner == self.token,
        )

    async def mark_applied(self, conn: AsyncConnection) -> None:
        """In the handler's transaction: record that its effects commit with it, or raise
        :class:`ClaimLostError` (rolling it back) when another request owns the key now."""
        result = await conn.execute(_table.update().where(self.owned_row()).values(state="applied"))
        if result.rowcount != 1:
            raise ClaimLostError(f"Idempotency-Key {self.key!r} was taken over by another request")

    def context(self, runtime: Runtime, service: str, correlation_id: str | None) -> Context:
        """The handler's context: its transactions mark this claim applied."""
        return _ClaimingContext(runtime, service, self, correlation_id=correlation_id)


class _ClaimingContext(Context):
    __slots__ = ("_claim",)

    def __init__(self, runtime: Runtime, service: str, claim: Claim, *, correlation_id: str | None) -> None:
        super().__init__(runtime, service, correlation_id=correlation_id)
        self._claim = claim

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """The outermost transaction marks the claim applied, once it committed; a nested one only
        joins it (its end commits nothing)."""
        outermost = self._tx is None
        async with super().transaction() as conn:
            if outermost:
                await self._claim.mark_applied(conn)
            yield conn
        if outermost:
            self._claim.applied = True


@dataclass(frozen=True)
class _InFlight:
    fingerprint: str
    done: asyncio.Future[StoredAnswer | None]


class IdempotencyGuard:
    """The keys of one route of one service, in this process and in the service's database."""

    def __init__(
        self, service: str, route: str, policy: IdempotencyPolicy, database: Callable[[], Database]
    ) -> None:
        self.service = service
        self.route = route
        self.policy = policy
        self._database = database
        self._in_flight: dict[str, _InFlight] = {}
        self._next_purge = 0.0

    async def run(
        self, key: str, fingerprint: str, execute: Callable[[Claim], Awaitable[Response]]
    ) -> Response:
        """The answer for a request with ``key``: ``execute``'s (run at most once per key while the
        key is kept), a replayed one, or an error (409, 422) saying why neither."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.wait
        pause = 0.01
        while True:
            local = self._in_flight.get(key)
            if local is not None:
                if local.fingerprint != fingerprint:
                    return _mismatch(key)
                try:
                    stored = await within(asyncio.shield(local.done), max(deadline - loop.time(), 0.0))
                except TimeoutError:
                    return _in_progress(key)
                if stored is not None:
                    return stored.replay()
                continue
            done: asyncio.Future[StoredAnswer | None] = loop.create_future()
            self._in_flight[key] = _InFlight(fingerprint, done)
            stored = None
            try:
                decision = await self._claim(key, fingerprint)
                if isinstance(decision, Claim):
                    response, stored = await self._execute(decision, execute)
                    return response
                if isinstance(decision, StoredAnswer):
                    stored = decision
                    return decision.replay()
                if decision != "busy":
                    return _mismatch(key) if decision == "mismatch" else _answer_lost(key)
            finally:
                del self._in_flight[key]
                done.set_result(stored)
            if loop.time() + pause > deadline:
                return _in_progress(key)
            await asyncio.sleep(pause)  # another process runs it: look again shortly
            pause = min(pause * 2, 0.2)

    async def _execute(
        self, claim: Claim, execute: Callable[[Claim], Awaitable[Response]]
    ) -> tuple[Response, StoredAnswer | None]:
        renewing = asyncio.create_task(self._keep(claim))
        try:
            response = await execute(claim)
        except ClaimLostError:
            return _in_progress(claim.key), None
        finally:
            renewing.cancel()
            try:
                await renewing
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():  # this request's own cancellation
                    raise
        body = getattr(response, "body", None)
        if (response.status_code >= 500 and not claim.applied) or not isinstance(body, bytes):
            await self._release(claim)
            return response, None
        stored = StoredAnswer(response.status_code, response.media_type, body)
        await self._store(claim, stored)
        return response, stored

    async def _keep(self, claim: Claim) -> None:
        """Renew ``claim``'s lease every third of it while its handler runs (a renewal that fails
        is logged; the next one may succeed before the lease runs out)."""
        while True:
            await asyncio.sleep(self.policy.lease / 3)
            try:
                async with self._database().transaction() as conn:
                    await conn.execute(
                        _table.update()
                        .where(claim.owned_row())
                        .values(lease_until=time.time() + self.policy.lease)
                    )
            except Exception as error:
                log.warning(
                    "renewing Idempotency-Key %r of %s failed: %s",
                    claim.key,
                    self.route,
                    type(error).__name__,
                )

    async def _claim(self, key: str, fingerprint: str) -> Claim | StoredAnswer | str:
        """Claim ``key`` for a new request; else what the table holds for it: its stored answer,
        ``"mismatch"``, ``"busy"`` (running elsewhere) or ``"lost"`` (applied, answer not stored)."""
        now = time.time()
        claim = Claim(self, key)
        database = self._database()
        async with database.transaction() as conn:
            if now >= self._next_purge:
                self._next_purge = now + _PURGE_EVERY
                await conn.execute(
                    _table.delete().where(_table.c.service == self.service, _table.c.expires_at < now)
                )
            insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
            fresh = {
                "fingerprint": fingerprint,
                "state": "running",
                "owner": claim.token,
                "lease_until": now + self.policy.lease,
                "expires_at": now + self.policy.retention,
                "status": None,
                "media_type": None,
                "body": None,
            }
            inserted = await conn.execute(
                insert(_table)
                .values(service=self.service, route=self.route, key=key, **fresh)
                .on_conflict_do_nothing(index_elements=["service", "route", "key"])
            )
            if inserted.rowcount == 1:
                return claim
            where = (_table.c.service == self.service, _table.c.route == self.route, _table.c.key == key)
            row = (await conn.execute(select(_table).where(*where).with_for_update())).one()
            if row.expires_at < now:
                await conn.execute(_table.update().where(*where).values(**fresh))
                return claim
            if row.fingerprint != fingerprint:
                return "mismatch"
            if row.state == "done":
                return StoredAnswer(row.status, row.media_type, row.body)
            if row.lease_until >= now:
                return "busy"
            if row.state == "applied":
                return "lost"
            await conn.execute(
                _table.update().where(*where).values(owner=claim.token, lease_until=now + self.policy.lease)
            )
            return claim

    async def _store(self, claim: Claim, answer: StoredAnswer) -> None:
        async with self._database().transaction() as conn:
            await conn.execute(
                _table.update()
                .where(claim.owned_row())
                .values(
                    state="done",
                    lease_until=0.0,
                    status=answer.status,
                    media_type=answer.media_type,
                    body=answer.body,
                )
            )

    async def _release(self, claim: Claim) -> None:
        async with self._database().transaction() as conn:
            await conn.execute(_table.delete().where(claim.owned_row(), _table.c.state == "running"))


def _mismatch(key: str) -> Response:
    return _error(
        422, f"Idempotency-Key {key!r} was already used with a different request (method, path or body)"
    )


def _in_progress(key: str) -> Response:
    return _error(409, f"a request with Idempotency-Key {key!r} is in progress; retry later")


def _answer_lost(key: str) -> Response:
    return _error(
        409,
        f"the request with Idempotency-Key {key!r} was applied, but its answer was not stored "
        "(the server stopped); it will not run again",
    )

"""A service's own SQL database, where callcast keeps its inbox, outbox and sequence records next to
the service's data, so they commit in the same transaction as the service's effects.

Services that want it say so: ``Service("emails", database=True)``. Which database is configuration,
never code: ``--database emails=URL`` (``callcast run``), ``App.start(databases={...})`` or
``$CALLCAST_DATABASE_EMAILS``; the default is ``sqlite:///<data dir>/<service>.db``.

URLs: ``sqlite:///path.db`` (through aiosqlite) and ``postgresql://user@host/db`` (through asyncpg),
both with SQLAlchemy's async engine; the service gets an ``AsyncConnection`` inside a transaction
(``ctx.db``) and writes with SQLAlchemy Core (``text(...)`` or table expressions).

SQLite transactions start with ``BEGIN IMMEDIATE`` (the write lock is taken at the start, so two
writers never deadlock upgrading a read); WAL mode; a 30 s busy timeout.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from callcast.brokers import redact
from callcast.exceptions import ConfigurationError, TransportError

SETUP_TRIES = 5
"""Tries to create callcast's tables when they fail with a conflict (~1.5 s of pauses in all)."""

log = logging.getLogger("callcast.database")

metadata = MetaData()

inbox_table = Table(
    "callcast_inbox",
    metadata,
    Column("subscriber", String(200), nullable=False),
    Column("message_id", String(200), nullable=False),
    Column("handled_at", Float, nullable=False),
    Column("duplicates", Integer, nullable=False, server_default="0"),
    PrimaryKeyConstraint("subscriber", "message_id"),
)
"""One row per (subscriber, message id) whose effects committed: the idempotent consumer's memory;
``duplicates`` counts the copies of the message that were recognised and not applied again."""

outbox_table = Table(
    "callcast_outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("topic", String(300), nullable=False),
    Column("headers", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("claimed_by", String(64)),
    Column("claimed_until", Float),
    sqlite_autoincrement=True,  # ids never reused: a relay's late delete cannot hit a newer row
)
"""Envelopes published inside a transaction, waiting for the relay to hand them to the broker."""

sequence_table = Table(
    "callcast_sequences",
    metadata,
    Column("subscriber", String(200), nullable=False),
    Column("key", String(200), nullable=False),
    Column("last_sequence", Integer, nullable=False),
    PrimaryKeyConstraint("subscriber", "key"),
)
"""The last sequence number applied per (subscriber, partition key)."""

parked_table = Table(
    "callcast_parked",
    metadata,
    Column("subscriber", String(200), nullable=False),
    Column("key", String(200), nullable=False),
    Column("sequence", Integer, nullable=False),
    Column("headers", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("parked_at", Float, nullable=False),
    PrimaryKeyConstraint("subscriber", "key", "sequence"),
)
"""Messages that arrived ahead of a gap in their key's sequence, waiting for the missing one."""

Index("callcast_parked_by_age", parked_table.c.subscriber, parked_table.c.parked_at)

idempotency_table = Table(
    "callcast_idempotency",
    metadata,
    Column("service", String(200), nullable=False),
    Column("route", String(300), nullable=False),
    Column("key", String(255), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("owner", String(64), nullable=False),
    Column("lease_until", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("status", Integer),
    Column("media_type", String(200)),
    Column("body", LargeBinary),
    PrimaryKeyConstraint("service", "route", "key"),
)
"""One row per ``Idempotency-Key`` used on a route: who runs it (``owner``, until ``lease_until``),
whether its effects committed (``state``), and the response to replay (see :mod:`callcast.idempotency`)."""

Index("callcast_idempotency_by_expiry", idempotency_table.c.expires_at)


def async_url(url: str) -> str:
    """The SQLAlchemy async driver URL for a plain ``sqlite:``/``postgresql:`` URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(f"not a database URL: {redact(url)!r}")
    driver = {
        "sqlite": "sqlite+aiosqlite",
        "sqlite+aiosqlite": "sqlite+aiosqlite",
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
        "postgresql+asyncpg": "postgresql+asyncpg",
    }.get(scheme)
    if driver is None:
        raise ConfigurationError(f"unsupported database URL {redact(url)!r}: use sqlite:/// or postgresql://")
    return f"{driver}://{rest}"


def database_url(service: str, data_dir: Path, configured: dict[str, str]) -> str:
    """Where ``service``'s database is: configured, else ``$CALLCAST_DATABASE_<SERVICE>``, else a
    SQLite file in the data directory."""
    if service in configured:
        return configured[service]
    from_env = os.environ.get(f"CALLCAST_DATABASE_{service.upper().replace('-', '_')}")
    return from_env or f"sqlite:///{data_dir / (service + '.db')}"


class Database:
    """One service's database: an async engine, callcast's tables, and transactions."""

    def __init__(self, url: str) -> None:
        self.url = redact(url)
        target = make_url(async_url(url))
        self.dialect = target.get_backend_name()
        options: dict[str, Any] = {}
        if self.dialect == "sqlite":
            if target.database and target.database != ":memory:":
                Path(target.database).parent.mkdir(parents=True, exist_ok=True)
            options["connect_args"] = {"timeout": 30}
        # Every checkout is an engine.begin() block that commits or rolls back before the connection
        # returns, so the pool's extra reset round trip (a ROLLBACK) is skipped.
        self.engine: AsyncEngine = create_async_engine(target, pool_reset_on_return=None, **options)
        if self.dialect == "sqlite":
            _sqlite_immediate_transactions(self.engine)
        _remember_failed_statements(self.engine)

    async def setup(self) -> None:
        """Create callcast's tables if missing (safe to run from several processes: a conflict with
        another process doing the same, or with one that died holding a lock, is tried again)."""
        for attempt in range(1, SETUP_TRIES + 1):
            try:
                async with self.engine.begin() as conn:
                    await conn.run_sync(metadata.create_all)
                return
            except SQLAlchemyError as error:
                # The driver's own message (not SQLAlchemy's, which quotes the statement).
                driver_error = getattr(error, "orig", None)
                reason = (str(driver_error or "") or type(error).__name__).splitlines()[0]
                if not isinstance(error, OperationalError) or attempt == SETUP_TRIES:
                    raise TransportError(
                        f"database {self.url}: cannot create callcast tables: {reason}"
                    ) from None
                log.info("database %s: creating callcast tables failed (%s); trying again", self.url, reason)
                await asyncio.sleep(0.05 * 2**attempt)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction: committed when the block ends, rolled back if it raises.

        A block that caught the error of one of its statements and ended normally commits only if
        the transaction survived it. PostgreSQL aborts a transaction at a failed statement (unless
        a savepoint was rolled back) and then answers ``COMMIT`` with a rollback, without an
        error; such a block raises the driver's "transaction is aborted" error instead of passing
        for committed."""
        async with self.engine.begin() as conn:
            info = conn.sync_connection.info if conn.sync_connection is not None else {}
            info.pop(_STATEMENT_FAILED, None)
            yield conn
            if info.pop(_STATEMENT_FAILED, False):
                await conn.exec_driver_sql("SELECT 1")  # fails in an aborted transaction

    async def close(self) -> None:
        await self.engine.dispose()


_STATEMENT_FAILED = "callcast_statement_failed"
"""Set in a connection's ``info`` when one of its statements failed."""


def _remember_failed_statements(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "handle_error")
    def on_error(context: Any) -> None:
        if context.connection is not None:
            context.connection.info[_STATEMENT_FAILED] = True


def _sqlite_immediate_transactions(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")  # first: switching to WAL may wait for a lock
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

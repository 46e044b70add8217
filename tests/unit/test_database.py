"""A service database's setup: a conflict with another process is tried again; anything else is a
TransportError that says why, without the SQL. A transaction whose failed statement aborted it does
not pass for committed."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, ProgrammingError

from callcast import database as database_module
from callcast.database import Database
from callcast.exceptions import TransportError


def _failing(error: Exception, times: int) -> Any:
    create_all = database_module.metadata.create_all
    calls = 0

    def create(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise error
        create_all(*args, **kwargs)

    return create


async def test_a_locked_database_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = OperationalError("CREATE TABLE ...", {}, sqlite3.OperationalError("database is locked"))
    monkeypatch.setattr(database_module.metadata, "create_all", _failing(locked, 2))
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    try:
        await database.setup()
        async with database.transaction() as conn:
            tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        assert "callcast_inbox" in tables
    finally:
        await database.close()


async def test_a_lasting_or_other_failure_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = OperationalError("CREATE TABLE secret", {}, sqlite3.OperationalError("database is locked"))
    monkeypatch.setattr(database_module, "SETUP_TRIES", 2)
    monkeypatch.setattr(database_module.metadata, "create_all", _failing(locked, 2))
    database = Database(f"sqlite:///{tmp_path / 'service.db'}")
    try:
        lasting = "cannot create callcast tables: database is locked"
        with pytest.raises(TransportError, match=lasting) as caught:
            await database.setup()
        assert "secret" not in str(caught.value)
        other = ProgrammingError("CREATE TABLE", {}, sqlite3.ProgrammingError("no such thing"))
        monkeypatch.setattr(database_module.metadata, "create_all", _failing(other, 1))
        with pytest.raises(TransportError, match="no such thing"):
            await database.setup()
    finally:
        await database.close()


async def rows_in(database: Database) -> list[int]:
    async with database.transaction() as conn:
        return [row[0] for row in await conn.execute(text("SELECT n FROM t ORDER BY n"))]


async def test_a_block_that_caught_a_failed_statement_commits_only_what_survived(
    service_database: str,
) -> None:
    """PostgreSQL aborts the transaction at the failed statement and would answer COMMIT with a
    silent rollback: the block raises instead. SQLite undoes only the statement; a savepoint rolled
    back leaves either usable."""
    database = Database(service_database)
    try:
        async with database.transaction() as conn:
            await conn.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))

        async def insert_twice(n: int, *, savepoint: bool) -> None:
            async with database.transaction() as conn:
                await conn.execute(text(f"INSERT INTO t VALUES ({n})"))
                with contextlib.suppress(IntegrityError):
                    if savepoint:
                        async with conn.begin_nested():
                            await conn.execute(text(f"INSERT INTO t VALUES ({n})"))
                    else:
                        await conn.execute(text(f"INSERT INTO t VALUES ({n})"))

        if database.dialect == "postgresql":
            with pytest.raises(DBAPIError, match="aborted"):
                await insert_twice(1, savepoint=False)
            assert await rows_in(database) == []
        else:
            await insert_twice(1, savepoint=False)
            assert await rows_in(database) == [1]
        await insert_twice(2, savepoint=True)
        assert 2 in await rows_in(database)
    finally:
        await database.close()

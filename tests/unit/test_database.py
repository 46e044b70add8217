"""A service database's setup: a conflict with another process is tried again; anything else is a
TransportError that says why, without the SQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError, ProgrammingError

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

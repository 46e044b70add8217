from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from callcast import App, Runtime
from callcast.brokers.memory import MemoryBroker
from tests.brokers.conftest import require_server
from tests.real_brokers import new_run


def dead_pid() -> int:
    """The pid of a process that ran and was reaped: a dead process's journal is named after it."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(10)
    return process.pid


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds, polling; fail the test after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    memory = MemoryBroker()
    yield memory
    await memory.close()


StartApp = Callable[..., Awaitable[Runtime]]


@pytest.fixture
async def start(broker: MemoryBroker, tmp_path: Path) -> AsyncIterator[StartApp]:
    """Start apps on the shared memory broker; everything started is stopped at the end."""
    started: list[Runtime] = []

    async def start_app(app: App, **options: object) -> Runtime:
        runtime = await app.start(broker=broker, data_dir=tmp_path, **options)  # type: ignore[arg-type]
        started.append(runtime)
        return runtime

    yield start_app
    for runtime in reversed(started):
        await runtime.stop(grace=1)


def client(runtime: Runtime) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=runtime.asgi), base_url="http://test")


@pytest.fixture
async def postgres_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one test (dropped after it), as a service database URL."""
    import asyncpg

    require_server("postgres", 5432, "127.0.0.1")
    name = new_run()
    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test", timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test", timeout=10)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def service_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A service database URL: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("postgres_database"))

"""The real brokers of this machine, for tests that run whole apps on each: a URL with a namespace
of its own per test run, and a clean-up that removes everything under that namespace.

    target = BROKERS["rabbitmq"]
    target.require()                 # skip locally / fail in CI when the server is down
    url = target.url(run)            # e.g. amqp://guest:guest@127.0.0.1:5672/?exchange=cc-e2e-<run>
    ...
    await target.cleanup(run)
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from callcast.testing.sweep import sweep_nats, sweep_postgres, sweep_rabbitmq, sweep_redis
from tests.brokers.conftest import require_server

HOST = "127.0.0.1"


def new_run() -> str:
    """A fresh namespace name: lower-case letters and digits, safe in every broker's names."""
    return "cce2e" + uuid.uuid4().hex[:10]


@dataclass(frozen=True)
class RealBroker:
    name: str
    port: int
    url: Callable[[str], str]
    cleanup: Callable[[str], Awaitable[None]]

    def require(self) -> None:
        __tracebackhide__ = True
        require_server(self.name, self.port, HOST)


def sqlite_target(directory: Path) -> RealBroker:
    """The embedded broker in ``directory`` (nothing to clean: the directory is temporary)."""

    async def nothing(run: str) -> None:
        return None

    return RealBroker("sqlite", 0, lambda run: f"sqlite:///{directory / (run + '.db')}?lease=2", nothing)


RABBITMQ_URL = f"amqp://guest:guest@{HOST}:5672/"
NATS_URL = f"nats://{HOST}:4222"
REDIS_URL = f"redis://{HOST}:6379/0"
POSTGRES_DSN = f"postgresql://postgres@{HOST}:5432/test"


BROKERS: dict[str, RealBroker] = {
    "rabbitmq": RealBroker(
        "rabbitmq",
        5672,
        lambda run: f"{RABBITMQ_URL}?exchange={run}",
        functools.partial(sweep_rabbitmq, RABBITMQ_URL),
    ),
    "nats": RealBroker(
        "nats",
        4222,
        lambda run: f"{NATS_URL}?stream={run.upper()}&prefix={run}",
        functools.partial(sweep_nats, NATS_URL),
    ),
    "redis": RealBroker(
        "redis",
        6379,
        lambda run: f"{REDIS_URL}?prefix={run}&lease=2",
        functools.partial(sweep_redis, REDIS_URL),
    ),
    "postgres": RealBroker(
        "postgres",
        5432,
        lambda run: f"{POSTGRES_DSN}?schema={run}",
        functools.partial(sweep_postgres, POSTGRES_DSN),
    ),
}

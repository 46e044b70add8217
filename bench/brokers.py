"""The brokers a run can use: where they listen, callcast's URL for a namespace, and the sweep that
deletes everything a run created under its namespace prefix.

Every trial gets a namespace of its own (lower-case letters and digits, starting with the run's
prefix): callcast's URL options put all its names under it (RabbitMQ ``?exchange=``, NATS
``?stream=``/``?prefix=``, Redis ``?prefix=``, PostgreSQL ``?schema=``, SQLite a file of its own),
and the raw and FastStream sides name their queues, streams, keys and tables after it too. So one
sweep per broker, by prefix, removes all of it, also after a trial that was killed.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from pathlib import Path

from callcast.testing.sweep import sweep_nats, sweep_postgres, sweep_rabbitmq, sweep_redis

HOST = "127.0.0.1"
RABBITMQ_URL = f"amqp://guest:guest@{HOST}:5672/"
NATS_URL = f"nats://{HOST}:4222"
REDIS_URL = f"redis://{HOST}:6379/0"
POSTGRES_DSN = f"postgresql://postgres@{HOST}:5432/test"


@dataclass(frozen=True)
class BrokerSpec:
    name: str
    port: int | None
    """The server's port on 127.0.0.1, or ``None`` for the embedded ones."""

    def available(self) -> bool:
        """Whether the server accepts a connection (embedded brokers always are)."""
        if self.port is None:
            return True
        with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1.0):
            return True
        return False


BROKERS: dict[str, BrokerSpec] = {
    spec.name: spec
    for spec in (
        BrokerSpec("rabbitmq", 5672),
        BrokerSpec("nats", 4222),
        BrokerSpec("redis", 6379),
        BrokerSpec("postgres", 5432),
        BrokerSpec("sqlite", None),
        BrokerSpec("memory", None),
    )
}


def callcast_url(broker: str, namespace: str, workdir: Path) -> str:
    """callcast's broker URL for ``namespace``."""
    if broker == "rabbitmq":
        return f"{RABBITMQ_URL}?exchange={namespace}"
    if broker == "nats":
        return f"{NATS_URL}?stream={namespace.upper()}&prefix={namespace}"
    if broker == "redis":
        return f"{REDIS_URL}?prefix={namespace}"
    if broker == "postgres":
        return f"{POSTGRES_DSN}?schema={namespace}"
    if broker == "sqlite":
        return f"sqlite:///{workdir / (namespace + '.db')}"
    if broker == "memory":
        return "memory://"
    raise ValueError(f"unknown broker {broker!r}")


async def sweep(broker: str, prefix: str) -> None:
    """Delete what trials created on ``broker`` under namespaces starting with ``prefix``."""
    if broker == "rabbitmq":
        await sweep_rabbitmq(RABBITMQ_URL, prefix)
    elif broker == "nats":
        await sweep_nats(NATS_URL, prefix)
    elif broker == "redis":
        await sweep_redis(REDIS_URL, prefix)
    elif broker == "postgres":
        await sweep_postgres(POSTGRES_DSN, prefix)

"""Broker adapters, chosen by URL (``--broker`` or ``CALLCAST_BROKER``), never by code.

===================== ==============================================================
``memory://``         in-process (tests); :mod:`callcast.brokers.memory`
``sqlite:///path.db`` embedded, durable, shared by the processes of one machine (default)
===================== ==============================================================
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from callcast.exceptions import ConfigurationError
from callcast.transport import Broker

DEFAULT_URL = "sqlite:///.callcast/broker.db"
ENV_VAR = "CALLCAST_BROKER"


def default_url() -> str:
    """``$CALLCAST_BROKER`` if set, else the embedded SQLite broker under ``.callcast/``."""
    return os.environ.get(ENV_VAR) or DEFAULT_URL


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``: the only form of a URL callcast prints."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


async def connect(url: str | None = None) -> Broker:
    """Open the broker named by ``url`` (default: :func:`default_url`)."""
    url = url or default_url()
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from callcast.brokers.memory import MemoryBroker

        return MemoryBroker(redact(url))
    if scheme == "sqlite":
        from callcast.brokers.sqlite import SqliteBroker

        broker = SqliteBroker(url)
        await broker.connect()
        return broker
    raise ConfigurationError(
        f"unknown broker URL scheme {scheme!r} in {redact(url)!r}; expected memory:// or sqlite:///path.db"
    )

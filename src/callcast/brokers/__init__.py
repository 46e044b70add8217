"""Broker adapters, chosen by URL (``--broker`` or ``CALLCAST_BROKER``), never by code.

============================ ===========================================================
``memory://``                in-process (tests); :mod:`callcast.brokers.memory`
``sqlite:///path.db``        embedded, durable, shared by the processes of one machine (default)
``amqp://user:pw@host/vh``   RabbitMQ (aio-pika); :mod:`callcast.brokers.rabbitmq`
``nats://host:4222``         NATS JetStream (nats-py); :mod:`callcast.brokers.nats`
``redis://host:6379/0``      Redis Streams (redis-py); :mod:`callcast.brokers.redis`
``postgresql://user@host/db`` PostgreSQL as a broker (asyncpg); :mod:`callcast.brokers.postgres`
============================ ===========================================================
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from callcast.exceptions import ConfigurationError
from callcast.transport import Broker

DEFAULT_URL = "sqlite:///.callcast/broker.db"
ENV_VAR = "CALLCAST_BROKER"


def seconds_option(broker: str, options: Mapping[str, str], name: str, default: float) -> float:
    """URL option ``name`` as a positive, finite number of seconds (``default`` when absent);
    a :class:`ConfigurationError` naming the broker and the option otherwise."""
    try:
        value = float(options.get(name, default))
    except ValueError:
        raise ConfigurationError(f"{broker} broker: {name} must be a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{broker} broker: {name} must be a positive, finite number of seconds")
    return value


def port_of(broker: str, url: str) -> int | None:
    """The port ``url`` names (``None`` when it names none), or a :class:`ConfigurationError` that
    shows the URL redacted and never echoes what stood where the port was read: when a password
    holds an unescaped ``/``, ``?`` or ``#``, what follows its ``:`` is part of the password."""
    parts = urlsplit(url)
    try:
        return parts.port
    except ValueError:
        hint = ""
        if "@" in url.partition("://")[2] and "@" not in parts.netloc:
            hint = "; a user or password holding / ? # or @ must be percent-encoded (%2F %3F %23 %40)"
        raise ConfigurationError(f"{broker} broker: invalid port in {redact(url)!r}{hint}") from None


def default_url() -> str:
    """``$CALLCAST_BROKER`` if set, else the embedded SQLite broker under ``.callcast/``."""
    return os.environ.get(ENV_VAR) or DEFAULT_URL


_TOKEN_SCHEMES = ("nats", "tls")
"""Schemes whose user, given without a password, is a token."""

_SECRET_PARAMETERS = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|auth_token|secret)=)[^&#]*")


def redact(url: str, *, user_is_secret: bool = False) -> str:
    """The URL with its password, and secret query parameters (``password=``, ``token=``...),
    replaced by ``***``: the only form of a URL callcast prints. ``user_is_secret``: a user without
    a password is a token, hidden too (always so for NATS URLs).

    The user part ends at the URL's last ``@``, so a password holding an unescaped ``/``, ``#`` or
    ``?`` (which drivers such as SQLAlchemy's accept) is hidden as well; an ``@`` in the query makes
    the redacted form hide more than it must, never less."""
    scheme, separator, rest = url.partition("://")
    user_is_secret = user_is_secret or scheme in _TOKEN_SCHEMES
    if separator:
        userinfo, at, host = rest.rpartition("@")
        if at and (":" in userinfo or user_is_secret):
            user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
            rest = f"{user}:***@{host}"
        url = f"{scheme}://{rest}"
    return _SECRET_PARAMETERS.sub(r"\1***", url)


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's error message, say) without the secrets of ``url``: ``url`` itself
    becomes :func:`redact`'s form of it, then its password is replaced by ``***`` wherever it
    appears, both as written in the URL and percent-decoded (as drivers use it). A user without a
    password in a NATS URL is a token (see :func:`redact`) and is replaced the same way; any other
    user is kept. A password that is also part of other words is hidden there too: more than it
    must, never less."""
    parts = urlsplit(url)
    secret = parts.username if parts.password is None and parts.scheme in _TOKEN_SCHEMES else parts.password
    text = text.replace(url, redact(url))
    if secret:
        for form in (secret, unquote(secret)):  # the longer first: the decoded form may be part of it
            text = text.replace(form, "***")
    return text


_ADAPTERS = {
    "memory": "callcast.brokers.memory:MemoryBroker",
    "sqlite": "callcast.brokers.sqlite:SqliteBroker",
    "amqp": "callcast.brokers.rabbitmq:RabbitBroker",
    "amqps": "callcast.brokers.rabbitmq:RabbitBroker",
    "nats": "callcast.brokers.nats:NatsBroker",
    "redis": "callcast.brokers.redis:RedisBroker",
    "rediss": "callcast.brokers.redis:RedisBroker",
    "postgresql": "callcast.brokers.postgres:PostgresBroker",
    "postgres": "callcast.brokers.postgres:PostgresBroker",
}
"""URL scheme → ``module:Class``. Every adapter class is built as ``Class(url)`` and opened with
``await broker.connect()``; its module is imported only when its scheme is used, so a broker's
client library is needed only by those who use that broker."""


async def connect(url: str | None = None) -> Broker:
    """Open the broker named by ``url`` (default: :func:`default_url`)."""
    url = url or default_url()
    scheme = urlsplit(url).scheme
    target = _ADAPTERS.get(scheme)
    if target is None:
        raise ConfigurationError(
            f"unknown broker URL scheme {scheme!r} in {redact(url)!r}; "
            f"expected one of {', '.join(sorted(_ADAPTERS))}"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(
            f"the {scheme}:// broker needs a client library that is not installed ({error.name}); "
            "install callcast with the matching extra, e.g. pip install 'callcast[all]'"
        ) from None
    broker: Broker = getattr(module, class_name)(url)
    await broker.connect()
    return broker

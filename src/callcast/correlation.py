"""Correlation ids in logs: which request or event a log line belongs to.

Every unit of work (an HTTP request, an RPC request, an event delivery) runs in its own asyncio task,
and the runtime sets :data:`current` for that task when it builds the unit's context. The id comes
from the incoming ``X-Correlation-Id`` header (when :func:`accept` finds it acceptable) or from the
envelope being handled, else a new one; it travels on with ``ctx.call`` and ``ctx.publish``.

:class:`CorrelationFilter` puts it on every log record as ``correlation_id`` (``-`` outside a unit of
work), so a format such as :data:`LOG_FORMAT` shows it::

    handler = logging.StreamHandler()
    handler.addFilter(CorrelationFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

MAX_LENGTH = 128
"""The longest correlation id accepted from outside; longer ones are replaced by a new id."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s]: %(message)s"
"""The log format of ``callcast run``."""

current: ContextVar[str | None] = ContextVar("callcast_correlation_id", default=None)
"""The correlation id of the unit of work running in this task, or ``None``."""


def accept(value: str | None) -> str | None:
    """``value`` if it is a usable correlation id from outside (1–128 visible ASCII characters),
    else ``None`` (the caller then makes a new one). Never raises."""
    if not value or len(value) > MAX_LENGTH:
        return None
    if not (value.isascii() and value.isprintable()) or " " in value:
        return None
    return value


def bind(correlation_id: str) -> None:
    """Make ``correlation_id`` the current one for the rest of this task (and tasks it starts)."""
    current.set(correlation_id)


class CorrelationFilter(logging.Filter):
    """Adds ``correlation_id`` (the current one, or ``-``) to every record; lets every record pass.

    Attach it to a *handler*: a logger's own filters do not see records of its child loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = current.get() or "-"
        return True

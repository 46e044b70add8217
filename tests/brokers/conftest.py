"""Real broker servers for the adapter tests: a server that is down is a clear skip on a developer's
machine and a failure in CI (``CI=true``), where ``.ci/run`` starts every server first."""

from __future__ import annotations

import os
import socket

import pytest

from callcast.envelope import Envelope


def server_is_up(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_server(name: str, port: int, host: str = "127.0.0.1") -> None:
    """Skip (locally) or fail (in CI) unless ``name`` listens on ``host:port``."""
    __tracebackhide__ = True
    if server_is_up(host, port):
        return
    message = f"{name} is not running on {host}:{port}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI must start it: see .ci/run)")
    pytest.skip(message)


class RecordingHolding:
    """A :class:`~callcast.transport.Holding` that keeps the ids it holds, and notes any return of
    an id it never heard of."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.unknown: list[str] = []

    def fetched(self, envelope: Envelope) -> None:
        self.held.add(envelope.id)

    def returned(self, envelope: Envelope) -> None:
        if envelope.id not in self.held:
            self.unknown.append(envelope.id)
        self.held.discard(envelope.id)


class HoldingLog:
    """A :class:`~callcast.transport.Holding` that logs what it is told, in order:
    ``("fetched" | "returned", data)``."""

    def __init__(self) -> None:
        self.told: list[tuple[str, bytes]] = []

    def fetched(self, envelope: Envelope) -> None:
        self.told.append(("fetched", envelope.data))

    def returned(self, envelope: Envelope) -> None:
        self.told.append(("returned", envelope.data))

"""Real broker servers for the adapter tests: a server that is down is a clear skip on a developer's
machine and a failure in CI (``CI=true``), where ``.ci/run`` starts every server first."""

from __future__ import annotations

import os
import socket

import pytest


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

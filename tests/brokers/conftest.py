"""Real broker servers for the adapter tests: a server that is down is a clear skip on a developer's
machine and a failure in CI (``CI=true``), where ``.ci/run`` starts every server first."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable
from typing import Any

import pytest

from callcast.envelope import Envelope
from callcast.exceptions import BrokerUnavailableError
from callcast.transport import Delivery, Subscription


async def next_delivery(subscription: Subscription, timeout: float = 5.0) -> Delivery:
    """The subscription's next delivery; ``TimeoutError`` if none comes within ``timeout`` seconds."""
    return await asyncio.wait_for(subscription.__anext__(), timeout)


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


class Pause:
    """Holds an async method of a class right after it returns, until :meth:`go_on`: a way to make
    a step of ``subscribe`` finish while ``close`` runs (``reached`` is set once it is held)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: type, method: str) -> None:
        self.reached, self._go_on = asyncio.Event(), asyncio.Event()
        original = getattr(owner, method)

        async def then_wait(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            self.reached.set()
            await self._go_on.wait()
            return result

        monkeypatch.setattr(owner, method, then_wait)

    def go_on(self) -> None:
        self._go_on.set()


async def close_during(broker: Any, opening: Awaitable[object], *pauses: Pause) -> None:
    """Close ``broker`` while ``opening`` (a subscribe) is held by ``pauses``, let it go on, and
    check that it is refused (:class:`BrokerUnavailableError`) rather than outliving the broker."""
    task = asyncio.ensure_future(opening)
    await asyncio.wait_for(asyncio.gather(*(pause.reached.wait() for pause in pauses)), 5)
    closing = asyncio.ensure_future(broker.close())
    deadline = asyncio.get_running_loop().time() + 5
    while not broker._closing:
        assert asyncio.get_running_loop().time() < deadline, "close did not begin"
        await asyncio.sleep(0.001)
    for pause in pauses:
        pause.go_on()
    with pytest.raises(BrokerUnavailableError):
        await asyncio.wait_for(task, 10)
    await asyncio.wait_for(closing, 10)
    assert not broker._subscriptions

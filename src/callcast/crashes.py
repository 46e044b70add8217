"""Which message crashed the process: the evidence behind the crash-loop bound.

When a process dies in a handler, every delivery it held comes back with one more attempt counted
by the broker — the message that killed it and its innocent neighbours alike. So the consumer runs a
*suspect* (a redelivered message this process did not see fail) alone, after writing its id to a
marker file; if the process dies, the marker names the culprit. At start, and before each suspect, a
consumer turns the markers of dead processes into *confirmed crashes* in a small ledger, shared by
the processes of one machine through the data directory (``<data dir>/crashes/<group>/``; the ledger
is updated under ``flock``).

A message is dead-lettered as a crash loop once it has crashed a process while running alone
``max_attempts - 1`` times (its first, not yet suspected, delivery being the first crash), or —
whatever the evidence, e.g. when its crashes happened on other machines — once the broker counted
more than ``3 × max_attempts`` deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

ABSOLUTE_FACTOR = 3
"""Deliveries beyond ``ABSOLUTE_FACTOR × max_attempts`` end in the DLQ without further evidence."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CrashLedger:
    """Markers and confirmed crash counts of one consumer group on this machine."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.marker = directory / f"{os.getpid()}.alone"
        self._ledger = directory / "ledger.json"
        self._lock = directory / "ledger.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, int]]:
        with open(self._lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                counts: dict[str, int] = {}
                with contextlib.suppress(FileNotFoundError, ValueError):
                    loaded = json.loads(self._ledger.read_text())
                    if isinstance(loaded, dict):
                        counts = {str(k): int(v) for k, v in loaded.items()}
                before = dict(counts)
                self._collect(counts)
                yield counts
                if counts != before:
                    temporary = self._ledger.with_suffix(".tmp")
                    temporary.write_text(json.dumps(counts))
                    temporary.replace(self._ledger)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _collect(self, counts: dict[str, int]) -> None:
        """Turn the markers of processes that died into confirmed crashes."""
        for marker in self.directory.glob("*.alone"):
            try:
                pid = int(marker.stem)
            except ValueError:
                continue
            if pid == os.getpid() or _alive(pid):
                continue
            with contextlib.suppress(FileNotFoundError):
                message_id = marker.read_text().strip()
                if message_id:
                    counts[message_id] = counts.get(message_id, 0) + 1
                marker.unlink()

    def confirmed(self, message_id: str) -> int:
        """How often ``message_id`` crashed a process while running alone."""
        with self._locked() as counts:
            return counts.get(message_id, 0)

    def forget(self, message_id: str) -> None:
        """The message was settled: its crash record is no longer needed."""
        with self._locked() as counts:
            counts.pop(message_id, None)

    def running_alone(self, message_id: str) -> None:
        """Mark ``message_id`` as the only handler running in this process (a plain write: it
        survives the process being killed)."""
        self.marker.write_text(message_id)

    def finished_alone(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()


class Isolation:
    """Runs suspects alone: one at a time, while no other handler of the consumer runs. Others
    wait while a suspect waits or runs (a suspect is never starved by a stream of others)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._running = 0
        self._alone = False
        self._waiting_alone = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._running += 1
        try:
            yield
        finally:
            async with self._changed:
                self._running -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting_alone += 1
            try:
                await self._changed.wait_for(lambda: not self._alone and not self._running)
            finally:
                self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            async with self._changed:
                self._alone = False
                self._changed.notify_all()

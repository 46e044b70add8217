"""Which message crashed the process: the evidence behind crash loops and attempt counts.

When a process dies in a handler, every delivery it held comes back with one more attempt counted
by the broker — the message that killed it and its innocent neighbours alike. So each consumer keeps
two files per process in ``<data dir>/crashes/<group>/``, whose writes survive the process being
killed:

* ``<pid>.inflight``: the deliveries it holds (``+id`` as the subscription receives one, also one
  read ahead and not handed out yet; ``-id`` once its settle reached the broker, or it was given
  back), a :class:`~callcast.journal.Journal`: each line is in the file when it was written, at the
  cost of a memory copy. The ledger is the subscription's :class:`~callcast.transport.Holding`.
* ``<pid>.alone``: the *suspect* it runs alone — a redelivered message this process did not see
  fail runs with no other handler of the consumer running.

At start and before each redelivery, a consumer turns the files of dead processes into a ledger
shared by the processes of one machine (updated under ``flock``): the suspect that was running alone
gets a *confirmed crash*; every other delivery the dead process held gets a *witnessed crash*.

The consumer then judges a message by ``attempt - witnessed`` (the deliveries that were its own)
for retries and dead letters, and dead-letters a crash loop once the message crashed a process
while running alone ``max_attempts - 1`` times (its first, not yet suspected, delivery being the
first crash) — or, without evidence (crashes on other machines leave none here), once more than
``3 × max_attempts`` of its deliveries are not explained by witnessed crashes (a message held by
processes that other messages crashed, say while it waited for a suspect running alone, is not
dead-lettered for that however often it happens).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from callcast.envelope import Envelope
from callcast.journal import Journal, read_journal

ABSOLUTE_FACTOR = 3
"""Deliveries beyond ``ABSOLUTE_FACTOR × max_attempts`` that witnessed crashes do not explain end in the
DLQ without further evidence."""


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
        self._held: set[str] = set()
        self._journal = Journal(
            directory / f"{os.getpid()}.inflight", lambda: "".join(f"+{held}\n" for held in self._held)
        )
        self._ledger = directory / "ledger.json"
        self._lock = directory / "ledger.lock"

    def fetched(self, envelope: Envelope) -> None:
        """This process now holds a delivery of ``envelope`` (witnessed if the process dies)."""
        self._held.add(envelope.id)
        self._journal.append(f"+{envelope.id}\n")

    def returned(self, envelope: Envelope) -> None:
        """This process no longer holds the delivery of ``envelope`` (settled, or given back)."""
        self._held.discard(envelope.id)
        self._journal.append(f"-{envelope.id}\n")

    def close(self) -> None:
        """A clean stop: this process's files go (nothing it held crashed)."""
        self._journal.close()
        for path in (self._journal.path, self.marker):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

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
        """Turn the files of processes that died into confirmed and witnessed crashes."""
        for journal in self.directory.glob("*.inflight"):
            try:
                pid = int(journal.stem)
            except ValueError:
                continue
            if pid == os.getpid() or _alive(pid):
                continue
            marker = self.directory / f"{pid}.alone"
            culprit = ""
            with contextlib.suppress(FileNotFoundError):
                culprit = marker.read_text().strip()
            held: set[str] = set()
            with contextlib.suppress(FileNotFoundError):
                for line in read_journal(journal).splitlines():
                    if line.startswith("+"):
                        held.add(line[1:])
                    elif line.startswith("-"):
                        held.discard(line[1:])
            for message_id in held - {culprit}:
                counts[f"w:{message_id}"] = counts.get(f"w:{message_id}", 0) + 1
            if culprit:
                counts[f"c:{culprit}"] = counts.get(f"c:{culprit}", 0) + 1
            for path in (journal, marker):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def evidence(self, message_id: str) -> tuple[int, int]:
        """(confirmed, witnessed): how often ``message_id`` crashed a process while running alone,
        and how often it was held by a process that something else crashed."""
        with self._locked() as counts:
            return counts.get(f"c:{message_id}", 0), counts.get(f"w:{message_id}", 0)

    def forget(self, message_id: str) -> None:
        """The message was settled: its crash record is no longer needed."""
        with self._locked() as counts:
            counts.pop(f"c:{message_id}", None)
            counts.pop(f"w:{message_id}", None)

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

    async def enter_shared(self) -> None:
        """Start a shared run (end it with :meth:`leave_shared`): at once, without the lock, when
        nothing runs or waits to run alone; else once the suspects are done."""
        if self._alone or self._waiting_alone:
            async with self._changed:
                await self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
        self._running += 1

    async def leave_shared(self) -> None:
        self._running -= 1
        if self._waiting_alone and not self._running:
            async with self._changed:
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        await self.enter_shared()
        try:
            yield
        finally:
            await self.leave_shared()

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

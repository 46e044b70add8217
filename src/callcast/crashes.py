"""Which message crashed the process: the evidence behind crash loops and attempt counts.

When a process dies in a handler, every delivery it held comes back with one more attempt counted
by the broker — the message that killed it and its innocent neighbours alike, and also deliveries
that were still on their way into it (in the socket, in the client library's queues), which nothing
in the process knew of yet. So each consumer keeps two files per process in
``<data dir>/crashes/<group>/``, whose writes survive the process being killed:

* ``<name>.inflight``: the deliveries it holds (``+id`` as the subscription receives one, also one
  read ahead and not handed out yet; ``-id`` once its settle reached the broker, or it was given
  back), a :class:`~callcast.journal.Journal`: each line is in the file when it was written, at the
  cost of a memory copy. The ledger is the subscription's :class:`~callcast.transport.Holding`.
* ``<name>.alone``: the *suspect* it runs alone — a redelivered message this process did not see
  fail runs with no other event handler of the process running
  (:class:`~callcast.isolation.Isolation`).

``<name>`` is the process id and a random part: names never repeat, also when a restarted
container gets its predecessor's pid or containers sharing the directory have the same one. A
process holds an exclusive ``flock`` on its journal while it lives; the kernel drops it when the
process dies (a killed process not yet reaped included), so a journal whose lock can be taken is a
dead process's.

The files sit beside ``ledger.sqlite3``, shared by the processes of one machine. Before each
redelivery is judged, a consumer turns the files of dead processes into it: the suspect that was
running alone gets a *confirmed crash*; every other delivery the dead process held gets a
*witnessed crash*; the death itself is recorded with its time. A handler that raises records a
*failure* there before its message goes back.

The consumer then judges a message by its own runs (:meth:`Evidence.own`): the broker's count less
the witnessed crashes, and less the deliveries lost in transit — the broker's deliveries this
machine has no account of (no failure, crash or witness), as many as processes of the group died
here since the message was published. On one machine that count is exact. Across machines the
deliveries another machine ran are not accounted for here either, so a machine whose processes
died since a message was published may give it up to that many extra runs.

A crash loop is dead-lettered once the message crashed a process while running alone
``max_attempts - 1`` times, and at least once (its first, not yet suspected, delivery being the
first crash) — or,
without evidence (crashes on other machines leave none here), once more than
``3 × max_attempts`` of its deliveries are its own (a message held by processes that other
messages crashed, say while it waited for a suspect running alone, is not dead-lettered for that
however often it happens).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, unquote

from callcast.envelope import Envelope
from callcast.journal import Journal, read_journal

try:
    import fcntl
except ImportError:  # not POSIX: no journal, the broker's count judges
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("callcast.crashes")

ABSOLUTE_FACTOR = 3
"""Own deliveries beyond ``ABSOLUTE_FACTOR × max_attempts`` end in the DLQ without further evidence."""

DEATHS_KEPT = 1000
"""Deaths the ledger remembers (the most recent); older ones no longer explain lost deliveries."""

EVIDENCE_KEPT = 7 * 24 * 3600.0
"""Seconds the evidence of a message is kept after it last changed. A message settled on another
machine is never forgotten here; this bounds the ledger. Evidence dropped early only makes the
broker's count weigh more (fewer runs, never more)."""

PRUNE_EVERY = 3600.0
"""Seconds between two prunes of old evidence by one process (also done whenever a death is collected)."""

STARTING_FOR = 60.0
"""Seconds after which a journal still being made (``.inflight.new``) and not locked is a dead
process's leftover."""

BUSY_TIMEOUT = 1.0
"""Seconds a ledger statement waits for another process's write lock before it gives up (the ledger
runs on the event loop: a longer wait would stall every handler of the process)."""

COLLECT_EVERY = 5.0
"""Seconds between two collections of dead processes' files by an idle consumer."""

WARN_EVERY = 60.0
"""Seconds between two warnings of one ledger that it cannot be read or written."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS evidence (
    message_id TEXT PRIMARY KEY,
    confirmed INTEGER NOT NULL DEFAULT 0,
    witnessed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    changed REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deaths (at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS collected (name TEXT PRIMARY KEY);
"""

_COUNT = {
    kind: f"INSERT INTO evidence (message_id, {kind}, changed) VALUES (?, 1, ?) "
    f"ON CONFLICT (message_id) DO UPDATE SET {kind} = {kind} + 1, changed = excluded.changed"
    for kind in ("confirmed", "witnessed", "failed")
}
"""One more of a kind of evidence for a message: (message id, time)."""


def _set_aside(path: Path, taken: list[tuple[Path, Path]]) -> Path | None:
    """Rename ``path`` to ``<name>.collected`` (noted in ``taken``); None if it is gone."""
    aside = path.with_name(f"{path.name}.collected")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return None
    taken.append((aside, path))
    return aside


def _locked(journal: Path) -> bool:
    """Whether a live process holds ``journal``'s lock (a file gone meanwhile, or one this process
    may not open, counts as held: there is nothing to collect)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(journal, os.O_RDWR)  # NFS takes an exclusive lock only on a writable descriptor
    except OSError:  # gone, or not ours to judge
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the lock, if it was taken
    return False


def _line_id(message_id: str) -> str:
    """A message id as one line of a journal or marker: ids come from outside, and one holding a line
    break (or a ``%``) is percent-encoded, so it cannot write lines of its own."""
    if message_id.isprintable() and "%" not in message_id:
        return message_id
    return quote(message_id, safe="")


def _from_line_id(text: str) -> str:
    return unquote(text) if "%" in text else text


def _published_at(envelope: Envelope) -> float | None:
    """The envelope's ``time`` as a UNIX time, or None if it has none that parses."""
    try:
        return datetime.fromisoformat(envelope.time).timestamp()
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Evidence:
    """What this machine knows of one message's earlier deliveries."""

    confirmed: int = 0
    """It crashed a process while running alone."""
    witnessed: int = 0
    """It was held by a process that something else crashed."""
    failed: int = 0
    """Its handler raised, in a process of this machine."""
    deaths: int = 0
    """Processes of its group on this machine died since it was published."""
    unknown: bool = False
    """The ledger could not say: the broker's count judges alone, as without a ledger."""

    @property
    def near_a_crash(self) -> bool:
        """A process of its group died here since it was published, or one that held it did."""
        return self.deaths > 0 or self.witnessed > 0 or self.confirmed > 0

    def own(self, attempt: int) -> int:
        """Of the ``attempt`` deliveries the broker counted (this one included), those that were this
        message's own runs: not cut short by another message's crash, nor lost in transit when a
        process died. Each death loses at most one delivery of a message (the broker does not
        deliver it again before that one is given up), and a death that witnessed or confirmed it
        lost none, so the lost ones are the earlier deliveries with no account here, at most one
        per other death."""
        if self.unknown:
            return attempt
        unaccounted = attempt - 1 - self.failed - self.confirmed - self.witnessed
        lost = min(max(0, unaccounted), max(0, self.deaths - self.witnessed - self.confirmed))
        return max(1, attempt - self.witnessed - lost)


_LEDGERS: weakref.WeakSet[CrashLedger] = weakref.WeakSet()
"""The ledgers with a journal in this process."""


def _drop_journals_in_child() -> None:
    """A child forked without exec shares its parent's journals, and so their locks, until it exits:
    the parent's death would go unseen. The child lets go of them (the parent keeps its lock)."""
    for ledger in list(_LEDGERS):
        if ledger._journal is not None:
            ledger._journal.close()
            ledger._journal = None
    _LEDGERS.clear()


os.register_at_fork(after_in_child=_drop_journals_in_child)

NO_EVIDENCE = Evidence()
"""A first delivery's (nothing to know), or any delivery's without a crash ledger."""

UNKNOWN = Evidence(unknown=True)
"""A redelivery's when the ledger cannot be used."""


UNREADABLE_KEPT = 3
"""Unreadable ledgers kept aside (the most recent), for a look at what damaged them."""

_CORRUPT = (11, 26)
"""SQLite's primary result codes of a damaged file: ``SQLITE_CORRUPT``, ``SQLITE_NOTADB``."""


def _open_ledger(path: Path) -> sqlite3.Connection:
    """The machine's ledger database at ``path``. One that is not a database (corrupt, say after a
    power loss: it is written with ``synchronous=OFF``) is moved aside (the last
    :data:`UNREADABLE_KEPT` are kept) and made anew: it only held evidence, whose loss makes the
    broker's count weigh more."""
    try:
        return _connect(path)
    except sqlite3.DatabaseError as error:
        if getattr(error, "sqlite_errorcode", 0) & 0xFF not in _CORRUPT:
            raise  # locked, out of file descriptors, a full disk: not the file's fault
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        log.warning("crash ledger %s is unreadable (%s): moved to %s, starting a new one", path, error, aside)
        with contextlib.suppress(FileNotFoundError):
            path.rename(aside)
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        _prune_unreadable(path)
        return _connect(path)


def _prune_unreadable(path: Path) -> None:
    """Keep the :data:`UNREADABLE_KEPT` most recent unreadable copies of the ledger at ``path``."""

    def moved_at(copy: Path) -> int:
        stamp = copy.name.rpartition("-")[2]
        return int(stamp) if stamp.isdigit() else 0

    copies = sorted(path.parent.glob(f"{path.name}.unreadable-*"), key=moved_at)
    for old in copies[:-UNREADABLE_KEPT]:
        old.unlink(missing_ok=True)


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit: each statement is its own transaction, or one opened explicitly. A commit is in
    # the write-ahead log when it returns, which survives the process (not the machine).
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        db.executescript(_SCHEMA)
    except BaseException:
        db.close()
        raise
    return db


class CrashLedger:
    """The crash evidence of one consumer group on this machine, and this process's part of it.

    The ledger is an aid, never a risk: when its database or journal cannot be used (locked past
    :data:`BUSY_TIMEOUT`, corrupt, a full disk), it logs a warning and the consumer judges by the
    broker's count alone, as without a data directory. Only :meth:`running_alone` raises (a suspect
    whose marker cannot be written must not run: its crash would go unconfirmed)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pid = os.getpid()
        name = f"{self._pid}-{uuid.uuid4().hex[:12]}"
        self.journal_path = directory / f"{name}.inflight"
        self.marker = directory / f"{name}.alone"
        self._held: Counter[str] = Counter()  # a message may be held twice (a duplicate, a lease run out)
        self._next_prune = 0.0
        self._quiet_until = 0.0
        self._db = _open_ledger(directory / "ledger.sqlite3")
        self._journal: Journal | None = None
        try:
            self._journal = self._open_journal()
        except OSError as error:
            self._degraded("creating this process's journal", error)

    def _open_journal(self) -> Journal:
        """This process's journal, locked before it gets the name others look for (until then it
        would look like a dead process's)."""
        if fcntl is None:
            raise OSError("no flock on this platform")
        making = self.journal_path.with_name(f"{self.journal_path.name}.new")
        journal: Journal | None = None
        try:
            journal = Journal(
                making, lambda: "".join(f"+{_line_id(held)}\n" * count for held, count in self._held.items())
            )
            fcntl.flock(journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            making.rename(self.journal_path)
        except BaseException:
            if journal is not None:
                journal.close()
            making.unlink(missing_ok=True)
            raise
        journal.path = self.journal_path
        _LEDGERS.add(self)
        return journal

    def _degraded(self, doing: str, error: BaseException) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + WARN_EVERY
            log.warning(
                "crash ledger %s: %s failed (%s); messages are judged by the broker's delivery count",
                self.directory,
                doing,
                error,
            )

    def _guarded(self, doing: str, action: Callable[[], object]) -> None:
        """Run ``action``; if it fails, log why and go on."""
        try:
            action()
        except Exception as error:
            self._degraded(doing, error)

    def fetched(self, envelope: Envelope) -> None:
        """This process now holds a delivery of ``envelope`` (witnessed if the process dies)."""
        self._held[envelope.id] += 1
        self._journal_append(f"+{_line_id(envelope.id)}\n")

    def returned(self, envelope: Envelope) -> None:
        """This process no longer holds the delivery of ``envelope`` (settled, or given back)."""
        held = self._held
        if held[envelope.id] > 1:
            held[envelope.id] -= 1
        else:
            held.pop(envelope.id, None)
        self._journal_append(f"-{_line_id(envelope.id)}\n")

    def _journal_append(self, line: str) -> None:
        if self._journal is not None:
            try:
                self._journal.append(line)
            except OSError as error:  # it emptied itself and stopped
                self._drop_journal()
                self._degraded("growing this process's journal", error)

    @property
    def journaling(self) -> bool:
        """Whether this process's deaths and crashes are on record (it has a journal)."""
        return self._journal is not None

    def _drop_journal(self) -> None:
        """Remove this process's journal, the file before its lock: a file without a lock is a dead
        process's."""
        if self._journal is not None:
            self._guarded(
                "removing this process's journal", lambda: self.journal_path.unlink(missing_ok=True)
            )
            self._journal.close()
            self._journal = None

    def close(self) -> None:
        """A clean stop: this process's files go (nothing it held crashed), the journal before its
        lock."""
        if os.getpid() == self._pid:  # a forked child's ledger leaves its parent's marker alone
            self._guarded("removing the crash marker", lambda: self.marker.unlink(missing_ok=True))
        self._drop_journal()
        _LEDGERS.discard(self)
        self._db.close()

    def _dead_journals(self) -> list[Path]:
        """The journals of processes that died (their lock is free), this process's never."""
        return [
            journal
            for journal in self.directory.glob("*.inflight")
            if journal != self.journal_path and not _locked(journal)
        ]

    def _collect(self) -> None:
        """Turn the files of processes that died into confirmed and witnessed crashes and deaths.

        Under the ledger's write lock, each file is renamed aside and counted; the names set aside
        are committed with the counts, and the files removed after the commit. If the transaction
        fails, the files are renamed back before the lock is released; if the collector is killed
        before its commit, the next collector puts them back and counts them (and removes them if
        the commit was made). A journal that is gone by the time it is renamed is not counted (its
        process stopped cleanly, or another collector took it): two processes never count one
        death twice, and a clean stop is never a death."""
        if not self._dead_journals() and not any(self.directory.glob("*.collected")):
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        taken: list[tuple[Path, Path]] = []  # (renamed aside, original)
        try:
            self._sweep_leftovers()
            for journal in self._dead_journals():
                aside = _set_aside(journal, taken)
                if aside is None:
                    continue
                marker = _set_aside(journal.with_suffix(".alone"), taken)
                culprit = (
                    "" if marker is None else _from_line_id(marker.read_bytes().decode("utf-8", "replace"))
                )
                held: Counter[str] = Counter()
                for line in read_journal(aside).splitlines():
                    if line[:1] in ("+", "-"):
                        held[_from_line_id(line[1:])] += 1 if line[0] == "+" else -1
                now = time.time()
                witnessed = [(message_id, now) for message_id, count in held.items() if count > 0]
                db.executemany(_COUNT["witnessed"], [row for row in witnessed if row[0] != culprit])
                if culprit:
                    db.execute(_COUNT["confirmed"], (culprit, now))
                db.execute("INSERT INTO deaths (at) VALUES (?)", (now,))
            db.executemany("INSERT OR IGNORE INTO collected (name) VALUES (?)", [(a.name,) for a, _ in taken])
            db.execute(
                "DELETE FROM deaths WHERE rowid <= (SELECT max(rowid) FROM deaths) - ?", (DEATHS_KEPT,)
            )
            self._prune()
            db.execute("COMMIT")
        except BaseException:
            for aside, original in taken:  # while the write lock is still held
                with contextlib.suppress(OSError):
                    aside.rename(original)
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        for aside, _ in taken:
            aside.unlink(missing_ok=True)

    def _sweep_leftovers(self) -> None:
        """Files a collector set aside and did not remove: counted (their names were committed with
        the counts), they go; not counted (it was killed before its commit), they are put back, to
        be counted now. Run under the write lock, when no live collector holds uncommitted files
        aside. Also a journal whose process died while making it."""
        counted = {name for (name,) in self._db.execute("SELECT name FROM collected")}
        for aside in self.directory.glob("*.collected"):
            if aside.name in counted:
                aside.unlink(missing_ok=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    aside.rename(aside.with_name(aside.name.removesuffix(".collected")))
        self._db.execute("DELETE FROM collected")
        for unborn in self.directory.glob("*.inflight.new"):
            with contextlib.suppress(FileNotFoundError):
                if unborn.stat().st_mtime < time.time() - STARTING_FOR and not _locked(unborn):
                    unborn.unlink()

    def evidence(self, envelope: Envelope) -> Evidence:
        """What this machine knows of the earlier deliveries of ``envelope`` (the files of processes
        that died are collected first); :data:`UNKNOWN` if the ledger cannot be read, or if this
        process has no journal (its own crashes would go unrecorded)."""
        if self._journal is None:
            return UNKNOWN
        try:
            return self._evidence(envelope)
        except Exception as error:  # the ledger never stands between a delivery and its settle
            self._degraded("reading crash evidence", error)
            return UNKNOWN

    def collect(self) -> None:
        """Collect the files of processes that died, now (also done before each redelivery is
        judged): a death is dated when it is collected, so the consumer collects every
        :data:`COLLECT_EVERY` seconds, lest an idle process's death be dated hours late."""
        self._guarded("collecting the files of processes that died", self._collect)

    def _evidence(self, envelope: Envelope) -> Evidence:
        self._collect()
        row = self._db.execute(
            "SELECT confirmed, witnessed, failed FROM evidence WHERE message_id = ?", (envelope.id,)
        ).fetchone()
        confirmed, witnessed, failed = row or (0, 0, 0)
        published = _published_at(envelope)
        deaths = 0
        if published is not None:
            (deaths,) = self._db.execute("SELECT count(*) FROM deaths WHERE at >= ?", (published,)).fetchone()
        return Evidence(confirmed=confirmed, witnessed=witnessed, failed=failed, deaths=deaths)

    def failed(self, message_id: str) -> None:
        """Its handler raised here, and it is about to go back to the broker: an account of this
        delivery (recorded first, so a process killed before the broker has the nack is only
        over-explained, never under)."""

        def record() -> None:
            self._db.execute(_COUNT["failed"], (message_id, time.time()))
            if time.monotonic() >= self._next_prune:
                self._prune()

        self._guarded("recording a failure", record)

    def _prune(self) -> None:
        """Drop the evidence that did not change for :data:`EVIDENCE_KEPT` seconds."""
        self._next_prune = time.monotonic() + PRUNE_EVERY
        self._db.execute("DELETE FROM evidence WHERE changed < ?", (time.time() - EVIDENCE_KEPT,))

    def forget(self, message_id: str) -> None:
        """The message was settled: its record is no longer needed."""
        self._guarded(
            "forgetting a settled message",
            lambda: self._db.execute("DELETE FROM evidence WHERE message_id = ?", (message_id,)),
        )

    def running_alone(self, message_id: str) -> None:
        """Mark ``message_id`` as the only handler running in this process (a plain write: it
        survives the process being killed). Without a journal no one would ever collect the
        marker (nor count this process's death): none is written, and the broker's count bounds
        the crash loop."""
        if self._journal is not None:
            self.marker.write_bytes(_line_id(message_id).encode())

    def finished_alone(self) -> None:
        self._guarded("removing the crash marker", lambda: self.marker.unlink(missing_ok=True))

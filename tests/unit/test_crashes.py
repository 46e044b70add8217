"""The crash ledger: what a process holds is in its file the moment it takes it; what dead processes
held, failures and deaths are the evidence that tells a message's own runs from its deliveries."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from callcast.crashes import EVIDENCE_KEPT, UNKNOWN, CrashLedger, Evidence
from callcast.envelope import Envelope
from callcast.journal import read_journal
from tests.unit.conftest import dead_pid


def test_a_ledger_names_what_it_holds_the_moment_it_takes_it(tmp_path: Path) -> None:
    """No event loop turn and no flush are needed: a process killed right after ``fetched`` is known
    to have held the message."""
    ledger = CrashLedger(tmp_path)
    journal = ledger.journal_path
    a, b = (Envelope(type="T", source="s", data=b"{}", id=name) for name in "ab")
    ledger.fetched(a)
    ledger.fetched(b)
    assert read_journal(journal) == "+a\n+b\n"
    ledger.returned(a)
    ledger.returned(b)
    assert read_journal(journal) == "+a\n+b\n-a\n-b\n"
    ledger.close()
    assert not journal.exists()


def test_what_a_closed_ledger_is_told_is_ignored(tmp_path: Path) -> None:
    """A NATS settle is reported returned once the server read it, which may be after the consumer
    stopped and closed its ledger: that report is dropped, not an error in the reporting task."""
    ledger = CrashLedger(tmp_path)
    ledger.close()
    ledger.returned(Envelope(type="T", source="s", data=b"{}", id="late"))
    assert not ledger.journal_path.exists()


def no_space_left(fd: int, offset: int, length: int) -> None:
    """``os.posix_fallocate`` on a full disk."""
    raise OSError(28, "No space left on device")


def published(seconds_from_now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds_from_now))


@pytest.mark.parametrize(
    ("evidence", "attempt", "own"),
    [
        (Evidence(), 5, 5),  # nothing known: the broker's count
        (Evidence(witnessed=2), 5, 3),
        (Evidence(failed=2, deaths=3), 4, 3),  # one delivery no one accounted for, lost in a death
        (Evidence(failed=1, deaths=1), 5, 4),  # three unaccounted (run elsewhere?), one death: one lost
        (Evidence(failed=3, deaths=4), 4, 4),  # every earlier delivery accounted for: none lost
        # a death that witnessed or confirmed it lost none of its deliveries: only other deaths did
        (Evidence(confirmed=1, witnessed=1, deaths=2), 4, 3),
        (Evidence(witnessed=1, deaths=2), 4, 2),
    ],
)
def test_a_messages_own_runs_are_its_deliveries_less_the_witnessed_and_the_lost(
    evidence: Evidence, attempt: int, own: int
) -> None:
    assert evidence.own(attempt) == own


def test_a_dead_processes_files_become_evidence_once(tmp_path: Path) -> None:
    ledger = CrashLedger(tmp_path)
    pid = dead_pid()
    (tmp_path / f"{pid}.inflight").write_text("+held\n+culprit\n+settled\n-settled\n")
    (tmp_path / f"{pid}.alone").write_text("culprit")
    before = published(-60)

    def seen(message_id: str, time: str = before) -> Evidence:
        return ledger.evidence(Envelope(type="T", source="s", data=b"{}", id=message_id, time=time))

    assert seen("held") == Evidence(witnessed=1, deaths=1)
    assert not (tmp_path / f"{pid}.inflight").exists()
    assert not (tmp_path / f"{pid}.alone").exists()
    assert seen("culprit") == Evidence(confirmed=1, deaths=1)
    assert seen("settled") == Evidence(deaths=1)
    assert seen("held", published(60)) == Evidence(witnessed=1)  # published after the death
    assert seen("held", "not a time") == Evidence(witnessed=1)
    ledger.close()


def test_failures_are_recorded_until_the_message_is_forgotten(tmp_path: Path) -> None:
    ledger = CrashLedger(tmp_path)
    envelope = Envelope(type="T", source="s", data=b"{}", id="poison")
    ledger.failed("poison")
    ledger.failed("poison")
    assert ledger.evidence(envelope) == Evidence(failed=2)
    assert failures_seen_by_another_process(tmp_path, "poison") == 2  # the machine's other processes
    ledger.forget("poison")
    assert ledger.evidence(envelope) == Evidence()
    assert failures_seen_by_another_process(tmp_path, "poison") == 0
    ledger.close()


def failures_seen_by_another_process(directory: Path, message_id: str) -> int:
    script = (
        "import sys; from pathlib import Path; from callcast.crashes import CrashLedger; "
        "from callcast.envelope import Envelope; ledger = CrashLedger(Path(sys.argv[1])); "
        "print(ledger.evidence(Envelope(type='T', source='s', data=b'{}', id=sys.argv[2])).failed); "
        "ledger.close()"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(directory), message_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are seen through /proc")
def test_a_live_process_is_never_collected_and_one_killed_but_not_yet_reaped_is(tmp_path: Path) -> None:
    """Its connections are closed and its messages redelivered before its parent waits for it; the
    kernel dropped its journal's lock with its files."""
    script = (
        "import sys, time; from pathlib import Path; from callcast.crashes import CrashLedger; "
        "from callcast.envelope import Envelope; ledger = CrashLedger(Path(sys.argv[1])); "
        "ledger.fetched(Envelope(type='T', source='s', data=b'{}', id='held')); "
        "print('holding', flush=True); time.sleep(60)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    ledger = CrashLedger(tmp_path)
    envelope = Envelope(type="T", source="s", data=b"{}", id="held", time=published(-60))
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "holding\n"
        assert ledger.evidence(envelope) == Evidence()  # alive: its journal stays its own
        process.kill()
        stat = Path(f"/proc/{process.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not die"
            time.sleep(0.01)
        assert ledger.evidence(envelope) == Evidence(witnessed=1, deaths=1)
    finally:
        process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
        ledger.close()


def test_evidence_unchanged_for_longer_than_it_is_kept_is_dropped(tmp_path: Path) -> None:
    """A message settled on another machine is never forgotten here: old evidence goes."""
    ledger = CrashLedger(tmp_path)
    ledger.failed("old")
    ledger.failed("recent")
    with contextlib.closing(sqlite3.connect(tmp_path / "ledger.sqlite3")) as db, db:
        db.execute("UPDATE evidence SET changed = changed - ? WHERE message_id = 'old'", (EVIDENCE_KEPT + 1,))
    (tmp_path / f"{dead_pid()}.inflight").write_text("")  # collecting a death prunes too

    def seen(message_id: str) -> Evidence:
        return ledger.evidence(Envelope(type="T", source="s", data=b"{}", id=message_id, time=published(-60)))

    assert seen("old") == Evidence(deaths=1)
    assert seen("recent") == Evidence(failed=1, deaths=1)
    ledger.close()


def test_a_locked_ledger_gives_no_evidence_and_takes_no_failure_but_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The ledger runs on the event loop: past a short wait for another process's write lock it
    goes without, and the broker's count decides."""
    monkeypatch.setattr("callcast.crashes.BUSY_TIMEOUT", 0.05)
    ledger = CrashLedger(tmp_path)
    (tmp_path / f"{dead_pid()}.inflight").write_text("+held\n")
    envelope = Envelope(type="T", source="s", data=b"{}", id="held", time=published(-60))
    blocker = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert ledger.evidence(envelope) == UNKNOWN
        ledger.failed("held")
        ledger.forget("held")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert "judged by the broker's delivery count" in caplog.text
    assert ledger.evidence(envelope) == Evidence(witnessed=1, deaths=1)  # the death waited its turn
    ledger.close()


def test_a_failed_collection_leaves_the_dead_processes_files_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It fails after the files were set aside and counted (at the prune before the commit): they
    are put back."""
    ledger = CrashLedger(tmp_path)
    pid = dead_pid()
    (tmp_path / f"{pid}.inflight").write_text("+held\n")
    (tmp_path / f"{pid}.alone").write_text("culprit")
    envelope = Envelope(type="T", source="s", data=b"{}", id="held", time=published(-60))

    def failing_prune() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ledger, "_prune", failing_prune)
    assert ledger.evidence(envelope) == UNKNOWN  # rolled back
    assert (tmp_path / f"{pid}.inflight").read_text() == "+held\n"
    assert (tmp_path / f"{pid}.alone").read_text() == "culprit"
    monkeypatch.undo()
    assert ledger.evidence(envelope) == Evidence(witnessed=1, deaths=1)
    assert not list(tmp_path.glob(f"{pid}.*"))
    ledger.close()


def test_a_failed_collection_puts_the_files_back_while_it_still_holds_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collector waiting for the lock must find them where they were, not set aside."""
    ledger = CrashLedger(tmp_path)
    journal = tmp_path / f"{dead_pid()}.inflight"
    journal.write_text("+held\n")
    database = ledger._db
    there_at_rollback: list[bool] = []

    class Watched:
        def __getattr__(self, name: str) -> object:
            return getattr(database, name)

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql == "ROLLBACK":
                there_at_rollback.append(journal.exists())
            return database.execute(sql, *args)

    def failing_prune() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ledger, "_db", Watched())
    monkeypatch.setattr(ledger, "_prune", failing_prune)
    ledger.collect()
    assert there_at_rollback == [True]
    monkeypatch.undo()
    ledger.close()


def test_files_that_cannot_be_removed_never_stop_a_settle_or_a_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = CrashLedger(tmp_path)
    ledger.running_alone("suspect")
    unlink = Path.unlink

    def refused(path: Path, missing_ok: bool = False) -> None:
        if path.suffix == ".alone":
            raise PermissionError(13, "Permission denied", str(path))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    ledger.finished_alone()
    ledger.close()
    assert ledger.marker.exists()
    assert not ledger.journal_path.exists()  # the journal still goes
    monkeypatch.undo()
    ledger.marker.unlink()


@pytest.mark.parametrize("committed", [False, True])
def test_a_collector_killed_midway_neither_loses_nor_doubles_the_deaths_it_took(
    tmp_path: Path, committed: bool
) -> None:
    """Killed after setting a dead process's files aside: before its commit, the next collector puts
    them back and counts them; after it, the next one only removes them."""
    pid = dead_pid()
    (tmp_path / f"{pid}.inflight").write_text("+held\n")
    (tmp_path / f"{pid}.alone").write_text("culprit")
    envelope = Envelope(type="T", source="s", data=b"{}", id="held", time=published(-60))
    if committed:
        first = CrashLedger(tmp_path)
        assert first.evidence(envelope) == Evidence(witnessed=1, deaths=1)
        first.close()
        (tmp_path / f"{pid}.inflight.collected").write_text("+held\n")  # as if its removals
        (tmp_path / f"{pid}.alone.collected").write_text("culprit")  # never happened
    else:
        for name in (f"{pid}.inflight", f"{pid}.alone"):
            (tmp_path / name).rename(tmp_path / f"{name}.collected")
    ledger = CrashLedger(tmp_path)
    assert ledger.evidence(envelope) == Evidence(witnessed=1, deaths=1)
    culprit = Envelope(type="T", source="s", data=b"{}", id="culprit", time=envelope.time)
    assert ledger.evidence(culprit) == Evidence(confirmed=1, deaths=1)
    assert not list(tmp_path.glob(f"{pid}.*"))
    ledger.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_child_forked_without_exec_does_not_keep_its_parents_death_unseen(tmp_path: Path) -> None:
    script = (
        "import os, sys, time; from pathlib import Path; from callcast.crashes import CrashLedger; "
        "from callcast.envelope import Envelope; ledger = CrashLedger(Path(sys.argv[1])); "
        "ledger.fetched(Envelope(type='T', source='s', data=b'{}', id='held')); "
        "child = os.fork()\n"
        "if child == 0:\n    os.close(1); os.close(2); time.sleep(60); os._exit(0)\n"
        "print(child, flush=True); os._exit(0)"
    )
    parent = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60, check=True
    )
    child = int(parent.stdout)
    try:
        ledger = CrashLedger(tmp_path)
        envelope = Envelope(type="T", source="s", data=b"{}", id="held", time=published(-60))
        assert ledger.evidence(envelope) == Evidence(witnessed=1, deaths=1)  # the child still runs
        ledger.close()
    finally:
        os.kill(child, 9)


def test_an_unreadable_ledger_is_moved_aside_and_made_anew(tmp_path: Path) -> None:
    (tmp_path / "ledger.sqlite3").write_bytes(b"not a database, " * 512)
    ledger = CrashLedger(tmp_path)
    ledger.failed("poison")
    assert ledger.evidence(Envelope(type="T", source="s", data=b"{}", id="poison")) == Evidence(failed=1)
    assert len(list(tmp_path.glob("ledger.sqlite3.unreadable-*"))) == 1
    ledger.close()


def test_only_the_last_unreadable_ledgers_are_kept(tmp_path: Path) -> None:
    for moved_at in (100, 200, 300, 400):
        (tmp_path / f"ledger.sqlite3.unreadable-{moved_at}").write_bytes(b"old")
    (tmp_path / "ledger.sqlite3").write_bytes(b"not a database, " * 512)
    CrashLedger(tmp_path).close()
    kept = sorted(int(path.name.rpartition("-")[2]) for path in tmp_path.glob("ledger.sqlite3.unreadable-*"))
    assert len(kept) == 3
    assert kept[:2] == [300, 400]  # and the one just moved aside


def test_journals_are_told_apart_by_their_lock_not_by_the_pid_in_their_name(tmp_path: Path) -> None:
    """A restarted container often gets its predecessor's pid, and containers sharing the directory
    may all be pid 1: an unlocked journal is a dead process's, a locked one a live process's,
    whatever its name says."""
    (tmp_path / f"{os.getpid()}.inflight").write_text("+old\n")  # a predecessor with our pid
    ledger = CrashLedger(tmp_path)
    held = Envelope(type="T", source="s", data=b"{}", id="held", time=published(-60))
    ledger.fetched(held)
    twin = CrashLedger(tmp_path)  # a second live ledger of the directory, in this process
    old = Envelope(type="T", source="s", data=b"{}", id="old", time=published(-60))
    assert twin.evidence(old) == Evidence(witnessed=1, deaths=1)
    assert twin.evidence(held) == Evidence(deaths=1)  # the first ledger lives: not witnessed
    twin.close()
    ledger.close()


def test_without_disk_space_for_its_journal_a_ledger_goes_on_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(os, "posix_fallocate", no_space_left, raising=False)
    ledger = CrashLedger(tmp_path)
    ledger.fetched(Envelope(type="T", source="s", data=b"{}", id="a"))
    ledger.running_alone("a")  # no marker either: no one would collect it
    assert not list(tmp_path.glob("*.alone"))
    assert "creating this process's journal failed" in caplog.text
    assert ledger.evidence(Envelope(type="T", source="s", data=b"{}", id="a")) == UNKNOWN
    ledger.close()


def test_a_journal_that_cannot_grow_empties_itself_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So a death does not witness what it no longer tracks."""
    from callcast.journal import Journal

    held = {f"id-{n:04d}" for n in range(40)}
    journal = Journal(tmp_path / "j", lambda: "".join(f"+{name}\n" for name in sorted(held)), size=512)
    journal.append("+first\n")

    monkeypatch.setattr(os, "posix_fallocate", no_space_left, raising=False)

    def append_until_it_must_grow() -> None:  # the 40 held fill more than half of it
        for name in sorted(held) * 2:
            journal.append(f"+{name}\n")

    with pytest.raises(OSError, match="No space"):
        append_until_it_must_grow()
    assert read_journal(tmp_path / "j") == ""
    journal.append("+after\n")  # stopped: ignored
    assert read_journal(tmp_path / "j") == ""
    journal.close()


def test_a_ledger_whose_journal_cannot_grow_is_not_taken_for_a_dead_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its file goes before its lock."""
    ledger = CrashLedger(tmp_path)
    ledger.fetched(Envelope(type="T", source="s", data=b"{}", id="held"))

    monkeypatch.setattr(os, "posix_fallocate", no_space_left, raising=False)
    monkeypatch.setattr(ledger._journal, "size", 64)  # the next appends must grow it
    for n in range(10):
        ledger.fetched(Envelope(type="T", source="s", data=b"{}", id=f"more-{n}"))
    assert not ledger.journal_path.exists()
    monkeypatch.undo()
    other = CrashLedger(tmp_path)
    assert (
        other.evidence(Envelope(type="T", source="s", data=b"{}", id="held", time=published(-60)))
        == Evidence()
    )
    other.close()
    ledger.close()


def test_a_clean_stop_is_never_counted_as_a_death(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopping process removes its journal before it lets go of the lock: a collector that looks
    the moment the lock is gone finds nothing."""
    from callcast.journal import Journal

    watcher = CrashLedger(tmp_path)
    envelope = Envelope(type="T", source="s", data=b"{}", id="held", time=published(-60))
    seen: list[Evidence] = []
    close = Journal.close

    def close_then_look(journal: Journal) -> None:
        close(journal)
        seen.append(watcher.evidence(envelope))

    stopping = CrashLedger(tmp_path)
    stopping.fetched(envelope)
    monkeypatch.setattr(Journal, "close", close_then_look)
    stopping.close()
    monkeypatch.undo()
    assert seen == [Evidence()]
    watcher.close()


def test_ids_cannot_write_journal_lines_and_a_message_held_twice_stays_held_until_both_go(
    tmp_path: Path,
) -> None:
    """Message ids come from outside; a duplicate (or a redelivery after a lease ran out) can be
    held twice by one process."""
    script = (
        "import os, sys; from pathlib import Path; from callcast.crashes import CrashLedger; "
        "from callcast.envelope import Envelope; ledger = CrashLedger(Path(sys.argv[1])); "
        "held = lambda i: Envelope(type='T', source='s', data=b'{}', id=i); "
        "[ledger.fetched(held(i)) for i in ('evil\\n-twice\\n+victim', 'twice', 'twice', '50%25')]; "
        "ledger.returned(held('twice')); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], timeout=60, check=True)
    ledger = CrashLedger(tmp_path)
    before = published(-60)

    def seen(message_id: str) -> Evidence:
        return ledger.evidence(Envelope(type="T", source="s", data=b"{}", id=message_id, time=before))

    assert seen("twice") == Evidence(witnessed=1, deaths=1)
    assert seen("victim") == Evidence(deaths=1)
    assert seen("evil\n-twice\n+victim") == Evidence(witnessed=1, deaths=1)
    assert seen("50%25") == Evidence(witnessed=1, deaths=1)
    ledger.close()


def test_a_ledger_that_cannot_be_opened_for_another_reason_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a corrupt file is moved aside: a locked one, or one opened while the process is out of
    file descriptors, holds the machine's evidence, and other processes write to it."""
    CrashLedger(tmp_path).close()

    def locked(path: Path) -> sqlite3.Connection:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr("callcast.crashes._connect", locked)
    with pytest.raises(sqlite3.OperationalError):
        CrashLedger(tmp_path)
    assert (tmp_path / "ledger.sqlite3").exists()
    assert not list(tmp_path.glob("ledger.sqlite3.unreadable-*"))


def test_a_marker_in_another_encoding_is_read_without_failing(tmp_path: Path) -> None:
    ledger = CrashLedger(tmp_path)
    pid = dead_pid()
    (tmp_path / f"{pid}.inflight").write_text("+held\n")
    (tmp_path / f"{pid}.alone").write_bytes(b"\xff\xfe")
    envelope = Envelope(type="T", source="s", data=b"{}", id="held", time=published(-60))
    assert ledger.evidence(envelope) == Evidence(witnessed=1, deaths=1)
    ledger.close()

"""The crash ledger's journal: what a process holds is in its file the moment it takes it."""

from __future__ import annotations

import os
from pathlib import Path

from callcast.crashes import CrashLedger
from callcast.envelope import Envelope
from callcast.journal import read_journal


def test_a_ledger_names_what_it_holds_the_moment_it_takes_it(tmp_path: Path) -> None:
    """No event loop turn and no flush are needed: a process killed right after ``fetched`` is known
    to have held the message."""
    ledger = CrashLedger(tmp_path)
    journal = tmp_path / f"{os.getpid()}.inflight"
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
    assert not (tmp_path / f"{os.getpid()}.inflight").exists()

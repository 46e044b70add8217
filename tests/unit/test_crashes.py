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

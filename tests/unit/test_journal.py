"""The memory-mapped journal: what was appended is in the file at once, also for a process that is
killed right after; a full journal is rewritten from what still matters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from callcast.journal import Journal, read_journal


def test_an_append_is_in_the_file_before_anything_is_flushed_or_closed(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", lambda: "")
    journal.append("+a\n")
    journal.append("-a\n")
    assert read_journal(tmp_path / "j") == "+a\n-a\n"
    journal.close()


def test_what_a_killed_process_appended_is_in_its_journal(tmp_path: Path) -> None:
    path = tmp_path / "killed"
    program = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from callcast.journal import Journal\n"
        "journal = Journal(Path(sys.argv[1]), lambda: '')\n"
        "for n in range(1000):\n"
        "    journal.append(f'+{n}\\n')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run([sys.executable, "-c", program, str(path)], timeout=60, check=False)
    assert child.returncode == -signal.SIGKILL
    assert read_journal(path).splitlines() == [f"+{n}" for n in range(1000)]


def test_a_full_journal_is_rewritten_from_what_still_matters(tmp_path: Path) -> None:
    held = {"x"}
    journal = Journal(tmp_path / "j", lambda: "".join(f"+{h}\n" for h in sorted(held)), size=24)
    for n in range(10):  # 3 bytes each: the 8th does not fit in 24 with a NUL after it
        journal.append(f"-{n}\n")  # the rewrite is the state the 8th leads to: it is not added
    assert read_journal(tmp_path / "j") == "+x\n-8\n-9\n"
    held.clear()
    for _ in range(8):  # the 5th finds it full again: rewritten from nothing, then 3 lines
        journal.append("-x\n")
    assert read_journal(tmp_path / "j") == "-x\n" * 3
    journal.close()
    assert (tmp_path / "j").stat().st_size == 24


def test_a_journal_grows_when_what_still_matters_fills_half_of_it(tmp_path: Path) -> None:
    held = ["y" * 40]
    journal = Journal(tmp_path / "j", lambda: "".join(f"+{h}\n" for h in held), size=32)
    for _ in range(12):  # 36 bytes: the 11th append finds it full, with 42 bytes that still matter
        journal.append("-z\n")
    assert journal.size > 32
    assert read_journal(tmp_path / "j") == "+" + "y" * 40 + "\n" + "-z\n"
    journal.close()
    assert (tmp_path / "j").stat().st_size == journal.size


def test_a_journal_written_by_plain_appends_is_read_too(tmp_path: Path) -> None:
    (tmp_path / "old").write_text("+a\n+b\n-a\n")
    assert read_journal(tmp_path / "old") == "+a\n+b\n-a\n"
    assert os.path.getsize(tmp_path / "old") == 9

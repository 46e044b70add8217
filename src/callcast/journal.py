"""An append-only text log that survives its process being killed, at the cost of a memory copy.

The file is mapped into memory (``MAP_SHARED``): an append copies the line into the kernel's page
cache, so it is in the file the moment the call returns, even if the process is killed right after
(``SIGKILL``, the OOM killer, a crashing extension), and without a system call per line. It does not
survive the machine crashing, which the crash journal of :mod:`callcast.crashes` does not need.

The file holds text up to its first NUL byte. When an append would fill it, the log is rewritten from
the lines its owner says still matter (``compacted``); if those alone fill half of it, it grows.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

SIZE = 1 << 20
"""Bytes of a journal file by default (allocated on disk when it is made): ~27,000 lines of a UUID
each between rewrites."""


class Journal:
    """Lines appended to ``path`` (created or emptied), readable by others with :func:`read_journal`.

    ``compacted()`` gives the lines that still matter, as the owner's state is once the line being
    appended is taken into account (the owner updates its state first)."""

    def __init__(self, path: Path, compacted: Callable[[], str], size: int = SIZE) -> None:
        """Raises :class:`OSError` if the file cannot be made (a full disk included)."""
        self.path = path
        self.size = size
        self._compacted = compacted
        self._file = open(path, "w+b")  # noqa: SIM115 - lives as long as the journal
        try:
            _allocate(self._file.fileno(), size)
            self._map = mmap.mmap(self._file.fileno(), size)
        except BaseException:
            self._file.close()
            raise
        self._end = 0
        self._stopped = False

    def append(self, line: str) -> None:
        """Add ``line`` (it should end with a newline); it is in the file when this returns. After
        :meth:`close`, nothing (a settle the broker confirms late may still report to a closed
        ledger).

        Raises :class:`OSError` if the file had to grow and could not (a full disk): the journal is
        then emptied and takes no more lines (its owner closes it), so it never reads as holding
        what it no longer tracks."""
        if self._map.closed or self._stopped:
            return
        data = line.encode()
        if self._end + len(data) >= self.size:  # keep a NUL after the text
            text = self._compacted().encode()  # the state ``line`` leads to: it is in there
            if 2 * len(text) >= self.size:
                self._grow(4 * len(text))
            self._rewrite(text)
            return
        end = self._end + len(data)
        self._map[self._end : end] = data
        self._end = end

    def _grow(self, size: int) -> None:
        try:
            _allocate(self._file.fileno(), size, start=self.size)
        except OSError:
            self._map[0:1] = b"\0"
            self._stopped = True
            raise
        self._map.close()
        self._map = mmap.mmap(self._file.fileno(), size)
        self.size = size

    def _rewrite(self, text: bytes) -> None:
        """Replace the log with ``text``. Killed meanwhile, the file reads as empty (its first byte is a
        NUL until the rest is in place), never as a mix of the old and the new."""
        old_end, self._end = self._end, len(text)
        self._map[0:1] = b"\0"
        self._map[1 : len(text)] = text[1:]
        if old_end > len(text):
            self._map[len(text) : old_end] = bytes(old_end - len(text))
        self._map[0:1] = text[:1] or b"\0"

    def fileno(self) -> int:
        """The file's descriptor (to lock it, say)."""
        return self._file.fileno()

    def close(self) -> None:
        if not self._map.closed:
            self._map.close()
            self._file.close()


def _allocate(fd: int, size: int, start: int = 0) -> None:
    """Make the file ``size`` bytes long, the bytes from ``start`` on real disk blocks, not a sparse
    hole: a write through the mapping into a hole the disk cannot fill kills the process
    (``SIGBUS``), where this raises :class:`OSError` (``ENOSPC``)."""
    os.ftruncate(fd, size)
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, start, size - start)
    else:  # no fallocate (macOS): write the zeros
        os.pwrite(fd, bytes(size - start), start)


def read_journal(path: Path) -> str:
    """The text of a journal file (also of one written by plain appends, with no NUL in it)."""
    return path.read_bytes().split(b"\0", 1)[0].decode("utf-8", "replace")

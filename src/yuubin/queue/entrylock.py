"""Cross-process locks on spool entries: the server's scheduler and `yuubin queue` both rewrite them.

Each edit is load → change → atomic rename; two processes doing it at once would lose one
change (a hold overwritten by a delivery result). POSIX byte-range locks on one lock file, one
byte per hash slot, serialise the edits without a lock file per entry. Within the server, an
asyncio lock per entry does the same job (POSIX locks never conflict inside one process).
"""

from __future__ import annotations

import fcntl
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SLOTS = 1 << 16


class EntryLocks:
    def __init__(self, spool_root: Path):
        # Kept open for the life of the process: closing any descriptor of the file drops its locks.
        self._fd = os.open(spool_root / "queue.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @staticmethod
    def _slot(qid: str) -> int:
        return zlib.crc32(qid.encode()) % SLOTS

    def acquire(self, qid: str) -> None:
        """Blocks until the entry is free (call from a thread in async code)."""
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, self._slot(qid))

    def release(self, qid: str) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._slot(qid))

    @contextmanager
    def held(self, qid: str) -> Iterator[None]:
        self.acquire(qid)
        try:
            yield
        finally:
            self.release(qid)

    def close(self) -> None:
        os.close(self._fd)

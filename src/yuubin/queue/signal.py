"""How new work reaches the outbound scheduler.

Intake and local delivery call `wake(qid)` when an entry has remote recipients ready, or
`wake()` when anything may have changed. In the process that runs the scheduler that is a
QueueSignal the scheduler waits on; in the other worker processes (and for the `yuubin queue`
tools) it is a flush request file in spool/requests/ that the scheduler reads every second.

While it runs, the scheduler holds a shared lock on spool/scheduler.lock, so `yuubin queue flush`
can tell whether anyone will read its request. A lock, not a pid file: the kernel drops it when
the process ends, however it ends, so a crash leaves nothing stale behind.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

REQUESTS_DIR = "requests"
RUNNING_LOCK = "scheduler.lock"


class Waker(Protocol):
    """What intake and local delivery need: QueueSignal in the scheduler's process, else RemoteWake."""

    def wake(self, qid: str | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Woken:
    """What was signalled since the scheduler last looked."""

    ids: frozenset[str]
    rescan: bool  # wake() without an id: look at the whole spool


class QueueSignal:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._ids: set[str] = set()
        self._rescan = False

    def wake(self, qid: str | None = None) -> None:
        """An entry with remote recipients is ready (or, without an id, something changed): look now."""
        if qid is None:
            self._rescan = True
        else:
            self._ids.add(qid)
        self._event.set()

    def recheck(self) -> None:
        """Nothing new, but look at what is due again (the scheduler's own: a job freed a slot)."""
        self._event.set()

    async def wait(self, timeout: float) -> Woken:
        """Until something is signalled or `timeout` seconds pass; returns (and forgets) what was."""
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            pass
        self._event.clear()
        woken = Woken(frozenset(self._ids), self._rescan)
        self._ids.clear()
        self._rescan = False
        return woken


def requests_dir(spool_root: Path) -> Path:
    return spool_root / REQUESTS_DIR


def request_flush(spool_root: Path, qid: str | None = None) -> None:
    """Ask the running scheduler (maybe in another process) to look at `qid`, or at everything."""
    d = requests_dir(spool_root)
    d.mkdir(mode=0o700, exist_ok=True)
    name = f"flush-{qid or 'all'}.{time.time_ns()}"
    os.close(os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


class RunningLock:
    """The scheduler's mark that it runs, from construction to close().

    Shared, so a second server on the same spool does not wait; a prober's exclusive try holds
    it for microseconds at most, so taking it here never waits long."""

    def __init__(self, spool_root: Path):
        self._fd = os.open(spool_root / RUNNING_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def scheduler_running(spool_root: Path) -> bool:
    """Whether a scheduler (in a server running with this spool) holds spool/scheduler.lock."""
    try:
        fd = os.open(spool_root / RUNNING_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # no server has run here yet
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also lets go of the lock if we got it
    return False


class RemoteWake:
    """The signal in a worker process that does not run the scheduler: a new entry with remote
    recipients becomes a flush request the primary worker reads within a second."""

    def __init__(self, spool_root: Path):
        self.spool_root = spool_root

    def wake(self, qid: str | None = None) -> None:
        request_flush(self.spool_root, qid)

"""Durable file writes with group commit.

The rule is: no 250 before the bytes and the directory entry are on disk. fsync is the price;
batching lets many sessions share it. Jobs queued during one turn of the event loop form a
batch; up to `workers` threads each take a batch, fsync every file, rename where asked, then
fsync each touched directory once. Parallel batches keep the disk busy while the event loop
goes on parsing.

What is written is private (files 0600, directories 0700) unless a `FileAccess` says otherwise:
the Maildirs may be shared with a reader such as Dovecot or a backup job (`[mail]` in the config).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class FileAccess:
    """Mode and ownership of the files yuubin creates, and of the directories that hold them.

    Set exactly, whatever the umask: a service manager's `UMask=0077` must not hide mail from
    the reader the admin configured, nor may a umask of 0022 show it to everyone.
    """

    mode: int = 0o600  # files; directories get search (x) wherever files are readable
    uid: int = -1  # -1: the process's own user (no chown)
    gid: int = -1  # -1: the process's own group

    @property
    def dir_mode(self) -> int:
        """0600 → 0700, 0640 → 0750, 0660 → 0770."""
        return self.mode | (self.mode & 0o444) >> 2

    @property
    def private(self) -> bool:
        return self.mode == 0o600 and self.uid == -1 and self.gid == -1

    def set_fd(self, fd: int) -> None:
        """Give a newly created file its owner and mode (nothing to do when private)."""
        if self.uid != -1 or self.gid != -1:
            os.fchown(fd, self.uid, self.gid)
        if self.mode != 0o600:
            os.fchmod(fd, self.mode)

    def set_dir(self, path: str | Path) -> None:
        """Give an existing directory this access (at start, for the directories yuubin owns)."""
        st = os.stat(path)
        if (self.uid not in (-1, st.st_uid)) or (self.gid not in (-1, st.st_gid)):
            os.chown(path, self.uid, self.gid)
        if st.st_mode & 0o777 != self.dir_mode:  # an admin's setgid bit stays
            os.chmod(path, st.st_mode & 0o7000 | self.dir_mode)

    def make_dirs(self, path: str | Path) -> list[Path]:
        """`mkdir -p` giving every directory it creates this access; returns those, top first."""
        missing: list[Path] = []
        p = Path(path)
        while not p.exists():
            missing.append(p)
            p = p.parent
        created = []
        for d in reversed(missing):
            try:
                os.mkdir(d, self.dir_mode)
            except FileExistsError:  # another worker process made it just now
                continue
            self.set_dir(d)
            created.append(d)
        return created


PRIVATE = FileAccess()


@dataclass(slots=True)
class FileWrite:
    path: str | Path  # written with O_EXCL and fsynced
    data: bytes | list[bytes]
    rename_to: str | Path | None = None  # then renamed here (Maildir tmp/ → new/, spool rewrite)
    access: FileAccess = PRIVATE  # its mode and owner, set before the first byte is written


@dataclass(slots=True, eq=False)
class Commit:
    """One queued job; await it (or its `future`) for durability."""

    writes: list[tuple[int, FileWrite]]  # open descriptors, data already written
    unlinks: list[str | Path]
    future: asyncio.Future
    after: Commit | None = None  # fails without touching the disk further if this one failed
    error: BaseException | None = field(default=None)
    finished: bool = False

    def __await__(self):
        return self.future.__await__()


class GroupCommitter:
    def __init__(self, workers: int = 2):
        self._workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsync")
        self._queue: list[Commit] = []
        self._active = 0
        self._kick_scheduled = False
        self.batches = 0
        self.jobs = 0

    async def commit(self, writes: list[FileWrite], unlinks: Sequence[str | Path] = ()) -> None:
        """Return once every write is durable; raise OSError (e.g. ENOSPC) if any failed."""
        await self.enqueue(writes, unlinks)

    def enqueue(self, writes: list[FileWrite], unlinks: Sequence[str | Path] = (),
                after: Commit | None = None) -> Commit:
        """Create and write the files now; the returned future resolves once they are durable.

        Files are created and written here, in the loop thread (page-cache work, microseconds);
        only fsync, close and rename go to the worker threads, so a worker needs the GIL few
        times per file. Unlinks run after the writes of the same job are durable; they need no
        fsync: a file that comes back after a crash means a duplicate delivery at worst, never
        a loss. With `after` (an earlier Commit), the job fails whole if that
        one failed — e.g. no Maildir copy of a message whose spool write failed.
        Raises OSError at once when a file cannot even be created or written.
        """
        loop = asyncio.get_running_loop()
        opened: list[tuple[int, FileWrite]] = []
        try:
            for w in writes:
                fd = os.open(w.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, w.access.mode)
                opened.append((fd, w))
                if not w.access.private:
                    w.access.set_fd(fd)
                _write_all(fd, w.data if isinstance(w.data, list) else [w.data])
        except OSError:
            for fd, w in opened:
                os.close(fd)
                _unlink_quietly(w.path)
            raise
        fut = loop.create_future()
        job = Commit(opened, list(unlinks), fut, after)
        self._queue.append(job)
        if not self._kick_scheduled:
            # Wait for the rest of this loop turn: other sessions' writes join the batch.
            self._kick_scheduled = True
            loop.call_soon(self._kick, loop)
        return job

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._kick_scheduled = False
        if self._queue and self._active < self._workers:
            batch, self._queue = self._queue, []
            self._active += 1
            cf = loop.run_in_executor(self._executor, _flush, batch)
            cf.add_done_callback(lambda f: self._done(loop, batch, f))

    def _done(self, loop: asyncio.AbstractEventLoop, batch: list[Commit], f: asyncio.Future) -> None:
        self._active -= 1
        self.batches += 1
        self.jobs += len(batch)
        exc = f.exception()
        for job in batch:
            err = exc or job.error
            if job.future.done():
                continue
            if err is None:
                job.future.set_result(None)
            else:
                job.future.set_exception(err)
        self._kick(loop)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


def _write_all(fd: int, parts: list[bytes]) -> None:
    """writev until every byte is written: a nearly full disk writes short before ENOSPC."""
    total = sum(len(p) for p in parts)
    written = os.writev(fd, parts)
    while written < total:
        rest = b"".join(parts)[written:]
        n = os.write(fd, rest)
        if n == 0:
            raise OSError(28, "No space left on device")  # ENOSPC
        written += n


def _sync_one(fd: int, w: FileWrite) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if w.rename_to is not None:
        os.rename(w.path, w.rename_to)


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _flush(batch: list[Commit]) -> None:
    """Worker thread: make each job durable, all or nothing per job; errors go on the job."""
    dirs: dict[str, list[Commit]] = {}
    members = set(map(id, batch))
    for job in batch:
        dep = job.after
        if dep is not None:
            # Same batch: it was synced just before (jobs run in order). Another batch: wait
            # for the worker running it (batches are short; this is rare).
            while id(dep) not in members and not dep.finished:
                time.sleep(0.001)
            if dep.error is not None:
                job.error = dep.error
        for fd, w in job.writes:
            if job.error is not None:
                os.close(fd)  # an earlier file of this job failed: the job fails whole
                continue
            try:
                _sync_one(fd, w)
                dirs.setdefault(os.path.dirname(w.rename_to or w.path), []).append(job)
            except OSError as e:
                job.error = e
        if job.error is not None:  # the caller retries the whole job
            for _fd, w in job.writes:
                _unlink_quietly(w.path)
                if w.rename_to is not None:
                    _unlink_quietly(w.rename_to)
    for d, owners in dirs.items():
        try:
            fsync_dir(d)
        except OSError as e:
            for job in owners:
                job.error = job.error or e
    for job in batch:
        if job.error is None:
            for p in job.unlinks:
                _unlink_quietly(p)
        job.finished = True

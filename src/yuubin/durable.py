"""Durable file writes with group commit.

The rule is: no 250 before the bytes and the directory entry are on disk. fsync is the price;
batching lets many sessions share it. Writes are queued; up to `workers` threads each take the
whole queue, write and fsync every file, rename where asked, then fsync each touched directory
once. Parallel batches keep the disk's queue busy while the event loop goes on parsing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path


@dataclass(slots=True)
class FileWrite:
    path: Path  # written with O_EXCL and fsynced
    data: bytes | list[bytes]
    rename_to: Path | None = None  # then renamed here (Maildir tmp/ → new/, spool rewrite)


@dataclass(slots=True)
class _Job:
    writes: list[tuple[int, FileWrite]]  # open descriptors, data already written
    unlinks: list[Path]
    future: asyncio.Future


class GroupCommitter:
    def __init__(self, workers: int = 2):
        self._workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsync")
        self._queue: list[_Job] = []
        self._active = 0
        self.batches = 0
        self.jobs = 0

    async def commit(self, writes: list[FileWrite], unlinks: list[Path] = ()) -> None:
        """Return once every write is durable; raise OSError (e.g. ENOSPC) if any failed.

        Files are created and written here, in the loop thread (page-cache work, microseconds);
        only fsync, close and rename go to the worker threads, so a worker needs the GIL few
        times per file. Unlinks run after the writes of the same job; they need no fsync: a
        file that comes back after a crash means a duplicate delivery at worst, never a loss.
        """
        loop = asyncio.get_running_loop()
        opened: list[tuple[int, FileWrite]] = []
        try:
            for w in writes:
                fd = os.open(w.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                opened.append((fd, w))
                _write_all(fd, w.data if isinstance(w.data, list) else [w.data])
        except OSError:
            for fd, w in opened:
                os.close(fd)
                _unlink_quietly(w.path)
            raise
        fut = loop.create_future()
        self._queue.append(_Job(opened, list(unlinks), fut))
        self._kick(loop)
        await fut

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._queue and self._active < self._workers:
            batch, self._queue = self._queue, []
            self._active += 1
            cf = loop.run_in_executor(self._executor, _flush, batch)
            cf.add_done_callback(lambda f: self._done(loop, batch, f))

    def _done(self, loop: asyncio.AbstractEventLoop, batch: list[_Job], f: asyncio.Future) -> None:
        self._active -= 1
        self.batches += 1
        self.jobs += len(batch)
        exc = f.exception()
        results = [exc] * len(batch) if exc else f.result()
        for job, err in zip(batch, results, strict=True):
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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _flush(batch: list[_Job]) -> list[BaseException | None]:
    results: list[BaseException | None] = []
    dirs: dict[Path, list[int]] = {}
    for i, job in enumerate(batch):
        err: BaseException | None = None
        for fd, w in job.writes:
            if err is not None:
                os.close(fd)  # an earlier file of this job failed: the job fails whole
                _unlink_quietly(w.path)
                continue
            try:
                _sync_one(fd, w)
                dirs.setdefault((w.rename_to or w.path).parent, []).append(i)
            except OSError as e:
                err = e
        if err is not None:  # all or nothing per job: the caller retries the whole job
            for _fd, w in job.writes:
                _unlink_quietly(w.path)
                if w.rename_to is not None:
                    _unlink_quietly(w.rename_to)
        results.append(err)
    for d, owners in dirs.items():
        try:
            fsync_dir(d)
        except OSError as e:
            for i in owners:
                results[i] = results[i] or e
    for i, job in enumerate(batch):
        if results[i] is None:
            for p in job.unlinks:
                _unlink_quietly(p)
    return results

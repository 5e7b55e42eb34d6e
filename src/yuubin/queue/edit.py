"""The one way to change a spool entry: lock it, load it, change it, write it back (or remove it).

Several parts edit entries: the scheduler records delivery results, containment holds a
suspended account's mail, and `yuubin queue` holds, releases and deletes from another process.
Each edit must see the previous one, or a hold is overwritten by a delivery result. Across
processes the entry's EntryLocks slot serialises them; inside the server (where POSIX locks
never conflict) an asyncio lock per entry does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from yuubin.durable import fsync_dir
from yuubin.queue.entrylock import EntryLocks
from yuubin.queue.spool import Envelope, Spool, SpoolCorrupt


class Unreadable(Exception):
    """The entry is there but cannot be loaded (torn by a crash, or not readable to us)."""


@dataclass(frozen=True, slots=True)
class Keep:
    """Nothing changed: the file stays as it is."""


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Write this envelope over the entry (atomic, fsynced); the message bytes stay."""

    env: Envelope  # the loaded one changed in place, or a new one with the same id


@dataclass(frozen=True, slots=True)
class Remove:
    """The entry is finished: unlink it."""


Edit = Keep | Rewrite | Remove
KEEP = Keep()
REMOVE = Remove()


@dataclass(frozen=True, slots=True)
class Removed:
    """What `remove_sync` took out of the queue."""

    env: Envelope | None  # None: the entry was unreadable (removed all the same)


class SpoolEditor:
    """Owns the entry locks (the cross-process EntryLocks and the in-process asyncio locks)."""

    def __init__(self, spool: Spool, entry_locks: EntryLocks):
        self.spool = spool
        self.entry_locks = entry_locks
        self._in_process: dict[str, asyncio.Lock] = {}

    def close(self) -> None:
        self.entry_locks.close()

    async def edit(self, qid: str, change: Callable[[Envelope, bytes], Awaitable[Edit]]) -> Edit | None:
        """Run `change` on the entry under both locks and carry out what it returns.

        Returns that, or None when the entry is gone (delivered or deleted meanwhile); raises
        Unreadable when it cannot be loaded. Either way `change` is not called. Errors of
        `change` and of the write propagate, and then nothing is written.
        """
        lock = self._in_process.setdefault(qid, asyncio.Lock())
        try:
            async with lock:
                await asyncio.to_thread(self.entry_locks.acquire, qid)
                try:
                    loaded = self._load(qid)
                    if loaded is None:
                        return None
                    env, data = loaded
                    edit = await change(env, data)
                    if isinstance(edit, Rewrite):
                        await self.spool.rewrite(_same_entry(edit.env, qid), data)
                    elif isinstance(edit, Remove):
                        await self.spool.committer.commit([], unlinks=[self.spool.path(qid)])
                    return edit
                finally:
                    self.entry_locks.release(qid)
        finally:
            # The lock object lives as long as its entry: dropping it while another edit waits on
            # it would let a third one create a fresh lock and edit at the same time.
            if not self.spool.path(qid).exists():
                self._in_process.pop(qid, None)

    def edit_sync(self, qid: str, change: Callable[[Envelope, bytes], Edit]) -> Edit | None:
        """`edit` for a process without a running event loop (the `yuubin queue` tools)."""
        with self.entry_locks.held(qid):
            loaded = self._load(qid)
            if loaded is None:
                return None
            env, data = loaded
            edit = change(env, data)
            if isinstance(edit, Rewrite):
                asyncio.run(self.spool.rewrite(_same_entry(edit.env, qid), data))
            elif isinstance(edit, Remove):
                self._unlink(qid)
            return edit

    def remove_sync(self, qid: str) -> Removed | None:
        """Delete an entry even when it cannot be read; None when there is no such entry."""
        with self.entry_locks.held(qid):
            try:
                loaded = self._load(qid)
            except Unreadable:
                env = None
            else:
                if loaded is None:
                    return None
                env = loaded[0]
            self._unlink(qid)
            return Removed(env)

    def _load(self, qid: str) -> tuple[Envelope, bytes] | None:
        try:
            return self.spool.load(qid)
        except FileNotFoundError:
            return None
        except (SpoolCorrupt, OSError) as e:
            raise Unreadable(f"entry {qid}: {e}") from e

    def _unlink(self, qid: str) -> None:
        self.spool.path(qid).unlink(missing_ok=True)
        fsync_dir(self.spool.queue_dir)


def _same_entry(env: Envelope, qid: str) -> Envelope:
    if env.id != qid:
        raise ValueError(f"an edit of entry {qid} returned entry {env.id}")
    return env

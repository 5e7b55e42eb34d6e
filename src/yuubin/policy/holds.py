"""Holds on a suspended account's mail: kept in the queue, never sent, never deleted.

Asked by the intake for every submitted message (the account may be suspended while it was in
DATA) and by the outbound queue before every attempt; `hold` puts everything the account has
queued on hold, each entry changed under the queue's entry locks so a delivery result recorded
at the same moment cannot overwrite it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from yuubin.queue.edit import KEEP, Edit, Rewrite, SpoolEditor, Unreadable
from yuubin.queue.spool import Envelope
from yuubin.store import Store, StoreBusy

log = logging.getLogger("yuubin.holds")

REFRESH = 1.0  # seconds between reads of which accounts are suspended, for the queue's checks


async def hold_account_mail(editor: SpoolEditor, account: str, held: bool = True) -> int:
    """Set (or clear) `held` on every queued entry the account submitted; returns how many.

    Each edit goes through the SpoolEditor the scheduler uses, so a delivery result recorded at
    the same moment cannot overwrite the hold. Also used by `yuubin account suspend/enable`.
    """
    async def set_held(env: Envelope, _data: bytes) -> Edit:
        if env.auth != account or env.held == held:
            return KEEP
        env.held = held
        return Rewrite(env)

    count = 0
    for qid in editor.spool.ids():
        try:
            edit = await editor.edit(qid, set_held)  # None: delivered and removed right now
        except Unreadable:
            continue  # torn: set aside at start
        if isinstance(edit, Rewrite):
            count += 1
    return count


class AccountHolds:
    def __init__(self, store: Store, editor: SpoolEditor):
        self.store = store
        self.editor = editor
        # The suspended accounts as last read (off the event loop, every REFRESH seconds): what
        # the queue's synchronous checks use; the intake reads the row itself.
        self.suspended: set[str] = set()
        self._task: asyncio.Task | None = None

    def is_held(self, env: Envelope) -> bool:
        """True when the submitting account is suspended (as of the last refresh): its mail must
        stay on hold."""
        return bool(env.auth) and env.auth in self.suspended

    async def is_held_now(self, env: Envelope) -> bool:
        """The same, read from state.db now (the last refresh when it is locked)."""
        if not env.auth:
            return False
        try:
            row = await self.store.run(self.store.account, env.auth)
        except StoreBusy:
            return self.is_held(env)
        return row is not None and row.suspended

    async def refresh(self) -> None:
        self.suspended = await self.store.run(self.store.suspended_accounts)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refreshing())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _refreshing(self) -> None:
        while True:
            try:
                await self.refresh()
            except StoreBusy as e:
                log.warning('event=holds_refresh_failed error="%s"', e)
            await asyncio.sleep(REFRESH)

    async def hold(self, account: str) -> int:
        """Hold every queued entry the account submitted; returns how many changed."""
        self.suspended.add(account)
        return await hold_account_mail(self.editor, account, True)

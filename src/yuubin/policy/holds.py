"""Holds on a suspended account's mail: kept in the queue, never sent, never deleted.

Asked by the intake for every submitted message (the account may be suspended while it was in
DATA) and by the outbound queue before every attempt; `hold` puts everything the account has
queued on hold, each entry changed under the queue's entry locks so a delivery result recorded
at the same moment cannot overwrite it.
"""

from __future__ import annotations

from yuubin.queue.edit import KEEP, Edit, Rewrite, SpoolEditor, Unreadable
from yuubin.queue.spool import Envelope
from yuubin.store import Store


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

    def is_held(self, env: Envelope) -> bool:
        """True when the submitting account is suspended: its mail must stay on hold."""
        if not env.auth:
            return False
        row = self.store.account(env.auth)
        return row is not None and row.suspended

    async def hold(self, account: str) -> int:
        """Hold every queued entry the account submitted; returns how many changed."""
        return await hold_account_mail(self.editor, account, True)

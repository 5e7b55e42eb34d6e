"""Holds on a suspended account's mail: kept in the queue, never sent, never deleted.

Asked by the intake for every submitted message (the account may be suspended while it was in
DATA) and by the outbound queue before every attempt; `hold` puts everything the account has
queued on hold, each entry changed under the queue's entry locks so a delivery result recorded
at the same moment cannot overwrite it.
"""

from __future__ import annotations

from yuubin.queue.edit import SpoolEditor
from yuubin.queue.spool import Envelope
from yuubin.store import Store


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

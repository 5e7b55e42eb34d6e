"""What admins did with the CLI (accounts, aliases, lockouts, the queue), in the server's log.

The CLI runs in its own process and its stderr is gone once the command returns, so each command
that changes something records it in state.db with who ran it. The running server logs those rows
within `POLL` seconds; a server that was not running logs them at its next start, so the log is
complete either way. Each row is marked once logged (at worst logged twice after a crash, never
lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time

from yuubin.store import AdminAction, Store, StoreBusy

log = logging.getLogger("yuubin.admin")

POLL = 1.0  # seconds between looks at state.db for new admin actions


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class AdminActionLog:
    """Logs the admin actions the CLI recorded, at start and then every `interval` seconds."""

    def __init__(self, store: Store, interval: float = POLL):
        self.store = store
        self.interval = interval
        self._task: asyncio.Task | None = None

    def log_pending(self) -> int:
        """Log every action not logged yet; returns how many."""
        actions = self.store.unlogged_admin_actions()
        for a in actions:
            self._log(a)
        if actions:
            self.store.mark_admin_actions_logged(actions[-1].id, time.time())
        return len(actions)

    @staticmethod
    def _log(a: AdminAction) -> None:
        log.info('event=admin_action action=%s target=%s by=%s at=%s detail="%s"', a.action, a.target, a.actor,
                 _stamp(a.at), _quoted(a.detail))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop polling, after logging what came in meanwhile."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._log_pending_safely()

    async def _run(self) -> None:
        while True:
            await self._log_pending_safely()
            await asyncio.sleep(self.interval)

    async def _log_pending_safely(self) -> None:
        try:
            await self.store.run(self.log_pending)
        except (StoreBusy, sqlite3.Error) as e:  # a busy or broken state.db must not stop the server; try again later
            log.warning('event=admin_log_failed error="%s"', _quoted(str(e)))

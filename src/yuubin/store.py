"""SQLite state (accounts, aliases, auth lockouts, submission counters, admin actions; later reports).

Everything that touches SQL lives here, so another database can take its place when several
hosts share state. WAL mode lets the server read while the CLI writes; each call reads the
current rows, so `account add` takes effect in a running server without a restart.

The file holds password hashes: it is created 0600 before SQLite opens it (its -wal and -shm
files take the same mode from SQLite), and an older, more open one is tightened.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from yuubin.durable import PRIVATE

log = logging.getLogger("yuubin.store")

T = TypeVar("T")
THREADS = 4  # server-side database threads: a read never waits behind a write stuck on a lock
RETRY_EVERY = 1.0  # seconds between tries of a write that found state.db locked

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    address TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created REAL NOT NULL,
    suspended INTEGER NOT NULL DEFAULT 0,
    suspended_by TEXT                 -- SUSPENDED_BY_ADMIN or _LIMIT; NULL when not known (older files)
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (alias, target)
);
CREATE TABLE IF NOT EXISTS auth_failures (
    scope TEXT NOT NULL,              -- "source" (an IP or an IPv6 /64) or "account"
    key TEXT NOT NULL,
    source TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_failures_key ON auth_failures(scope, key, at);
CREATE TABLE IF NOT EXISTS auth_lockouts (
    source TEXT PRIMARY KEY,
    until REAL NOT NULL,
    offences INTEGER NOT NULL,        -- how many times locked: the next lockout doubles
    last REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS auth_known_sources (
    account TEXT NOT NULL,
    source TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (account, source)
);
CREATE TABLE IF NOT EXISTS submissions (
    account TEXT NOT NULL,
    at REAL NOT NULL,
    client TEXT NOT NULL,
    recipients INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS submissions_account ON submissions(account, at);
CREATE TABLE IF NOT EXISTS submission_recipients (
    account TEXT NOT NULL,
    recipient TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS submission_recipients_account ON submission_recipients(account, at);
CREATE TABLE IF NOT EXISTS admin_actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,              -- who ran the command: the sudo user, else the login name
    action TEXT NOT NULL,             -- e.g. "account_suspend", "queue_delete"
    target TEXT NOT NULL,             -- the address, alias, IP or queue id acted on
    detail TEXT NOT NULL DEFAULT '',
    logged REAL                       -- when the server logged it; NULL until then
);
CREATE INDEX IF NOT EXISTS admin_actions_unlogged ON admin_actions(id) WHERE logged IS NULL;
"""


def _tighten(path: Path) -> None:
    """0600 for a state file an older release left more open (only its owner or root may: for
    anyone else this is a no-op, and the owner's next start fixes it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if st.st_mode & 0o777 != 0o600:
        with contextlib.suppress(PermissionError):
            os.chmod(path, 0o600)


# Why an account is suspended: its reply and `account list` say so.
SUSPENDED_BY_ADMIN = "admin"  # `yuubin account suspend`
SUSPENDED_BY_LIMIT = "limit"  # an outbound limit tripped (policy/ratelimit.py)


@dataclass(frozen=True)
class AccountRow:
    address: str
    password_hash: str
    created: float
    suspended: bool
    suspended_by: str = ""  # SUSPENDED_BY_ADMIN, SUSPENDED_BY_LIMIT, or "" when not known


@dataclass(frozen=True)
class AdminAction:
    id: int
    at: float
    actor: str
    action: str
    target: str
    detail: str


class StoreBusy(Exception):
    """state.db did not answer within its busy timeout (locked by another process, or failing)."""


class Store:
    """SQLite state: one connection per thread that uses it.

    The CLI calls the methods directly. The server never does that on its event loop: `run` does
    the call in one of a few threads with a short busy timeout (a locked file then costs the one
    command that needs it a 4xx, never a frozen loop), and `later` keeps a write that must not be
    lost in an ordered queue, retried until state.db takes it.
    """

    def __init__(self, path: Path, busy_timeout: float = 10.0, server_busy_timeout: float = 2.0):
        path.parent.parent.mkdir(parents=True, exist_ok=True)  # not ours: as `mkdir -p` would
        PRIVATE.make_dirs(path.parent)  # the data directory, 0700 when it is made here
        self.path = path
        # Created 0600 only when new: closing a descriptor of a file this process already has open
        # in SQLite would drop SQLite's POSIX locks on it (another Store in the same process).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        _tighten(path)
        self.busy_timeout = busy_timeout  # this (the opening) thread's: the CLI's
        self.server_busy_timeout = server_busy_timeout  # the threads of `run` and `later`
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._opened_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._later: collections.deque[tuple[Callable[[], Any], Callable[[], None] | None]] = collections.deque()
        self._writer: asyncio.Task | None = None
        self.db.execute("PRAGMA journal_mode=WAL")
        for suffix in ("-wal", "-shm"):
            _tighten(Path(f"{path}{suffix}"))
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._add_column("accounts", "suspended_by", "TEXT")

    def _add_column(self, table: str, column: str, decl: str) -> None:
        """Bring a state.db written by an older yuubin up to date; its rows keep their values."""
        if any(r[1] == column for r in self.db.execute(f"PRAGMA table_info({table})")):
            return
        try:
            self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        except sqlite3.OperationalError as e:
            if "duplicate column" not in str(e):  # another process added it just now
                raise

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use)."""
        conn: sqlite3.Connection | None = getattr(self._local, "db", None)
        if conn is None:
            first = not self._opened
            timeout = self.busy_timeout if first or self._pool is None else self.server_busy_timeout
            conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
            if not first:
                conn.execute("PRAGMA synchronous=FULL")
            self._local.db = conn
            with self._opened_lock:
                self._opened.append(conn)
        return conn

    # ---- off the event loop (the server) ----

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(THREADS, thread_name_prefix="state-db")
        return self._pool

    async def run(self, fn: Callable[..., T], *args: Any, wait: float | None = None) -> T:
        """`fn(*args)` (a method of this store, or a function of its methods) in a database thread;
        StoreBusy when state.db stays locked past `wait` seconds (default `server_busy_timeout`)
        or fails."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor(), functools.partial(self._waiting, wait, fn, *args))
        except sqlite3.Error as e:
            raise StoreBusy(str(e)) from e

    def _waiting(self, wait: float | None, fn: Callable[..., T], *args: Any) -> T:
        if wait is None:
            return fn(*args)
        db = self.db
        db.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
        try:
            return fn(*args)
        finally:
            db.execute(f"PRAGMA busy_timeout = {int(self.server_busy_timeout * 1000)}")

    def later(self, fn: Callable[..., Any], *args: Any, done: Callable[[], None] | None = None) -> None:
        """A write that must not be lost: done in order after the ones before it, retried every
        RETRY_EVERY seconds while state.db is locked; `done` is called once it is in."""
        self._later.append((functools.partial(fn, *args), done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_later())

    @property
    def pending_writes(self) -> int:
        return len(self._later)

    async def _write_later(self) -> None:
        loop = asyncio.get_running_loop()
        busy_since: float | None = None
        while self._later:
            call, done = self._later[0]
            try:
                await loop.run_in_executor(self._executor(), call)
            except sqlite3.Error as e:
                if busy_since is None:
                    busy_since = time.monotonic()
                    log.warning('event=state_db_busy pending=%d action=retry error="%s"', len(self._later), e)
                await asyncio.sleep(RETRY_EVERY)
                continue
            self._later.popleft()
            if busy_since is not None:
                log.info("event=state_db_written after=%.1fs", time.monotonic() - busy_since)
                busy_since = None
            if done is not None:
                done()

    async def flush(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for the queued writes; returns how many are still left."""
        if self._writer is not None and not self._writer.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), timeout)
        return len(self._later)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
        if self._later:
            log.error("event=state_db_unwritten count=%d reason=\"not written before the stop\"",
                      len(self._later))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        with self._opened_lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()

    # accounts
    def add_account(self, address: str, password_hash: str) -> None:
        self.db.execute("INSERT INTO accounts(address, password_hash, created) VALUES (?, ?, ?)",
                        (address, password_hash, time.time()))

    def account(self, address: str) -> AccountRow | None:
        row = self.db.execute("SELECT address, password_hash, created, suspended, suspended_by FROM accounts "
                              "WHERE address = ?", (address,)).fetchone()
        return AccountRow(row[0], row[1], row[2], bool(row[3]), row[4] or "") if row else None

    def suspended_accounts(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT address FROM accounts WHERE suspended != 0")}

    def account_exists(self, address: str) -> bool:
        return self.db.execute("SELECT 1 FROM accounts WHERE address = ?", (address,)).fetchone() is not None

    def accounts(self) -> list[AccountRow]:
        rows = self.db.execute("SELECT address, password_hash, created, suspended, suspended_by FROM accounts "
                               "ORDER BY address").fetchall()
        return [AccountRow(r[0], r[1], r[2], bool(r[3]), r[4] or "") for r in rows]

    def set_password(self, address: str, password_hash: str) -> bool:
        return self.db.execute("UPDATE accounts SET password_hash = ? WHERE address = ?",
                               (password_hash, address)).rowcount > 0

    def remove_account(self, address: str) -> bool:
        return self.db.execute("DELETE FROM accounts WHERE address = ?", (address,)).rowcount > 0

    # aliases
    def add_alias(self, alias: str, targets: list[str]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO aliases(alias, target) VALUES (?, ?)",
                                [(alias, t) for t in targets])

    def alias_targets(self, alias: str) -> list[str]:
        rows = self.db.execute("SELECT target FROM aliases WHERE alias = ? ORDER BY target", (alias,))
        return [r[0] for r in rows]

    def aliases(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for alias, target in self.db.execute("SELECT alias, target FROM aliases ORDER BY alias, target"):
            out.setdefault(alias, []).append(target)
        return out

    def remove_alias(self, alias: str) -> bool:
        return self.db.execute("DELETE FROM aliases WHERE alias = ?", (alias,)).rowcount > 0

    # account suspension (compromised-account containment)
    def set_suspended(self, address: str, suspended: bool, by: str = "") -> bool:
        """Suspend (`by` says why: SUSPENDED_BY_ADMIN or _LIMIT) or enable; False when no such account."""
        return self.db.execute("UPDATE accounts SET suspended = ?, suspended_by = ? WHERE address = ?",
                               (int(suspended), (by or None) if suspended else None, address)).rowcount > 0

    # auth guard: failures, lockouts, sources that logged in successfully
    def record_auth_failure(self, scope: str, key: str, source: str, at: float) -> None:
        self.db.execute("INSERT INTO auth_failures(scope, key, source, at) VALUES (?, ?, ?, ?)",
                        (scope, key, source, at))

    def auth_failures_since(self, scope: str, key: str, since: float) -> int:
        return self.db.execute("SELECT COUNT(*) FROM auth_failures WHERE scope = ? AND key = ? AND at > ?",
                               (scope, key, since)).fetchone()[0]

    def auth_failure_sources_since(self, scope: str, key: str, since: float) -> int:
        return self.db.execute("SELECT COUNT(DISTINCT source) FROM auth_failures "
                               "WHERE scope = ? AND key = ? AND at > ?", (scope, key, since)).fetchone()[0]

    def clear_auth_failures(self, scope: str, key: str) -> int:
        return self.db.execute("DELETE FROM auth_failures WHERE scope = ? AND key = ?", (scope, key)).rowcount

    def prune_auth_failures(self, before: float) -> None:
        self.db.execute("DELETE FROM auth_failures WHERE at <= ?", (before,))

    def accounts_with_failures_since(self, since: float) -> list[tuple[str, int, int]]:
        """(account, failures, distinct sources) for accounts that failed within the window."""
        rows = self.db.execute("SELECT key, COUNT(*), COUNT(DISTINCT source) FROM auth_failures "
                               "WHERE scope = 'account' AND at > ? GROUP BY key ORDER BY key", (since,))
        return [(r[0], r[1], r[2]) for r in rows]

    def auth_lockout(self, source: str) -> tuple[float, int, float] | None:
        row = self.db.execute("SELECT until, offences, last FROM auth_lockouts WHERE source = ?",
                              (source,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def set_auth_lockout(self, source: str, until: float, offences: int, last: float) -> None:
        self.db.execute("INSERT INTO auth_lockouts(source, until, offences, last) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(source) DO UPDATE SET until = excluded.until, "
                        "offences = excluded.offences, last = excluded.last", (source, until, offences, last))

    def active_auth_lockouts(self, now: float) -> list[tuple[str, float, int]]:
        rows = self.db.execute("SELECT source, until, offences FROM auth_lockouts WHERE until > ? "
                               "ORDER BY until", (now,))
        return [(r[0], r[1], r[2]) for r in rows]

    def remove_auth_lockout(self, source: str) -> bool:
        return self.db.execute("DELETE FROM auth_lockouts WHERE source = ?", (source,)).rowcount > 0

    def add_known_source(self, account: str, source: str, at: float) -> None:
        self.db.execute("INSERT INTO auth_known_sources(account, source, at) VALUES (?, ?, ?) "
                        "ON CONFLICT(account, source) DO UPDATE SET at = excluded.at", (account, source, at))

    def is_known_source(self, account: str, source: str) -> bool:
        return self.db.execute("SELECT 1 FROM auth_known_sources WHERE account = ? AND source = ?",
                               (account, source)).fetchone() is not None

    # outbound limits per account
    def record_submission(self, account: str, at: float, client: str, recipients: list[str]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO submissions(account, at, client, recipients) VALUES (?, ?, ?, ?)",
                            (account, at, client, len(recipients)))
            self.db.executemany("INSERT INTO submission_recipients(account, recipient, at) VALUES (?, ?, ?)",
                                [(account, r, at) for r in recipients])

    def submissions_since(self, account: str, since: float) -> int:
        return self.db.execute("SELECT COUNT(*) FROM submissions WHERE account = ? AND at > ?",
                               (account, since)).fetchone()[0]

    def submission_recipients_since(self, account: str, since: float) -> set[str]:
        rows = self.db.execute("SELECT DISTINCT recipient FROM submission_recipients "
                               "WHERE account = ? AND at > ?", (account, since))
        return {r[0] for r in rows}

    def submission_clients_since(self, account: str, since: float) -> list[tuple[str, int]]:
        rows = self.db.execute("SELECT client, COUNT(*) FROM submissions WHERE account = ? AND at > ? "
                               "GROUP BY client ORDER BY COUNT(*) DESC", (account, since))
        return [(r[0], r[1]) for r in rows]

    def clear_submissions(self, account: str) -> None:
        """Forget an account's counters (after an admin reviewed and re-enabled it)."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM submissions WHERE account = ?", (account,))
            self.db.execute("DELETE FROM submission_recipients WHERE account = ?", (account,))

    def prune_submissions(self, before: float) -> None:
        self.db.execute("DELETE FROM submissions WHERE at <= ?", (before,))
        self.db.execute("DELETE FROM submission_recipients WHERE at <= ?", (before,))

    # admin actions: written by the CLI, logged by the server (at once, or at its next start)
    def record_admin_action(self, actor: str, action: str, target: str, detail: str = "") -> None:
        self.db.execute("INSERT INTO admin_actions(at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                        (time.time(), actor, action, target, detail))

    def unlogged_admin_actions(self, limit: int = 1000) -> list[AdminAction]:
        rows = self.db.execute("SELECT id, at, actor, action, target, detail FROM admin_actions "
                               "WHERE logged IS NULL ORDER BY id LIMIT ?", (limit,))
        return [AdminAction(*r) for r in rows]

    def mark_admin_actions_logged(self, through: int, at: float) -> None:
        """Every action up to id `through` is in the log (ids only grow: later ones stay unlogged)."""
        self.db.execute("UPDATE admin_actions SET logged = ? WHERE logged IS NULL AND id <= ?", (at, through))

"""SQLite state (accounts, aliases, auth lockouts, submission counters, admin actions, DMARC reports).

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
from typing import TYPE_CHECKING, Any, TypeVar

from yuubin.config import ConfigError
from yuubin.durable import PRIVATE

if TYPE_CHECKING:
    from yuubin.mailauth.reports import AggregateReport

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
CREATE TABLE IF NOT EXISTS greylist (
    triplet TEXT PRIMARY KEY,         -- client network, sender, recipient
    first REAL NOT NULL,              -- when it was first refused
    passed REAL                       -- when a retry was accepted (then remembered for greylist.ttl)
);
CREATE TABLE IF NOT EXISTS greylist_clients (
    network TEXT PRIMARY KEY,         -- a client network that retried once: not greylisted again
    until REAL NOT NULL
);
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
CREATE TABLE IF NOT EXISTS dmarc_reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    org_name TEXT NOT NULL,           -- the reporting organisation
    report_id TEXT NOT NULL,
    policy_domain TEXT NOT NULL,      -- the domain whose published policy the report is about
    email TEXT NOT NULL DEFAULT '',   -- the reporter's contact
    date_begin INTEGER NOT NULL,      -- the period covered, seconds since the epoch (UTC)
    date_end INTEGER NOT NULL,
    policy TEXT NOT NULL DEFAULT '',  -- the published policy as the reporter saw it: "p=reject sp=none ..."
    format TEXT NOT NULL,             -- "rfc7489" or "rfc9990"
    received REAL NOT NULL,
    queue_id TEXT NOT NULL DEFAULT '',  -- the mail it came in (kept in postmaster's mailbox)
    UNIQUE (org_name, report_id, policy_domain)  -- a report sent twice is stored once
);
CREATE INDEX IF NOT EXISTS dmarc_reports_end ON dmarc_reports(date_end);
CREATE TABLE IF NOT EXISTS dmarc_rows (
    report INTEGER NOT NULL,          -- dmarc_reports.id
    source_ip TEXT NOT NULL,
    count INTEGER NOT NULL,
    disposition TEXT NOT NULL,        -- what the receiver did: none, quarantine, reject (or pass)
    dkim TEXT NOT NULL,               -- the DMARC-aligned results: pass or fail
    spf TEXT NOT NULL,
    header_from TEXT NOT NULL,
    envelope_from TEXT NOT NULL DEFAULT '',
    auth TEXT NOT NULL DEFAULT ''     -- the raw DKIM/SPF results: "dkim=pass d=x s=y; spf=fail d=z"
);
CREATE INDEX IF NOT EXISTS dmarc_rows_report ON dmarc_rows(report);
"""


# PRAGMA user_version of the state.db this release writes. A change that CREATE TABLE IF NOT
# EXISTS cannot make (a new column, a changed meaning) gets the next number and a step in
# MIGRATIONS; tests/fixtures/ keeps each released version's DDL to migrate from.
SCHEMA_VERSION = 1


class SchemaError(ConfigError):
    """state.db cannot be used by this release (a newer schema)."""


def _statements(script: str) -> list[str]:
    """The DDL one statement at a time (executescript would commit our transaction)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return [st for st in out if st]


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
class DmarcRow:
    """One source's row of a stored DMARC aggregate report, with its report's facts."""

    org_name: str
    report_id: str
    policy_domain: str
    date_begin: int
    date_end: int
    source_ip: str
    count: int
    disposition: str
    dkim: str
    spf: str
    header_from: str
    envelope_from: str
    auth: str


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
        self._migrate()

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION (PRAGMA user_version), in one write transaction so
        that a worker or an admin command opening it at the same time waits instead of racing.

        A file from a newer yuubin is refused: its tables may mean things this release does not
        know, and writing them would lose data silently. Version 0 is a new file or one written
        before the version was kept (release 0.1.0: SCHEMA_V1's tables, perhaps without
        accounts.suspended_by)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SchemaError(f"{self.path}: schema version {version} was written by a newer yuubin (this "
                                  f"one knows up to {SCHEMA_VERSION}); run that release, or restore a backup "
                                  "made with this one (yuubin never downgrades a state.db)")
            for statement in _statements(SCHEMA):  # CREATE ... IF NOT EXISTS: new tables of any version
                self.db.execute(statement)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[target](self)
            if version != SCHEMA_VERSION:
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.schema_from = version  # what the file was before this start (logged by the server)

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _to_v1(self) -> None:
        """0.1.0 files: accounts.suspended_by came late in that release."""
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

    def backup_to(self, dest: Path) -> None:
        """A consistent copy of the whole database while others write (SQLite online backup API),
        created 0600 and fsynced."""
        with contextlib.suppress(FileExistsError):
            os.close(os.open(dest, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        target = sqlite3.connect(dest)
        try:
            self.db.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        finally:
            target.close()
        fd = os.open(dest, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
    # greylisting
    def greylist_entry(self, triplet: str) -> tuple[float, float | None] | None:
        row = self.db.execute("SELECT first, passed FROM greylist WHERE triplet = ?", (triplet,)).fetchone()
        return (row[0], row[1]) if row else None

    def set_greylist_entry(self, triplet: str, first: float, passed: float | None) -> None:
        self.db.execute("INSERT INTO greylist (triplet, first, passed) VALUES (?, ?, ?) ON CONFLICT(triplet) "
                        "DO UPDATE SET first = excluded.first, passed = excluded.passed", (triplet, first, passed))

    def greylist_client_until(self, network: str) -> float | None:
        row = self.db.execute("SELECT until FROM greylist_clients WHERE network = ?", (network,)).fetchone()
        return row[0] if row else None

    def set_greylist_client(self, network: str, until: float) -> None:
        self.db.execute("INSERT INTO greylist_clients (network, until) VALUES (?, ?) ON CONFLICT(network) "
                        "DO UPDATE SET until = excluded.until", (network, until))

    def prune_greylist(self, unpassed_before: float, passed_before: float, now: float) -> None:
        self.db.execute("DELETE FROM greylist WHERE (passed IS NULL AND first < ?) OR passed < ?",
                        (unpassed_before, passed_before))
        self.db.execute("DELETE FROM greylist_clients WHERE until < ?", (now,))

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

    # DMARC aggregate reports (mailauth/capture.py stores them; `yuubin dmarc report` reads them)
    def add_dmarc_report(self, report: AggregateReport, received: float, queue_id: str = "") -> bool:
        """Store a parsed report with its rows in one transaction; False when the same report
        (organisation, report id, policy domain) is already stored."""
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute(
                "INSERT OR IGNORE INTO dmarc_reports(org_name, report_id, policy_domain, email, date_begin, date_end, "
                "policy, format, received, queue_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (report.org_name, report.report_id, report.policy.domain, report.email, report.begin, report.end,
                 report.policy.text(), report.format, received, queue_id))
            if cur.rowcount == 0:
                return False
            rid = cur.lastrowid
            self.db.executemany(
                "INSERT INTO dmarc_rows(report, source_ip, count, disposition, dkim, spf, header_from, envelope_from, "
                "auth) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(rid, r.source_ip, r.count, r.disposition, r.dkim, r.spf, r.header_from, r.envelope_from,
                  "; ".join(f"{a.method}={a.result} d={a.domain}" + (f" s={a.selector}" if a.selector else "")
                            for a in r.auth)) for r in report.rows])
        return True

    def dmarc_rows(self, since: float, domain: str | None = None) -> list[DmarcRow]:
        """Rows of the reports whose period ends after `since`; with `domain`, only those about it
        (the policy domain, or mail whose From: is that domain or one of its subdomains)."""
        sql = ("SELECT r.org_name, r.report_id, r.policy_domain, r.date_begin, r.date_end, w.source_ip, w.count, "
               "w.disposition, w.dkim, w.spf, w.header_from, w.envelope_from, w.auth "
               "FROM dmarc_rows w JOIN dmarc_reports r ON r.id = w.report WHERE r.date_end >= ?")
        args: list[object] = [since]
        if domain:
            sql += " AND (r.policy_domain = ? OR w.header_from = ? OR w.header_from LIKE ? ESCAPE '\\')"
            escaped = domain.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args += [domain, domain, f"%.{escaped}"]
        sql += " ORDER BY r.org_name, w.source_ip, r.date_begin"
        return [DmarcRow(*row) for row in self.db.execute(sql, args)]

# Each step brings a file of the version before it to this one (key = the version reached).
MIGRATIONS = {1: Store._to_v1}

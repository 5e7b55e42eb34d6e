"""SQLite state (accounts, aliases; later lockouts, rate counters, reports).

Everything that touches SQL lives here, so another database can take its place when several
hosts share state. WAL mode lets the server read while the CLI writes; each call reads the
current rows, so `account add` takes effect in a running server without a restart.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    address TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created REAL NOT NULL,
    suspended INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (alias, target)
);
"""


@dataclass(frozen=True)
class AccountRow:
    address: str
    password_hash: str
    created: float
    suspended: bool


class Store:
    """One SQLite connection; not shared across threads."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=10.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # accounts
    def add_account(self, address: str, password_hash: str) -> None:
        self.db.execute("INSERT INTO accounts(address, password_hash, created) VALUES (?, ?, ?)",
                        (address, password_hash, time.time()))

    def account(self, address: str) -> AccountRow | None:
        row = self.db.execute("SELECT address, password_hash, created, suspended FROM accounts "
                              "WHERE address = ?", (address,)).fetchone()
        return AccountRow(row[0], row[1], row[2], bool(row[3])) if row else None

    def account_exists(self, address: str) -> bool:
        return self.db.execute("SELECT 1 FROM accounts WHERE address = ?", (address,)).fetchone() is not None

    def accounts(self) -> list[AccountRow]:
        rows = self.db.execute("SELECT address, password_hash, created, suspended FROM accounts "
                               "ORDER BY address").fetchall()
        return [AccountRow(r[0], r[1], r[2], bool(r[3])) for r in rows]

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

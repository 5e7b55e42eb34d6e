"""state.db across versions: a file an older yuubin wrote opens and keeps its rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from yuubin.store import SUSPENDED_BY_ADMIN, SUSPENDED_BY_LIMIT, Store

# The accounts table before the suspension's reason was stored.
OLD_ACCOUNTS = """
CREATE TABLE accounts (
    address TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created REAL NOT NULL,
    suspended INTEGER NOT NULL DEFAULT 0
);
INSERT INTO accounts VALUES ('alice@example.test', '$argon2id$x', 1700000000.0, 1);
INSERT INTO accounts VALUES ('bob@example.test', '$argon2id$y', 1700000000.0, 0);
"""


def test_an_older_state_db_opens_and_learns_why_accounts_are_suspended(tmp_path: Path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_ACCOUNTS)
    db.close()
    store = Store(path)
    alice = store.account("alice@example.test")
    assert alice is not None and alice.suspended and alice.suspended_by == ""  # suspended, reason not known
    assert store.set_suspended("bob@example.test", True, SUSPENDED_BY_ADMIN)
    assert store.account("bob@example.test").suspended_by == SUSPENDED_BY_ADMIN
    assert store.set_suspended("bob@example.test", False)
    bob = store.account("bob@example.test")
    assert not bob.suspended and bob.suspended_by == ""  # enabling forgets the reason
    store.close()
    again = Store(path)  # opening it twice (the server and the CLI) adds the column once
    assert again.set_suspended("alice@example.test", True, SUSPENDED_BY_LIMIT)
    assert [(a.address, a.suspended_by) for a in again.accounts()] == [
        ("alice@example.test", SUSPENDED_BY_LIMIT), ("bob@example.test", "")]
    again.close()

"""Backups while running, restore into a new data_dir, and state.db's schema version.

The end-to-end test backs up a real `yuubin serve` in the middle of a bounded SMTP load, restores
into a new data_dir and starts a server there: every message acknowledged before the backup
began is delivered from it, and every account is there.
"""

from __future__ import annotations

import json
import os
import smtplib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.harness import ACCOUNTS, ServerConfig, free_port, run_yuubin
from yuubin.backup import BackupError, backup, restore
from yuubin.store import SCHEMA_VERSION, SchemaError, Store

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# ---- schema versions ----------------------------------------------------------------------------


def _v1_file(path: Path, without_suspended_by: bool = False) -> None:
    """A state.db as release 0.1.0 made it, from its DDL kept in tests/fixtures, with some rows."""
    ddl = (FIXTURES / "state_v1.sql").read_text()
    if without_suspended_by:  # the earliest 0.1.0 files
        ddl = ddl.replace("suspended INTEGER NOT NULL DEFAULT 0,", "suspended INTEGER NOT NULL DEFAULT 0")
        ddl = ddl.replace("    suspended_by TEXT                 -- SUSPENDED_BY_ADMIN or _LIMIT; NULL when not known "
                          "(older files)\n", "")
    db = sqlite3.connect(path)
    db.executescript(ddl)
    columns = "address, password_hash, created, suspended" + ("" if without_suspended_by else ", suspended_by")
    values = "'alice@example.test', 'hash-a', 1.0, 1" + ("" if without_suspended_by else ", 'admin'")
    db.execute(f"INSERT INTO accounts({columns}) VALUES ({values})")
    db.execute("INSERT INTO aliases(alias, target) VALUES ('info@example.test', 'alice@example.test')")
    db.commit()
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()


@pytest.mark.parametrize("earliest", [False, True])
def test_a_state_db_of_the_previous_release_migrates_forward_keeping_its_rows(tmp_path, earliest):
    path = tmp_path / "state.db"
    _v1_file(path, without_suspended_by=earliest)
    store = Store(path)
    try:
        assert store.schema_from == 0 and store.schema_version() == SCHEMA_VERSION
        row = store.account("alice@example.test")
        assert row is not None and row.password_hash == "hash-a" and row.suspended
        assert row.suspended_by == ("" if earliest else "admin")
        assert store.alias_targets("info@example.test") == ["alice@example.test"]
        store.add_account("bob@example.test", "hash-b")
    finally:
        store.close()
    again = Store(path)  # the second start has nothing to do
    try:
        assert again.schema_from == SCHEMA_VERSION
        assert [a.address for a in again.accounts()] == ["alice@example.test", "bob@example.test"]
    finally:
        again.close()


def test_a_new_state_db_gets_the_current_version(tmp_path):
    store = Store(tmp_path / "state.db")
    try:
        assert store.schema_version() == SCHEMA_VERSION
    finally:
        store.close()


def test_a_state_db_from_a_newer_release_is_refused_never_downgraded(tmp_path, make_config):
    config = make_config()
    path = config.write()
    cfg = config.load()
    Store(cfg.state_db).close()
    db = sqlite3.connect(cfg.state_db)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SchemaError, match="newer yuubin"):
        Store(cfg.state_db)
    for args in (["serve"], ["account", "list"]):
        p = run_yuubin(args, config=path, timeout=30)
        assert p.returncode == 2, (args, p.stderr)
        assert f"schema version {SCHEMA_VERSION + 1} was written by a newer yuubin" in p.stderr
        assert "Traceback" not in p.stderr and "event=listening" not in p.stderr
    db = sqlite3.connect(cfg.state_db)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1  # untouched
    db.close()


# ---- backup and restore, unit ---------------------------------------------------------------------


def _data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    store = Store(data / "state.db")
    store.add_account("alice@example.test", "hash-a")
    store.close()
    maildir = data / "mail" / "example.test" / "alice"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new" / "1.a").write_bytes(b"Subject: one\r\n\r\nnew\r\n")
    (maildir / "cur" / "2.b:2,S").write_bytes(b"Subject: two\r\n\r\nseen\r\n")
    (maildir / "tmp" / "3.c").write_bytes(b"Subject: thr")  # being written: never copied
    (data / "spool" / "queue").mkdir(parents=True)
    (data / "spool" / "tmp").mkdir(parents=True)
    (data / "dkim" / "example.test").mkdir(parents=True)
    (data / "dkim" / "example.test" / "y2026a-rsa.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    return data


def test_backup_links_maildir_files_skips_tmp_and_half_written_spool_entries(tmp_path):
    from yuubin.queue.spool import Envelope
    data = _data_dir(tmp_path)
    env = Envelope(id="q1", sender="a@remote.example", mail_params={},
                   local=[("alice@example.test", "alice@example.test")], remote=[],
                   received=1.0, client="127.0.0.1", helo="client.example", listener="mx")
    body = b"Subject: queued\r\n\r\nbody\r\n"
    env.size = len(body)
    (data / "spool" / "queue" / "q1").write_bytes(env.encode() + body)
    (data / "spool" / "queue" / "q2").write_bytes((env.encode() + body)[:-5])  # still being written
    (data / "spool" / "tmp" / "q3").write_bytes(b"partial")
    result = backup(data, tmp_path / "b")
    assert result.skipped_incomplete == 1
    names = sorted(e["path"] for e in result.entries)
    assert names == ["dkim/example.test/y2026a-rsa.key", "mail/example.test/alice/cur/2.b:2,S",
                     "mail/example.test/alice/new/1.a", "spool/queue/q1", "state.db"]
    assert result.linked == 2
    src = data / "mail" / "example.test" / "alice" / "new" / "1.a"
    assert (tmp_path / "b" / "mail" / "example.test" / "alice" / "new" / "1.a").stat().st_ino == src.stat().st_ino
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION and len(manifest["files"]) == 5
    copied = backup(data, tmp_path / "c", copy=True)
    assert copied.linked == 0
    assert (tmp_path / "c" / "mail" / "example.test" / "alice" / "new" / "1.a").stat().st_ino != src.stat().st_ino

    count = restore(tmp_path / "b", tmp_path / "restored")
    assert count == 5
    restored = tmp_path / "restored"
    assert (restored / "dkim" / "example.test" / "y2026a-rsa.key").read_bytes() == b"-----BEGIN PRIVATE KEY-----\n"
    assert (restored / "spool" / "queue" / "q1").read_bytes() == env.encode() + body
    assert not (restored / "spool" / "queue" / "q2").exists()
    assert oct(restored.stat().st_mode & 0o777) == oct(0o700)
    store = Store(restored / "state.db")
    try:
        assert store.account_exists("alice@example.test")
    finally:
        store.close()


def test_restore_refuses_a_damaged_backup_a_used_directory_and_a_newer_schema(tmp_path):
    data = _data_dir(tmp_path)
    backup(data, tmp_path / "b")
    with pytest.raises(BackupError, match="not an empty directory"):
        backup(data, tmp_path / "b")
    with pytest.raises(BackupError, match="not an empty directory"):
        restore(tmp_path / "b", data)
    with pytest.raises(BackupError, match=r"no manifest\.json"):
        restore(tmp_path / "data", tmp_path / "new")
    (tmp_path / "b" / "mail" / "example.test" / "alice" / "new" / "1.a").unlink()
    with pytest.raises(BackupError, match="missing"):
        restore(tmp_path / "b", tmp_path / "new1")
    backup(data, tmp_path / "b2", copy=True)
    (tmp_path / "b2" / "mail" / "example.test" / "alice" / "new" / "1.a").write_bytes(b"Subject: one\r\n\r\nNEW\r\n")
    with pytest.raises(BackupError, match="differs"):
        restore(tmp_path / "b2", tmp_path / "new2")
    backup(data, tmp_path / "b3")
    manifest = json.loads((tmp_path / "b3" / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "b3" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackupError, match="newer than this yuubin"):
        restore(tmp_path / "b3", tmp_path / "new3")
    assert not (tmp_path / "new1").exists() or not any((tmp_path / "new1").iterdir())


# ---- end to end: backup during load, restore, serve from the copy ------------------------------------


@pytest.mark.slow
def test_backup_during_smtp_load_then_restore_has_every_accepted_message_and_account(
        tmp_path, make_config, serve_process, dns_server):
    # nowhere.test's MX takes no connections: mail to it is deferred and stays in the spool.
    dns_server.add("nowhere.test", "MX", "10 mx.nowhere.test.")
    dns_server.add("mx.nowhere.test", "A", "127.1.9.9")
    closed_port = free_port("127.1.9.9")
    config = make_config(outbound={"retry_first": "1h", "port": closed_port}).add_accounts(cached=True)
    srv = serve_process(config)
    accepted: list[tuple[float, str, str]] = []  # (when the 250 came, subject, recipient)
    lock = threading.Lock()
    backup_started = threading.Event()
    stop = threading.Event()

    def client(n: int) -> None:
        for i in range(40):
            if stop.is_set():
                return
            subject = f"load-{n}-{i}"
            # Every fourth to a remote domain with no MX: it stays queued in the spool.
            rcpt = f"someone{n}@nowhere.test" if i % 4 == 3 else ("alice@example.test" if n % 2 else "bob@example.test")
            with smtplib.SMTP("127.0.0.1", srv.port(), timeout=30) as s:
                s.sendmail("sender@example.test", [rcpt], f"Subject: {subject}\r\n\r\n{subject}\r\n".encode())
            with lock:
                accepted.append((time.monotonic(), subject, rcpt))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(accepted) < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(accepted) >= 30, "the load did not get going"
    started = time.monotonic()
    backup_started.set()
    p = run_yuubin(["backup", str(tmp_path / "backup")], config=srv.config_path, timeout=120)
    finished = time.monotonic()
    for t in threads:
        t.join(60)
    assert p.returncode == 0, p.stderr
    assert "backup of" in p.stdout
    with lock:
        before = [(subject, rcpt) for at, subject, rcpt in accepted if at < started]
        during = [(subject, rcpt) for at, subject, rcpt in accepted if started <= at < finished]
    assert during, "the backup did not overlap the load"
    assert len(before) >= 30 and len(accepted) == 160
    assert srv.stop(30) == 0

    restored = tmp_path / "restored"
    r = run_yuubin(["restore", str(tmp_path / "backup"), "--dir", str(restored)])
    assert r.returncode == 0, r.stderr
    text = {}
    for path in restored.rglob("*"):
        if path.is_file() and path.name not in ("state.db", "manifest.json"):
            text[path] = path.read_bytes()
    found = {s for s, _r in before + during for body in text.values() if f"Subject: {s}\r\n".encode() in body}
    missing = [s for s, _r in before if s not in found]
    assert not missing, f"{len(missing)} messages acknowledged before the backup are not in it: {missing[:5]}"
    for path, body in text.items():  # nothing half-written: each file ends with its own subject line
        assert body.endswith(b"\r\n") and b"load-" in body, path

    # A server on the restored data_dir has every account and delivers what was in the spool.
    config2 = ServerConfig(tmp_path / "second", dns_port=dns_server.port, data_dir=str(restored),
                           outbound={"retry_first": "1h", "port": closed_port})
    srv2 = serve_process(config2)
    local_before = [(s, r) for s, r in before if r.endswith("@example.test")]
    for mailbox in ("alice@example.test", "bob@example.test"):
        want = {s for s, r in local_before if r == mailbox}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            got = {s for s in want if any(f"Subject: {s}\r\n".encode() in m for m in srv2.delivered(mailbox))}
            if got == want:
                break
            time.sleep(0.05)
        assert got == want, (mailbox, sorted(want - got)[:5])
    queued = b"".join(p.read_bytes() for p in srv2.queue_entries())
    for s, r in before:
        if r.endswith("@nowhere.test"):
            assert f"Subject: {s}\r\n".encode() in queued, s
    assert srv2.stop(30) == 0
    store = Store(restored / "state.db")
    try:
        assert {a.address for a in store.accounts()} == set(ACCOUNTS)
    finally:
        store.close()
    assert os.stat(restored).st_mode & 0o077 == 0

"""Who may read what yuubin writes, checked with os.stat on the files a real server wrote.

state.db (password hashes) is 0600 and the data directories 0700; mail is private unless
[mail] shares it with a reader such as Dovecot or a backup job (a group: directories 0750,
files 0640; an owner; a mode), and then exactly so, whatever the process's umask.
"""

from __future__ import annotations

import grp
import os
import pwd
import smtplib
import sqlite3
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import BASE_CONFIG, RunningServer, ServerConfig, run_yuubin
from yuubin.config import ConfigError, check_mail_access, describe, from_dict
from yuubin.delivery.maildir import JUNK, Maildirs
from yuubin.durable import FileAccess

ALICE = "alice@example.test"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="giving files to the Debian group/user \"mail\" (chown) needs root")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """A restrictive umask, as systemd's UMask=0077: [mail] modes must hold regardless."""
    old = os.umask(0o077)
    yield
    os.umask(old)


@pytest.fixture
def common_umask() -> Iterator[None]:
    """The usual 0022: without care, files and directories would come out 0644 / 0755."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def deliver(srv: RunningServer, rcpt: str = ALICE) -> Path:
    """Send one message over the mx port; the path of its file in the Maildir's new/."""
    with smtplib.SMTP("127.0.0.1", srv.port("mx"), local_hostname="lan.example", timeout=10) as s:
        s.sendmail("someone@remote.example", [rcpt], b"Subject: modes\r\n\r\nhello\r\n")
    srv.wait_delivered(rcpt, 1)
    (path,) = (srv.maildir(rcpt) / "new").iterdir()
    return path


def maildir_dirs(srv: RunningServer, mailbox: str = ALICE) -> list[Path]:
    """mail/, the domain directory, the Maildir and its tmp/, new/, cur/."""
    box = srv.maildir(mailbox)
    return [srv.config.mail_dir, box.parent, box, box / "tmp", box / "new", box / "cur"]


def spool_dirs(srv: RunningServer) -> list[Path]:
    spool = srv.config.spool_dir
    return [spool, spool / "queue", spool / "tmp", spool / "corrupt"]


def state_files(srv: RunningServer) -> list[Path]:
    db = srv.config.state_db
    return [db, Path(f"{db}-wal"), Path(f"{db}-shm")]


def test_a_new_server_keeps_state_db_spool_and_mail_private(common_umask, cached_hashes, make_server):
    srv = make_server(accounts={ALICE: "Tangerine-orbit-71-quasar"})
    message = deliver(srv)
    assert mode(srv.config.data_dir) == 0o700
    for d in spool_dirs(srv) + maildir_dirs(srv):
        assert mode(d) == 0o700, d
    for f in state_files(srv):  # SQLite gives -wal and -shm the main file's mode
        assert mode(f) == 0o600, f
    assert mode(message) == 0o600


def test_an_older_more_open_install_is_tightened_at_start(common_umask, cached_hashes, make_server, tmp_path):
    data = tmp_path / "data"
    for d in (data, data / "spool", data / "spool" / "queue", data / "mail"):
        d.mkdir()
        d.chmod(0o755)
    db = sqlite3.connect(data / "state.db")  # as an older release left it: 0644 by the umask
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    for f in (data / "state.db", data / "state.db-wal", data / "state.db-shm"):
        f.chmod(0o644)
    srv = make_server(accounts={ALICE: "Tangerine-orbit-71-quasar"}, data_dir=data)
    db.close()
    assert mode(data) == 0o700
    for d in [*spool_dirs(srv), srv.config.mail_dir]:
        assert mode(d) == 0o700, d
    for f in state_files(srv):
        assert mode(f) == 0o600, f


def test_account_add_before_the_first_start_makes_a_private_state_db(common_umask, make_config, tmp_path):
    data = tmp_path / "srv" / "yuubin"
    path = make_config(data_dir=str(data)).write()
    r = run_yuubin(["account", "add", ALICE], config=path, stdin="Tangerine-orbit-71-quasar\n")
    assert r.returncode == 0, r.stderr
    assert mode(data) == 0o700
    assert mode(data / "state.db") == 0o600
    assert mode(data.parent) == 0o755  # not yuubin's: made as `mkdir -p` would, a reader may pass


@needs_root
def test_a_mail_group_lets_a_reader_in_whatever_the_umask(umask, cached_hashes, make_server):
    gid = grp.getgrnam("mail").gr_gid
    srv = make_server(accounts={ALICE: "Tangerine-orbit-71-quasar"}, mail={"group": "mail"})
    message = deliver(srv)
    data = srv.config.data_dir
    assert (mode(data), os.stat(data).st_gid) == (0o750, gid)  # the reader may pass through to mail/
    for d in maildir_dirs(srv):
        assert (mode(d), os.stat(d).st_gid) == (0o750, gid), d
    assert (mode(message), os.stat(message).st_gid) == (0o640, gid)
    assert os.stat(message).st_uid == os.geteuid()  # no owner given: yuubin's own
    for d in spool_dirs(srv):  # the spool and the passwords stay yuubin's alone
        assert mode(d) == 0o700, d
    for f in state_files(srv):
        assert mode(f) == 0o600, f


@needs_root
def test_a_mail_owner_and_mode_for_a_reader_that_also_moves_and_flags(umask, cached_hashes, make_server):
    user = pwd.getpwnam("mail")  # Debian's user "mail" (group "mail"), as Dovecot's vmail would be
    srv = make_server(accounts={ALICE: "Tangerine-orbit-71-quasar"}, mail={"owner": "mail", "mode": "0660"})
    message = deliver(srv)
    st = os.stat(message)
    assert (mode(message), st.st_uid, st.st_gid) == (0o660, user.pw_uid, user.pw_gid)
    for d in maildir_dirs(srv):
        st = os.stat(d)
        assert (mode(d), st.st_uid, st.st_gid) == (0o770, user.pw_uid, user.pw_gid), d
    data = os.stat(srv.config.data_dir)
    assert (mode(srv.config.data_dir), data.st_uid, data.st_gid) == (0o750, os.geteuid(), user.pw_gid)


@needs_root
def test_a_junk_folder_gets_the_mail_access_too(umask, tmp_path):
    gid = grp.getgrnam("mail").gr_gid
    maildirs = Maildirs(tmp_path / "mail", "mx.test.example", FileAccess(0o640, gid=gid))
    folder = maildirs.ensure(ALICE, JUNK)
    for d in (folder, folder / "tmp", folder / "new", folder / "cur"):
        assert (mode(d), os.stat(d).st_gid) == (0o750, gid), d
    marker = folder / "maildirfolder"
    assert (mode(marker), os.stat(marker).st_gid) == (0o640, gid)


# ---- the [mail] keys: errors name the key, at `config check` as at start -------------------------


def config(mail: dict[str, str]) -> dict:
    return {**BASE_CONFIG, "data_dir": "/nonexistent", "mail": mail}


@pytest.mark.parametrize(("mail", "message"), [
    ({"group": "no-such-group"}, "mail.group: no group named 'no-such-group' on this host"),
    ({"owner": "no-such-user"}, "mail.owner: no user named 'no-such-user' on this host"),
    ({"mode": "rw-r-----"}, "mail.mode: expected an octal file mode like \"0640\""),
    ({"mode": "0640"}, "mail.mode: '0640' gives the group access, but mail.group is not set"),
    ({"group": "mail", "mode": "0644"}, "mail.mode: other users must get no access"),
    ({"group": "mail", "mode": "0440"}, "mail.mode: the owner must be able to read and write"),
    ({"grup": "mail"}, "mail.grup: unknown key"),
])
def test_bad_mail_settings_name_the_key(mail, message):
    with pytest.raises(ConfigError) as e:
        from_dict(config(mail))
    assert str(e.value).startswith(message), str(e.value)


def test_config_check_refuses_an_unknown_group_with_exit_2(tmp_path):
    path = ServerConfig(tmp_path, mail={"group": "dovcot"}).write()
    r = run_yuubin(["config", "check"], config=path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"yuubin: error: {path}: mail.group: no group named 'dovcot' on this host"


def test_the_mail_defaults_follow_the_group():
    assert (from_dict(config({})).mail.mode, from_dict(config({})).mail.gid) == (0o600, -1)
    shared = from_dict(config({"group": "mail"})).mail
    assert (shared.mode, shared.gid) == (0o640, grp.getgrnam("mail").gr_gid)
    owned = from_dict(config({"owner": "mail"})).mail  # the owner's group, but no access for it by default
    assert (owned.mode, owned.uid, owned.group) == (0o600, pwd.getpwnam("mail").pw_uid, "mail")


def test_config_check_prints_the_effective_mail_settings_and_they_load_the_same():
    cfg = from_dict(config({"group": "mail"}))
    text = describe(cfg)
    assert tomllib.loads(text)["mail"] == {"owner": "", "group": "mail", "mode": "0640"}
    assert from_dict(tomllib.loads(text)).mail == cfg.mail


def test_a_group_or_owner_that_is_not_ours_to_give_is_a_config_error(monkeypatch):
    """Not root: chown to another user is refused, chgrp only to a group the user is in."""
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(os, "getegid", lambda: 4242)
    monkeypatch.setattr(os, "getgroups", lambda: [4242])
    with pytest.raises(ConfigError, match=r"^mail\.group: yuubin runs as uid 4242, who is not in group 'mail'"):
        check_mail_access(from_dict(config({"group": "mail"})))
    with pytest.raises(ConfigError, match=r"^mail\.owner: giving mail files to 'mail' needs root"):
        check_mail_access(from_dict(config({"owner": "mail"})))
    check_mail_access(from_dict(config({})))  # nothing to give: fine for anyone

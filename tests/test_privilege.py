"""Least privilege: `serve` started as root binds its ports, then runs as `[server] user`.

End to end as root (the CI runs as root): the server process's uid, gid and capabilities are
read from /proc, and it still takes and delivers mail. Root without a user is refused.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ServerConfig, run_yuubin
from yuubin.config import RunAs
from yuubin.privilege import PrivilegeError, capabilities, must_drop, warn_open_files

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (the CI runs as root)")


def _proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user named nobody on this host")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="yuubin-privilege-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, uid, gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), uid, gid)


@needs_root
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_as_root_runs_as_the_user_without_capabilities_and_delivers(open_dir, nobody, dns_server,
                                                                           serve_process, workers):
    config = ServerConfig(open_dir, dns_port=dns_server.port, server={"user": "nobody", "workers": workers})
    config.write()
    config.add_accounts({"alice@example.test": "correct horse battery staple"}, cached=True)
    data_dir = config.load().data_dir
    _chown_tree(data_dir, nobody.pw_uid, nobody.pw_gid)  # the admin's (or `yuubin init`'s) part
    srv = serve_process(config)
    text = srv.log_text()
    assert f"event=privileges_dropped user=nobody uid={nobody.pw_uid}" in text
    pids = [srv.pid]
    if workers > 1:
        pids += [int(p) for p in re.search(r"event=workers_started workers=2 pids=([\d,]+)", text).group(1).split(",")]
    for pid in pids:
        status = _proc_status(pid)
        assert status["Uid"].split() == [str(nobody.pw_uid)] * 4, (pid, status["Uid"])
        assert status["Gid"].split() == [str(nobody.pw_gid)] * 4, (pid, status["Gid"])
        for cap in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
            assert int(status[cap], 16) == 0, (pid, cap, status[cap])
        assert "0" not in status["Groups"].split(), status["Groups"]
    # The config file is 0644 here: a warning at start, naming it.
    assert re.search(rf"reason=world_readable path={re.escape(str(config.path))} mode=0644", text), text
    with smtplib.SMTP("127.0.0.1", srv.port(), timeout=10) as s:
        s.sendmail("sender@remote.example", ["alice@example.test"], b"Subject: dropped\r\n\r\nstill works\r\n")
    (msg,) = srv.wait_delivered("alice@example.test", 1)
    assert b"still works" in msg
    delivered = next((srv.maildir("alice@example.test") / "new").iterdir())
    assert delivered.stat().st_uid == nobody.pw_uid
    assert data_dir.stat().st_mode & 0o007 == 0  # never world-readable
    assert srv.stop(20) == 0


@needs_root
def test_serve_as_root_without_a_user_refuses_to_run(open_dir, dns_server):
    config = ServerConfig(open_dir, dns_port=dns_server.port, server=None)
    p = run_yuubin(["serve"], config=config.write(), timeout=30)
    assert p.returncode == 2, p.stderr
    assert "server.user: yuubin refuses to run as root" in p.stderr
    assert "event=listening" not in p.stderr
    assert "Traceback" not in p.stderr


@needs_root
def test_a_data_dir_of_another_user_is_refused_before_serving(open_dir, dns_server):
    config = ServerConfig(open_dir, dns_port=dns_server.port, server={"user": "nobody"})
    config.write()
    config.add_accounts({"alice@example.test": "x"}, cached=True)  # made by root: root's files
    p = run_yuubin(["serve"], config=config.path, timeout=30)
    assert p.returncode == 2, p.stderr
    assert "data_dir:" in p.stderr and "chown -R nobody:" in p.stderr
    assert "event=listening" not in p.stderr


@needs_root
def test_a_user_that_does_not_exist_is_a_config_error(open_dir):
    config = ServerConfig(open_dir, server={"user": "no-such-user-yuubin"})
    p = run_yuubin(["config", "check"], config=config.write())
    assert p.returncode == 2
    assert "server.user: no user named 'no-such-user-yuubin'" in p.stderr and "useradd" in p.stderr


@needs_root
def test_root_without_a_user_is_refused_and_root_named_on_purpose_is_not():
    with pytest.raises(PrivilegeError, match="refuses to run as root"):
        must_drop(RunAs())
    assert must_drop(RunAs("root", "root", 0, 0)) is False
    assert must_drop(RunAs("nobody", "nogroup", 65534, 65534)) is True


def test_files_others_can_read_are_named(tmp_path, caplog):
    private, shared = tmp_path / "private.toml", tmp_path / "shared.toml"
    private.write_text("")
    shared.write_text("")
    os.chmod(private, 0o600)
    os.chmod(shared, 0o644)
    assert warn_open_files([private, shared, tmp_path / "missing"]) == [shared]
    assert "reason=world_readable" in caplog.text and str(shared) in caplog.text


def test_capabilities_are_read_from_proc():
    caps = capabilities()
    if not caps:
        pytest.skip("no /proc here")
    assert {"CapEff", "CapPrm", "CapBnd"} <= set(caps)

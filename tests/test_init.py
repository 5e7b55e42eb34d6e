"""`yuubin init`: a config with every key of the example, data_dir with its owner and modes, a
certificate, the postmaster account, DNS records; re-running keeps everything; the server it
sets up starts (as root, dropping to the user init named) and receives mail."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import smtplib
import stat
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ServerConfig, run_yuubin
from yuubin.auth.passwords import verify_password
from yuubin.cli.init import systemd_unit
from yuubin.config import load
from yuubin.store import Store

ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="init gives files to the server's user only as root")


def _keys(raw: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in raw.items():
        if isinstance(v, dict):
            out |= _keys(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                out |= _keys(item, f"{prefix}{k}[].")
        else:
            out.add(prefix + k)
    return out


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp_path is root's, 0700)."""
    d = Path(tempfile.mkdtemp(prefix="yuubin-init-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _init(directory: Path, *extra: str, stdin: str = "") -> object:
    user = ["--user", "nobody"] if os.geteuid() == 0 else []
    return run_yuubin(["init", "--domain", "example.jp", "--hostname", "mx.example.jp", "--dir", str(directory),
                       *user, *extra], stdin=stdin)


def test_the_config_has_every_key_of_the_example_with_this_domains_values(tmp_path):
    p = _init(tmp_path / "srv", "--ip", "203.0.113.25")
    assert p.returncode == 0, p.stderr
    path = tmp_path / "srv" / "yuubin.toml"
    written = tomllib.loads(path.read_text())
    example = tomllib.loads((ROOT / "yuubin.example.toml").read_text())
    # `allow` needs a [geo] file: it is a comment in the written config.
    missing = _keys(example) - _keys(written) - {"listener[].allow"}
    assert not missing, f"init's config lacks these keys of yuubin.example.toml: {sorted(missing)}"
    text = path.read_text()
    assert "# allow = " in text and "imaps" in text
    cfg = load(path)
    assert cfg.hostname == "mx.example.jp" and cfg.local_domains == ("example.jp",)
    assert cfg.postmaster == "postmaster@example.jp"
    assert cfg.data_dir == tmp_path / "srv" / "data"
    assert cfg.tls.cert == tmp_path / "srv" / "tls" / "cert.pem"
    assert [lc.kind for lc in cfg.listeners] == ["mx", "submission", "submissions", "imaps"]
    # The records to publish.
    assert "example.jp.  MX   10 mx.example.jp." in p.stdout
    assert "mx.example.jp.  A  203.0.113.25" in p.stdout
    assert '"v=spf1 mx -all"' in p.stdout and "_dmarc.example.jp." in p.stdout
    assert re.search(r"y\d{4}a-rsa\._domainkey\.example\.jp\.  3600  IN  TXT  \"v=DKIM1; k=rsa; p=", p.stdout)
    assert re.search(r"y\d{4}a-ed25519\._domainkey\.example\.jp\.  3600  IN  TXT  \"v=DKIM1; k=ed25519;", p.stdout)
    assert cfg.public_ips == ("203.0.113.25",)
    check = run_yuubin(["config", "check"], config=path)
    assert check.returncode == 0, check.stderr


def test_files_get_owners_and_modes_and_the_generated_password_works(tmp_path):
    p = _init(tmp_path / "srv")
    assert p.returncode == 0, p.stderr
    base = tmp_path / "srv"
    m = re.search(r"postmaster account postmaster@example.jp  password: (\S+)  \(shown once", p.stdout)
    assert m, p.stdout
    store = Store(base / "data" / "state.db")
    try:
        row = store.account("postmaster@example.jp")
        assert row is not None and verify_password(row.password_hash, m.group(1))
    finally:
        store.close()
    data = base / "data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((base / "tls" / "key.pem").stat().st_mode) & 0o007 == 0
    assert stat.S_IMODE((base / "yuubin.toml").stat().st_mode) & 0o007 == 0
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in (data, data / "state.db", *(data / "dkim").rglob("*")):
            assert path.stat().st_uid == nobody.pw_uid, path
        for path in (base / "yuubin.toml", base / "tls" / "key.pem"):
            st = path.stat()
            assert (st.st_uid, st.st_gid) == (0, nobody.pw_gid), path  # root's, readable by its group
            assert stat.S_IMODE(st.st_mode) == 0o640
        assert 'user = "nobody"' in (base / "yuubin.toml").read_text()


def test_running_init_again_overwrites_nothing(tmp_path):
    assert _init(tmp_path / "srv").returncode == 0
    base = tmp_path / "srv"
    keys = sorted((base / "data" / "dkim" / "example.jp").glob("*.key"))
    assert len(keys) == 2
    before = {p: p.read_bytes() for p in (base / "yuubin.toml", base / "tls" / "key.pem", base / "tls" / "cert.pem",
                                          *keys)}
    (base / "yuubin.toml").write_text((base / "yuubin.toml").read_text() + "# the admin's own note\n")
    before[base / "yuubin.toml"] = (base / "yuubin.toml").read_bytes()
    store = Store(base / "data" / "state.db")
    hash_before = store.account("postmaster@example.jp").password_hash
    store.close()
    p = _init(tmp_path / "srv", "--generate-password")
    assert p.returncode == 0, p.stderr
    assert "password:" not in p.stdout
    assert "kept" in p.stdout and "never overwrites" in p.stdout and "kept the DKIM key sets" in p.stdout
    assert sorted((base / "data" / "dkim" / "example.jp").glob("*.key")) == keys
    for path, content in before.items():
        assert path.read_bytes() == content, path
    store = Store(base / "data" / "state.db")
    try:
        assert store.account("postmaster@example.jp").password_hash == hash_before
    finally:
        store.close()


def test_bad_arguments_are_one_line_errors(tmp_path):
    p = run_yuubin(["init", "--domain", "not a domain", "--hostname", "mx.example.jp", "--dir", str(tmp_path)])
    assert p.returncode == 2 and "--domain" in p.stderr and "Traceback" not in p.stderr
    p = run_yuubin(["init", "--domain", "example.jp", "--hostname", "mx.example.jp", "--dir", str(tmp_path),
                    "--ip", "300.1.2.3"])
    assert p.returncode == 2 and "--ip" in p.stderr
    assert not (tmp_path / "yuubin.toml").exists()


def test_the_contrib_unit_is_the_one_init_writes(tmp_path):
    assert (ROOT / "contrib" / "yuubin.service").read_text() == systemd_unit()
    if os.geteuid() != 0:
        return
    unit = tmp_path / "unit.service"
    p = _init(tmp_path / "srv", "--systemd", "--unit-path", str(unit))
    assert p.returncode == 0, p.stderr
    text = unit.read_text()
    assert f"-c {tmp_path / 'srv' / 'yuubin.toml'} serve" in text
    assert f"ReadWritePaths={tmp_path / 'srv' / 'data'}" in text and "StateDirectory" not in text
    assert "User=nobody" in text


@needs_root
def test_the_server_init_set_up_starts_as_root_runs_as_its_user_and_receives_mail(open_dir, dns_server,
                                                                                 serve_process):
    p = _init(open_dir / "srv")
    assert p.returncode == 0, p.stderr
    path = open_dir / "srv" / "yuubin.toml"
    # The test's only edits: loopback ports and the test DNS server instead of the real ones.
    text = path.read_text()
    for port in ("25", "587", "465"):
        text = text.replace(f'"0.0.0.0:{port}"', '"127.0.0.1:0"')
    text = text.replace("nameservers = []", 'nameservers = ["127.0.0.1"]')
    text = text.replace("port = 53", f"port = {dns_server.port}")
    path.write_text(text)
    config = ServerConfig(open_dir / "srv")
    config.path = path
    srv = serve_process(config)
    assert "event=privileges_dropped user=nobody" in srv.log_text()
    with smtplib.SMTP("127.0.0.1", srv.port("mx"), timeout=10) as s:
        s.starttls()  # the self-signed certificate init made
        s.sendmail("someone@remote.example", ["postmaster@example.jp"], b"Subject: hello\r\n\r\nfirst mail\r\n")
    (msg,) = srv.wait_delivered("postmaster@example.jp", 1)
    assert b"first mail" in msg
    assert srv.stop(20) == 0

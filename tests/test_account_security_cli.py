"""The CLI side of issue 3: weak passwords, audit, suspend/enable, firewall export, geo sources."""

from __future__ import annotations

import io
import ipaddress
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from yuubin.auth.passwords import hash_password, verify_password
from yuubin.cli import main
from yuubin.config import from_dict
from yuubin.geo import AccessList, GeoDatabase, GeoError
from yuubin.queue.spool import Envelope, RemoteRecipient, Spool, new_id
from yuubin.store import Store

DELEGATED = """2|ripencc|20261127|5|19830705|20261126|+0100
ripencc|*|ipv4|*|3|summary
ripencc|JP|ipv4|1.0.16.0|4096|20110412|allocated
ripencc|JP|ipv4|1.0.64.0|768|20110412|allocated
ripencc|DE|ipv4|1.0.68.0|1024|20110412|assigned
ripencc|JP|ipv6|2001:200::|35|19990813|allocated
ripencc|DE|ipv6|2001:db8::|32|19990813|allocated
ripencc||ipv4|1.0.80.0|256||reserved
"""


@pytest.fixture
def cfg_file(make_config, tmp_path: Path) -> Path:
    (tmp_path / "delegated-ripencc-latest").write_text(DELEGATED)
    return make_config(
        hostname="mx.example.jp", domains={"local": ["example.jp"]}, dns=None,
        tls={"cert": "cert.pem", "key": "key.pem"},  # relative to the config file; copied there when needed
        geo={"source": "delegated-ripencc-latest"},
        listener=[{"kind": "submission", "address": "0.0.0.0:587", "allow": ["JP", "192.168.1.0/24"]},
                  {"kind": "submissions", "address": "0.0.0.0:465", "allow": ["10.0.0.0/8", "2001:db8:1::/48"]}],
    ).write()


def run(cfg: Path, *argv: str, stdin: str = "", capsys=None, monkeypatch=None) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["-c", str(cfg), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- weak passwords -------------------------------------------------------------------------

@pytest.mark.parametrize("password, reason", [
    ("password1", "too easy to guess"),
    ("qwerty123", "too easy to guess"),
    ("taro2026!Secret", "'taro'"),            # contains the user name
    ("MyExampleMail#2026x", "'example'"),     # contains the domain name
])
def test_weak_password_refused_with_reason(cfg_file, capsys, monkeypatch, password, reason):
    code, _out, err = run(cfg_file, "account", "add", "taro@example.jp", stdin=password + "\n", capsys=capsys,
                         monkeypatch=monkeypatch)
    assert code == 2
    assert "refused" in err and reason in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert Store(from_dict_cfg(cfg_file).state_db).account("taro@example.jp") is None


def from_dict_cfg(p: Path):
    from yuubin.config import load
    return load(p)


def test_strong_password_accepted_and_passwd_checks_too(cfg_file, capsys, monkeypatch):
    code, out, _ = run(cfg_file, "account", "add", "taro@example.jp", stdin="violet staple orbit 93\n",
                       capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0 and "added" in out
    code, _, err = run(cfg_file, "account", "passwd", "taro@example.jp", stdin="123456\n", capsys=capsys,
                       monkeypatch=monkeypatch)
    assert code == 2 and "too easy to guess" in err
    code, out, _ = run(cfg_file, "account", "passwd", "taro@example.jp", stdin="granite lumen tulip 4471\n",
                       capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0
    row = Store(from_dict_cfg(cfg_file).state_db).account("taro@example.jp")
    assert verify_password(row.password_hash, "granite lumen tulip 4471")


def test_allow_weak_is_logged(cfg_file, capsys, monkeypatch, caplog):
    caplog.set_level("WARNING", logger="yuubin.cli")
    code, _out, _err = run(cfg_file, "account", "add", "--allow-weak", "weak@example.jp", stdin="123456\n",
                         capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0
    assert any("event=weak_password_allowed account=weak@example.jp" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_audit_finds_guessable_passwords(cfg_file, capsys, monkeypatch):
    from argon2 import PasswordHasher
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash  # stored hashes carry their cost
    store = Store(from_dict_cfg(cfg_file).state_db)
    store.add_account("taro@example.jp", cheap("taro123"))
    store.add_account("hanako@example.jp", cheap("letmein"))
    store.add_account("jiro@example.jp", cheap("violet staple orbit 93"))
    store.close()
    code, out, err = run(cfg_file, "account", "audit", "taro@example.jp", "hanako@example.jp", "--max-time", "60",
                         capsys=capsys, monkeypatch=monkeypatch)
    assert code == 1
    assert "WEAK\ttaro@example.jp\tpassword guessed: derived from its address" in out
    assert "WEAK\thanako@example.jp\tpassword guessed: a common password" in out
    assert "[1/2] " in err and "[2/2] " in err  # progress
    # time bounded: a strong password with a tiny budget ends as unfinished, not as a hang
    code, out, _ = run(cfg_file, "account", "audit", "jiro@example.jp", "--max-time", "0.01", capsys=capsys,
                       monkeypatch=monkeypatch)
    assert code == 0 and "UNFINISHED\tjiro@example.jp" in out and "WEAK" not in out


def test_audit_says_how_long_it_will_take_before_it_starts(cfg_file, capsys, monkeypatch):
    from argon2 import PasswordHasher

    from yuubin.auth.strength import audit_guesses
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash
    store = Store(from_dict_cfg(cfg_file).state_db)
    store.add_account("jiro@example.jp", cheap("violet staple orbit 93"))
    store.add_account("saburo@example.jp", cheap("granite lumen tulip 4471"))
    store.close()
    guesses = len(audit_guesses("jiro@example.jp")) + len(audit_guesses("saburo@example.jp"))
    code, out, err = run(cfg_file, "account", "audit", "--workers", "2", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0 and "2 accounts audited, 0 weak, 0 unfinished" in out
    first, *rest = err.splitlines()
    assert re.fullmatch(rf"auditing 2 accounts: {guesses} guesses in all, \d+ ms each with 2 in parallel: "
                        r"at most about \d+s", first), first
    assert rest[0].startswith("[1/2] jiro@example.jp: ")  # said before the first account is tried
    # a budget shorter than the estimate says so
    store = Store(from_dict_cfg(cfg_file).state_db)
    store.add_account("shiro@example.jp", PasswordHasher().hash("violet staple orbit 93"))  # the real cost
    store.close()
    code, out, err = run(cfg_file, "account", "audit", "shiro@example.jp", "--max-time", "0.01", capsys=capsys,
                         monkeypatch=monkeypatch)
    assert "--max-time 0.01s stops it sooner" in err.splitlines()[0]


# ---- suspend / enable -----------------------------------------------------------------------

def test_suspend_holds_queued_mail_and_enable_releases_on_request(cfg_file, capsys, monkeypatch):
    import asyncio

    from yuubin.durable import GroupCommitter
    cfg = from_dict_cfg(cfg_file)
    store = Store(cfg.state_db)
    store.add_account("taro@example.jp", hash_password("violet staple orbit 93"))
    committer = GroupCommitter()
    spool = Spool(cfg.spool_dir, committer)
    ids = []
    for auth in ("taro@example.jp", "taro@example.jp", "other@example.jp"):
        env = Envelope(id=new_id(), sender=auth, mail_params={}, local=[], remote=[RemoteRecipient("x@far.test")],
                       received=0, client="203.0.113.1", helo="h", listener="submission", auth=auth)
        asyncio.run(spool.store(env, b"Subject: x\r\n\r\nbody\r\n"))
        ids.append(env.id)
    committer.shutdown()
    code, out, _ = run(cfg_file, "account", "suspend", "taro@example.jp", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0 and "2 queued messages put on hold" in out
    assert store.account("taro@example.jp").suspended
    assert [spool.load(i)[0].held for i in ids] == [True, True, False]
    store.record_submission("taro@example.jp", time.time(), "203.0.113.1", ["a@far.test", "b@far.test"])
    code, out, _ = run(cfg_file, "account", "enable", "taro@example.jp", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0 and not store.account("taro@example.jp").suspended
    assert store.submissions_since("taro@example.jp", 0) == 0  # a fresh start, not an instant re-suspension
    assert store.submission_recipients_since("taro@example.jp", 0) == set()
    assert [spool.load(i)[0].held for i in ids] == [True, True, False]  # enabling alone releases nothing
    code, out, _ = run(cfg_file, "account", "enable", "--release", "taro@example.jp", capsys=capsys,
                       monkeypatch=monkeypatch)
    assert "2 held messages released" in out
    assert [spool.load(i)[0].held for i in ids] == [False, False, False]
    code, _, err = run(cfg_file, "account", "suspend", "nobody@example.jp", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2 and "no account" in err


def test_auth_unlock_rejects_garbage(cfg_file, capsys, monkeypatch):
    code, _, err = run(cfg_file, "auth", "unlock", "not an address", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2 and "IP|ADDRESS" in err
    code, out, _ = run(cfg_file, "auth", "lockouts", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0 and "no lockouts" in out


# ---- geo sources and allow lists ------------------------------------------------------------

def test_delegated_stats_lookup(tmp_path):
    p = tmp_path / "delegated"
    p.write_text(DELEGATED)
    geo = GeoDatabase.load(str(p))
    a = ipaddress.ip_address
    assert geo.country(a("1.0.16.1")) == "JP"
    assert geo.country(a("1.0.31.255")) == "JP"
    assert geo.country(a("1.0.32.0")) is None
    assert geo.country(a("1.0.66.255")) == "JP"   # 768 addresses: not a power of two
    assert geo.country(a("1.0.67.0")) is None
    assert geo.country(a("1.0.68.9")) == "DE"
    assert geo.country(a("1.0.80.1")) is None     # reserved: no country
    assert geo.country(a("2001:200:1fff::1")) == "JP"
    assert geo.country(a("2001:200:2000::1")) is None
    assert geo.country(a("::ffff:1.0.16.1")) == "JP"
    assert [str(n) for n in geo.networks("JP")] == ["1.0.16.0/20", "1.0.64.0/23", "1.0.66.0/24", "2001:200::/35"]
    acl = AccessList((ipaddress.ip_network("192.168.1.0/24"),), ("JP",), geo)
    assert acl.allows(a("1.0.16.1"))[0] and acl.allows(a("192.168.1.5"))[0]
    assert not acl.allows(a("1.0.68.9"))[0]


def test_bad_geo_sources(tmp_path):
    with pytest.raises(GeoError):
        GeoDatabase.load(str(tmp_path / "missing"))
    (tmp_path / "junk").write_text("hello\n")
    with pytest.raises(GeoError):
        GeoDatabase.load(str(tmp_path / "junk"))
    (tmp_path / "junk.mmdb").write_bytes(b"not an mmdb")
    with pytest.raises(GeoError):
        GeoDatabase.load(str(tmp_path / "junk.mmdb"))


def test_country_in_allow_without_geo_source_is_a_config_error(tmp_path):
    from yuubin.config import ConfigError
    with pytest.raises(ConfigError, match=r"listener\[0\]\.allow: country JP needs geo.source"):
        from_dict({"hostname": "mx.example.jp", "domains": {"local": ["example.jp"]},
                   "tls": {"cert": "c", "key": "k"},
                   "listener": [{"kind": "submission", "address": "0.0.0.0:587", "allow": ["JP"]}]})


# ---- nftables export ------------------------------------------------------------------------

def nft_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)


def test_firewall_nftables_ruleset_is_valid(cfg_file, tmp_path, capsys, monkeypatch):
    code, out, _ = run(cfg_file, "firewall", "nftables", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0
    assert "elements = { 1.0.16.0/20, 1.0.64.0/23, 1.0.66.0/24, 192.168.1.0/24 }" in out
    assert "elements = { 2001:200::/35 }" in out
    assert "elements = { 10.0.0.0/8 }" in out and "elements = { 2001:db8:1::/48 }" in out
    assert "tcp dport 587 ip saddr @allow4_submission_0 accept" in out
    assert "tcp dport 465 counter reject with tcp reset" in out
    if shutil.which("nft") is None:
        pytest.skip("nft (Debian package nftables) is not installed; the ruleset text was checked only")
    rules = tmp_path / "yuubin.nft"
    rules.write_text(out)
    broken = tmp_path / "broken.nft"
    broken.write_text(out.replace("type ipv4_addr", "type ipv4_adr", 1))
    bad = nft_check(broken)
    if bad.returncode == 0 or "Operation not permitted" in bad.stderr:
        pytest.skip(f"`nft -c` cannot validate here (no privileges?): {bad.stderr.strip()[:200]}")
    res = nft_check(rules)
    assert res.returncode == 0, res.stderr


def test_mmdb_country_database(tmp_path):
    writer = pytest.importorskip("mmdb_writer", reason="mmdb-writer (test extra) makes the .mmdb fixture")
    from netaddr import IPSet
    w = writer.MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country", languages=["en"],
                          description="yuubin test")
    w.insert_network(IPSet(["1.0.16.0/20"]), {"country": {"iso_code": "JP"}})
    w.insert_network(IPSet(["2001:db8::/32"]), {"registered_country": {"iso_code": "DE"}})
    path = tmp_path / "country.mmdb"
    w.to_db_file(str(path))
    geo = GeoDatabase.load(str(path))
    a = ipaddress.ip_address
    assert geo.country(a("1.0.16.5")) == "JP"
    assert geo.country(a("1.0.32.1")) is None
    assert geo.country(a("2001:db8::1")) == "DE"
    assert [str(n) for n in geo.networks("JP")] == ["1.0.16.0/20"]
    acl = AccessList((), ("JP",), geo)
    assert acl.allows(a("1.0.16.5")) == (True, "country JP")
    assert acl.allows(a("8.8.8.8")) == (False, "country unknown not in allow list")


def test_config_check_reports_an_unreadable_geo_source(cfg_file, tls_files, capsys, monkeypatch):
    shutil.copy(tls_files[0], cfg_file.parent / "cert.pem")
    shutil.copy(tls_files[1], cfg_file.parent / "key.pem")
    code, out, _ = run(cfg_file, "config", "check", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 0 and "OK" in out
    (cfg_file.parent / "delegated-ripencc-latest").unlink()
    code, _, err = run(cfg_file, "config", "check", capsys=capsys, monkeypatch=monkeypatch)
    assert code == 2
    assert "geo.source: cannot read" in err


def test_weakness_names_and_short_user_names():
    from yuubin.auth.strength import weakness
    assert "'yamada'" in weakness("sunny-yamada-orbit-4", "taro.yamada@example.jp")
    assert weakness("mojo river tulip 88", "jo@example.jp") is None  # a 2-letter user name is no signal
    assert weakness("violet staple orbit 93", "taro@example.jp") is None

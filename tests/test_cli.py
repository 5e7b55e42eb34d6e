"""The `yuubin` command, run for real as a subprocess (`python -m yuubin ...`).

Admin mistakes (bad config, bad argument) must give one line on stderr naming the key or
argument, exit status 2, and never a traceback.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONFIG = """\
hostname = "mx.example.test"
data_dir = "data"

[domains]
local = ["example.test", "other.test"]

[dnsbl]
zones = []

[[listener]]
kind = "mx"
address = "127.0.0.1:2525"
"""


def run(args: list[str], *, config: Path | None = None, stdin: str | None = None,
        env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "yuubin"]
    if config is not None:
        cmd += ["-c", str(config)]
    full_env = {k: v for k, v in os.environ.items() if k != "YUUBIN_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(cmd + args, input=stdin if stdin is not None else "", capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=60)


def assert_usage_error(p: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, exactly one line on stderr that names every one of `names`, no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "yuubin.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


# ---- config check -------------------------------------------------------------------------------


def test_config_check_prints_the_effective_settings(config, tmp_path):
    p = run(["config", "check"], config=config)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert 'hostname = "mx.example.test"' in out
    assert f'data_dir = "{tmp_path / "data"}"' in out  # relative to the config file, made absolute
    assert 'local = ["example.test", "other.test"]' in out
    assert 'postmaster = "postmaster@example.test"' in out  # a default, shown
    assert 'address = "127.0.0.1:2525"' in out
    assert "message_size = 26214400" in out and "recipients = 100" in out
    assert "zones = []" in out
    assert "Traceback" not in p.stderr


def test_config_check_from_yuubin_config_env(config):
    p = run(["config", "check"], env={"YUUBIN_CONFIG": str(config)})
    assert p.returncode == 0, p.stderr
    assert 'hostname = "mx.example.test"' in p.stdout


def test_config_check_shows_ipv6_listener(tmp_path):
    path = tmp_path / "v6.toml"
    path.write_text(CONFIG.replace('"127.0.0.1:2525"', '"[::]:25"'), encoding="utf-8")
    p = run(["config", "check"], config=path)
    assert p.returncode == 0, p.stderr
    assert 'address = "[::]:25"' in p.stdout


BAD_CONFIGS = {
    "unknown key": (CONFIG + "\n[limits]\nmessage_sise = 1000\n", ["limits.message_sise", "unknown"]),
    "unknown top-level key": ("hostnme = \"x.example\"\n" + CONFIG, ["hostnme"]),
    "bad type": (CONFIG + "\n[limits]\nrecipients = \"many\"\n", ["limits.recipients"]),
    "bad duration": (CONFIG + "\n[limits]\nidle_timeout = \"soon\"\n", ["limits.idle_timeout"]),
    "missing hostname": (CONFIG.replace('hostname = "mx.example.test"\n', ""), ["hostname"]),
    "bad hostname": (CONFIG.replace('"mx.example.test"', '"not a host"'), ["hostname"]),
    "bad listener address": (CONFIG.replace('"127.0.0.1:2525"', '"mail.example.test:25"'),
                             ["listener[0].address"]),
    "listener without port": (CONFIG.replace('"127.0.0.1:2525"', '"127.0.0.1"'), ["listener[0].address"]),
    "listener port out of range": (CONFIG.replace('"127.0.0.1:2525"', '"127.0.0.1:70000"'),
                                   ["listener[0].address"]),
    "bad listener kind": (CONFIG.replace('kind = "mx"', 'kind = "smtp"'), ["listener[0].kind"]),
    "bad trusted network": (CONFIG + '\n[network]\ntrusted = ["192.168.1.0/33"]\n', ["network.trusted[0]"]),
    "no local domain": (CONFIG.replace('local = ["example.test", "other.test"]', "local = []"),
                        ["domains.local"]),
    "bad TOML": ('hostname = "mx.example.test\n', ["TOML"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line_exit_2(tmp_path, case):
    text, names = BAD_CONFIGS[case]
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    line = assert_usage_error(run(["config", "check"], config=path), *names)
    assert str(path) in line  # names the file too


def test_bad_config_stops_serve_the_same_way(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CONFIGS["unknown key"][0], encoding="utf-8")
    assert_usage_error(run(["serve"], config=path), "limits.message_sise")


def test_missing_config_file(tmp_path):
    assert_usage_error(run(["config", "check"], config=tmp_path / "nope.toml"), "nope.toml")


def test_no_config_given(tmp_path):
    p = run(["account", "list"], cwd=tmp_path)
    line = assert_usage_error(p)
    assert "-c" in line or "YUUBIN_CONFIG" in line, line


def test_usage_errors_are_one_line_exit_2(config):
    assert_usage_error(run(["frobnicate"], config=config))
    assert_usage_error(run(["account"], config=config))
    assert_usage_error(run(["alias", "add", "sales@example.test"], config=config))


# ---- accounts -----------------------------------------------------------------------------------


def test_account_add_list_remove(config, tmp_path):
    p = run(["account", "add", "alice@example.test"], config=config, stdin="Tangerine-orbit-71-quasar\n")
    assert p.returncode == 0, p.stderr
    assert "alice@example.test" in p.stdout
    p = run(["account", "add", "Bob@Other.TEST"], config=config, stdin="Velvet-canyon-38-nimbus\n")
    assert p.returncode == 0, p.stderr

    p = run(["account", "list"], config=config)
    assert p.returncode == 0, p.stderr
    listed = [line.split()[0] for line in p.stdout.splitlines()]
    assert listed == ["alice@example.test", "bob@other.test"]

    # The password is stored only as an Argon2id hash.
    db = sqlite3.connect(tmp_path / "data" / "state.db")
    try:
        rows = dict(db.execute("SELECT address, password_hash FROM accounts").fetchall())
    finally:
        db.close()
    assert rows["alice@example.test"].startswith("$argon2id$")
    assert "Tangerine" not in rows["alice@example.test"]

    dup = run(["account", "add", "alice@example.test"], config=config, stdin="Copper-lantern-55-fjord\n")
    assert_usage_error(dup, "ADDRESS", "alice@example.test")
    dup = run(["account", "add", "ALICE@example.test"], config=config, stdin="Copper-lantern-55-fjord\n")
    assert_usage_error(dup, "ADDRESS")

    p = run(["account", "remove", "alice@example.test"], config=config)
    assert p.returncode == 0, p.stderr
    p = run(["account", "list"], config=config)
    assert [line.split()[0] for line in p.stdout.splitlines()] == ["bob@other.test"]
    assert_usage_error(run(["account", "remove", "alice@example.test"], config=config), "ADDRESS")


def test_account_password_from_stdin_is_one_line(config, tmp_path):
    p = run(["account", "add", "carol@example.test"], config=config, stdin="Saffron-meteor-62-thicket\nsecond line\n")
    assert p.returncode == 0, p.stderr
    from argon2 import PasswordHasher

    db = sqlite3.connect(tmp_path / "data" / "state.db")
    try:
        (hashed,) = db.execute("SELECT password_hash FROM accounts WHERE address = 'carol@example.test'").fetchone()
    finally:
        db.close()
    assert PasswordHasher().verify(hashed, "Saffron-meteor-62-thicket")


def test_account_add_refuses_an_empty_password(config):
    p = run(["account", "add", "dave@example.test"], config=config, stdin="\n")
    assert_usage_error(p, "password")
    assert run(["account", "list"], config=config).stdout.strip() == ""


@pytest.mark.parametrize("address", ["not-an-address", "user@", "@example.test", "a b@example.test",
                                     "x%y@example.test", "x!y@example.test", "../../etc@example.test"])
def test_account_add_bad_address(config, address):
    p = run(["account", "add", address], config=config, stdin="Obsidian-walrus-19-prairie\n")
    assert_usage_error(p, "ADDRESS")
    assert not (config.parent / "data" / "state.db").exists() or run(
        ["account", "list"], config=config).stdout.strip() == ""


def test_account_add_for_a_foreign_domain(config):
    p = run(["account", "add", "eve@elsewhere.example"], config=config, stdin="Obsidian-walrus-19-prairie\n")
    assert_usage_error(p, "ADDRESS", "elsewhere.example")


def test_account_remove_bad_address(config):
    assert_usage_error(run(["account", "remove", "nonsense"], config=config), "ADDRESS")


# ---- aliases ------------------------------------------------------------------------------------


def test_alias_add_list_remove(config):
    p = run(["alias", "add", "sales@example.test", "alice@example.test", "Partner@Remote.Example"], config=config)
    assert p.returncode == 0, p.stderr
    p = run(["alias", "list"], config=config)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["sales@example.test\talice@example.test, partner@remote.example"]
    p = run(["alias", "remove", "sales@example.test"], config=config)
    assert p.returncode == 0, p.stderr
    assert run(["alias", "list"], config=config).stdout == ""
    assert_usage_error(run(["alias", "remove", "sales@example.test"], config=config), "ALIAS")


def test_alias_errors(config):
    assert_usage_error(run(["alias", "add", "not an alias", "alice@example.test"], config=config), "ALIAS")
    assert_usage_error(run(["alias", "add", "sales@example.test", "bad target"], config=config), "TARGET")
    assert_usage_error(run(["alias", "add", "sales@elsewhere.example", "alice@example.test"], config=config),
                       "ALIAS")
    assert_usage_error(run(["alias", "add", "loop@example.test", "loop@example.test"], config=config), "TARGET")
    assert_usage_error(run(["alias", "remove", "@@"], config=config), "ALIAS")
    assert run(["alias", "list"], config=config).stdout == ""
    added = run(["account", "add", "alice@example.test"], config=config, stdin="Tangerine-orbit-71-quasar\n")
    assert added.returncode == 0, added.stderr
    assert_usage_error(run(["alias", "add", "alice@example.test", "bob@remote.example"], config=config), "ALIAS")
    assert run(["alias", "list"], config=config).stdout == ""


# ---- password prompt on a terminal -------------------------------------------------------------


def _run_on_a_terminal(args: list[str], answers: list[str], timeout: float = 30) -> tuple[int, str]:
    """Run yuubin with a pseudo-terminal as its controlling terminal; answer each prompt in turn."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            env = {k: v for k, v in os.environ.items() if k != "YUUBIN_CONFIG"}
            os.execve(sys.executable, [sys.executable, "-m", "yuubin", *args], env)
        finally:
            os._exit(127)
    out = b""
    pending = list(answers)
    answered_at = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if pending and out.endswith(b": ") and len(out) > answered_at:  # a new prompt, echo off
                os.write(fd, pending.pop(0).encode() + b"\n")
                answered_at = len(out)
        else:
            os.kill(pid, 9)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_account_add_prompts_twice_on_a_terminal(config):
    pw = "Quartz-harbor-84-lichen"
    rc, out = _run_on_a_terminal(["-c", str(config), "account", "add", "erin@example.test"], [pw, pw])
    assert rc == 0, out
    assert out.lower().count("password") + out.lower().count("again") >= 2, out  # two prompts
    assert pw not in out  # not echoed
    assert "erin@example.test" in run(["account", "list"], config=config).stdout

    rc, out = _run_on_a_terminal(["-c", str(config), "account", "add", "frank@example.test"],
                                 [pw, "Something-else-entirely-9"])
    assert rc == 2, out
    assert "Traceback" not in out and "password" in out.lower()
    assert "frank@example.test" not in run(["account", "list"], config=config).stdout


# ---- TLS files named in the config -------------------------------------------------------------


def _config_with_tls(tmp_path: Path, cert: str, key: str) -> Path:
    path = tmp_path / "tls.toml"
    path.write_text(CONFIG.replace('"127.0.0.1:2525"', '"127.0.0.1:0"')
                    + f'\n[tls]\ncert = "{cert}"\nkey = "{key}"\n', encoding="utf-8")
    return path


TLS_FILES_BUG = ("BUG: a [tls] cert/key path that does not exist or is not PEM makes `serve` exit 1 with "
                 "'yuubin: error: : No such file or directory' (or ': [SSL] PEM lib'), naming neither the key "
                 "tls.cert nor the file; expected exit 2 naming tls.cert")


@pytest.mark.parametrize("case", ["missing", "not PEM"])
def test_serve_with_bad_tls_files_names_the_key(tmp_path, case):
    if case == "not PEM":
        (tmp_path / "cert.pem").write_text("garbage\n")
        (tmp_path / "key.pem").write_text("garbage\n")
    config = _config_with_tls(tmp_path, "cert.pem", "key.pem") if case == "not PEM" else \
        _config_with_tls(tmp_path, "missing/cert.pem", "missing/key.pem")
    p = run(["serve"], config=config)
    assert_usage_error(p, "tls.cert")


def test_config_check_finds_a_missing_certificate(tmp_path):
    config = _config_with_tls(tmp_path, "missing/cert.pem", "missing/key.pem")
    assert_usage_error(run(["config", "check"], config=config), "tls.cert")

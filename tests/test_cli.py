"""The `yuubin` command, run for real as a subprocess (`python -m yuubin ...`, see tests/harness.py).

Admin mistakes (bad config, bad argument) must give one line on stderr naming the key or
argument, exit status 2, and never a traceback.
"""

from __future__ import annotations

import calendar
import os
import re
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import YUUBIN, free_port, run_yuubin

# What the CLI tests need from their config, over the shared base: the values the output is checked
# for, a data_dir relative to the config file, and no DNS server (no command here resolves names).
CLI = {
    "hostname": "mx.example.test",
    "data_dir": "data",
    "dnsbl": {"zones": []},
    "listener": [{"kind": "mx", "address": "127.0.0.1:2525"}],
    "dns": None,
}


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
def cli_config(make_config):
    """`cli_config(**overrides)`: the CLI tests' config with more overrides."""
    return lambda **overrides: make_config(**{**CLI, **overrides})


@pytest.fixture
def config(cli_config) -> Path:
    return cli_config().write()


# ---- config check -------------------------------------------------------------------------------


def test_config_check_prints_the_effective_settings(config, tmp_path):
    p = run_yuubin(["config", "check"], config=config)
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
    p = run_yuubin(["config", "check"], env={"YUUBIN_CONFIG": str(config)})
    assert p.returncode == 0, p.stderr
    assert 'hostname = "mx.example.test"' in p.stdout


def test_config_check_shows_ipv6_listener(cli_config):
    path = cli_config(listener=[{"kind": "mx", "address": "[::]:25"}]).write("v6.toml")
    p = run_yuubin(["config", "check"], config=path)
    assert p.returncode == 0, p.stderr
    assert 'address = "[::]:25"' in p.stdout


def _listener(address: str, kind: str = "mx") -> dict:
    return {"listener": [{"kind": kind, "address": address}]}


# Overrides of the CLI config that make it wrong (a string: the whole file), and the names the error must give.
BAD_CONFIGS = {
    "unknown key": ({"limits": {"message_sise": 1000}}, ["limits.message_sise", "unknown"]),
    "unknown top-level key": ({"hostnme": "x.example"}, ["hostnme"]),
    "bad type": ({"limits": {"recipients": "many"}}, ["limits.recipients"]),
    "bad duration": ({"limits": {"idle_timeout": "soon"}}, ["limits.idle_timeout"]),
    "missing hostname": ({"hostname": None}, ["hostname"]),
    "bad hostname": ({"hostname": "not a host"}, ["hostname"]),
    "bad listener address": (_listener("mail.example.test:25"), ["listener[0].address"]),
    "listener without port": (_listener("127.0.0.1"), ["listener[0].address"]),
    "listener port out of range": (_listener("127.0.0.1:70000"), ["listener[0].address"]),
    "bad listener kind": (_listener("127.0.0.1:2525", kind="smtp"), ["listener[0].kind"]),
    "bad trusted network": ({"network": {"trusted": ["192.168.1.0/33"]}}, ["network.trusted[0]"]),
    "no local domain": ({"domains": {"local": []}}, ["domains.local"]),
    "bad TOML": ('hostname = "mx.example.test\n', ["TOML"]),
}


def bad_config(cli_config, tmp_path: Path, case: str) -> Path:
    bad, _names = BAD_CONFIGS[case]
    if isinstance(bad, str):
        path = tmp_path / "bad.toml"
        path.write_text(bad, encoding="utf-8")
        return path
    return cli_config(**bad).write("bad.toml")


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line_exit_2(cli_config, tmp_path, case):
    path = bad_config(cli_config, tmp_path, case)
    line = assert_usage_error(run_yuubin(["config", "check"], config=path), *BAD_CONFIGS[case][1])
    assert str(path) in line  # names the file too


def test_bad_config_stops_serve_the_same_way(cli_config, tmp_path):
    path = bad_config(cli_config, tmp_path, "unknown key")
    assert_usage_error(run_yuubin(["serve"], config=path), "limits.message_sise")


def test_a_misspelt_required_key_is_named_as_the_typo(cli_config):
    path = cli_config(hostname=None, hostnmae="mx.example.test").write("typo.toml")
    line = assert_usage_error(run_yuubin(["config", "check"], config=path), "hostnmae", "unknown key",
                              "did you mean hostname?")
    assert "hostname: required" not in line, line


def test_a_listener_without_kind_says_kind_is_required(cli_config):
    path = cli_config(listener=[{"address": "127.0.0.1:2525"}]).write("nokind.toml")
    line = assert_usage_error(run_yuubin(["config", "check"], config=path), "listener[0].kind", "required", "mx")
    assert "None" not in line, line


@pytest.mark.parametrize(("key", "overrides", "wide", "host"), [
    ("network.trusted[0]", {"network": {"trusted": ["127.0.0.71/24"]}}, "127.0.0.0/24", "127.0.0.71/32"),
    ("listener[0].allow[0]", {"listener": [{"kind": "submission", "address": "127.0.0.1:0",
                                            "allow": ["2001:db8::7/64"]}]}, "2001:db8::/64", "2001:db8::7/128"),
])
def test_host_bits_in_a_network_are_refused_not_widened(cli_config, key, overrides, wide, host):
    path = cli_config(**overrides).write("hostbits.toml")
    assert_usage_error(run_yuubin(["config", "check"], config=path), key, "host bits", wide, host)


# Configs that load but that `serve` refuses at start: `config check` must refuse them too, with the
# same line. Each case makes its overrides from the test's directory and a free port.
RELAY = "smtp.isp.example:587"
SERVE_REFUSES = {
    "missing relayhost password file": (
        lambda d, port: {"outbound": {"relayhost": RELAY, "relayhost_password_file": "missing/password"}},
        ["outbound.relayhost_password_file", "missing/password"]),
    "relayhost password file is a directory": (
        lambda d, port: {"outbound": {"relayhost": RELAY, "relayhost_password_file": str(d)}},
        ["outbound.relayhost_password_file", "cannot read"]),
    "missing relayhost CA file": (
        lambda d, port: {"outbound": {"relayhost": RELAY, "relayhost_ca_file": "missing/ca.pem"}},
        ["outbound.relayhost_ca_file", "missing/ca.pem"]),
    "IPv4 wildcard beside one of its addresses": (
        lambda d, port: {"listener": [{"kind": "mx", "address": f"0.0.0.0:{port}"},
                                      {"kind": "mx", "address": f"127.0.0.7:{port}"}]},
        ["listener[1].address", "listener[0]", "0.0.0.0"]),
    "IPv6 wildcard beside ::1": (
        lambda d, port: {"listener": [{"kind": "mx", "address": f"[::1]:{port}"},
                                      {"kind": "mx", "address": f"[::]:{port}"}]},
        ["listener[1].address", "listener[0]", "[::]"]),
    "localhost beside 127.0.0.1": (
        lambda d, port: {"listener": [{"kind": "mx", "address": f"127.0.0.1:{port}"},
                                      {"kind": "mx", "address": f"localhost:{port}"}]},
        ["listener[1].address", "listener[0]"]),
    "listener kind not implemented": (
        lambda d, port: {"listener": [{"kind": "mx", "address": "127.0.0.1:0"},
                                      {"kind": "pop3s", "address": "127.0.0.1:0"}]},
        ["listener[1].kind", "pop3s", "not implemented"]),
    "no listener": (lambda d, port: {"listener": None}, ["listener", "none"]),
    "data_dir is a file": (lambda d, port: {"data_dir": "refuse.toml"}, ["data_dir", "not a directory"]),
}


@pytest.mark.parametrize("case", list(SERVE_REFUSES))
def test_config_check_refuses_what_serve_refuses_with_the_same_line(cli_config, tmp_path, case):
    make, names = SERVE_REFUSES[case]
    path = cli_config(**make(tmp_path, free_port())).write("refuse.toml")
    check = run_yuubin(["config", "check"], config=path)
    line = assert_usage_error(check, str(path), *names)
    served = run_yuubin(["serve"], config=path, timeout=30)
    assert assert_usage_error(served, *names) == line


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_names_the_listener_whose_address_is_taken(cli_config, workers):
    taken_port = free_port()
    path = cli_config(listener=[{"kind": "mx", "address": "127.0.0.1:0"},
                                {"kind": "mx", "address": f"127.0.0.1:{taken_port}"}],
                      server={"workers": workers}).write("taken.toml")
    assert run_yuubin(["config", "check"], config=path).returncode == 0  # the bind alone is left to serve
    with socket.create_server(("127.0.0.1", taken_port)):
        p = run_yuubin(["serve"], config=path, timeout=30)
    # serve logs that it is starting before it binds; the error is then the one line that is not a log line
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if " level=" not in line]
    assert_usage_error(subprocess.CompletedProcess(p.args, p.returncode, p.stdout, "\n".join(errors)),
                       str(path), "listener[1].address", f"127.0.0.1:{taken_port}", "(mx)", "already in use")
    assert "event=listening" not in p.stderr  # nothing half-run: every listener is bound before any serves


def test_localserve_port_base_out_of_range(tmp_path):
    p = run_yuubin(["localserve", "--dir", str(tmp_path / "ls"), "--port-base", "65000"])
    assert_usage_error(p, "--port-base", "65000", "out of range")
    assert not (tmp_path / "ls").exists()


def test_missing_config_file(tmp_path):
    assert_usage_error(run_yuubin(["config", "check"], config=tmp_path / "nope.toml"), "nope.toml")


def test_no_config_given(tmp_path):
    p = run_yuubin(["account", "list"], cwd=tmp_path)
    line = assert_usage_error(p)
    assert "-c" in line or "YUUBIN_CONFIG" in line, line


def test_usage_errors_are_one_line_exit_2(config):
    assert_usage_error(run_yuubin(["frobnicate"], config=config))
    assert_usage_error(run_yuubin(["account"], config=config))
    assert_usage_error(run_yuubin(["alias", "add", "sales@example.test"], config=config))


# ---- one CLI: -c anywhere, a default config, help, typos, argument names ----------------------


def test_config_option_after_the_command(config, tmp_path):
    for args in (["config", "check", "-c", str(config)], ["account", "list", "--config", str(config)],
                 ["auth", "-c", str(config), "lockouts"], ["alias", "list", "-c", str(config)]):
        p = run_yuubin(args, cwd=tmp_path)
        assert p.returncode == 0, (args, p.stderr)
    # after the command wins over before it (and over YUUBIN_CONFIG): the nearest is what was meant
    p = run_yuubin(["config", "check", "-c", str(config)], config=tmp_path / "nope.toml",
                   env={"YUUBIN_CONFIG": str(tmp_path / "nope-either.toml")})
    assert p.returncode == 0, p.stderr
    assert 'hostname = "mx.example.test"' in p.stdout


def test_without_config_the_default_path_is_named(tmp_path):
    if Path("/etc/yuubin/yuubin.toml").exists():
        pytest.skip("this machine has a /etc/yuubin/yuubin.toml")
    line = assert_usage_error(run_yuubin(["account", "list"], cwd=tmp_path), "/etc/yuubin/yuubin.toml")
    assert "-c" in line and "YUUBIN_CONFIG" in line


def _commands(parser, path=()):
    """(path, parser) for every command that runs something: `config check`, `queue list`, ..."""
    import argparse
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _commands(child, (*path, name))


def test_every_command_describes_itself_and_takes_c(capsys):
    from yuubin.cli import build_parser, main
    commands = dict(_commands(build_parser()))
    assert ("queue", "show") in commands and ("config", "check") in commands and len(commands) >= 20
    for path, parser in commands.items():
        with pytest.raises(SystemExit) as done:
            main([*path, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        usage, description = out.split("\n\n")[:2]
        assert parser.description and description.strip() == parser.description, (path, out)
        assert "\n" not in description.strip(), (path, description)  # one line
        # localserve writes and reads its own config in --dir, init writes one, restore needs none
        if path not in {("localserve",), ("init",), ("restore",)}:
            assert "-c FILE" in usage, (path, usage)


@pytest.mark.parametrize(("args", "line"), [
    (["acount", "list"], "yuubin: error: unknown command 'acount' (did you mean 'account'?)"),
    (["queue", "lst"], "yuubin: error: unknown command 'queue lst' (did you mean 'queue list'?)"),
    (["config", "chek"], "yuubin: error: unknown command 'config chek' (did you mean 'config check'?)"),
    (["frobnicate"], "yuubin: error: unknown command 'frobnicate' (see yuubin --help)"),
])
def test_a_mistyped_command_names_the_nearest(config, args, line):
    assert assert_usage_error(run_yuubin(args, config=config)) == line


@pytest.mark.parametrize(("args", "name"), [
    (["account", "add"], "ADDRESS"),
    (["account", "suspend"], "ADDRESS"),
    (["alias", "remove"], "ALIAS"),
    (["alias", "add", "sales@example.test"], "TARGET"),
    (["queue", "show"], "ID"),
    (["auth", "unlock"], "IP|ADDRESS"),
    (["queue"], "COMMAND"),
])
def test_a_missing_argument_is_named_as_in_usage_and_errors(config, args, name):
    line = assert_usage_error(run_yuubin(args, config=config), name)
    assert " sub" not in line and "argument" not in line.replace("arguments are required", "")


# ---- accounts -----------------------------------------------------------------------------------


def test_account_add_list_remove(config, tmp_path):
    p = run_yuubin(["account", "add", "alice@example.test"], config=config, stdin="Tangerine-orbit-71-quasar\n")
    assert p.returncode == 0, p.stderr
    assert "alice@example.test" in p.stdout
    p = run_yuubin(["account", "add", "Bob@Other.TEST"], config=config, stdin="Velvet-canyon-38-nimbus\n")
    assert p.returncode == 0, p.stderr

    p = run_yuubin(["account", "list"], config=config)
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

    dup = run_yuubin(["account", "add", "alice@example.test"], config=config, stdin="Copper-lantern-55-fjord\n")
    assert_usage_error(dup, "ADDRESS", "alice@example.test")
    dup = run_yuubin(["account", "add", "ALICE@example.test"], config=config, stdin="Copper-lantern-55-fjord\n")
    assert_usage_error(dup, "ADDRESS")

    p = run_yuubin(["account", "remove", "alice@example.test"], config=config)
    assert p.returncode == 0, p.stderr
    p = run_yuubin(["account", "list"], config=config)
    assert [line.split()[0] for line in p.stdout.splitlines()] == ["bob@other.test"]
    assert_usage_error(run_yuubin(["account", "remove", "alice@example.test"], config=config), "ADDRESS")


def test_account_password_from_stdin_is_one_line(config, tmp_path):
    p = run_yuubin(["account", "add", "carol@example.test"], config=config,
                   stdin="Saffron-meteor-62-thicket\nsecond line\n")
    assert p.returncode == 0, p.stderr
    from argon2 import PasswordHasher

    db = sqlite3.connect(tmp_path / "data" / "state.db")
    try:
        (hashed,) = db.execute("SELECT password_hash FROM accounts WHERE address = 'carol@example.test'").fetchone()
    finally:
        db.close()
    assert PasswordHasher().verify(hashed, "Saffron-meteor-62-thicket")


def test_account_add_refuses_an_empty_password(config):
    p = run_yuubin(["account", "add", "dave@example.test"], config=config, stdin="\n")
    assert_usage_error(p, "password")
    assert run_yuubin(["account", "list"], config=config).stdout.strip() == ""


@pytest.mark.parametrize("address", ["not-an-address", "user@", "@example.test", "a b@example.test",
                                     "x%y@example.test", "x!y@example.test", "../../etc@example.test"])
def test_account_add_bad_address(config, address):
    p = run_yuubin(["account", "add", address], config=config, stdin="Obsidian-walrus-19-prairie\n")
    assert_usage_error(p, "ADDRESS")
    assert not (config.parent / "data" / "state.db").exists() or run_yuubin(
        ["account", "list"], config=config).stdout.strip() == ""


def test_account_add_for_a_foreign_domain(config):
    p = run_yuubin(["account", "add", "eve@elsewhere.example"], config=config, stdin="Obsidian-walrus-19-prairie\n")
    assert_usage_error(p, "ADDRESS", "elsewhere.example")


def test_account_remove_bad_address(config):
    assert_usage_error(run_yuubin(["account", "remove", "nonsense"], config=config), "ADDRESS")


UTC_STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def test_times_are_shown_in_utc_like_the_logs(config):
    far_east = {"TZ": "JST-9"}  # local time 9 hours ahead of UTC: local times would show
    before = time.time()
    added = run_yuubin(["account", "add", "alice@example.test"], config=config, stdin="Tangerine-orbit-71-quasar\n")
    assert added.returncode == 0, added.stderr
    line = run_yuubin(["account", "list"], config=config, env=far_east).stdout.strip()
    created = UTC_STAMP.search(line)
    assert created, line
    shown = calendar.timegm(time.strptime(created.group(), "%Y-%m-%dT%H:%M:%SZ"))
    assert int(before) - 1 <= shown <= time.time() + 1, line
    from yuubin.config import load
    from yuubin.store import Store
    store = Store(load(config).state_db)
    store.set_auth_lockout("127.1.2.3", 2000000000.0, 1, before)
    store.close()
    out = run_yuubin(["auth", "lockouts"], config=config, env=far_east).stdout
    assert "127.1.2.3\tlocked until 2033-05-18T03:33:20Z" in out, out


def test_audit_of_an_account_that_does_not_exist(config):
    p = run_yuubin(["account", "audit", "nobody@example.test"], config=config)
    assert_usage_error(p, "ADDRESS", "nobody@example.test")


# ---- aliases ------------------------------------------------------------------------------------


def test_alias_add_list_remove(config):
    added = run_yuubin(["account", "add", "alice@example.test"], config=config, stdin="Tangerine-orbit-71-quasar\n")
    assert added.returncode == 0, added.stderr
    p = run_yuubin(["alias", "add", "sales@example.test", "alice@example.test", "Partner@Remote.Example"],
                   config=config)
    assert p.returncode == 0, p.stderr
    p = run_yuubin(["alias", "list"], config=config)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["sales@example.test\talice@example.test, partner@remote.example"]
    p = run_yuubin(["alias", "remove", "sales@example.test"], config=config)
    assert p.returncode == 0, p.stderr
    assert run_yuubin(["alias", "list"], config=config).stdout == ""
    assert_usage_error(run_yuubin(["alias", "remove", "sales@example.test"], config=config), "ALIAS")


def test_alias_errors(config):
    assert_usage_error(run_yuubin(["alias", "add", "not an alias", "alice@example.test"], config=config), "ALIAS")
    assert_usage_error(run_yuubin(["alias", "add", "sales@example.test", "bad target"], config=config), "TARGET")
    assert_usage_error(run_yuubin(["alias", "add", "sales@elsewhere.example", "alice@example.test"], config=config),
                       "ALIAS")
    assert_usage_error(run_yuubin(["alias", "add", "loop@example.test", "loop@example.test"], config=config), "TARGET")
    assert_usage_error(run_yuubin(["alias", "remove", "@@"], config=config), "ALIAS")
    assert run_yuubin(["alias", "list"], config=config).stdout == ""
    added = run_yuubin(["account", "add", "alice@example.test"], config=config, stdin="Tangerine-orbit-71-quasar\n")
    assert added.returncode == 0, added.stderr
    assert_usage_error(run_yuubin(["alias", "add", "alice@example.test", "bob@remote.example"], config=config), "ALIAS")
    assert run_yuubin(["alias", "list"], config=config).stdout == ""


def test_alias_to_a_local_address_nobody_has_is_refused(config):
    p = run_yuubin(["alias", "add", "sales@example.test", "alice@example.test", "partner@remote.example"],
                   config=config)
    assert_usage_error(p, "TARGET", "alice@example.test", "--force")
    assert run_yuubin(["alias", "list"], config=config).stdout == ""
    # a local target that exists: an account, an alias, plus-addressing, postmaster of any local domain
    added = run_yuubin(["account", "add", "alice@example.test"], config=config, stdin="Tangerine-orbit-71-quasar\n")
    assert added.returncode == 0, added.stderr
    for alias, target in (("sales@example.test", "alice+sales@example.test"),
                          ("team@example.test", "sales@example.test"), ("abuse@other.test", "postmaster@other.test")):
        p = run_yuubin(["alias", "add", alias, target], config=config)
        assert p.returncode == 0 and p.stderr == "", (target, p.stderr)
    # --force adds it anyway, with a warning
    p = run_yuubin(["alias", "add", "--force", "help@example.test", "bob@example.test"], config=config)
    assert p.returncode == 0, p.stderr
    assert "warning" in p.stderr and "bob@example.test" in p.stderr
    assert "help@example.test\tbob@example.test" in run_yuubin(["alias", "list"], config=config).stdout


# ---- password prompt on a terminal -------------------------------------------------------------


def _run_on_a_terminal(args: list[str], answers: list[str], timeout: float = 30) -> tuple[int, str]:
    """Run yuubin with a pseudo-terminal as its controlling terminal; answer each prompt in turn."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            env = {k: v for k, v in os.environ.items() if k != "YUUBIN_CONFIG"}
            os.execve(YUUBIN[0], [*YUUBIN, *args], env)
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
    assert "erin@example.test" in run_yuubin(["account", "list"], config=config).stdout

    rc, out = _run_on_a_terminal(["-c", str(config), "account", "add", "frank@example.test"],
                                 [pw, "Something-else-entirely-9"])
    assert rc == 2, out
    assert "Traceback" not in out and "password" in out.lower()
    assert "frank@example.test" not in run_yuubin(["account", "list"], config=config).stdout


# ---- TLS files named in the config -------------------------------------------------------------


def _config_with_tls(cli_config, cert: str, key: str) -> Path:
    return cli_config(listener=[{"kind": "mx", "address": "127.0.0.1:0"}],
                      tls={"cert": cert, "key": key}).write("tls.toml")


TLS_FILES_BUG = ("BUG: a [tls] cert/key path that does not exist or is not PEM makes `serve` exit 1 with "
                 "'yuubin: error: : No such file or directory' (or ': [SSL] PEM lib'), naming neither the key "
                 "tls.cert nor the file; expected exit 2 naming tls.cert")


@pytest.mark.parametrize("case", ["missing", "not PEM"])
def test_serve_with_bad_tls_files_names_the_key(cli_config, tmp_path, case):
    if case == "not PEM":
        (tmp_path / "cert.pem").write_text("garbage\n")
        (tmp_path / "key.pem").write_text("garbage\n")
    config = _config_with_tls(cli_config, "cert.pem", "key.pem") if case == "not PEM" else \
        _config_with_tls(cli_config, "missing/cert.pem", "missing/key.pem")
    p = run_yuubin(["serve"], config=config)
    assert_usage_error(p, "tls.cert")


def test_config_check_finds_a_missing_certificate(cli_config):
    config = _config_with_tls(cli_config, "missing/cert.pem", "missing/key.pem")
    assert_usage_error(run_yuubin(["config", "check"], config=config), "tls.cert")

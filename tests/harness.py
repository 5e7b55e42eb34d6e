"""The test harness: one way to configure, start and inspect yuubin, in-process or as `yuubin serve`.

Registered as a pytest plugin from tests/conftest.py. What it offers:

- ``ServerConfig``: a config built from ``BASE_CONFIG`` plus a test's overrides, as a dict, as TOML
  text and as a file; it also puts accounts and aliases into state.db. The ``make_config`` fixture
  builds one in the test's tmp_path with the test TLS certificate and the test DNS server.
- ``ServeProcess``: ``yuubin -c FILE serve`` as a real process, its output in a log file, ready once
  every listener logged ``event=listening`` (the bound ports are read from those lines). The
  ``serve_process`` fixture starts them and kills what is left at the end of the test.
- ``LocalServe``: ``yuubin localserve`` as a real process (fixed ports, see ``port_2525``).
- ``RunningServer``: the same server in a thread of the test process (``make_server`` fixture),
  so blocking clients like smtplib can talk to it and tests can patch its modules.
- ``run_yuubin``: one admin command as a subprocess.
- The DNS fixtures (``dns_server``, ``resolver``) and TLS fixtures (``ca``, ``tls_files``,
  ``client_tls``).

All traffic stays on 127.0.0.0/8 and ::1: clients bound to 127.0.x.y are in network.trusted
("the LAN"), 127.1.x.y and above are "the internet".
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import functools
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.dnsserver import TestDNSServer
from yuubin.app import App
from yuubin.auth import passwords
from yuubin.auth.passwords import hash_password
from yuubin.config import Config, from_dict, load
from yuubin.dns import Resolver
from yuubin.store import Store

__all__ = [
    "ACCOUNTS", "BASE_CONFIG", "YUUBIN", "LocalServe", "RunningServer", "ServeProcess", "ServerConfig", "ca",
    "cached_hashes", "client_tls", "dns_server", "free_port", "make_config", "make_server", "port_2525",
    "resolver", "run_yuubin", "serve_process", "tls_files", "toml_text",
]

# The `yuubin` command as the tests run it: the console script's entry point, with this interpreter.
YUUBIN: tuple[str, ...] = (sys.executable, "-m", "yuubin")

BASE_CONFIG: dict[str, Any] = {
    "hostname": "mx.test.example",
    "domains": {"local": ["example.test", "other.test"]},
    "network": {"trusted": ["127.0.0.0/16", "::1/128"]},  # 127.0.x.y is "the LAN"; 127.1+ "the internet"
    "dnsbl": {"zones": ["zen.dnsbl.test", "bl.dnsbl.test"]},
    "listener": [{"kind": "mx", "address": "127.0.0.1:0"}],
    "limits": {"idle_timeout": "10s", "shutdown_grace": "5s"},
    # The suite runs as root in CI: say so on purpose (serve refuses root without a user).
    "server": {"user": "root"},
}

ACCOUNTS = {"alice@example.test": "correct horse battery staple", "bob@example.test": "bob's long password 42"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now, for servers that must be told their port up front."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---- config builder ------------------------------------------------------------------------------


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in: tables merge key by key, other values replace, None removes."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML: {v!r}")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def toml_text(raw: Mapping[str, Any]) -> str:
    """`raw` as TOML: plain keys first, then [tables], then [[arrays of tables]]."""
    lines: list[str] = []

    def table(prefix: str, d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            if not isinstance(v, dict) and not _is_table_array(v):
                lines.append(f"{_key(k)} = {_value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                name = f"{prefix}{_key(k)}"
                lines.extend(["", f"[{name}]"])
                table(name + ".", v)
        for k, v in d.items():
            if _is_table_array(v):
                name = f"{prefix}{_key(k)}"
                for item in v:
                    lines.extend(["", f"[[{name}]]"])
                    table(name + ".", item)

    table("", raw)
    return "\n".join(lines).lstrip("\n") + "\n"


@functools.cache
def _hash_once(password: str) -> str:
    return passwords.hash_password(password)


class ServerConfig:
    """A test's yuubin config: BASE_CONFIG merged with `overrides` (None removes a key).

    `data_dir` defaults to DIRECTORY/data; `tls` to `tls_files` and `dns` to the test DNS server
    on `dns_port` when those are given. An override of `data_dir`, `tls` or `dns` replaces that
    default as a whole (`tls={}` is a server without TLS, `dns=None` one without a [dns] table).
    """

    def __init__(self, directory: Path, *, tls_files: tuple[Path, Path] | None = None,
                 dns_port: int | None = None, **overrides: Any):
        self.directory = Path(directory)
        defaults: dict[str, Any] = {"data_dir": str(self.directory / "data")}
        if tls_files is not None:
            defaults["tls"] = {"cert": str(tls_files[0]), "key": str(tls_files[1])}
        if dns_port is not None:
            defaults["dns"] = {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 0.5}
        raw = merge(BASE_CONFIG, overrides)
        for k, v in defaults.items():
            if k not in overrides:
                raw[k] = v
        self.raw: dict[str, Any] = raw
        self.path: Path | None = None  # the file last written by write()

    @property
    def text(self) -> str:
        """The config as TOML."""
        return toml_text(self.raw)

    def write(self, name: str = "yuubin.toml") -> Path:
        """Write the TOML to DIRECTORY/`name` (relative paths in it are relative to that file)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / name
        path.write_text(self.text, encoding="utf-8")
        self.path = path
        return path

    def load(self) -> Config:
        """The validated Config, as `yuubin` would load it from the written file."""
        source = str(self.path) if self.path else "<memory>"
        return from_dict(copy.deepcopy(self.raw), source=source, base=self.directory)

    def add_accounts(self, accounts: Mapping[str, str] | None = None,
                     aliases: Mapping[str, Sequence[str]] | None = None, *, cached: bool = False) -> ServerConfig:
        """Create `accounts` (default ACCOUNTS; existing ones are kept) and `aliases` in state.db.

        `cached=True` reuses one Argon2id hash per password (~0.15 s each), for tests that never
        check a password or check only ones hashed before.
        """
        hasher = _hash_once if cached else hash_password  # hash_password: patched by `cached_hashes`
        store = Store(self.load().state_db)
        try:
            for addr, pw in (ACCOUNTS if accounts is None else accounts).items():
                if not store.account_exists(addr):
                    store.add_account(addr, hasher(pw))
            for alias, targets in (aliases or {}).items():
                store.add_alias(alias, list(targets))
        finally:
            store.close()
        return self


# ---- what tests read back from a server's data_dir -----------------------------------------------


class _Mailboxes:
    """Maildir and spool helpers for anything with a `config` (the yuubin Config it runs with)."""

    config: Config

    def maildir(self, mailbox: str) -> Path:
        local, _, domain = mailbox.rpartition("@")
        return self.config.mail_dir / domain / local

    def delivered(self, mailbox: str) -> list[bytes]:
        """The messages in the mailbox's new/, oldest first."""
        new = self.maildir(mailbox) / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def wait_delivered(self, mailbox: str, count: int, timeout: float = 10.0) -> list[bytes]:
        """The mailbox's messages once there are at least `count`; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.delivered(mailbox)
            if len(msgs) >= count:
                return msgs
            time.sleep(0.02)
        raise AssertionError(f"{mailbox}: {len(self.delivered(mailbox))} messages, expected {count}")

    def queue_entries(self) -> list[Path]:
        """The files in the spool's queue/ now."""
        q = self.config.spool_dir / "queue"
        return sorted(q.iterdir()) if q.exists() else []


# ---- yuubin as a subprocess ----------------------------------------------------------------------


def run_yuubin(args: Sequence[str], *, config: Path | None = None, stdin: str | None = None,
               env: Mapping[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `yuubin [-c CONFIG] ARGS` to the end (YUUBIN_CONFIG is not inherited); text output."""
    cmd = [*YUUBIN]
    if config is not None:
        cmd += ["-c", str(config)]
    full_env = {k: v for k, v in os.environ.items() if k != "YUUBIN_CONFIG"}
    full_env.update(env or {})
    return subprocess.run([*cmd, *args], input=stdin if stdin is not None else "", capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=timeout)


class _Process:
    """A yuubin command in the background; stderr (and stdout unless piped) go to `log_path`."""

    def __init__(self, args: Sequence[str], log_path: Path, *, pipe_stdout: bool = False):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([*YUUBIN, *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if pipe_stdout else self._log, stderr=self._log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15, sig: int = signal.SIGTERM) -> int:
        """Send `sig` (SIGTERM) and return the exit status; after `timeout` kill it and re-raise."""
        if self.running():
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._log.close()
        return rc

    def kill(self) -> int:
        """SIGKILL (a crash) and return the exit status."""
        if self.running():
            self.proc.kill()
        rc = self.proc.wait(10)
        self._log.close()
        return rc

    def close(self) -> None:
        """Kill it if it still runs (the end of a test)."""
        self.kill()


LISTENING = re.compile(r"event=listening kind=(\S+) address=(\S+) worker=(\d+)")


class ServeProcess(_Process, _Mailboxes):
    """`yuubin -c FILE serve` as a real process (writes the config file if it is not written yet).

    `start()` returns once every listener of every worker logged `event=listening`; `listening`
    then holds (kind, host, port, worker) per line.
    """

    def __init__(self, config: ServerConfig, *, log_path: Path | None = None):
        self.server_config = config
        self.config_path = config.path or config.write()
        self.config = load(self.config_path)
        self.listening: list[tuple[str, str, int, int]] = []
        log_path = log_path or config.directory / f"serve-{time.monotonic_ns()}.log"
        super().__init__(["-c", str(self.config_path), "serve"], log_path)

    def start(self, timeout: float = 20) -> ServeProcess:
        expected = len(self.config.listeners) * max(1, self.config.workers)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            found = LISTENING.findall(text)
            if len(found) >= expected:
                break
            if not self.running():
                raise AssertionError(f"yuubin serve exited with {self.proc.returncode} before listening:\n{text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"yuubin serve did not log {expected} listeners in {timeout}s:\n{text}")
            time.sleep(0.02)
        for kind, address, worker in found:
            host, _, port = address.rpartition(":")
            self.listening.append((kind, host.strip("[]"), int(port), int(worker)))
        return self

    def port(self, kind: str = "mx") -> int:
        """The bound port of the first listener of that kind."""
        for k, _host, port, _worker in self.listening:
            if k == kind:
                return port
        raise KeyError(kind)


class LocalServe(_Process, _Mailboxes):
    """`yuubin localserve --dir DIRECTORY [ARGS]`; `banner()` waits for what it prints on stdout."""

    def __init__(self, directory: Path, *args: str):
        self.directory = directory
        self.lines: list[str] = []
        self.done = threading.Event()
        super().__init__(["localserve", "--dir", str(directory), *args],
                         directory.parent / f"localserve-{time.monotonic_ns()}.log", pipe_stdout=True)
        threading.Thread(target=self._read_out, daemon=True).start()

    def _read_out(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if line.startswith("Ctrl-C stops"):
                self.done.set()
        self.done.set()

    def banner(self, timeout: float = 20) -> str:
        assert self.done.wait(timeout), f"no banner: {self.lines} {self.log_text()}"
        assert self.running(), f"localserve exited: {self.lines} {self.log_text()}"
        return "\n".join(self.lines)

    @functools.cached_property
    def config(self) -> Config:  # the config localserve wrote on its first start
        return load(self.directory / "yuubin.toml")

    def interrupt(self) -> int:
        """Ctrl-C: SIGINT and the exit status (killed after 15 s)."""
        return self.stop(15, sig=signal.SIGINT)


@contextlib.contextmanager
def port_2525() -> Iterator[None]:
    """localserve always listens on 127.0.0.1:2525: one test run at a time may use it."""
    with open(os.path.join(tempfile.gettempdir(), "yuubin-tests-port-2525.lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another test run holds it; wait (bounded by pytest timeout)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", 2525))
            except OSError:
                pytest.skip("127.0.0.1:2525 is in use by something else; localserve needs it")
        yield


# ---- yuubin in a thread of the test process ------------------------------------------------------


def _build_server(config: Config) -> App:
    """The server object `yuubin serve` runs, built from `config`."""
    return App(config)


class RunningServer(_Mailboxes):
    """A started server in its own thread and event loop; `port(kind)` gives a listener's bound port."""

    def __init__(self, config: Config, server_config: ServerConfig | None = None):
        self.config = config
        self.server_config = server_config
        self.server: App | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> RunningServer:
        self._thread = threading.Thread(target=self._run, name="yuubin-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("server did not start")
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            try:
                self.server = _build_server(self.config)
                self.loop = asyncio.get_running_loop()
                await self.server.start()
            except BaseException as e:
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self.server.stopped.wait()

        asyncio.run(main())

    def port(self, kind: str = "mx") -> int:
        for bl in self.server.listeners:
            if bl.config.kind == kind:
                return bl.sockname[1]
        raise KeyError(kind)

    def call(self, coro_fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop (e.g. to inspect or stop it)."""
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout)

    def stop(self) -> None:
        if self.server is not None and self.loop is not None and not self.server.stopping:
            with contextlib.suppress(RuntimeError):
                self.call(self.server.stop, timeout=60)
        if self._thread is not None:
            self._thread.join(30)

    def config_file(self) -> Path:
        """This server's config as a file, for admin commands (`yuubin -c FILE queue ...`)."""
        assert self.server_config is not None
        return self.server_config.path or self.server_config.write()


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[TestDNSServer]:
    """A started TestDNSServer on 127.0.0.1 (UDP and TCP, free port); stopped afterwards.

    A fresh server per test keeps ``queries`` and the resolver cache independent between tests.
    """
    with TestDNSServer() as server:
        yield server


@pytest.fixture
def resolver(dns_server: TestDNSServer) -> Resolver:
    """A yuubin Resolver asking only ``dns_server``, with a short timeout to keep tests fast."""
    return Resolver(["127.0.0.1"], port=dns_server.port, timeout=0.5)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca: trustme.CA, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("mx.test.example", "localhost", "127.0.0.1")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


@pytest.fixture(scope="session")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def cached_hashes(monkeypatch) -> None:
    """Argon2id costs ~0.15 s per hash; tests that never check a password reuse the hashes."""
    monkeypatch.setattr(sys.modules[__name__], "hash_password", _hash_once)


@pytest.fixture
def make_config(tmp_path: Path, tls_files, request) -> Callable[..., ServerConfig]:
    """`make_config(**overrides)`: a ServerConfig in tmp_path with the test TLS files and DNS server.

    The DNS server (the `dns_server` fixture) is started only when the config gets its [dns] table.
    """
    def factory(directory: Path | None = None, **overrides: Any) -> ServerConfig:
        dns_port = request.getfixturevalue("dns_server").port if "dns" not in overrides else None
        return ServerConfig(directory or tmp_path, tls_files=tls_files, dns_port=dns_port, **overrides)

    return factory


@pytest.fixture
def make_server(make_config, dns_server) -> Iterator[Callable[..., RunningServer]]:
    """`make_server(**overrides)` starts a server in-process; config keys merge over BASE_CONFIG.

    (It asks for `dns_server` itself so that the DNS server outlives every server it started.)
    """
    started: list[RunningServer] = []

    def factory(accounts: Mapping[str, str] | None = None, aliases: Mapping[str, Sequence[str]] | None = None,
                data_dir: Path | None = None, **overrides: Any) -> RunningServer:
        if data_dir is not None:
            overrides["data_dir"] = str(data_dir)
        sc = make_config(**overrides).add_accounts(accounts, aliases)
        rs = RunningServer(sc.load(), sc)
        started.append(rs)
        return rs.start()

    yield factory
    for rs in started:
        rs.stop()


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServeProcess]]:
    """`serve_process(config)` starts `yuubin serve` with a ServerConfig; killed at the end if still running."""
    started: list[ServeProcess] = []

    def factory(config: ServerConfig, **kw: Any) -> ServeProcess:
        sp = ServeProcess(config, **kw)
        started.append(sp)
        return sp.start()

    yield factory
    for sp in started:
        sp.close()

"""pytest plugin: a real yuubin server on loopback, in its own thread and event loop.

The server runs exactly as `yuubin serve` does (same Server class, real sockets, real TLS from a
trustme CA, the test DNS server as resolver), so blocking clients like smtplib can talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from yuubin.auth import passwords
from yuubin.auth.passwords import hash_password
from yuubin.config import Config, from_dict
from yuubin.server import Server
from yuubin.store import Store

__all__ = ["ca", "cached_hashes", "client_tls", "make_server", "tls_files"]


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


class RunningServer:
    """A started server; `port(kind)` gives the bound port of the first listener of that kind."""

    def __init__(self, config: Config):
        self.config = config
        self.server: Server | None = None
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
                self.server = Server(self.config)
                self.loop = asyncio.get_running_loop()
                await self.server.start()
            except BaseException as e:
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self.server._stopped.wait()

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

    def maildir(self, mailbox: str) -> Path:
        local, _, domain = mailbox.rpartition("@")
        return self.config.mail_dir / domain / local

    def delivered(self, mailbox: str) -> list[bytes]:
        new = self.maildir(mailbox) / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def wait_delivered(self, mailbox: str, count: int, timeout: float = 10.0) -> list[bytes]:
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.delivered(mailbox)
            if len(msgs) >= count:
                return msgs
            time.sleep(0.02)
        raise AssertionError(f"{mailbox}: {len(self.delivered(mailbox))} messages, expected {count}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now, for servers that must be told their port up front."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@functools.cache
def _hash_once(password: str) -> str:
    return passwords.hash_password(password)


@pytest.fixture
def cached_hashes(monkeypatch) -> None:
    """Argon2id costs ~0.15 s per hash; tests that never check a password reuse the hashes."""
    monkeypatch.setattr(sys.modules[__name__], "hash_password", _hash_once)


BASE_CONFIG: dict[str, Any] = {
    "hostname": "mx.test.example",
    "domains": {"local": ["example.test", "other.test"]},
    "network": {"trusted": ["127.0.0.0/16", "::1/128"]},  # 127.0.x.y is "the LAN"; 127.1+ "the internet"
    "dnsbl": {"zones": ["zen.dnsbl.test", "bl.dnsbl.test"]},
    "listener": [{"kind": "mx", "address": "127.0.0.1:0"}],
    "limits": {"idle_timeout": "10s", "shutdown_grace": "5s"},
}

ACCOUNTS = {"alice@example.test": "correct horse battery staple", "bob@example.test": "bob's long password 42"}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture
def make_server(tmp_path: Path, tls_files, dns_server) -> Iterator[Callable[..., RunningServer]]:
    """`make_server(**overrides)` starts a server; config keys merge over BASE_CONFIG."""
    started: list[RunningServer] = []

    def factory(accounts: dict[str, str] | None = None, aliases: dict[str, list[str]] | None = None,
                data_dir: Path | None = None, **overrides: Any) -> RunningServer:
        raw = _merge(BASE_CONFIG, overrides)
        raw.setdefault("data_dir", str(data_dir or tmp_path / "data"))
        raw.setdefault("tls", {"cert": str(tls_files[0]), "key": str(tls_files[1])})
        raw.setdefault("dns", {"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": 0.5})
        cfg = from_dict(raw)
        store = Store(cfg.state_db)
        for addr, pw in (ACCOUNTS if accounts is None else accounts).items():
            if not store.account_exists(addr):
                store.add_account(addr, hash_password(pw))
        for alias, targets in (aliases or {}).items():
            store.add_alias(alias, targets)
        store.close()
        rs = RunningServer(cfg).start()
        started.append(rs)
        return rs

    yield factory
    for rs in started:
        rs.stop()

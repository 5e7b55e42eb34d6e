"""Never lose a message: kill -9 a real `yuubin serve` at random points during a stream of mail.

Every message that got 250 must arrive (local Maildir or the remote MX sink) after restarts;
duplicates are allowed (a kill between the remote's 250 and our rewrite sends it again).
"""

from __future__ import annotations

import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness import free_port
from tests.smtpsink import SmtpSink
from yuubin.auth.passwords import hash_password
from yuubin.store import Store

KILLS = 5
ALICE = "alice@example.test"
REMOTE = "carol@remote.test"


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"yuubin serve exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("yuubin serve did not start listening")


@pytest.mark.slow
def test_kill_9_during_a_stream_of_mail_loses_nothing(tmp_path: Path, dns_server):
    rng = random.Random(os.environ.get("YUUBIN_CRASH_SEED", "4"))
    mx_port = free_port("127.1.0.1")
    listen_port = free_port("127.0.0.1")
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")
    data_dir = tmp_path / "data"
    cfg = tmp_path / "yuubin.toml"
    cfg.write_text(f"""
hostname = "mx.test.example"
data_dir = "{data_dir}"
[domains]
local = ["example.test"]
[network]
trusted = ["127.0.0.0/16"]
[dns]
nameservers = ["127.0.0.1"]
port = {dns_server.port}
timeout = 0.5
[dnsbl]
zones = []
[[listener]]
kind = "mx"
address = "127.0.0.1:{listen_port}"
[limits]
shutdown_grace = "2s"
[outbound]
port = {mx_port}
retry_first = "0.2s"
retry_max = "0.5s"
queue_scan = "0.5s"
connect_timeout = "2s"
command_timeout = "5s"
[log]
level = "warning"
""")
    store = Store(data_dir / "state.db")
    store.add_account(ALICE, hash_password("crash test password 1"))
    store.close()
    log = (tmp_path / "serve.log").open("ab")

    def serve() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "yuubin", "-c", str(cfg), "serve"], stdout=log, stderr=log)
        wait_listening(listen_port, p)
        return p

    accepted: dict[str, list[str]] = {}
    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            token = f"crash-{n}"
            rcpts = [[ALICE], [REMOTE], [ALICE, REMOTE]][n % 3]
            body = f"From: <{ALICE}>\r\nSubject: {token}\r\n\r\nbody of {token}\r\n.dot line\r\n"
            try:
                with smtplib.SMTP("127.0.0.1", listen_port, timeout=5) as c:
                    c.sendmail(ALICE, rcpts, body)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.02)  # down or killed mid-transaction: not acknowledged, not counted
                continue
            accepted[token] = rcpts

    with SmtpSink(host="127.1.0.1", port=mx_port) as sink:
        proc = serve()
        t0 = time.monotonic()
        client = threading.Thread(target=stream, daemon=True)
        client.start()
        try:
            for _ in range(KILLS):
                time.sleep(rng.uniform(0.3, 1.5))
                proc.send_signal(signal.SIGKILL)
                proc.wait(5)
                proc = serve()
            time.sleep(0.5)
            stop.set()
            client.join(10)
            assert len(accepted) >= 20, f"only {len(accepted)} messages accepted: the test did not stress anything"

            def missing() -> list[str]:
                new = data_dir / "mail" / "example.test" / "alice" / "new"
                local = b"".join(p.read_bytes() for p in new.iterdir()) if new.exists() else b""
                with sink.lock:
                    remote = b"".join(m.data for m in sink.messages)
                out = []
                for token, rcpts in accepted.items():
                    needle = f"Subject: {token}\r\n".encode()
                    if (ALICE in rcpts and needle not in local) or (REMOTE in rcpts and needle not in remote):
                        out.append(token)
                return out

            deadline = time.monotonic() + 25
            while missing() and time.monotonic() < deadline:
                time.sleep(0.2)
            lost = missing()
            assert not lost, f"{len(lost)} of {len(accepted)} acknowledged messages lost: {lost[:10]}"
            print(f"crash test: {len(accepted)} acknowledged, {KILLS} kills, {len(sink.messages)} remote copies, "
                  f"{len(list((data_dir / 'spool' / 'corrupt').iterdir()))} set aside as torn")
            assert sink.bare_line_endings == 0
            assert b"\r\n.dot line\r\n" in sink.messages[0].data
        finally:
            stop.set()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    assert time.monotonic() - t0 < 60

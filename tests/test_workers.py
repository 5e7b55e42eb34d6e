"""`[server] workers = 2`: a real `yuubin serve` as several processes sharing the listeners.

Both workers take sessions, every acknowledged message is delivered, relayed mail accepted by a
worker that does not run the outbound queue still leaves (through a flush request), SIGTERM
stops everything, and a worker that dies takes the whole server down for its supervisor.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness import free_port
from tests.smtpsink import SmtpSink

pytestmark = pytest.mark.slow

SINK_HOST = "127.1.7.1"


def _config(tmp_path: Path, dns_port: int, sink_port: int) -> Path:
    cfg = tmp_path / "yuubin.toml"
    cfg.write_text(f"""
hostname = "mx.workers.test"
data_dir = "{tmp_path / 'data'}"
[domains]
local = ["example.test"]
[network]
trusted = ["127.0.0.0/16"]
[dns]
nameservers = ["127.0.0.1"]
port = {dns_port}
timeout = 1.0
[dnsbl]
zones = []
[[listener]]
kind = "mx"
address = "127.0.0.1:0"
[outbound]
port = {sink_port}
retry_first = "1s"
[server]
workers = 2
""", encoding="utf-8")
    return cfg


class Served:
    def __init__(self, cfg: Path, log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "yuubin", "-c", str(cfg), "serve"],
                                     stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        deadline = time.monotonic() + 20
        self.port = 0
        while time.monotonic() < deadline and self.port == 0:
            found = re.findall(r"event=listening kind=mx address=127\.0\.0\.1:(\d+) worker=(\d)", self.text())
            if {w for _p, w in found} == {"0", "1"}:
                self.port = int(found[0][0])
            elif self.proc.poll() is not None:
                break
            time.sleep(0.05)
        assert self.port, f"workers did not start:\n{self.text()}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def send(self, rcpt: str, n: int) -> None:
        def one(i: int) -> None:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
                s.sendmail("sender@remote.example", [rcpt], f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode())
        with ThreadPoolExecutor(10) as pool:
            list(pool.map(one, range(n)))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


@pytest.fixture
def served(tmp_path, dns_server):
    sink = SmtpSink(host=SINK_HOST, port=free_port(SINK_HOST)).start()
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", SINK_HOST)
    cfg = _config(tmp_path, dns_server.port, sink.port)
    from yuubin.auth.passwords import hash_password
    from yuubin.store import Store
    store = Store(tmp_path / "data" / "state.db")
    store.add_account("alice@example.test", hash_password("correct horse battery staple"))
    store.close()
    srv = Served(cfg, tmp_path / "serve.log")
    yield srv, sink, tmp_path / "data"
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait(10)
    sink.stop()


def test_two_workers_share_the_sessions_and_deliver_everything(served):
    srv, _sink, data = served
    srv.send("alice@example.test", 80)
    new = data / "mail" / "example.test" / "alice" / "new"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(list(new.iterdir())) < 80:
        time.sleep(0.05)
    bodies = sorted(p.read_bytes().split(b"message ")[1] for p in new.iterdir())
    assert len(bodies) == 80 and len(set(bodies)) == 80
    assert srv.stop() == 0
    text = srv.text()
    assert "session=0-" in text and "session=1-" in text, "one worker took every session"
    assert "event=workers_stopped status=0" in text
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2)


def test_relayed_mail_leaves_whichever_worker_accepted_it(served):
    srv, sink, _data = served
    sent = 0
    # Until worker 1 (which does not run the outbound queue) has accepted some: bounded.
    while sent < 100 and not re.search(r"event=accepted session=1-", srv.text()):
        srv.send("bob@remote.test", 20)  # from 127.0.0.1: the trusted LAN relays
        sent += 20
        time.sleep(0.2)  # log lines are written every 50 ms
    assert re.search(r"event=accepted session=1-", srv.text()), "worker 1 accepted nothing"
    got = sink.wait_messages(sent, timeout=20)
    assert sorted(m.recipients[0] for m in got) == ["bob@remote.test"] * sent
    assert srv.stop() == 0


def test_a_dying_worker_stops_the_server_for_its_supervisor(served):
    srv, _sink, _data = served
    pids = [int(p) for p in re.search(r"event=workers_started workers=2 pids=([\d,]+)", srv.text()).group(1).split(",")]
    os.kill(pids[1], signal.SIGKILL)
    assert srv.proc.wait(20) == 1
    assert "event=worker_exited worker=1" in srv.text()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

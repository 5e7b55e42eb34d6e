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
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness import ServeProcess, free_port
from tests.smtpsink import SmtpSink

pytestmark = pytest.mark.slow

SINK_HOST = "127.1.7.1"


def send(srv: ServeProcess, rcpt: str, n: int) -> None:
    """`n` messages to `rcpt`, ten sessions at a time."""
    def one(i: int) -> None:
        with smtplib.SMTP("127.0.0.1", srv.port(), timeout=30) as s:
            s.sendmail("sender@remote.example", [rcpt], f"Subject: {i}\r\n\r\nmessage {i}\r\n".encode())
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(one, range(n)))


@pytest.fixture
def served(make_config, dns_server, serve_process):
    sink = SmtpSink(host=SINK_HOST, port=free_port(SINK_HOST)).start()
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", SINK_HOST)
    config = make_config(dns={"nameservers": ["127.0.0.1"], "port": dns_server.port, "timeout": 1.0},
                         outbound={"port": sink.port, "retry_first": "1s"}, server={"workers": 2})
    srv = serve_process(config.add_accounts({"alice@example.test": "correct horse battery staple"}, cached=True))
    assert {w for kind, _h, _p, w in srv.listening if kind == "mx"} == {0, 1}, srv.log_text()
    yield srv, sink
    srv.close()
    sink.stop()


def test_two_workers_share_the_sessions_and_deliver_everything(served):
    srv, _sink = served
    send(srv, "alice@example.test", 80)
    bodies = sorted(raw.split(b"message ")[1] for raw in srv.wait_delivered("alice@example.test", 80, timeout=15))
    assert len(bodies) == 80 and len(set(bodies)) == 80
    assert srv.stop(20) == 0
    text = srv.log_text()
    # Session ids are START-WORKER-N with several workers.
    assert re.search(r"session=\w+-0-", text) and re.search(r"session=\w+-1-", text), "one worker took every session"
    assert "event=workers_stopped status=0" in text
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port()), timeout=2)


def test_relayed_mail_leaves_whichever_worker_accepted_it(served):
    srv, sink = served
    sent = 0
    # Until worker 1 (which does not run the outbound queue) has accepted some: bounded.
    while sent < 100 and not re.search(r"event=accepted session=\w+-1-", srv.log_text()):
        send(srv, "bob@remote.test", 20)  # from 127.0.0.1: the trusted LAN relays
        sent += 20
        time.sleep(0.2)  # log lines are written every 50 ms
    assert re.search(r"event=accepted session=\w+-1-", srv.log_text()), "worker 1 accepted nothing"
    got = sink.wait_messages(sent, timeout=20)
    assert sorted(m.recipients[0] for m in got) == ["bob@remote.test"] * sent
    assert srv.stop(20) == 0


def test_a_dying_worker_stops_the_server_for_its_supervisor(served):
    srv, _sink = served
    pids = [int(p) for p in
            re.search(r"event=workers_started workers=2 pids=([\d,]+)", srv.log_text()).group(1).split(",")]
    os.kill(pids[1], signal.SIGKILL)
    assert srv.wait(20) == 1
    assert "event=worker_exited worker=1" in srv.log_text()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

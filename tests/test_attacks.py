"""Resource attacks against a real `yuubin serve`, each bounded, each with a good client alongside.

Every test starts the server as a process (small limits so the attack is over in seconds), runs
the attack from an "internet" address (127.1.x.y), checks that the limit held (connections
closed, fds and RSS bounded, no more password checks than allowed) and that a good client from
another address got through while it ran.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import select
import smtplib
import socket
import sqlite3
import ssl
import threading
import time
from pathlib import Path

import pytest

from tests.harness import ACCOUNTS, ServeProcess, ServerConfig
from tests.smtpclient import RawSMTP
from yuubin.smtp.protocol import SMTPServerConnection

ALICE = "alice@example.test"
ALICE_PW = ACCOUNTS[ALICE]
LISTENERS = [
    {"kind": "mx", "address": "127.0.0.1:0"},
    {"kind": "submissions", "address": "127.0.0.1:0"},
]
GOOD_MTA = "127.2.0.9"  # another internet address: a well-behaved MTA
GOOD_USER = "127.3.0.9"  # a roaming user on 465


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def logged(sp: ServeProcess, text: str, timeout: float = 5.0) -> bool:
    """Whether the server logs `text` within `timeout` seconds (its log is written as it goes)."""
    deadline = time.monotonic() + timeout
    while text not in sp.log_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def serve(make_config, serve_process, limits: dict, listeners: list | None = None, **extra) -> ServeProcess:
    cfg: ServerConfig = make_config(listener=listeners or LISTENERS,
                                    limits={"idle_timeout": "10s", "shutdown_grace": "2s", **limits}, **extra)
    cfg.add_accounts({ALICE: ALICE_PW}, cached=True)
    return serve_process(cfg)


def submit_465(sp: ServeProcess, client_tls: ssl.SSLContext, source: str = GOOD_USER) -> float:
    """A user logs in on 465 and submits one message to a local mailbox; seconds it took."""
    t0 = time.monotonic()
    with smtplib.SMTP_SSL("127.0.0.1", sp.port("submissions"), source_address=(source, 0), timeout=10,
                          context=client_tls) as s:
        s.ehlo("laptop.test")
        s.login(ALICE, ALICE_PW)
        s.sendmail(ALICE, [ALICE], f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: t\r\n\r\nhi\r\n")
    return time.monotonic() - t0


def deliver_25(sp: ServeProcess, source: str = GOOD_MTA) -> float:
    """A good MTA delivers one message on 25; seconds it took."""
    t0 = time.monotonic()
    with smtplib.SMTP("127.0.0.1", sp.port("mx"), source_address=(source, 0), timeout=10) as s:
        s.ehlo("mta.good.test")
        s.sendmail("someone@good.test", [ALICE], "From: someone@good.test\r\nSubject: t\r\n\r\nhi\r\n")
    return time.monotonic() - t0


def still_open(socks: list[socket.socket], wait: float = 0.3) -> list[socket.socket]:
    """The sockets the server has not closed (nothing readable, or data without EOF)."""
    readable, _, _ = select.select(socks, [], [], wait)
    closed = set()
    for s in readable:
        try:
            s.setblocking(False)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    closed.add(s)
                    break
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError:
            closed.add(s)
    return [s for s in socks if s not in closed]


def tcp(port: int, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    return s


# ---- 1: unfinished TLS handshakes are counted from the accept ---------------------------------


def test_half_open_tls_is_bounded_per_address_and_in_total(make_config, serve_process, client_tls):
    sp = serve(make_config, serve_process, {"handshakes_per_ip": 3, "max_handshakes": 8, "handshake_timeout": "2s",
                                             "connections_per_ip": 100})
    port = sp.port("submissions")
    fds_idle = open_fds(sp.pid)
    flood = [tcp(port, "127.1.0.20") for _ in range(30)]  # TCP only: never a ClientHello
    try:
        time.sleep(0.3)
        assert len(still_open(flood)) == 3  # the rest closed at once, no handshake started
        # A good user from another address logs in and submits meanwhile.
        assert submit_465(sp, client_tls) < 3.0
        # From many addresses: at most max_handshakes wait, in total.
        more = [tcp(port, f"127.1.1.{i}") for i in range(1, 11) for _ in range(2)]
        time.sleep(0.3)
        assert len(still_open(flood + more)) == 8
        assert open_fds(sp.pid) <= fds_idle + 8 + 2
        flood += more
        # The handshake deadline: all of them are gone after limits.handshake_timeout.
        time.sleep(2.5)
        assert still_open(flood) == []
        assert submit_465(sp, client_tls) < 3.0
    finally:
        for s in flood:
            s.close()
    assert logged(sp, "no handshake within 2s (limits.handshake_timeout)")
    log = sp.log_text()
    assert "too many TLS handshakes in progress from the address (limits.handshakes_per_ip)" in log
    assert "too many TLS handshakes in progress (limits.max_handshakes)" in log
    assert "no handshake within 2s (limits.handshake_timeout)" in log


# ---- 3: slow dribblers are timed out; port 25 has its own pool ----------------------------------


@pytest.mark.slow
def test_slowloris_on_25_never_locks_out_465(make_config, serve_process, client_tls):
    listeners = [{"kind": "mx", "address": "127.0.0.1:0", "max_connections": 10},
                 {"kind": "submissions", "address": "127.0.0.1:0"}]
    sp = serve(make_config, serve_process, {"idle_timeout": "2s", "max_connections": 30, "connections_per_ip": 100},
               listeners=listeners)
    port = sp.port("mx")
    dribblers = [RawSMTP(port, source="127.1.0.40") for _ in range(10)]
    for d in dribblers:
        assert d.reply()[0] == 220
    stop = threading.Event()

    def dribble() -> None:  # one byte each 0.3 s: never a whole line
        while not stop.is_set():
            for d in dribblers:
                with contextlib.suppress(OSError):
                    d.send(b"N")
            stop.wait(0.3)

    t = threading.Thread(target=dribble)
    t.start()
    try:
        # Port 25's pool is full: one more from the flooding address gets 421 ...
        extra = RawSMTP(port, source="127.1.0.40")
        assert extra.reply()[0] == 421
        # ... one from another address takes the place of one of the flood's idle sessions ...
        newcomer = RawSMTP(port, source="127.1.0.41")
        assert newcomer.reply()[0] == 220
        # ... and 465 has its own pool: a user logs in and submits at once.
        assert submit_465(sp, client_tls) < 3.0
        # The deadline is for the whole line, not per byte: every dribbler is closed with 421.
        time.sleep(2.6)
        for d in dribblers:
            code, text = d.reply()
            assert code == 421, text
        # Its places are free again: a good MTA delivers on 25.
        assert deliver_25(sp) < 3.0
    finally:
        stop.set()
        t.join()
    assert logged(sp, "command line not complete within 2s (limits.idle_timeout)")
    log = sp.log_text()
    assert log.count("this address holds the most of its places") == 1
    assert 'reason="listener full (its max_connections)"' in log


@pytest.mark.slow
def test_data_dribbler_below_the_minimum_rate_is_closed(make_config, serve_process):
    sp = serve(make_config, serve_process, {"idle_timeout": "1s", "data_min_rate": 1000})
    c = RawSMTP(sp.port("mx"), source="127.1.0.42")
    c.reply()
    c.cmd("EHLO slow.test")
    assert c.cmd("MAIL FROM:<a@slow.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    t0 = time.monotonic()
    with pytest.raises((ConnectionError, OSError, AssertionError)):
        while time.monotonic() - t0 < 6:
            c.send(b"x" * 10)  # 10 bytes each 0.2 s: 50 B/s, far below 1000 B/s
            time.sleep(0.2)
            if c.pending(0):
                raise AssertionError("closed")
    assert time.monotonic() - t0 < 3
    assert logged(sp, "slower than 1000 bytes/s (limits.data_min_rate)")


# ---- 4: message data in memory has one budget ------------------------------------------------


@pytest.mark.slow
def test_large_unfinished_messages_keep_rss_bounded(make_config, serve_process):
    budget = 48 << 20
    sp = serve(make_config, serve_process, {"data_in_memory": budget, "message_size": 25 << 20,
                                             "connections_per_ip": 100, "data_timeout": "20s"})
    port = sp.port("mx")
    idle = rss_kib(sp.pid)
    peak = [idle]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(sp.pid))
            stop.wait(0.05)

    chunk = b"y" * 1020 + b"\r\n"
    results: list[str] = []

    def flooder(i: int) -> None:
        c = RawSMTP(port, source="127.1.0.50", timeout=20)
        c.reply()
        c.cmd("EHLO big.test")
        c.cmd("MAIL FROM:<a@big.test>")
        c.cmd(f"RCPT TO:<{ALICE}>")
        c.cmd("DATA")
        try:
            for _ in range(20 * 1024):  # 20 MB, never the terminator
                c.send(chunk)
            results.append("sent")
        except OSError:
            results.append("closed")
        finally:
            c.sock.close()

    w = threading.Thread(target=watch)
    w.start()
    threads = [threading.Thread(target=flooder, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        assert deliver_25(sp) < 5.0  # a good MTA gets through while 20 × 20 MB are in flight
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        w.join()
    grown_mib = (peak[0] - idle) / 1024
    # The budget, plus a copy or two of the unparsed reads: never the 400 MB in flight.
    assert grown_mib < 3 * budget / (1 << 20) + 40, grown_mib
    assert results.count("closed") >= 10
    assert logged(sp, "check=memory")


# ---- 5: a locked state.db stalls nothing ---------------------------------------------------------


@pytest.mark.slow
def test_locked_state_db_stalls_no_session_and_loses_no_failure(make_config, serve_process, client_tls):
    sp = serve(make_config, serve_process, {"state_db_timeout": "0.5s"}, auth_guard={"max_failures": 3})
    other = sqlite3.connect(sp.config.state_db, timeout=1, isolation_level=None, check_same_thread=False)
    mta = RawSMTP(sp.port("mx"), source=GOOD_MTA)
    mta.reply()
    mta.cmd("EHLO mta.good.test")
    other.execute("BEGIN EXCLUSIVE")
    other.execute("INSERT INTO aliases(alias, target) VALUES ('lock@example.test', 'x@example.test')")
    try:
        released = threading.Timer(4.0, other.execute, args=("COMMIT",))
        released.start()
        # A wrong password while the file is locked: refused at once, and counted later.
        wrong: list[float] = []
        codes: list[int] = []

        def guess() -> None:
            t0 = time.monotonic()
            with smtplib.SMTP_SSL("127.0.0.1", sp.port("submissions"), source_address=("127.1.0.70", 0),
                                  timeout=10, context=client_tls) as s:
                s.ehlo("x.test")
                token = base64.b64encode(f"\0{ALICE}\0not the password".encode()).decode()
                codes.append(s.docmd("AUTH", f"PLAIN {token}")[0])
            wrong.append(time.monotonic() - t0)

        g = threading.Thread(target=guess)
        g.start()
        # Meanwhile an unrelated session on 25 answers at once, again and again.
        worst = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            assert mta.cmd("NOOP")[0] == 250
            worst = max(worst, time.monotonic() - t0)
            time.sleep(0.05)
        # A local recipient (a read) and a correct password work during the lock.
        assert mta.cmd("MAIL FROM:<a@good.test>")[0] == 250
        assert mta.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
        for _ in range(4):  # more logins than max_failures: successes queued are not failures
            assert submit_465(sp, client_tls) < 3.0
        g.join(10)
        assert worst < 0.3, worst
        assert wrong and wrong[0] < 3.0 and codes == [535]
        released.join()
    finally:
        other.close()
    # Once the lock is gone, the failure made while it was held is in state.db.
    deadline = time.monotonic() + 5
    db = sqlite3.connect(sp.config.state_db)
    try:
        while True:
            n = db.execute("SELECT COUNT(*) FROM auth_failures WHERE scope = 'source' AND key = '127.1.0.70'"
                           ).fetchone()[0]
            if n == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        db.close()
    assert n == 1
    assert logged(sp, "event=state_db_busy") and logged(sp, "event=state_db_written")
    mta.cmd("QUIT")


# ---- 6: parallel guessing checks at most max_failures passwords --------------------------------


@pytest.mark.slow
def test_parallel_auth_never_checks_more_than_max_failures(make_config, serve_process, client_tls):
    sp = serve(make_config, serve_process, {"connections_per_ip": 50, "handshakes_per_ip": 16},
               auth_guard={"max_failures": 3, "concurrent_checks": 2})
    port = sp.port("submissions")
    codes: list[int] = []
    go = threading.Barrier(16)

    def attempt(i: int) -> None:
        with smtplib.SMTP_SSL("127.0.0.1", port, source_address=("127.1.0.60", 0), timeout=20,
                              context=client_tls) as s:
            s.ehlo("hydra.test")
            token = base64.b64encode(f"\0{ALICE}\0guess{i}".encode()).decode()
            go.wait(10)
            codes.append(s.docmd("AUTH", f"PLAIN {token}")[0])

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(codes) == 16 and set(codes) <= {535, 454}, codes
    time.sleep(0.3)  # the last lines of the log
    log = sp.log_text()
    checked = len(re.findall(r"event=auth_failed .*source=127\.1\.0\.60 ", log))
    assert 1 <= checked <= 3, checked
    assert codes.count(535) == checked
    assert len(re.findall(r"event=auth_lockout client=127\.1\.0\.60 ", log)) <= 1
    # A user elsewhere is not affected.
    assert submit_465(sp, client_tls) < 3.0


# ---- 7: a client that never reads ----------------------------------------------------------------


@pytest.mark.slow
def test_non_reading_pipeliner_stalls_nobody(make_config, serve_process):
    sp = serve(make_config, serve_process, {"idle_timeout": "3s", "connections_per_ip": 20})
    port = sp.port("mx")
    stop = threading.Event()
    sent = [0] * 5

    def pipeline(i: int) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads nothing, and buffers little
        s.bind(("127.1.0.80", 0))
        s.connect(("127.0.0.1", port))
        s.settimeout(0.2)
        blob = b"EHLO x\r\n" * 8192
        try:
            while not stop.is_set() and sent[i] < (1 << 20):
                try:
                    sent[i] += s.send(blob)
                except TimeoutError:
                    continue  # the server stopped reading: flow control
        except OSError:
            pass
        finally:
            stop.wait()
            s.close()

    threads = [threading.Thread(target=pipeline, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    try:
        good = RawSMTP(port, source=GOOD_MTA)
        assert good.reply()[0] == 220
        worst = 0.0
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            t0 = time.monotonic()
            assert good.cmd("NOOP")[0] == 250
            worst = max(worst, time.monotonic() - t0)
        assert worst < 0.3, worst
        good.cmd("QUIT")
        assert rss_kib(sp.pid) < 200 * 1024
        # Not reading our replies for idle_timeout ends the session.
        deadline = time.monotonic() + 15
        while "client not reading our replies" not in sp.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert "client not reading our replies for 3s" in sp.log_text()


# ---- 8: the minor ones ----------------------------------------------------------------------------


def test_ehlo_with_a_bare_cr_is_refused_not_echoed(make_config, serve_process):
    sp = serve(make_config, serve_process, {})
    c = RawSMTP(sp.port("mx"), source=GOOD_MTA)
    c.reply()
    c.send(b"EHLO evil\rX-Injected: yes\r\n")
    code, lines = c.reply()
    assert code == 501 and all("\r" not in line and "Injected" not in line for line in lines)
    assert c.cmd("EHLO good.test")[0] == 250  # the session goes on
    assert logged(sp, "control character in the HELO/EHLO name")


def test_ehlo_name_with_control_characters_refused_by_the_core():
    conn = SMTPServerConnection("mx.test")
    conn.start()
    conn.receive_data(b"EHLO a\rb\r\nHELO c\td\r\nEHLO ok.test\r\n")
    event = conn.next_event()
    assert getattr(event, "name", None) == "ok.test"
    out = conn.data_to_send()
    assert out.count(b"501 5.5.4") == 2 and b"a\rb" not in out


def test_bdat_0_last_with_no_data_is_554(make_config, serve_process):
    sp = serve(make_config, serve_process, {})
    c = RawSMTP(sp.port("mx"), source=GOOD_MTA)
    c.reply()
    c.cmd("EHLO mta.good.test")
    c.cmd("MAIL FROM:<a@good.test>")
    assert c.cmd(f"RCPT TO:<{ALICE}>")[0] == 250
    code, lines = c.cmd("BDAT 0 LAST")
    assert (code, lines[0][:5]) == (554, "5.6.0")
    assert c.cmd("MAIL FROM:<a@good.test>")[0] == 250  # the transaction is over; the session is not
    c.cmd("QUIT")
    assert not any(sp.maildir(ALICE).glob("new/*")) if sp.maildir(ALICE).exists() else True


def test_old_maildir_tmp_files_are_cleaned_at_start(make_config, serve_process):
    cfg: ServerConfig = make_config(listener=LISTENERS[:1])
    maildir = Path(cfg.load().mail_dir) / "example.test" / "alice"
    for sub in ("tmp", "new", "cur", ".Junk/tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    old, fresh, junk_old = maildir / "tmp" / "1.crashed", maildir / "tmp" / "2.writing", maildir / ".Junk/tmp/3.x"
    for p in (old, fresh, junk_old):
        p.write_bytes(b"partial")
    then = time.time() - 37 * 3600
    os.utime(old, (then, then))
    os.utime(junk_old, (then, then))
    sp = serve_process(cfg)
    deadline = time.monotonic() + 5
    while old.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not old.exists() and not junk_old.exists() and fresh.exists()
    assert logged(sp, "event=maildir_tmp_cleaned files=2")

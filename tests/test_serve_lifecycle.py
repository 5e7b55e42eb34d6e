"""`yuubin serve` and `yuubin localserve` as real processes: start, receive, stop, crash, restart.

The promise under test: a message that got 250 is never lost — not at SIGTERM (sessions in flight
finish within limits.shutdown_grace) and not at kill -9 (the spool is redelivered at start).
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import LocalServe, ServeProcess, port_2525, run_yuubin
from tests.smtpclient import RawSMTP

pytestmark = pytest.mark.slow

ALICE = "alice@example.test"
ALICE_PASSWORD = "Tangerine-orbit-71-quasar"


@pytest.fixture
def served(make_config):
    """The config every test here serves: a short shutdown grace, and alice's account."""
    return make_config(limits={"shutdown_grace": "3s"}).add_accounts(
        {ALICE: ALICE_PASSWORD}, cached=True)  # (`account add` itself is tested in test_cli.py)


def maildir_ids(srv: ServeProcess) -> list[str]:
    out = []
    for raw in srv.delivered(ALICE):
        m = re.search(rb"^Message-ID: <([^>]+)>", raw, re.M)
        out.append(m.group(1).decode() if m else "?")
    return sorted(out)


def wait_ids(srv: ServeProcess, expected: set[str], timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = maildir_ids(srv)
        if expected <= set(ids):
            return ids
        time.sleep(0.05)
    return maildir_ids(srv)


def msg(mid: str) -> bytes:
    return f"From: <sender@remote.example>\r\nSubject: {mid}\r\nMessage-ID: <{mid}>\r\n\r\nbody of {mid}\r\n".encode()


def send(port: int, mid: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="lan.example", timeout=10) as s:
        assert s.sendmail("sender@remote.example", ["alice@example.test"], msg(mid)) == {}


def test_sigterm_finishes_sessions_in_flight_and_loses_nothing(served, serve_process):
    srv = serve_process(served)
    port = srv.port()
    accepted = set()
    for i in range(5):
        send(port, f"before-{i}@test")
        accepted.add(f"before-{i}@test")

    idle = RawSMTP(port)
    assert idle.reply()[0] == 220 and idle.cmd("EHLO lan.example")[0] == 250
    inflight = RawSMTP(port)
    assert inflight.reply()[0] == 220
    inflight.send(b"EHLO lan.example\r\nMAIL FROM:<sender@remote.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert [inflight.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    inflight.send(msg("inflight@test")[:40])

    t0 = time.monotonic()
    srv.send_signal(signal.SIGTERM)
    # The idle session is told at once; new connections are no longer accepted.
    code, text = idle.reply()
    assert code == 421 and text[0].startswith("4."), text
    assert idle.closed_by_peer()
    deadline = time.monotonic() + 3
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(2)
                banner = s.recv(512)
            assert not banner.startswith(b"220"), "a new session was greeted after SIGTERM"
        except OSError:
            break
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    # The transaction in flight may finish and is accepted, then the session is closed.
    inflight.send(msg("inflight@test")[40:] + b".\r\n")
    code, text = inflight.reply()
    assert code == 250, (code, text)
    accepted.add("inflight@test")
    code, text = inflight.reply()
    assert code == 421, (code, text)
    assert inflight.closed_by_peer()

    rc = srv.wait(3 + 10)
    elapsed = time.monotonic() - t0
    assert rc == 0, srv.log_text()
    assert elapsed < 3 + 5, elapsed
    log = srv.log_text()
    assert "Traceback" not in log, log
    assert "event=stopped" in log
    # key=value logs on stderr, with the session id on every line of a session
    connects = re.findall(r"event=connect session=(\S+) ", log)
    assert len(connects) >= 7, log
    for sid in connects:
        assert re.search(rf"event=disconnect session={re.escape(sid)} ", log), sid

    ids = maildir_ids(srv)
    if not accepted <= set(ids):  # a delivery cut off at shutdown must be redelivered at the next start
        again = serve_process(served)
        ids = wait_ids(again, accepted)
        rc = again.stop(15)
        assert rc == 0, again.log_text()
    assert accepted <= set(ids), (sorted(accepted - set(ids)), ids)
    assert srv.queue_entries() == []


def test_sigterm_stops_within_the_grace_even_if_a_client_never_finishes(served, serve_process):
    srv = serve_process(served)
    stuck = RawSMTP(srv.port(), timeout=15)
    assert stuck.reply()[0] == 220
    stuck.send(b"EHLO lan.example\r\nMAIL FROM:<sender@remote.example>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert [stuck.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    stuck.send(b"Subject: never finished\r\n\r\nstill typing")
    t0 = time.monotonic()
    srv.send_signal(signal.SIGTERM)
    code, text = stuck.reply()  # after shutdown_grace (3 s) the session is ended, the message not taken
    assert code == 421, (code, text)
    rc = srv.wait(15)
    elapsed = time.monotonic() - t0
    assert rc == 0, srv.log_text()
    assert 2.5 < elapsed < 3 + 5, elapsed
    stuck.close()
    assert maildir_ids(srv) == [] and srv.queue_entries() == []


def test_kill_9_after_250_then_restart_delivers(served, serve_process):
    srv = serve_process(served)
    accepted = [f"crash-{i}@test" for i in range(4)]
    for mid in accepted:
        send(srv.port(), mid)
    srv.kill()  # SIGKILL right after the last 250

    again = serve_process(served)
    ids = wait_ids(again, set(accepted))
    assert set(accepted) <= set(ids), ids
    rc = again.stop(15)
    assert rc == 0, again.log_text()
    assert again.queue_entries() == []


def test_spooled_message_survives_kill_9_while_delivery_is_failing(served, serve_process):
    # Make local delivery impossible (a file where the domain's directory must be): the message
    # can then only be in the spool when the process dies.
    blocker = served.load().mail_dir / "example.test"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_bytes(b"not a directory\n")
    srv = serve_process(served)
    send(srv.port(), "spooled@test")
    deadline = time.monotonic() + 5
    while not srv.queue_entries() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(srv.queue_entries()) == 1
    time.sleep(0.3)  # the first delivery attempt fails and is deferred
    assert len(srv.queue_entries()) == 1
    srv.kill()

    blocker.unlink()
    again = serve_process(served)
    ids = wait_ids(again, {"spooled@test"})
    assert ids == ["spooled@test"], ids
    rc = again.stop(15)
    assert rc == 0, again.log_text()
    assert again.queue_entries() == []


def test_account_added_while_serving_takes_effect_at_once(served, serve_process):
    srv = serve_process(served)
    port = srv.port()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="lan.example", timeout=10) as s:
        s.ehlo()
        s.mail("sender@remote.example")
        assert s.rcpt("newbie@example.test")[0] == 550
    p = run_yuubin(["account", "add", "newbie@example.test"], config=srv.config_path, stdin="Velvet-canyon-38-nimbus\n")
    assert p.returncode == 0, p.stderr
    with smtplib.SMTP("127.0.0.1", port, local_hostname="lan.example", timeout=10) as s:
        assert s.sendmail("sender@remote.example", ["newbie@example.test"], msg("newbie@test")) == {}
    assert len(srv.wait_delivered("newbie@example.test", 1)) == 1
    rc = srv.stop(15)
    assert rc == 0, srv.log_text()


# ---- localserve (fixed port 2525) ----------------------------------------------------------------


def test_localserve_runs_everything_on_loopback(tmp_path):
    d = tmp_path / "ls"
    with port_2525():
        ls = LocalServe(d)
        try:
            text = ls.banner()
            assert re.search(r"\bmx\s+127\.0\.0\.1:2525\b", text), text
            m = re.search(r"demo@localhost\.test\s+password:\s*(\S+)", text)
            assert m, text
            password = m.group(1)
            assert len(password) >= 12
            cert_path = d / "tls" / "cert.pem"
            assert cert_path.exists() and (d / "tls" / "key.pem").exists()
            from cryptography import x509

            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            assert cert.issuer == cert.subject  # self-signed

            ctx = ssl.create_default_context(cafile=str(cert_path))
            ctx.check_hostname = False  # trust exactly this certificate, whatever name it carries
            with smtplib.SMTP("127.0.0.1", 2525, local_hostname="client.example", timeout=10) as s:
                s.ehlo()
                assert s.starttls(context=ctx)[0] == 220
                s.ehlo()
                assert s.sendmail("friend@remote.example", ["demo@localhost.test"], msg("demo@test")) == {}
            (delivered,) = ls.wait_delivered("demo@localhost.test", 1)
            assert b"Message-ID: <demo@test>" in delivered
        finally:
            rc = ls.interrupt()
        assert rc == 0, (rc, ls.log_text())  # Ctrl-C is a clean stop, like SIGTERM
        assert "Traceback" not in ls.log_text(), ls.log_text()

        # The second start reuses everything and does not print a password again.
        ls = LocalServe(d)
        try:
            text = ls.banner()
            assert password not in text
            assert "demo@localhost.test" in text
        finally:
            ls.interrupt()
        assert (d / "tls" / "cert.pem").read_bytes() == cert_path.read_bytes()


def test_localserve_on_a_taken_port_says_which_and_shows_the_password_on_the_next_start(tmp_path):
    d = tmp_path / "ls"
    with port_2525():
        with socket.create_server(("127.0.0.1", 2525)):  # another program on the mx port
            p = run_yuubin(["localserve", "--dir", str(d)], timeout=60)
        assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr
        # the one line that is not a log line (serve logs that it is starting before it binds)
        (line,) = [x for x in p.stderr.strip().splitlines() if " level=" not in x]
        for name in ("mx", "127.0.0.1:2525", "already in use", "--port-base"):
            assert name in line, (name, line)
        assert "password" not in p.stdout

        ls = LocalServe(d)  # the port is free now: this is the first start that shows a password
        try:
            text = ls.banner()
            m = re.search(r"demo@localhost\.test\s+password:\s*(\S+)", text)
            assert m, text
        finally:
            ls.interrupt()


def _free_port_base() -> int:
    """A --port-base whose localserve ports (N+465, N+525, N+587, N+143, N+993) are free now."""
    for base in range(20000 + os.getpid() % 1000 * 20, 60000, 1000):
        try:
            socks = [socket.create_server(("127.0.0.1", base + off)) for off in (465, 525, 587, 143, 993)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return base
    pytest.skip("no free set of localserve ports")


def test_localserve_port_base_moves_every_port(tmp_path):
    base = _free_port_base()
    ls = LocalServe(tmp_path / "ls", "--port-base", str(base))
    try:
        text = ls.banner()
        for kind, offset in (("mx", 525), ("submission", 587), ("submissions", 465)):
            assert re.search(rf"^\s+{kind}\s+127\.0\.0\.1:{base + offset}$", text, re.M), (kind, text)
        with smtplib.SMTP("127.0.0.1", base + 525, local_hostname="client.example", timeout=10) as s:
            assert s.noop()[0] == 250
    finally:
        assert ls.interrupt() == 0, ls.log_text()
    # The config it wrote keeps those ports for the next start without --port-base.
    assert f'address = "127.0.0.1:{base + 525}"' in (tmp_path / "ls" / "yuubin.toml").read_text()


# ---- a full disk, and failing writes, never lose an accepted message ------------------------------
# These run the server in-process (tests/harness.py) with its data_dir on a small tmpfs, so
# the disk really fills up; they are skipped where mounting is not allowed.

MESSAGE_LINE = b"z" * 998 + b"\r\n"


@pytest.fixture
def small_fs(tmp_path) -> Iterator:
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {p.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in reversed(mounted):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _send_big(srv, lines: int, subject: str) -> tuple[int, bytes]:
    body = f"Subject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\n".encode() + MESSAGE_LINE * lines
    with smtplib.SMTP("127.0.0.1", srv.port("mx"), local_hostname="lan.example", timeout=30) as s:
        s.ehlo()
        s.mail("sender@remote.example")
        assert s.rcpt("alice@example.test")[0] == 250
        code, text = s.data(body)
    return code, text, body


def _maildir_files(srv) -> list[bytes]:
    return srv.delivered("alice@example.test")


def test_full_disk_at_receive_time_gives_452(small_fs, cached_hashes, make_server):
    data_dir = small_fs("1m") / "data"
    srv = make_server(accounts={"alice@example.test": ALICE_PASSWORD}, data_dir=data_dir,
                      limits={"shutdown_grace": "1s"})
    code, text, _ = _send_big(srv, 1500, "too-big-for-the-disk")  # 1.5 MB onto < 1 MB free
    assert (code, text[:5]) == (452, b"4.3.1"), (code, text)
    queue = data_dir / "spool" / "queue"
    assert list(queue.iterdir()) == []  # nothing half-written left behind
    code, _, body = _send_big(srv, 100, "small-enough")  # the server goes on once space allows
    assert code == 250
    (raw,) = srv.wait_delivered("alice@example.test", 1)
    assert raw.endswith(body)


def test_full_disk_at_delivery_keeps_the_message_in_the_spool(small_fs, cached_hashes, make_server):
    mnt = small_fs("3m")
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024))
    srv = make_server(accounts={"alice@example.test": ALICE_PASSWORD}, data_dir=mnt / "data",
                      limits={"shutdown_grace": "1s"})
    code, _, body = _send_big(srv, 1200, "fills-the-disk")  # spool copy fits; the Maildir copy cannot
    assert code == 250
    time.sleep(0.5)  # the first delivery attempt runs into the full disk
    for raw in _maildir_files(srv):  # a message in new/ must be whole, never cut short
        assert raw.endswith(body), f"truncated message in Maildir new/: {len(raw)} bytes"
    assert _maildir_files(srv) == []  # a whole copy cannot fit yet
    filler.unlink()
    queue = srv.config.data_dir / "spool" / "queue"
    assert len(list(queue.iterdir())) == 1, "the only complete copy was removed from the spool"
    # (the retry once space is back is covered by test_failed_local_delivery_stays_in_the_spool_and_is_retried)


class _ShortWritingOs:
    """The `os` module, except that writev/write store only part of the data per call, as POSIX allows."""

    def __getattr__(self, name: str):
        return getattr(os, name)

    @staticmethod
    def writev(fd: int, buffers) -> int:
        data = b"".join(bytes(b) for b in buffers)
        return os.write(fd, data[: max(1, len(data) // 2)]) if data else 0

    @staticmethod
    def write(fd: int, data) -> int:
        data = bytes(data)
        return os.write(fd, data[: max(1, len(data) // 2)]) if data else 0


def test_short_writes_never_truncate_an_accepted_message(cached_hashes, make_server, monkeypatch):
    import yuubin.durable

    srv = make_server(accounts={"alice@example.test": ALICE_PASSWORD})
    monkeypatch.setattr(yuubin.durable, "os", _ShortWritingOs())
    code, _, body = _send_big(srv, 50, "short-writes")
    if code == 250:  # accepted: then every stored byte must be there
        (raw,) = srv.wait_delivered("alice@example.test", 1)
        assert raw.endswith(body), f"delivered {len(raw)} bytes, message is {len(body)}"
    else:
        assert 400 <= code < 500


def test_failed_local_delivery_stays_in_the_spool_and_is_retried(cached_hashes, make_server, tmp_path):
    data_dir = tmp_path / "data"
    blocker = data_dir / "mail" / "example.test"  # a file where the domain's directory must go
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"not a directory\n")
    srv = make_server(accounts={"alice@example.test": ALICE_PASSWORD}, data_dir=data_dir,
                      limits={"shutdown_grace": "1s"})
    code, _, body = _send_big(srv, 3, "retried")
    assert code == 250
    time.sleep(0.5)
    queue = data_dir / "spool" / "queue"
    assert len(list(queue.iterdir())) == 1
    blocker.unlink()
    (raw,) = srv.wait_delivered("alice@example.test", 1, timeout=20)  # first retry after a few seconds
    assert raw.endswith(body)
    deadline = time.monotonic() + 5
    while list(queue.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(queue.iterdir()) == []

"""systemd: the notify protocol end to end (a real `yuubin serve` and a NOTIFY_SOCKET of the test's),
the watchdog pinged from the event loop (a blocked loop stops the pings), and the unit verified."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from yuubin.sdnotify import ServiceNotifier

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "yuubin.service"


def _receive(sock: socket.socket, until: str, timeout: float) -> list[str]:
    """Datagrams until one contains `until` (or AssertionError after `timeout`)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(data)
        if until in data.split("\n"):
            return got
    raise AssertionError(f"no {until} within {timeout}s; got {got}")


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    yield path, sock
    sock.close()


def test_serve_says_ready_pings_the_watchdog_and_says_stopping(make_config, serve_process, notify_socket,
                                                                  monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    srv = serve_process(make_config())
    got = _receive(sock, "READY=1", 10)
    ready = next(d for d in got if "READY=1" in d.split("\n"))
    assert "STATUS=serving 1 listeners" in ready
    pings = [d for d in _receive(sock, "WATCHDOG=1", 2) if d == "WATCHDOG=1"]
    started = time.monotonic()
    while len(pings) < 5:
        pings += [d for d in _receive(sock, "WATCHDOG=1", 2) if d == "WATCHDOG=1"]
    assert time.monotonic() - started < 2, "five pings at 0.1 s intervals took too long"
    srv.send_signal(15)
    assert any("STOPPING=1" in d for d in _receive(sock, "STOPPING=1", 10))
    assert srv.wait(20) == 0


def test_no_notify_socket_means_no_notifications(make_config, serve_process, notify_socket, monkeypatch):
    _path, sock = notify_socket
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    srv = serve_process(make_config())
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    assert srv.stop(20) == 0


def test_a_blocked_event_loop_stops_the_watchdog_pings(notify_socket):
    path, sock = notify_socket
    notifier = ServiceNotifier.from_environ({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_interval == pytest.approx(0.05)
    stamps: list[float] = []
    done = threading.Event()

    def receive() -> None:
        sock.settimeout(0.05)
        while not done.is_set():
            try:
                if sock.recv(4096) == b"WATCHDOG=1":
                    stamps.append(time.monotonic())
            except TimeoutError:
                continue

    async def main() -> tuple[float, float]:
        notifier.start_watchdog()
        await asyncio.sleep(0.3)
        blocked = time.monotonic()
        time.sleep(0.6)  # the loop blocked: no ping may come meanwhile
        resumed = time.monotonic()
        await asyncio.sleep(0.3)
        await notifier.stop_watchdog()
        return blocked, resumed

    reader = threading.Thread(target=receive)
    reader.start()
    try:
        blocked, resumed = asyncio.run(main())
        time.sleep(0.1)
    finally:
        done.set()
        reader.join()
    before = [t for t in stamps if t < blocked]
    during = [t for t in stamps if blocked + 0.02 < t < resumed - 0.02]
    after = [t for t in stamps if t > resumed]
    assert len(before) >= 3 and len(after) >= 3, stamps
    assert during == [], "pings were sent while the loop was blocked"


def test_an_abstract_socket_address_and_a_watchdog_meant_for_another_process():
    n = ServiceNotifier.from_environ({"NOTIFY_SOCKET": "@yuubin-test", "WATCHDOG_USEC": "1000000",
                                     "WATCHDOG_PID": "999999999"}, pid=os.getpid())
    assert n.address == "\0yuubin-test"
    assert n.watchdog_interval is None  # meant for another process
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(f"\0yuubin-test-{os.getpid()}")
        s.settimeout(2)
        assert ServiceNotifier(f"@yuubin-test-{os.getpid()}").send("READY=1")
        assert s.recv(100) == b"READY=1"
    assert not ServiceNotifier(None).send("READY=1")


def test_the_unit_verifies(tmp_path):
    """`systemd-analyze verify` on the unit, with ExecStart pointing at this yuubin."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    yuubin = Path(sys.executable).parent / "yuubin"
    if not yuubin.exists():
        pytest.skip(f"no yuubin console script beside {sys.executable}")
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/yuubin " in text
    for needed in ("Type=notify", "User=yuubin", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "NoNewPrivileges=yes",
                   "ProtectSystem=strict", "ReadWritePaths=/var/lib/yuubin", "PrivateTmp=yes",
                   "RestrictAddressFamilies=", "SystemCallFilter=@system-service", "WatchdogSec="):
        assert needed in text, needed
    unit = tmp_path / "yuubin.service"
    unit.write_text(text.replace("/usr/local/bin/yuubin", str(yuubin)))
    p = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "yuubin.service" not in p.stderr, p.stderr  # no warning about the unit itself
    security = subprocess.run([analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                              timeout=60)
    if security.returncode == 0 and "Overall exposure level" in security.stdout:
        score = float(security.stdout.split("Overall exposure level for yuubin.service:")[1].split()[0])
        assert score <= 2.0, security.stdout  # the README reports it: keep it "OK"

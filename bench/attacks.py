"""Resource attacks on loopback: RSS idle, under each flood and after it; good clients during it.

Starts `yuubin serve` (mx and submissions listeners, TLS from a throw-away CA, the default limits
except where a scenario says) and runs each flood for a bounded time while two good clients work
in a loop: an MTA delivering on 25 from 127.2.0.9 and a user logging in and submitting on 465
from 127.3.0.9. Reports, per flood: RSS before / peak during / 3 s after, the good clients'
successes and failures and their p50/p99 latency. Writes bench/attacks.json and prints a
Markdown table (bench/ATTACKS.md holds the one of record).

    .venv/bin/python bench/attacks.py              # every flood
    .venv/bin/python bench/attacks.py handshakes   # only some
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trustme

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import procstat  # noqa: E402

PYTHON = REPO / ".venv" / "bin" / "python"
USER, PASSWORD = "alice@bench.test", "correct horse battery staple 42"
GOOD_MTA, GOOD_USER = "127.2.0.9", "127.3.0.9"


class Server:
    def __init__(self, tmp: Path, limits: str = ""):
        self.tmp = tmp
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "bench.local")
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
        self.client_tls = ssl.create_default_context()
        ca.configure_trust(self.client_tls)
        self.config = tmp / "yuubin.toml"
        self.config.write_text(f"""\
hostname = "bench.local"
data_dir = "{tmp / 'data'}"
[domains]
local = ["bench.test"]
[network]
trusted = ["127.0.0.0/16"]
[dnsbl]
zones = []
[tls]
cert = "{tmp / 'cert.pem'}"
key = "{tmp / 'key.pem'}"
[[listener]]
kind = "mx"
address = "127.0.0.1:0"
[[listener]]
kind = "submissions"
address = "127.0.0.1:0"
[limits]
idle_timeout = "10s"
{limits}
""")
        subprocess.run([str(PYTHON), "-m", "yuubin", "account", "add", "-c", str(self.config), USER],
                       input=PASSWORD + "\n", text=True, check=True, capture_output=True)
        self.log = tmp / "serve.log"
        self.proc = subprocess.Popen([str(PYTHON), "-m", "yuubin", "-c", str(self.config), "serve"],
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        self.ports: dict[str, int] = {}
        deadline = time.monotonic() + 20
        while len(self.ports) < 2:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text())
            for line in self.log.read_text().splitlines():
                if "event=listening" in line:
                    kind = line.split("kind=")[1].split()[0]
                    self.ports[kind] = int(line.split("address=")[1].split()[0].rsplit(":", 1)[1])
            time.sleep(0.05)

    @property
    def rss_mib(self) -> float:
        return (procstat.rss_kib(self.proc.pid) or 0) / 1024

    @property
    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def submit(srv: Server) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", srv.ports["submissions"], source_address=(GOOD_USER, 0), timeout=10,
                          context=srv.client_tls) as s:
        s.ehlo("laptop.bench")
        s.login(USER, PASSWORD)
        s.sendmail(USER, [USER], f"From: {USER}\r\nTo: {USER}\r\nSubject: b\r\n\r\nhi\r\n")


def deliver(srv: Server) -> None:
    with smtplib.SMTP("127.0.0.1", srv.ports["mx"], source_address=(GOOD_MTA, 0), timeout=10) as s:
        s.ehlo("mta.good.bench")
        s.sendmail("x@good.bench", [USER], "From: x@good.bench\r\nSubject: b\r\n\r\nhi\r\n")


class Good(threading.Thread):
    """One good client in a loop: latencies of successes, count of failures."""

    def __init__(self, srv: Server, fn: Callable[[Server], None]):
        super().__init__(daemon=True)
        self.srv, self.fn = srv, fn
        self.stop = threading.Event()
        self.ok: list[float] = []
        self.failed = 0

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                self.fn(self.srv)
                self.ok.append(time.monotonic() - t0)
            except (OSError, smtplib.SMTPException):
                self.failed += 1
            self.stop.wait(0.2)

    def summary(self) -> dict:
        lat = sorted(self.ok)
        p = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000)) if lat else (lambda q: None)
        return {"ok": len(lat), "failed": self.failed, "p50_ms": p(0.5), "p99_ms": p(0.99),
                "under_1s": sum(1 for x in lat if x < 1.0)}


# ---- the floods: each runs for about `seconds`, then lets go of everything ----------------------

def flood_handshakes(srv: Server, seconds: float) -> None:
    """1,000 TCP connections to 465 from 50 addresses that never send a ClientHello."""
    socks = []
    for i in range(1000):
        with contextlib.suppress(OSError):
            socks.append(socket.create_connection(("127.0.0.1", srv.ports["submissions"]), timeout=2,
                                                  source_address=(f"127.1.0.{1 + i % 50}", 0)))
    time.sleep(seconds)
    for s in socks:
        s.close()


def flood_slowloris(srv: Server, seconds: float) -> None:
    """1,000 connections to 25 from 50 addresses, one byte each per 2 s."""
    socks = []
    for i in range(1000):
        with contextlib.suppress(OSError):
            socks.append(socket.create_connection(("127.0.0.1", srv.ports["mx"]), timeout=2,
                                                  source_address=(f"127.1.1.{1 + i % 50}", 0)))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for s in socks:
            with contextlib.suppress(OSError):
                s.send(b"N")
        time.sleep(2)
    for s in socks:
        s.close()


def flood_big_data(srv: Server, seconds: float) -> None:
    """60 clients from 20 addresses each sending 24 MB of DATA without the terminator."""
    def one(i: int) -> None:
        with contextlib.suppress(OSError):
            s = socket.create_connection(("127.0.0.1", srv.ports["mx"]), timeout=10,
                                         source_address=(f"127.1.2.{1 + i % 20}", 0))
            f = s.makefile("rb")
            f.readline()
            for cmd in (b"EHLO big.bench", b"MAIL FROM:<a@big.bench>", f"RCPT TO:<{USER}>".encode(), b"DATA"):
                s.sendall(cmd + b"\r\n")
                while f.readline()[3:4] == b"-":
                    pass
            chunk = b"y" * 1022 + b"\r\n"
            end = time.monotonic() + seconds
            for _ in range(24 * 1024):
                if time.monotonic() > end:
                    break
                s.sendall(chunk)
            s.close()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def flood_auth(srv: Server, seconds: float) -> None:
    """Parallel password guessing on 465: 16 tasks from one address, as hydra -t 16."""
    end = time.monotonic() + seconds

    def one(i: int) -> None:
        while time.monotonic() < end:
            with contextlib.suppress(OSError, smtplib.SMTPException), smtplib.SMTP_SSL(
                    "127.0.0.1", srv.ports["submissions"], source_address=("127.1.3.1", 0), timeout=10,
                    context=srv.client_tls) as s:
                s.ehlo("hydra")
                token = base64.b64encode(f"\0{USER}\0guess{i}".encode()).decode()
                s.docmd("AUTH", f"PLAIN {token}")
            time.sleep(0.05)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def flood_pipeline(srv: Server, seconds: float) -> None:
    """5 clients pipelining 1 MB of EHLO each and never reading a reply."""
    def one() -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.bind(("127.1.4.1", 0))
        s.connect(("127.0.0.1", srv.ports["mx"]))
        s.settimeout(0.5)
        blob, sent, end = b"EHLO x\r\n" * 8192, 0, time.monotonic() + seconds
        while sent < (1 << 20) and time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                sent += s.send(blob)
        time.sleep(max(0.0, end - time.monotonic()))
        s.close()
    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def flood_locked_db(srv: Server, seconds: float) -> None:
    """Another process holds BEGIN EXCLUSIVE on state.db (with a write pending) while a guesser tries."""
    db = sqlite3.connect(srv.tmp / "data" / "state.db", isolation_level=None, timeout=5)
    db.execute("BEGIN EXCLUSIVE")
    db.execute("INSERT INTO aliases(alias, target) VALUES ('held@bench.test', 'x@bench.test')")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(OSError, smtplib.SMTPException), smtplib.SMTP_SSL(
                "127.0.0.1", srv.ports["submissions"], source_address=("127.1.5.1", 0), timeout=10,
                context=srv.client_tls) as s:
            s.ehlo("guess")
            s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0{USER}\0wrong".encode()).decode())
        time.sleep(1)
    db.execute("ROLLBACK")
    db.close()


FLOODS: dict[str, tuple[str, Callable[[Server, float], None], str]] = {
    "handshakes": ("1,000 half-open TLS handshakes on 465 (50 addresses)", flood_handshakes, ""),
    "slowloris": ("1,000 dribblers on 25 (50 addresses, 1 byte / 2 s)", flood_slowloris, ""),
    "big_data": ("60 × 24 MB DATA without the end on 25 (20 addresses)", flood_big_data, ""),
    "auth": ("16 parallel password guessers on 465 (one address)", flood_auth, ""),
    "pipeline": ("5 × 1 MB of pipelined EHLO, replies never read", flood_pipeline, ""),
    "locked_db": ("state.db held by BEGIN EXCLUSIVE in another process", flood_locked_db, ""),
}


def scenario(name: str, seconds: float) -> dict:
    title, flood, limits = FLOODS[name]
    with tempfile.TemporaryDirectory(prefix="yuubin-attack-") as d:
        srv = Server(Path(d), limits)
        try:
            for _ in range(3):  # warm: first TLS handshake, first login, first delivery
                submit(srv)
                deliver(srv)
            time.sleep(1)
            idle, fds_idle = srv.rss_mib, srv.fds
            peak, peak_fds = [idle], [fds_idle]
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], srv.rss_mib)
                    peak_fds[0] = max(peak_fds[0], srv.fds)
                    done.wait(0.1)

            w = threading.Thread(target=watch, daemon=True)
            w.start()
            good = [Good(srv, submit), Good(srv, deliver)]
            for g in good:
                g.start()
            t0 = time.monotonic()
            flood(srv, seconds)
            took = time.monotonic() - t0
            for g in good:
                g.stop.set()
                g.join()
            done.set()
            w.join()
            time.sleep(3)
            after = srv.rss_mib
            return {"flood": name, "title": title, "seconds": round(took, 1), "rss_idle_mib": round(idle, 1),
                    "rss_peak_mib": round(peak[0], 1), "rss_after_mib": round(after, 1), "fds_idle": fds_idle,
                    "fds_peak": peak_fds[0], "submit_465": good[0].summary(), "deliver_25": good[1].summary()}
        finally:
            srv.stop()


def render(results: list[dict]) -> str:
    rows = ["| flood | RSS idle / peak / after (MiB) | fds idle / peak | 465 submit ok/failed, p50/p99 ms | "
            "25 deliver ok/failed, p50/p99 ms |", "|---|---|---|---|---|"]
    for r in results:
        s, d = r["submit_465"], r["deliver_25"]
        rows.append(f"| {r['title']} ({r['seconds']} s) | {r['rss_idle_mib']} / {r['rss_peak_mib']} / "
                    f"{r['rss_after_mib']} | {r['fds_idle']} / {r['fds_peak']} | {s['ok']}/{s['failed']}, "
                    f"{s['p50_ms']}/{s['p99_ms']} | {d['ok']}/{d['failed']}, {d['p50_ms']}/{d['p99_ms']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("floods", nargs="*", choices=[[], *FLOODS], default=[])
    ap.add_argument("--seconds", type=float, default=10.0, help="how long each flood lasts")
    args = ap.parse_args(argv)
    procstat.raise_nofile()
    results = [scenario(n, args.seconds) for n in (args.floods or list(FLOODS))]
    (BENCH_DIR / "attacks.json").write_text(json.dumps(results, indent=1))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

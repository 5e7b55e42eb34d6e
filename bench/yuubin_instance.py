"""A throw-away yuubin server for the benchmark.

Writes the benchmark config into a temp dir, adds the account
``user@bench.test`` and runs ``<venv python> -m yuubin -c CONFIG serve`` with
its MX listener on 127.0.0.2:2525. Delivered mail lands in
``<data_dir>/mail/bench.test/user/new/``. The temp dir is removed on stop.

Usage as a script (self-test: start, send a few messages, wait for delivery)::

    python bench/yuubin_instance.py --selftest
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat
from postfix_instance import wait_port

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_PYTHON = REPO / ".venv" / "bin" / "python"

DEFAULT_HOST = "127.0.0.2"
DEFAULT_PORT = 2525
DOMAIN = "bench.test"
USER = "user"
PASSWORD = "bench-password"

CONFIG = """\
hostname = "bench.local"
data_dir = "{data_dir}"
[domains]
local = ["bench.test"]
[network]
trusted = ["127.0.0.0/8"]
[dns]
nameservers = ["127.0.0.1"]
port = 5399
timeout = 1.0
[dnsbl]
zones = []
[[listener]]
kind = "mx"
address = "{host}:{port}"
[limits]
connections_per_ip = 2000
max_connections = 5000
[server]
workers = {workers}
"""


def python_exe(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    if DEFAULT_PYTHON.exists():
        return str(DEFAULT_PYTHON)
    return sys.executable


class YuubinInstance:
    """Context manager: ``with YuubinInstance() as y: ... y.maildir_new, y.pid``."""

    name = "yuubin"

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        python: str | None = None,
        keep: bool = False,
        start_timeout: float = 60.0,
        workers: int = 1,
    ):
        self.host = host
        self.port = port
        self.python = python_exe(python)
        self.keep = keep
        self.start_timeout = start_timeout
        self.workers = workers
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    # --- paths -------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        assert self.dir
        return self.dir / "yuubin.toml"

    @property
    def data_dir(self) -> Path:
        assert self.dir
        return self.dir / "data"

    @property
    def maildir(self) -> Path:
        return self.data_dir / "mail" / DOMAIN / USER

    @property
    def maildir_new(self) -> Path:
        return self.maildir / "new"

    @property
    def logfile(self) -> Path:
        assert self.dir
        return self.dir / "yuubin.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def recipient(self) -> str:
        return f"{USER}@{DOMAIN}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def cmd(self, *args: str) -> list[str]:
        return [self.python, "-m", "yuubin", "-c", str(self.config_path), *args]

    # --- lifecycle ---------------------------------------------------------
    def start(self) -> YuubinInstance:
        self.dir = Path(tempfile.mkdtemp(prefix="yuubin-bench-yuubin-"))
        try:
            self._setup()
        except BaseException:
            self.stop()
            raise
        return self

    def _setup(self) -> None:
        self.data_dir.mkdir()
        self.config_path.write_text(
            CONFIG.format(data_dir=self.data_dir, host=self.host, port=self.port, workers=self.workers))
        r = subprocess.run(
            self.cmd("account", "add", self.recipient, "--allow-weak"),
            input=PASSWORD + "\n",
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir,
        )
        if r.returncode != 0:
            raise RuntimeError(
                f"`{' '.join(self.cmd('account', 'add', self.recipient, '--allow-weak'))}` "
                f"failed (rc={r.returncode}):\n{r.stdout}{r.stderr}"
            )
        self._log = open(self.logfile, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd("serve"),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            preexec_fn=procstat.raise_nofile,
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"yuubin serve exited with rc={self.proc.returncode}:\n{self.log_tail()}")
            try:
                wait_port(self.host, self.port, 1.0)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"yuubin not answering on {self.address} after {self.start_timeout}s:\n{self.log_tail()}"
                    ) from None

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()  # this exact pid only
                    self.proc.wait(timeout=10)
            self.proc = None
        if self._log:
            self._log.close()
            self._log = None
        if self.dir is not None and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> YuubinInstance:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- benchmark hooks ---------------------------------------------------
    def alive(self) -> bool:
        return self.pid is not None

    def pids(self) -> list[int]:
        return procstat.tree(self.pid) if self.pid else []

    def queue_empty(self) -> bool:
        """No message waiting in the spool (data_dir/spool/{queue,tmp}/)."""
        for sub in ("queue", "tmp"):
            try:
                with os.scandir(self.data_dir / "spool" / sub) as it:
                    if any(True for _ in it):
                        return False
            except FileNotFoundError:
                continue
        return True

    def log_tail(self, n: int = 40) -> str:
        try:
            if self._log:
                self._log.flush()
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except (OSError, AssertionError):
            return "(no log)"


def _selftest(count: int, python: str | None) -> int:
    with YuubinInstance(python=python) as y:
        print(f"yuubin up on {y.address}, pid {y.pid}, dir {y.dir}")
        for i in range(count):
            with smtplib.SMTP(y.host, y.port, timeout=30) as s:
                s.ehlo("client.bench.example")
                s.sendmail(
                    "sender@bench.example",
                    [y.recipient],
                    f"From: sender@bench.example\r\nTo: {y.recipient}\r\nSubject: selftest {i}\r\n\r\nhello {i}\r\n",
                )
        deadline = time.monotonic() + 30
        n = 0
        while time.monotonic() < deadline:
            n = len(os.listdir(y.maildir_new)) if y.maildir_new.exists() else 0
            if n >= count:
                break
            time.sleep(0.2)
        print(f"delivered {n}/{count} into {y.maildir_new}")
        print(f"RSS {procstat.rss_kib(y.pid)} KiB, CPU {procstat.tree_cpu_seconds(y.pid):.2f}s")
        if n < count:
            print(y.log_tail())
            return 1
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--python", help="interpreter that has yuubin installed (default: repo .venv)")
    args = ap.parse_args(argv)
    if args.selftest:
        return _selftest(args.count, args.python)
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

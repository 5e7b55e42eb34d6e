"""Log output: one key=value line per event on stderr, written in batches.

A plain StreamHandler makes one write(2) per line, and a message produces four or five lines
(connect, accepted, delivered, disconnect): at several hundred messages a second that is a
measurable share of the server's CPU. Lines are collected and written by a small thread every
`interval` seconds, or at once for warnings and errors, and on exit. A kill -9 can lose at
most the last `interval` of info lines; nothing about mail depends on them.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from typing import TextIO


class BatchedLineHandler(logging.Handler):
    def __init__(self, stream: TextIO | None = None, interval: float = 0.05):
        super().__init__()
        self.stream = stream or sys.stderr
        self.interval = interval
        self._lines: list[str] = []
        self._lock_lines = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a bad log call must never take a session down
            self.handleError(record)
            return
        with self._lock_lines:
            self._lines.append(line)
        if record.levelno >= logging.WARNING:
            self.flush()

    def flush(self) -> None:
        with self._lock_lines:
            lines, self._lines = self._lines, []
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed: nowhere left to complain to

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.interval)
            self.flush()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        self.flush()
        super().close()


class KeyValueFormatter(logging.Formatter):
    """`2026-11-27T20:34:13.595Z level=INFO logger=yuubin.smtp event=...` (UTC)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        sec = int(record.created)
        if sec != self._second:
            self._second = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        ms = int((record.created - sec) * 1000)
        line = f"{self._stamp}.{ms:03d}Z level={record.levelname} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " traceback=" + repr(self.formatException(record.exc_info))
        return line


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    """Install the batched key=value handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, BatchedLineHandler):
            root.removeHandler(h)
            h.close()
    handler = BatchedLineHandler(stream)
    handler.setFormatter(KeyValueFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


def shutdown() -> None:
    """Write what is pending and stop the writer thread (before fork, and on exit)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, BatchedLineHandler):
            root.removeHandler(h)
            h.close()


def utc_time(ts: float) -> str:
    """`2026-11-27T20:34:15Z`: how the CLI shows a time, in UTC like the log lines."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

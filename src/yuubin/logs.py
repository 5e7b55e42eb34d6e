"""Log output: one key=value line (or JSON object) per event on stderr, written in batches.

A plain StreamHandler makes one write(2) per line, and a message produces four or five lines
(connect, accepted, delivered, disconnect): at several hundred messages a second that is a
measurable share of the server's CPU. Lines are collected and written by a small thread every
`interval` seconds, or at once for warnings and errors, and on exit. A kill -9 can lose at
most the last `interval` of info lines; nothing about mail depends on them.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
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


_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def fields(message: str) -> dict[str, str]:
    """The key=value pairs of an event line; quoted values unquoted."""
    out = {}
    for k, v in _FIELD.findall(message):
        out[k] = v[1:-1].replace('\\"', '"') if v.startswith('"') else v
    return out


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal, which stamps each line itself
    ($JOURNAL_STREAM names the device and inode of that stream)."""
    dev_ino = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return dev_ino == f"{st.st_dev}:{st.st_ino}"


class KeyValueFormatter(logging.Formatter):
    """`2026-11-27T20:34:13.595Z level=INFO logger=yuubin.smtp event=...` (UTC); without the time
    when the journal stamps the lines."""

    def __init__(self, stamp: bool = True) -> None:
        super().__init__()
        self.stamp = stamp
        self._second = -1
        self._stamp = ""

    def when(self, record: logging.LogRecord) -> str:
        sec = int(record.created)
        if sec != self._second:
            self._second = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._stamp}.{int((record.created - sec) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        head = f"{self.when(record)} " if self.stamp else ""
        line = f"{head}level={record.levelname} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " traceback=" + repr(self.formatException(record.exc_info))
        return line


class JsonFormatter(KeyValueFormatter):
    """`--log-format json` / `[log] format = "json"`: one object per line, the event's fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, str] = {"time": self.when(record)} if self.stamp else {}
        out.update(level=record.levelname, logger=record.name)
        if message.startswith("event="):
            out.update(fields(message))
        else:
            out["message"] = message
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(level: str = "info", stream: TextIO | None = None, fmt: str = "text") -> None:
    """Install the batched handler on the root logger (idempotent); `fmt` is "text" or "json"."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, BatchedLineHandler):
            root.removeHandler(h)
            h.close()
    handler = BatchedLineHandler(stream)
    stamp = not (stream is None and stderr_is_journal())
    handler.setFormatter(JsonFormatter(stamp) if fmt == "json" else KeyValueFormatter(stamp))
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

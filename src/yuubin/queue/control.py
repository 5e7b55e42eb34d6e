"""`yuubin queue ...`: look at and steer the outbound queue, like postqueue/postsuper.

It runs in its own process and edits spool entries directly, through the same SpoolEditor as the
server (load → change → atomic rewrite under the entry's cross-process lock), so it never races
the running scheduler.
"Retry now" cannot be written into an entry without touching its schedule for good, so flush
drops a request file in spool/requests/ that the scheduler reads within a second — and says so
when no server runs to read it. An ID argument may be any unique start of a queue id.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from yuubin.durable import GroupCommitter
from yuubin.logs import utc_time
from yuubin.queue.edit import KEEP, Edit, Rewrite, SpoolEditor, Unreadable
from yuubin.queue.entrylock import EntryLocks
from yuubin.queue.retry import next_due
from yuubin.queue.signal import request_flush, scheduler_running
from yuubin.queue.spool import QUEUED, Envelope, Spool, SpoolCorrupt

log = logging.getLogger("yuubin.queue")

# Where a change is recorded for the server's log: (action, queue id, detail).
AdminRecord = Callable[[str, str, str], None]


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


class QueueError(ValueError):
    """A bad queue id or selection, worded for the admin."""


class NoServer(Exception):
    """What was asked needs the running server, and none runs with this spool."""


def _when(ts: float | None) -> str:
    return "-" if ts is None else utc_time(ts)


def _entries(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


def _age(seconds: float) -> str:
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def entry_state(env: Envelope) -> str:
    if env.held:
        return "held"
    if env.local:
        return "local"
    if any(r.tries > 0 for r in env.remote if r.state == QUEUED):
        return "deferred"
    return "queued"


class QueueRow(TypedDict):
    """One entry as `yuubin queue list` shows it (and prints with --json)."""

    id: str
    age: int
    sender: str
    recipients: list[str]
    state: str
    next_attempt: float | None
    last_error: str
    attempts: int
    size: int


def become_spool_owner(spool_root: Path) -> None:
    """Run as the spool's owner, like postsuper: files root would create are unreadable to the server."""
    st = spool_root.stat()
    if os.geteuid() == 0 and st.st_uid != 0:
        os.setgroups([])
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)


class QueueControl:
    def __init__(self, spool_root: Path, record: AdminRecord | None = None):
        if not (spool_root / "queue").is_dir():
            raise QueueError(f"no queue at {spool_root} (has the server run with this config?)")
        become_spool_owner(spool_root)
        self.spool = Spool(spool_root, GroupCommitter(workers=1))
        self.editor = SpoolEditor(self.spool, EntryLocks(spool_root))
        self.record = record  # hold, release and delete are admin actions for the server's log

    def close(self) -> None:
        self.spool.committer.shutdown()
        self.editor.close()

    def entries(self) -> list[tuple[Envelope, bytes]]:
        out = []
        for qid in self.spool.ids():
            try:
                out.append(self.spool.load(qid))
            except (FileNotFoundError, SpoolCorrupt):
                continue
        return out

    def row(self, env: Envelope, now: float | None = None) -> QueueRow:
        now = time.time() if now is None else now
        pending = [r for r in env.remote if r.state == QUEUED]
        errors = [r.error for r in pending if r.error]
        return {
            "id": env.id,
            "age": round(now - env.received),
            "sender": env.sender,
            "recipients": [r.to for r in pending] + [mb for mb, _ in env.local],
            "state": entry_state(env),
            "next_attempt": next_due(env) if not env.held else None,
            "last_error": errors[-1] if errors else "",
            "attempts": env.attempts,
            "size": env.size,
        }

    def list_text(self, as_json: bool) -> str:
        rows = [self.row(env) for env, _ in self.entries()]
        if as_json:
            return json.dumps(rows, indent=1)
        if not rows:
            return "queue is empty"
        header = ("ID", "AGE", "STATE", "NEXT ATTEMPT")
        cells = [(r["id"], _age(r["age"]), r["state"], _when(r["next_attempt"])) for r in rows]
        width = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]

        def columns(c: tuple[str, str, str, str]) -> str:
            return f"{c[0]:<{width[0]}}  {c[1]:>{width[1]}}  {c[2]:<{width[2]}}  {c[3]:<{width[3]}}  "

        indent = " " * len(columns(header))  # the last error goes under the sender
        lines = [columns(header) + "SENDER -> RECIPIENTS / LAST ERROR"]
        for r, c in zip(rows, cells, strict=True):
            lines.append(columns(c) + f"<{r['sender']}> -> {', '.join(r['recipients'])}")
            if r["last_error"]:
                lines.append(indent + r["last_error"])
        lines.append(f"-- {_entries(len(rows))}")
        return "\n".join(lines)

    def resolve(self, given: str) -> str:
        """The queue id `given` is, or the one it is the unique start of."""
        ids = self.spool.ids()
        if given in ids:
            return given
        matches = [qid for qid in ids if qid.startswith(given)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise QueueError(f"ID: no queue entry {given}")
        shown = ", ".join(matches[:3]) + (", ..." if len(matches) > 3 else "")
        raise QueueError(f"ID: {given} is the start of {len(matches)} queue ids ({shown}): give more of it")

    def _load(self, qid: str) -> tuple[Envelope, bytes]:
        try:
            return self.spool.load(qid)
        except FileNotFoundError:
            raise QueueError(f"ID: no queue entry {qid}") from None
        except SpoolCorrupt as e:
            raise QueueError(f"ID: entry {qid} is unreadable: {e}") from None

    def show_text(self, qid: str) -> str:
        qid = self.resolve(qid)
        env, data = self._load(qid)
        end = data.find(b"\r\n\r\n")
        headers = (data if end < 0 else data[:end]).decode("utf-8", "replace")
        rcpts = [f"  {r.to}  {r.state}  tries={r.tries}  "
                 f"next={_when(r.next) if r.state == QUEUED and r.next else '-'}  "
                 f"last={r.error or '-'}" for r in env.remote]
        return (f"# entry {qid} ({entry_state(env)}), received {_when(env.received)}, "
                f"{env.attempts} attempts\n" + "\n".join(rcpts) + "\n# envelope\n"
                + json.dumps(env.to_json(), indent=1, default=str)
                + "\n# headers\n" + headers.replace("\r\n", "\n") + "\n")

    def select(self, qid: str | None = None, sender: str | None = None, all_held: bool = False) -> list[str]:
        if qid:
            qid = self.resolve(qid)
            self._load(qid)
            return [qid]
        chosen = []
        for env, _ in self.entries():
            if (sender is not None and env.sender.lower() == sender.lower()) or (all_held and env.held):
                chosen.append(env.id)
        return chosen

    def set_held(self, qids: list[str], held: bool) -> list[str]:
        def set_held(env: Envelope, _data: bytes) -> Edit:
            if env.held == held:
                return KEEP
            env.held = held
            return Rewrite(env)

        changed = []
        for qid in qids:
            try:
                edit = self.editor.edit_sync(qid, set_held)
            except Unreadable:
                continue
            if not isinstance(edit, Rewrite):
                continue
            changed.append(qid)
            log.info("event=queue_%s id=%s from=<%s>", "held" if held else "released", qid, edit.env.sender)
            if self.record is not None:
                self.record("queue_hold" if held else "queue_release", qid, f"from=<{edit.env.sender}>")
            if not held:
                self.request_flush(qid)
        return changed

    def delete(self, qids: list[str]) -> list[str]:
        deleted = []
        for qid in qids:
            removed = self.editor.remove_sync(qid)
            if removed is None:
                continue
            deleted.append(qid)
            env = removed.env
            rcpts = ",".join(r.to for r in env.remote) if env else "?"
            log.warning("event=queue_deleted id=%s from=<%s> rcpts=%s by=%s", qid, env.sender if env else "?",
                        rcpts, os.environ.get("SUDO_USER") or _login())
            if self.record is not None:
                self.record("queue_delete", qid, f"from=<{env.sender if env else '?'}> rcpts={rcpts}")
        return deleted

    def request_flush(self, qid: str | None = None) -> None:
        request_flush(self.spool.root, qid)


def run_command(spool_root: Path, sub: str, qid: str | None = None, sender: str | None = None,
                all_held: bool = False, as_json: bool = False, record: AdminRecord | None = None) -> str:
    """One `yuubin queue` subcommand; returns what to print, or raises QueueError."""
    ctl = QueueControl(spool_root, record)
    try:
        if sub == "list":
            return ctl.list_text(as_json)
        if sub == "show":
            if not qid:
                raise QueueError("ID: missing")
            return ctl.show_text(qid)
        if sub == "flush":
            if qid:
                qid = ctl.resolve(qid)
                ctl._load(qid)
            if not scheduler_running(spool_root):
                raise NoServer(f"queue flush: no server is running with the queue in {spool_root}: nothing "
                               "was flushed (`yuubin serve` retries what is due when it starts)")
            ctl.request_flush(qid)
            return f"flush requested for {qid or 'all entries'} (the running server retries within a second)"
        qids = ctl.select(qid, sender, all_held)
        if sub in ("hold", "release"):
            done = ctl.set_held(qids, sub == "hold")
            return f"{sub}: {_entries(len(done))}" + (f" ({', '.join(done)})" if done else "")
        if sub == "delete":
            done = ctl.delete(qids)
            return f"deleted {_entries(len(done))}" + (f" ({', '.join(done)})" if done else "")
        raise QueueError(f"unknown queue command {sub!r}")
    finally:
        ctl.close()

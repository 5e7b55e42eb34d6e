"""The spool: every accepted message with its envelope, durable before the 250.

One file per message: a JSON envelope line, then the message bytes. One file means one fsync.
The envelope records the message length, so a file cut short by a crash during the write (which
was never acknowledged) is recognised at start-up and set aside instead of delivered.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from yuubin.durable import PRIVATE, Commit, FileWrite, GroupCommitter, fsync_dir

MAGIC = b"YUUBIN-SPOOL-1 "
_counter = itertools.count()


class SpoolCorrupt(Exception):
    pass


RecipientState = Literal["queued", "delivered", "failed"]
QUEUED: RecipientState = "queued"
DELIVERED: RecipientState = "delivered"
FAILED: RecipientState = "failed"
_STATES: tuple[str, ...] = get_args(RecipientState)


@dataclass(slots=True)
class RemoteRecipient:
    """One remote recipient of a spool entry and where its delivery stands.

    Stored as a JSON object with these field names as keys. Entries from earlier releases
    carry only the keys they had reached (at first just to, params, rcpt): a missing key means
    its default, so an old spool loads unchanged.
    """

    to: str  # the address delivered to
    params: dict[str, str] = field(default_factory=dict)  # RCPT TO parameters as given (NOTIFY, ORCPT)
    rcpt: str = ""  # the recipient as given in RCPT TO (differs from `to` for an alias's forward)
    state: RecipientState = QUEUED
    tries: int = 0
    next: float = 0.0  # epoch seconds of the next attempt while queued
    error: str = ""  # the last reply or problem, for logs, `queue list` and the DSN
    status: str = ""  # RFC 3463 status of the last attempt
    host: str = ""  # the host that gave the last reply
    reported: bool = False  # its failure has been dealt with (DSN stored, or suppressed)

    def to_json(self) -> dict[str, object]:
        return {"to": self.to, "params": self.params, "rcpt": self.rcpt, "state": self.state,
                "tries": self.tries, "next": self.next, "error": self.error, "status": self.status,
                "host": self.host, "reported": self.reported}

    @classmethod
    def from_json(cls, raw: Any) -> RemoteRecipient:
        """Raises ValueError, TypeError or KeyError on a malformed record (Spool.load: corrupt)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("params") or {}, dict):
            raise TypeError(f"malformed remote recipient {raw!r}")
        state = raw.get("state") or QUEUED
        if state not in _STATES:
            raise ValueError(f"unknown recipient state {state!r}")
        to = str(raw["to"])
        return cls(to=to, params={str(k): str(v) for k, v in (raw.get("params") or {}).items()},
                   rcpt=str(raw.get("rcpt", to)), state=state, tries=int(raw.get("tries") or 0),
                   next=float(raw.get("next") or 0.0), error=str(raw.get("error") or ""),
                   status=str(raw.get("status") or ""), host=str(raw.get("host") or ""),
                   reported=bool(raw.get("reported", False)))


@dataclass
class Envelope:
    id: str
    sender: str  # "" for the null sender
    mail_params: dict[str, str]
    local: list[tuple[str, str]]  # (mailbox, recipient as given)
    remote: list[RemoteRecipient]  # delivered by outbound
    received: float
    client: str
    helo: str
    listener: str
    size: int = 0
    auth: str | None = None  # the account that submitted it (587/465), else None
    trusted: bool = False  # came from [network].trusted: ours, so it may be bounced to its sender
    held: bool = False  # on hold: never sent, never deleted, until released
    attempts: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def junk(self) -> bool:
        """Quarantined by policy: local copies go to the recipient's Junk folder. Kept in `extra`,
        so an entry written now still loads in the previous release."""
        return bool(self.extra.get("junk"))

    @junk.setter
    def junk(self, value: bool) -> None:
        if value:
            self.extra["junk"] = True
        else:
            self.extra.pop("junk", None)

    def to_json(self) -> dict[str, object]:
        # A shallow dict, not dataclasses.asdict(): asdict deep-copies every value, and this
        # runs for every message on the hot path.
        out = {f: getattr(self, f) for f in _FIELDS}
        out["remote"] = [r.to_json() for r in self.remote]
        return out

    def encode(self) -> bytes:
        return MAGIC + json.dumps(self.to_json(), separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Envelope:
        if not line.startswith(MAGIC):
            raise SpoolCorrupt("bad magic")
        raw = json.loads(line[len(MAGIC):])
        raw["local"] = [(str(mb), str(rcpt)) for mb, rcpt in raw["local"]]
        raw["remote"] = [RemoteRecipient.from_json(r) for r in raw["remote"]]
        return cls(**raw)


_FIELDS = tuple(f.name for f in fields(Envelope))


def new_id() -> str:
    """Unique across the worker processes too: time, process id, counter."""
    return f"{time.time_ns():016x}{os.getpid() & 0xFFFF:04x}{next(_counter) & 0xFFF:03x}"


class Spool:
    def __init__(self, root: Path, committer: GroupCommitter):
        self.root = root
        self.queue_dir = root / "queue"
        self._queue_prefix = str(self.queue_dir) + os.sep
        self.tmp_dir = root / "tmp"
        self.corrupt_dir = root / "corrupt"
        for d in (self.queue_dir, self.tmp_dir, self.corrupt_dir):
            PRIVATE.make_dirs(d)
        for d in (root, self.queue_dir, self.tmp_dir, self.corrupt_dir):
            PRIVATE.set_dir(d)  # 0700, also when an older release made them 0755: only yuubin reads the spool
        fsync_dir(root)
        self.committer = committer

    def path(self, qid: str) -> Path:
        return self.queue_dir / qid

    def file(self, qid: str) -> str:
        """`path()` as a plain string: pathlib costs tens of microseconds per message."""
        return self._queue_prefix + qid

    async def store(self, env: Envelope, data: bytes) -> None:
        """Durable on return: file and directory fsynced (group-committed)."""
        await self.enqueue_store(env, data)

    def enqueue_store(self, env: Envelope, data: bytes) -> Commit:
        """Queue the entry's durable write now; await the result before saying 250."""
        env.size = len(data)
        return self.committer.enqueue([FileWrite(self.file(env.id), [env.encode(), data])])

    async def rewrite(self, env: Envelope, data: bytes) -> None:
        """Replace an entry's envelope atomically (write aside, fsync, rename over)."""
        env.size = len(data)
        tmp = self.tmp_dir / f"{env.id}.{next(_counter)}"
        await self.committer.commit([FileWrite(tmp, [env.encode(), data], rename_to=self.path(env.id))])

    def ids(self) -> list[str]:
        return sorted(p.name for p in self.queue_dir.iterdir() if not p.name.startswith("."))

    def load(self, qid: str) -> tuple[Envelope, bytes]:
        raw = self.path(qid).read_bytes()
        nl = raw.find(b"\n")
        if nl < 0:
            raise SpoolCorrupt("no envelope line")
        try:
            env = Envelope.decode(raw[: nl + 1])
        except (ValueError, TypeError, KeyError) as e:
            raise SpoolCorrupt(f"bad envelope: {e}") from None
        data = raw[nl + 1:]
        if len(data) != env.size:
            raise SpoolCorrupt(f"length {len(data)} != {env.size}")
        return env, data

    def set_aside(self, qid: str) -> Path:
        """Move a corrupt entry out of the queue, keeping it for the admin to inspect."""
        dest = self.corrupt_dir / qid
        os.rename(self.path(qid), dest)
        return dest

    def clean_tmp(self) -> None:
        for p in self.tmp_dir.iterdir():
            p.unlink(missing_ok=True)

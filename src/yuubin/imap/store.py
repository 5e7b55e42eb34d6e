"""The IMAP mailbox store: the Maildir that delivery writes, plus an index of what IMAP needs.

The Maildir stays the truth for *which messages exist* and for the system flags (the `:2,`
letters S R F T D of the file name, so mutt, Dovecot and backup tools agree with us). The
index holds what a Maildir cannot: UIDVALIDITY, UIDNEXT, the UID of each file (keyed by the
unique part of its name, before `:2,`), MODSEQs and HIGHESTMODSEQ (CONDSTORE), keywords,
expunged UIDs with their MODSEQ (QRESYNC VANISHED), \\Recent, subscriptions, special-use, and
a cache of each message's size and INTERNALDATE.

Index: one SQLite file per account, `yuubin-index.sqlite` in the account's Maildir. Per
account and not in state.db because it belongs to the Maildir: it travels with it in a backup
or a move, a damaged one costs one account a resync (never everyone), and sessions of
different accounts never wait for each other's write lock. WAL mode, `synchronous=FULL`: a
UID is handed out only from a committed transaction, so after a power loss no UID can come
back attached to another message. APPEND, COPY and MOVE run their file and index work in a
thread, off the event loop; flag changes and reconciliation are short and run inline.

Crash safety — the order of every operation, and why kill -9 anywhere is safe:

* APPEND/COPY/MOVE: the file is made durable *first* (written in tmp/, fsynced, renamed into
  cur/, directory fsynced — durable.py's group commit; COPY hard-links, MOVE renames, each
  directory fsynced), *then* its UID is assigned in one index transaction. A crash before the
  transaction leaves a file the index does not know: the next reconciliation gives it the
  next UID (the client never got an OK, so nothing it knows is contradicted). A crash before
  the file is durable leaves nothing. Nothing is lost; UIDs only ever come from UIDNEXT,
  which a committed transaction advances, so none is reused or given twice, and a file's key
  is UNIQUE in its folder, so no file gets two UIDs (the insert checks whether a concurrent
  reconciliation already numbered it).
* Flags: the file is renamed first, then the index updated. A crash between leaves a file
  whose letters differ from the index: reconciliation takes the file's letters, with a new
  MODSEQ, so every session hears of the change.
* EXPUNGE: the files are unlinked (directory fsynced), then the rows move to `expunged`. A
  crash between leaves rows without files: reconciliation expunges them, with a MODSEQ.
* A lost or corrupt index is set aside and rebuilt from the files, with a new UIDVALIDITY
  (always larger than the last one handed out, which is remembered in the index), so clients
  resynchronise instead of trusting stale UIDs.

Reconciliation (a folder's files against its index rows) runs at open and sync when new/ or
cur/ changed since this process last looked (directory mtimes; an mtime within the last two
seconds is not trusted, as a change in the same clock tick would not move it). It notices
files added, removed or renamed behind our back, and moves new/ files to cur/ as it numbers
them. Sessions learn of each other's changes through the index: every change has a MODSEQ,
and a view's sync() asks for what is newer than what it has seen.

Folder names: IMAP names use "/" as the delimiter; on disk they are Maildir++ (`.A.B` for
"A/B") in UTF-8 (the IMAP side encodes modified UTF-7 for the wire). A "." or "%" inside a
name is stored as `%2E` / `%25`, so "v1.2" stays one folder and never becomes "v1/2".
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import operator
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple

from yuubin.delivery.maildir import Maildirs
from yuubin.durable import FileWrite, GroupCommitter, fsync_dir

log = logging.getLogger("yuubin.imap")

INDEX_FILE = "yuubin-index.sqlite"
DELETING_PREFIX = "yuubin-deleting-"  # a folder on its way out (renamed first: atomic)
INBOX = "INBOX"
DELIMITER = "/"
# RFC 6154 folders every account gets on first open (Junk is where quarantine delivers).
SPECIAL_USE = (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"), ("Junk", "\\Junk"),
               ("Archive", "\\Archive"))
SYSTEM_FLAGS = {"\\Seen": "S", "\\Answered": "R", "\\Flagged": "F", "\\Deleted": "T", "\\Draft": "D"}
_LETTER_FLAG = {v: k for k, v in SYSTEM_FLAGS.items()}
_CANONICAL = {k.lower(): k for k in SYSTEM_FLAGS}
MTIME_TRUST = 2.0  # seconds: a directory mtime younger than this may hide a change in the same tick
POLL_INTERVAL = 1.0  # while someone waits, another process's change is noticed this often
RESCAN_GAP = 0.25  # seconds between two listings of a folder whose mtime is too recent to trust
FULL_EVERY = 30.0  # seconds: cur/ is listed in full at least this often while a folder is in use
_counter = itertools.count()
_BARE_LF = re.compile(rb"(?<!\r)\n")
_ESCAPED = re.compile(r"%(25|2[Ee])")
_uid_of = operator.attrgetter("uid")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS folders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,        -- IMAP name, "/" delimiter
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL,
    recent_uid INTEGER NOT NULL,      -- the first UID no read-write session has announced (\\Recent)
    special_use TEXT
);
CREATE TABLE IF NOT EXISTS messages (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    key TEXT NOT NULL,                -- the file name before ":2,"
    file TEXT NOT NULL,               -- "cur/<name>" or "new/<name>" as last seen
    letters TEXT NOT NULL,            -- the info letters after ":2,"
    keywords TEXT NOT NULL,           -- space separated
    modseq INTEGER NOT NULL,
    size INTEGER NOT NULL,            -- RFC822.SIZE: with CRLF line ends
    internaldate REAL NOT NULL,
    PRIMARY KEY (folder, uid),
    UNIQUE (folder, key)
);
CREATE INDEX IF NOT EXISTS messages_modseq ON messages(folder, modseq);
CREATE TABLE IF NOT EXISTS expunged (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (folder, uid)
);
CREATE INDEX IF NOT EXISTS expunged_modseq ON expunged(folder, modseq);
CREATE TABLE IF NOT EXISTS subscriptions (
    name TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS fetch_cache (  -- what FETCH computed once (ENVELOPE, BODYSTRUCTURE wire bytes)
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    item TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (folder, uid, item)
) WITHOUT ROWID;
"""
CACHE_FLUSH = 500  # remembered FETCH items written to the index in one transaction


class StoreError(Exception):
    """An operation the client asked for cannot be done; the text is fit for a NO reply."""


class NoSuchFolder(StoreError):
    pass  # IMAP: NO [NONEXISTENT] (or [TRYCREATE] for APPEND/COPY/MOVE)


class FolderExists(StoreError):
    pass  # IMAP: NO [ALREADYEXISTS]


class InvalidName(StoreError):
    pass  # IMAP: NO [CANNOT]


class HasChildren(StoreError):
    pass  # IMAP: NO [INUSE]? Dovecot says "has children"; [CANNOT]


class ReadOnly(StoreError):
    pass  # a view opened with EXAMINE


class Expunged(StoreError):
    pass  # the message is gone (another session expunged it): IMAP may answer NO [EXPUNGEISSUEDIN]


@dataclass(frozen=True, slots=True)
class FolderInfo:
    name: str  # IMAP name, "/" delimiter, plain Unicode
    special_use: str | None  # "\\Sent", ...
    subscribed: bool
    exists: bool  # False: only a parent of existing folders, or a subscription (\\NonExistent)
    children: bool  # \\HasChildren / \\HasNoChildren


@dataclass(frozen=True, slots=True)
class FolderStatus:
    messages: int
    recent: int
    uidnext: int
    uidvalidity: int
    unseen: int
    size: int
    highestmodseq: int
    deleted: int


class MessageInfo(NamedTuple):
    """One message as a view knows it; a tuple, cheap to make by the ten thousand."""

    uid: int
    flags: frozenset[str]  # system flags ("\\Seen" ...) and keywords; never \\Recent
    modseq: int
    size: int
    internaldate: float
    key: str


@dataclass(slots=True)
class Changes:
    """What sync() found since the view's last look, already applied to `view.messages`."""

    expunged: list[int] = field(default_factory=list)  # UIDs, ascending
    expunged_seqs: list[int] = field(default_factory=list)  # EXPUNGE responses to send, in this order
    added: list[MessageInfo] = field(default_factory=list)  # new messages, ascending UID (now at the end)
    flags: list[MessageInfo] = field(default_factory=list)  # messages whose flags/MODSEQ changed

    def __bool__(self) -> bool:
        return bool(self.expunged or self.added or self.flags)


@dataclass(frozen=True, slots=True)
class StoreResult:
    updated: list[MessageInfo]  # every message the STORE reached, in its state now
    modified: list[int]  # UIDs left alone by UNCHANGEDSINCE (RFC 7162 MODIFIED)


@dataclass(frozen=True, slots=True)
class CopyResult:
    uidvalidity: int  # of the destination (COPYUID)
    source: list[int]
    dest: list[int]


# ---- names -------------------------------------------------------------------------------

def normalize(name: str) -> str:
    """The store's form of an IMAP name: INBOX (any case) as "INBOX", no trailing delimiter."""
    name = name.rstrip(DELIMITER) if name != DELIMITER else name
    first, sep, rest = name.partition(DELIMITER)
    if first.upper() == INBOX:
        return INBOX + sep + rest
    return name


def disk_name(name: str) -> str:
    """"A/v1.2" -> "A.v1%2E2" (the folder's directory is "." + this); "" for INBOX."""
    name = normalize(name)
    if name == INBOX:
        return ""
    parts = name.split(DELIMITER)
    for p in parts:
        if not p or any(ord(c) < 0x20 or c == "\x7f" for c in p):
            raise InvalidName(f"invalid folder name {name!r}")
    out = ".".join(p.replace("%", "%25").replace(".", "%2E") for p in parts)
    if len(out.encode()) > 200:
        raise InvalidName("folder name too long")
    return out


def imap_name(disk: str) -> str:
    """The inverse of disk_name: "A.v1%2E2" -> "A/v1.2"."""
    if not disk:
        return INBOX
    return normalize(DELIMITER.join(_ESCAPED.sub(lambda m: "%" if m[1] == "25" else ".", p)
                                    for p in disk.split(".")))


def letters_of(flags: Iterable[str]) -> str:
    return "".join(sorted(SYSTEM_FLAGS[f] for f in flags if f in SYSTEM_FLAGS))


def canonical_flags(flags: Iterable[str]) -> frozenset[str]:
    """System flags in their canonical case (IMAP flags are case-insensitive); keywords as given."""
    return frozenset(_CANONICAL.get(f.lower(), f) for f in flags if f.lower() != "\\recent")


def _split(name: str) -> tuple[str, str]:
    """File name -> (key, info letters)."""
    key, sep, info = name.partition(":")
    if sep and info.startswith("2,"):
        return key, info[2:]
    return key, ""


@lru_cache(maxsize=4096)
def _flags(letters: str, keywords: str) -> frozenset[str]:
    """Cached: a folder has few distinct flag sets, and views share the frozensets."""
    out = {_LETTER_FLAG[c] for c in letters if c in _LETTER_FLAG}
    if keywords:
        out.update(keywords.split(" "))
    return frozenset(out)


def _crlf_size(path: str, name: str) -> int:
    """RFC822.SIZE of a file: its size with CRLF line ends (Dovecot's ,W= says it without reading)."""
    for part in name.partition(":")[0].split(","):
        if part.startswith("W=") and part[2:].isdigit():
            return int(part[2:])
    with open(path, "rb") as f:
        data = f.read()
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def _with_letters(letters: str, set_flags: frozenset[str], mode: str, old: str) -> str:
    """New info letters: system letters per STORE mode; letters we do not map (P, Dovecot's a-z) kept."""
    mine = set(letters_of(set_flags))
    have = set(old)
    if mode == "+":
        have |= mine
    elif mode == "-":
        have -= mine
    else:
        have = {c for c in have if c not in _LETTER_FLAG} | mine
    return "".join(sorted(have))


def _with_keywords(keywords: str, set_flags: frozenset[str], mode: str) -> str:
    kws = {f for f in set_flags if not f.startswith("\\")}
    have = set(keywords.split(" ")) if keywords else set()
    if mode == "+":
        have |= kws
    elif mode == "-":
        have -= kws
    else:
        have = kws
    return " ".join(sorted(have))


def _folder(db: sqlite3.Connection, columns: str, fid: int) -> Any:
    """A folder's row by id; NoSuchFolder when it was deleted (by another session) meanwhile."""
    row = db.execute(f"SELECT {columns} FROM folders WHERE id=?", (fid,)).fetchone()
    if row is None:
        raise NoSuchFolder("the folder has been deleted")
    return row


# ---- the store ---------------------------------------------------------------------------

class MailStore:
    """One per process: the accounts' stores, opened on first use, and the delivery hook."""

    def __init__(self, maildirs: Maildirs, committer: GroupCommitter):
        self.maildirs = maildirs
        self.committer = committer
        self._accounts: dict[str, AccountStore] = {}

    def account(self, mailbox: str) -> AccountStore:
        acc = self._accounts.get(mailbox)
        if acc is None:
            acc = self._accounts[mailbox] = AccountStore(self.maildirs, self.committer, mailbox)
        return acc

    def delivered(self, mailbox: str, folder: str) -> None:
        """Delivery wrote a message (folder: the Maildir++ folder, "" for INBOX): wake IDLE at once."""
        acc = self._accounts.get(mailbox)
        if acc is not None:
            acc.poke(folder)

    def close(self) -> None:
        for acc in self._accounts.values():
            acc.close()
        self._accounts.clear()


@dataclass(slots=True)
class _Folder:
    """What this process knows of one folder's directory."""

    path: str
    seen_mtimes: tuple[int, int] = (0, 0)  # new/, cur/ at the last listing (after our own moves)
    complete: tuple[bool, bool] = (False, False)  # that listing of new/, cur/ missed nothing (see refresh)
    scanned_at: float = 0.0
    full_at: float = 0.0  # the last listing of cur/ too
    event: asyncio.Event | None = None
    waiters: int = 0
    poller: asyncio.Task | None = None


class AccountStore:
    """One account's folders and index. Every index access holds `_lock` (threads do APPENDs)."""

    def __init__(self, maildirs: Maildirs, committer: GroupCommitter, mailbox: str):
        self.maildirs = maildirs
        self.committer = committer
        self.mailbox = mailbox
        self.root = maildirs.ensure(mailbox)
        self._lock = threading.RLock()
        self._dirs: dict[str, _Folder] = {}
        # The MessageInfo of each message, shared by every open view of its folder (ten views of a
        # 10,000-message INBOX hold one set of tuples); dropped when the folder's last view closes.
        self._infos: dict[int, dict[int, MessageInfo]] = {}
        self._views: dict[int, int] = {}
        self._masters: dict[int, FolderView] = {}
        self._warned_names = False
        self.db = self._open_index()
        self._clean_deleting()
        self._special_use()

    # -- index ----------------------------------------------------------------------------

    def _open_index(self) -> sqlite3.Connection:
        path = self.root / INDEX_FILE
        for attempt in (1, 2):
            try:
                fresh = False
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
                    fresh = True
                db = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(SCHEMA)
                db.execute("SELECT count(*) FROM folders").fetchone()
                if fresh and (attempt == 2 or self._has_mail()):
                    # An index made again for mail that had one: its UIDVALIDITYs (time-based, +1 for
                    # each folder made in the same second) may lie a little ahead of the clock. Start
                    # an hour ahead, so every new one is larger than any a client may remember.
                    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('uidvalidity', ?)",
                               (int(time.time()) + 3600,))
                return db
            except sqlite3.DatabaseError as e:
                if attempt == 2:
                    raise
                aside = path.with_name(f"{INDEX_FILE}.corrupt-{int(time.time())}")
                log.error('event=imap_index_corrupt mailbox=%s error="%s" moved_to=%s action="rebuilt from the '
                          'Maildir with a new UIDVALIDITY"', self.mailbox, e, aside)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, aside)
                for suffix in ("-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{path}{suffix}")
        raise AssertionError("unreachable")

    def _has_mail(self) -> bool:
        with os.scandir(self.root) as it:
            if any(e.name.startswith(".") and e.is_dir() for e in it):
                return True
        return any(os.scandir(self.root / "cur")) or any(os.scandir(self.root / "new"))

    @contextlib.contextmanager
    def _write(self):
        """One write transaction (BEGIN IMMEDIATE: other processes wait, never interleave)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _new_uidvalidity(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM meta WHERE key='uidvalidity'").fetchone()
        last = row[0] if row else 0
        uv = max(int(time.time()), last + 1) & 0xFFFFFFFF or 1
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('uidvalidity', ?)", (uv,))
        return uv

    def _folder_row(self, name: str, *, create: bool = True) -> tuple[int, int, int, int, int, str | None]:
        """(id, uidvalidity, uidnext, highestmodseq, recent_uid, special_use) of an existing folder."""
        name = normalize(name)
        path = self.folder_path(name)
        if not os.path.isdir(os.path.join(path, "cur")):
            raise NoSuchFolder(f"no folder {name!r}")
        with self._lock:
            row = self.db.execute("SELECT id, uidvalidity, uidnext, highestmodseq, recent_uid, special_use "
                                  "FROM folders WHERE name=?", (name,)).fetchone()
            if row is None and create:
                # A folder another tool made with cur/ alone (Dovecot makes new/ and tmp/ lazily).
                self.maildirs.access.make_dirs(os.path.join(path, "new"))
                self.maildirs.access.make_dirs(os.path.join(path, "tmp"))
                with self._write() as db:
                    row = db.execute("SELECT id, uidvalidity, uidnext, highestmodseq, recent_uid, special_use "
                                     "FROM folders WHERE name=?", (name,)).fetchone()
                    if row is None:
                        uv = self._new_uidvalidity(db)
                        cur = db.execute("INSERT INTO folders(name, uidvalidity, uidnext, highestmodseq, recent_uid)"
                                         " VALUES (?, ?, 1, 1, 1)", (name, uv))
                        row = (cur.lastrowid, uv, 1, 1, 1, None)
            if row is None:
                raise NoSuchFolder(f"no folder {name!r}")
            return row

    def folder_path(self, name: str) -> str:
        """The folder's Maildir directory."""
        d = disk_name(name)
        return str(self.root / f".{d}") if d else str(self.root)

    def _dir(self, name: str) -> _Folder:
        path = self.folder_path(name)
        f = self._dirs.get(path)
        if f is None:
            f = self._dirs[path] = _Folder(path)
        return f

    # -- reconciliation --------------------------------------------------------------------

    def _mtimes(self, path: str) -> tuple[int, int]:
        return (os.stat(os.path.join(path, "new")).st_mtime_ns, os.stat(os.path.join(path, "cur")).st_mtime_ns)

    def refresh(self, name: str, *, force: bool = False) -> int:
        """Reconcile a folder's files with its index when they may differ; returns its folder id.

        A directory whose mtime has not moved since a complete listing holds nothing new. A
        listing is complete when it began more than MTIME_TRUST after the mtime it saw (a change in
        the same clock tick would not move the mtime); an incomplete one is redone, at most every
        RESCAN_GAP, so fifty sessions syncing after one delivery list the folder once. When only
        new/ moved (a delivery), only new/ is listed: a sync after new mail costs the new files,
        not the ten thousand in cur/. Our own new/ -> cur/ moves are no news; cur/ is listed in
        full at least every FULL_EVERY while the folder is in use, whatever its mtime says.
        """
        name = normalize(name)
        fid = self._folder_row(name)[0]
        d = self._dir(name)
        with self._lock:
            try:
                mt = self._mtimes(d.path)
            except FileNotFoundError:
                raise NoSuchFolder(f"no folder {name!r}") from None
            now = time.time()
            recent = now - d.scanned_at < RESCAN_GAP
            new_ok = mt[0] == d.seen_mtimes[0] and (d.complete[0] or recent)
            cur_ok = mt[1] == d.seen_mtimes[1] and (d.complete[1] or recent) and now - d.full_at < FULL_EVERY
            if not force and new_ok and cur_ok:
                return fid
            complete = (now - mt[0] / 1e9 > MTIME_TRUST, now - mt[1] / 1e9 > MTIME_TRUST)
            moved, full = self._reconcile(fid, d.path, only_new=not force and cur_ok)
            if moved:
                mt = self._mtimes(d.path)
            d.seen_mtimes = mt
            d.complete = complete if full else (complete[0], d.complete[1])
            d.scanned_at = now
            if full:
                d.full_at = now
        return fid

    def _listing(self, path: str, subs: tuple[str, ...] = ("new", "cur")) -> dict[str, str]:
        """key -> "new/<name>" or "cur/<name>". new/ first: a file moving to cur/ meanwhile is still seen."""
        files: dict[str, str] = {}
        for sub in subs:
            with os.scandir(os.path.join(path, sub)) as it:
                for e in it:
                    name = e.name
                    if name[0] != "." and name.isprintable():
                        files[name.partition(":")[0]] = f"{sub}/{name}"
                    elif name[0] != "." and not self._warned_names:
                        # Not a Maildir name (undecodable bytes, control characters): left alone.
                        self._warned_names = True
                        log.warning("event=imap_file_skipped mailbox=%s folder=%s name=%r reason=\"not a Maildir "
                                    "file name\"", self.mailbox, path, name)
        return files

    def _reconcile(self, fid: int, path: str, *, only_new: bool = False) -> tuple[bool, bool]:
        """Bring the index in line with the files: (moved files new/ -> cur/ itself, listed cur/ too)."""
        db = self.db
        if only_new:
            files = self._listing(path, ("new",))
            rows = {key: (uid, file) for uid, key, file in
                    db.execute("SELECT uid, key, file FROM messages WHERE folder=? AND file LIKE 'new/%'", (fid,))}
            if any(k not in files for k in rows):
                return self._reconcile(fid, path)  # moved to cur/ or removed by someone else: look at all
            for k in files:
                if k not in rows and (r := db.execute("SELECT uid, file FROM messages WHERE folder=? AND key=?",
                                                      (fid, k)).fetchone()):
                    rows[k] = r
        else:
            files = self._listing(path)
            rows = {key: (uid, file) for uid, key, file in
                    db.execute("SELECT uid, key, file FROM messages WHERE folder=?", (fid,))}
        full = not only_new
        if all(rows.get(k, (0, ""))[1] == f for k, f in files.items()) and len(rows) == len(files):
            return False, full
        gone = [k for k in rows if k not in files]
        if gone:  # readdir during a rename may miss an entry: look once more before calling it expunged
            again = self._listing(path)
            files.update({k: again[k] for k in gone if k in again})
        added = []
        for key, file in files.items():
            if key in rows:
                continue
            full_path = os.path.join(path, file)
            try:
                st = os.stat(full_path)
                size = _crlf_size(full_path, file)
            except FileNotFoundError:
                continue  # expunged by another process since the listing
            except OSError as e:  # unreadable (permissions): left out until it can be read
                log.warning('event=imap_file_unreadable mailbox=%s file=%s error="%s"', self.mailbox, full_path,
                            e.strerror or e)
                continue
            added.append((st.st_mtime, key, file, size))
        added.sort()
        changed = [(k, f) for k, f in files.items() if k in rows and rows[k][1] != f]
        expunged = [rows[k][0] for k in rows if k not in files]
        if not (added or changed or expunged):
            return False, full
        moved = False
        with self._write() as db:
            (uidnext, modseq) = _folder(db, "uidnext, highestmodseq", fid)
            modseq += 1

            def known(key: str) -> tuple[int, str, str] | None:  # as the index says now, inside the transaction
                return db.execute("SELECT uid, file, letters FROM messages WHERE folder=? AND key=?",
                                  (fid, key)).fetchone()

            for key, file in changed:
                if (row := known(key)) is None:
                    continue
                uid, _old, letters = row
                new_letters = _split(file.partition("/")[2])[1]
                if new_letters != letters:
                    db.execute("UPDATE messages SET file=?, letters=?, modseq=? WHERE folder=? AND uid=?",
                               (file, new_letters, modseq, fid, uid))
                else:
                    db.execute("UPDATE messages SET file=? WHERE folder=? AND uid=?", (file, fid, uid))
            for uid in expunged:
                db.execute("DELETE FROM messages WHERE folder=? AND uid=?", (fid, uid))
                db.execute("DELETE FROM fetch_cache WHERE folder=? AND uid=?", (fid, uid))
                db.execute("INSERT OR REPLACE INTO expunged(folder, uid, modseq) VALUES (?, ?, ?)", (fid, uid, modseq))
            for mtime, key, file, size in added:
                if known(key) is not None:
                    continue  # numbered by another process meanwhile
                now_file = self._to_cur(path, file)
                moved = moved or now_file != file
                name = now_file.partition("/")[2]
                db.execute("INSERT INTO messages(folder, uid, key, file, letters, keywords, modseq, size, internaldate)"
                           " VALUES (?, ?, ?, ?, ?, '', ?, ?, ?)",
                           (fid, uidnext, key, now_file, _split(name)[1], modseq, size, mtime))
                uidnext += 1
            db.execute("UPDATE folders SET uidnext=?, highestmodseq=? WHERE id=?", (uidnext, modseq, fid))
        if expunged or added:
            log.info("event=imap_reconcile mailbox=%s folder=%s added=%d removed=%d", self.mailbox,
                     path, len(added), len(expunged))
        return moved, full

    def _to_cur(self, path: str, file: str) -> str:
        """new/<name> -> cur/<name>:2, (a session has seen it); where it is now."""
        if not file.startswith("new/"):
            return file
        name = file[4:]
        target = name if ":" in name else f"{name}:2,"
        try:
            os.rename(os.path.join(path, file), os.path.join(path, "cur", target))
        except FileNotFoundError:
            return file  # another process moved it: the next reconciliation finds where
        return f"cur/{target}"

    # -- folders ---------------------------------------------------------------------------

    def _disk_folders(self) -> list[str]:
        out = [INBOX]
        with os.scandir(self.root) as it:
            for e in it:
                if e.name.startswith(".") and e.name not in (".", "..") and e.is_dir() \
                        and os.path.isdir(os.path.join(e.path, "cur")):
                    out.append(imap_name(e.name[1:]))
        return out

    def _special_use(self) -> None:
        have = set(self._disk_folders())
        with self._lock:
            used = {r[0] for r in self.db.execute("SELECT special_use FROM folders WHERE special_use IS NOT NULL")}
        for name, use in SPECIAL_USE:
            if use in used:
                continue
            if name not in have:
                self.maildirs.ensure(self.mailbox, disk_name(name))
                with self._write() as db:
                    db.execute("INSERT OR IGNORE INTO subscriptions(name) VALUES (?)", (name,))
            fid = self._folder_row(name)[0]
            with self._write() as db:
                db.execute("UPDATE folders SET special_use=? WHERE id=?", (use, fid))
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO subscriptions(name) VALUES (?)", (INBOX,))

    def _clean_deleting(self) -> None:
        with os.scandir(self.root) as it:
            for e in it:
                if e.name.startswith(DELETING_PREFIX):
                    shutil.rmtree(e.path, ignore_errors=True)

    def folders(self) -> list[FolderInfo]:
        """Every folder (INBOX first), with parents that do not exist and subscriptions of names that do not."""
        names = set(self._disk_folders())
        with self._lock:
            subs = {r[0] for r in self.db.execute("SELECT name FROM subscriptions")}
            uses = dict(self.db.execute("SELECT name, special_use FROM folders WHERE special_use IS NOT NULL"))
        every = set(names) | subs
        for n in list(every):
            parts = n.split(DELIMITER)
            every.update(DELIMITER.join(parts[:i]) for i in range(1, len(parts)))
        parents = {n.rpartition(DELIMITER)[0] for n in names if DELIMITER in n}
        order = sorted(every - {INBOX})
        out = []
        for n in [INBOX, *order]:
            out.append(FolderInfo(n, uses.get(n) if n in names else None, n in subs, n in names, n in parents))
        return out

    def create(self, name: str, special_use: str | None = None) -> None:
        name = normalize(name)
        d = disk_name(name)
        if name == INBOX or os.path.isdir(os.path.join(self.folder_path(name), "cur")):
            raise FolderExists(f"folder {name!r} exists")
        parts = name.split(DELIMITER)
        for i in range(1, len(parts) + 1):  # RFC 9051: superior names are created as needed
            sub = DELIMITER.join(parts[:i])
            if sub != INBOX:
                self.maildirs.ensure(self.mailbox, disk_name(sub))
        fid = self._folder_row(name)[0]
        if special_use:
            with self._write() as db:
                db.execute("UPDATE folders SET special_use=? WHERE id=?", (special_use, fid))
        log.info("event=imap_folder_create mailbox=%s folder=%s disk=%s", self.mailbox, name, d)

    def delete(self, name: str) -> None:
        name = normalize(name)
        if name == INBOX:
            raise InvalidName("INBOX cannot be deleted")
        path = self.folder_path(name)
        if not os.path.isdir(os.path.join(path, "cur")):
            raise NoSuchFolder(f"no folder {name!r}")
        if any(n.startswith(name + DELIMITER) for n in self._disk_folders()):
            raise HasChildren(f"folder {name!r} has children: delete them first")
        aside = str(self.root / f"{DELETING_PREFIX}{time.time_ns()}")
        os.rename(path, aside)  # atomic: the folder is gone at once; the files go after
        fsync_dir(self.root)
        with self._write() as db:
            row = db.execute("SELECT id FROM folders WHERE name=?", (name,)).fetchone()
            if row:
                self._masters.pop(row[0], None)
                db.execute("DELETE FROM messages WHERE folder=?", row)
                db.execute("DELETE FROM expunged WHERE folder=?", row)
                db.execute("DELETE FROM fetch_cache WHERE folder=?", row)
                db.execute("DELETE FROM folders WHERE id=?", row)
        self._dirs.pop(path, None)
        self.maildirs.forget(self.mailbox, disk_name(name))
        shutil.rmtree(aside, ignore_errors=True)
        self.poke(disk_name(name))
        log.info("event=imap_folder_delete mailbox=%s folder=%s", self.mailbox, name)

    def rename(self, old: str, new: str) -> None:
        old, new = normalize(old), normalize(new)
        if old == INBOX:
            self._rename_inbox(new)
            return
        src = self.folder_path(old)
        if not os.path.isdir(os.path.join(src, "cur")):
            raise NoSuchFolder(f"no folder {old!r}")
        if new == INBOX or os.path.isdir(os.path.join(self.folder_path(new), "cur")):
            raise FolderExists(f"folder {new!r} exists")
        if new.startswith(old + DELIMITER):
            raise InvalidName("a folder cannot become its own child")
        parts = new.split(DELIMITER)
        for i in range(1, len(parts)):
            sub = DELIMITER.join(parts[:i])
            if sub != INBOX:
                self.maildirs.ensure(self.mailbox, disk_name(sub))
        moves = [(n, new + n[len(old):]) for n in self._disk_folders()
                 if n == old or n.startswith(old + DELIMITER)]
        with self._write() as db:
            for a, b in moves:
                os.rename(self.folder_path(a), self.folder_path(b))
                db.execute("UPDATE folders SET name=? WHERE name=?", (b, a))
                if db.execute("SELECT 1 FROM subscriptions WHERE name=?", (a,)).fetchone():
                    db.execute("DELETE FROM subscriptions WHERE name=?", (a,))
                    db.execute("INSERT OR IGNORE INTO subscriptions(name) VALUES (?)", (b,))
            fsync_dir(self.root)
        for a, _b in moves:
            self._dirs.pop(self.folder_path(a), None)
            self.maildirs.forget(self.mailbox, disk_name(a))
        log.info("event=imap_folder_rename mailbox=%s from=%s to=%s", self.mailbox, old, new)

    def _rename_inbox(self, new: str) -> None:
        """RFC 9051: every message of INBOX moves to the new folder; INBOX stays, empty."""
        self.create(new)
        fid = self.refresh(INBOX, force=True)
        dest_fid = self.refresh(new)
        with self._lock:
            rows = self.db.execute("SELECT uid FROM messages WHERE folder=? ORDER BY uid", (fid,)).fetchall()
        self._move_sync(fid, INBOX, [r[0] for r in rows], dest_fid, new)

    def subscribe(self, name: str, on: bool) -> None:
        name = normalize(name)
        with self._write() as db:
            if on:
                db.execute("INSERT OR IGNORE INTO subscriptions(name) VALUES (?)", (name,))
            else:
                db.execute("DELETE FROM subscriptions WHERE name=?", (name,))

    def status(self, name: str) -> FolderStatus:
        fid = self.refresh(name)
        with self._lock:
            uv, uidnext, hms, recent_uid = _folder(self.db, "uidvalidity, uidnext, highestmodseq, recent_uid", fid)
            n, size, unseen, deleted, recent = self.db.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(instr(letters, 'S') = 0), 0), "
                "coalesce(sum(instr(letters, 'T') > 0), 0), coalesce(sum(uid >= ?), 0) FROM messages WHERE folder=?",
                (recent_uid, fid)).fetchone()
        return FolderStatus(n, recent, uidnext, uv, unseen, size, hms, deleted)

    # -- writing messages ------------------------------------------------------------------

    def _new_key(self, size: int) -> str:
        now = time.time()
        return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}R{next(_counter)}.{self.maildirs.hostname},S={size}"

    def _insert(self, db: sqlite3.Connection, fid: int, entries: list[tuple[str, str, str, str, int, float]]
                ) -> list[int]:
        """Number new files (key, file, letters, keywords, size, internaldate) in one transaction."""
        uidnext, modseq = _folder(db, "uidnext, highestmodseq", fid)
        modseq += 1
        uids = []
        for key, file, letters, keywords, size, internaldate in entries:
            row = db.execute("SELECT uid FROM messages WHERE folder=? AND key=?", (fid, key)).fetchone()
            if row:  # a reconciliation numbered it between the rename and now: keep its UID
                db.execute("UPDATE messages SET keywords=?, internaldate=?, modseq=? WHERE folder=? AND uid=?",
                           (keywords, internaldate, modseq, fid, row[0]))
                uids.append(row[0])
                continue
            db.execute("INSERT INTO messages(folder, uid, key, file, letters, keywords, modseq, size, internaldate)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (fid, uidnext, key, file, letters, keywords, modseq, size, internaldate))
            uids.append(uidnext)
            uidnext += 1
        db.execute("UPDATE folders SET uidnext=?, highestmodseq=? WHERE id=?", (uidnext, modseq, fid))
        return uids

    async def append(self, name: str, data: bytes, flags: frozenset[str], internaldate: float | None
                     ) -> tuple[int, int]:
        """Store a message; (uidvalidity, uid) once the file and its UID are durable."""
        name = normalize(name)
        fid, uv = self._folder_row(name)[:2]
        path = self.folder_path(name)
        flags = canonical_flags(flags)
        key = self._new_key(len(data))
        size = len(data) + data.count(b"\n") - data.count(b"\r\n")  # as read() serves it: CRLF
        letters = letters_of(flags)
        keywords = " ".join(sorted(f for f in flags if not f.startswith("\\")))
        file = f"cur/{key}:2,{letters}"
        when = time.time() if internaldate is None else internaldate
        await self.committer.commit([FileWrite(os.path.join(path, "tmp", key), data,
                                               rename_to=os.path.join(path, file), access=self.maildirs.access)])

        def number() -> int:
            with contextlib.suppress(OSError):
                os.utime(os.path.join(path, file), (when, when))  # INTERNALDATE, as Dovecot reads it
            with self._write() as db:
                return self._insert(db, fid, [(key, file, letters, keywords, size, when)])[0]

        uid = await asyncio.to_thread(number)
        self.poke(disk_name(name))
        return uv, uid

    def _copy_sync(self, fid: int, src: str, uids: list[int], dest_fid: int, dest: str, *, move: bool) -> CopyResult:
        src_path, dest_path = self.folder_path(src), self.folder_path(dest)
        with self._lock:
            rows = [self.db.execute("SELECT uid, file, letters, keywords, size, internaldate FROM messages "
                                    "WHERE folder=? AND uid=?", (fid, u)).fetchone() for u in uids]
            dest_uv = _folder(self.db, "uidvalidity", dest_fid)[0]
        done, entries = [], []
        for row in rows:
            if row is None:
                continue  # expunged meanwhile: COPY/MOVE skips it
            uid, file, letters, keywords, size, internaldate = row
            key = self._new_key(size)
            target = f"cur/{key}:2,{letters}"
            a, b = os.path.join(src_path, file), os.path.join(dest_path, target)
            try:
                if move:
                    os.rename(a, b)
                else:
                    self._link_or_copy(a, b)
            except FileNotFoundError:
                continue  # gone behind our back; the next reconciliation reports it
            done.append(uid)
            entries.append((key, target, letters, keywords, size, internaldate))
        fsync_dir(os.path.join(dest_path, "cur"))
        if move:
            for sub in {os.path.dirname(r[1]) for r in rows if r is not None}:
                fsync_dir(os.path.join(src_path, sub))
        with self._write() as db:
            dest_uids = self._insert(db, dest_fid, entries)
            if move and done:
                self._expunge_rows(db, fid, done)
        return CopyResult(dest_uv, done, dest_uids)

    def _link_or_copy(self, a: str, b: str) -> None:
        try:
            os.link(a, b)  # Maildir files never change: one inode in two folders is safe
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                raise
            with open(a, "rb") as f:
                data = f.read()
            tmp = os.path.join(os.path.dirname(os.path.dirname(b)), "tmp", os.path.basename(b))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.maildirs.access.mode)
            try:
                self.maildirs.access.set_fd(fd)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, b)

    def _move_sync(self, fid: int, src: str, uids: list[int], dest_fid: int, dest: str) -> CopyResult:
        return self._copy_sync(fid, src, uids, dest_fid, dest, move=True)

    def _expunge_rows(self, db: sqlite3.Connection, fid: int, uids: list[int]) -> None:
        modseq = _folder(db, "highestmodseq", fid)[0] + 1
        for uid in uids:
            db.execute("DELETE FROM messages WHERE folder=? AND uid=?", (fid, uid))
            db.execute("DELETE FROM fetch_cache WHERE folder=? AND uid=?", (fid, uid))
            db.execute("INSERT OR REPLACE INTO expunged(folder, uid, modseq) VALUES (?, ?, ?)", (fid, uid, modseq))
        db.execute("UPDATE folders SET highestmodseq=? WHERE id=?", (modseq, fid))

    def import_folder(self, name: str, uidvalidity: int, uidnext: int,
                      entries: list[tuple[str, str, str, int | None, int, float]]) -> bool:
        """Number files already written durably into a folder with UIDs another server gave them.

        entries: (key, file "cur/<name>", keywords, uid or None, size, internaldate). When the
        folder holds no message and has never expunged one, it takes `uidvalidity` and the given
        UIDs (clients keep their caches); otherwise the files get new UIDs. Returns which.
        """
        name = normalize(name)
        fid = self._folder_row(name)[0]
        with self._write() as db:
            used = db.execute("SELECT (SELECT count(*) FROM messages WHERE folder=?) + "
                              "(SELECT count(*) FROM expunged WHERE folder=?)", (fid, fid)).fetchone()[0]
            keep = used == 0 and uidvalidity > 0
            if keep:
                top = max((u for *_r, u, _s, _d in entries if u), default=0)
                free = max(uidnext, top + 1)
                modseq = _folder(db, "highestmodseq", fid)[0] + 1
                for key, file, keywords, uid, size, internaldate in sorted(entries, key=lambda e: e[3] or 1 << 62):
                    if not uid:
                        uid, free = free, free + 1
                    db.execute("INSERT INTO messages(folder, uid, key, file, letters, keywords, modseq, size, "
                               "internaldate) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (fid, uid, key, file, _split(file)[1], keywords, modseq, size, internaldate))
                db.execute("UPDATE folders SET uidvalidity=?, uidnext=?, highestmodseq=?, recent_uid=? WHERE id=?",
                           (uidvalidity, free, modseq, free, fid))
                row = db.execute("SELECT value FROM meta WHERE key='uidvalidity'").fetchone()
                if not row or row[0] < uidvalidity:
                    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('uidvalidity', ?)", (uidvalidity,))
            else:
                ordered = sorted(entries, key=lambda e: (e[3] or 1 << 62, e[5]))
                self._insert(db, fid, [(k, f, _split(f)[1], kw, size, d) for k, f, kw, _u, size, d in ordered])
        self.poke(disk_name(name))
        return keep

    def indexed_keys(self, name: str) -> set[str]:
        """The keys of the files the index has numbered (no reconciliation first: for import)."""
        fid = self._folder_row(name)[0]
        with self._lock:
            return {r[0] for r in self.db.execute("SELECT key FROM messages WHERE folder=?", (fid,))}

    def messages(self, name: str) -> list[tuple[MessageInfo, str]]:
        """Every message of a folder with its file ("cur/<name>"), ascending UID (for export)."""
        fid = self.refresh(name)
        with self._lock:
            return [(MessageInfo(uid, _flags(letters, kw), modseq, size, idate, key), file)
                    for uid, key, file, letters, kw, modseq, size, idate in self.db.execute(
                        "SELECT uid, key, file, letters, keywords, modseq, size, internaldate FROM messages "
                        "WHERE folder=? ORDER BY uid", (fid,))]

    def open(self, name: str, *, readonly: bool) -> FolderView:
        return FolderView(self, normalize(name), readonly)

    def _info(self, fid: int, uid: int, letters: str, kw: str, modseq: int, size: int, idate: float, key: str
              ) -> MessageInfo:
        d = self._infos.get(fid)
        if d is None:
            return MessageInfo(uid, _flags(letters, kw), modseq, size, idate, key)
        m = d.get(uid)
        if m is None or m.modseq != modseq:
            m = d[uid] = MessageInfo(uid, _flags(letters, kw), modseq, size, idate, key)
        return m

    def _master(self, fid: int, name: str) -> FolderView:
        """This process's own read-only view of a folder, kept while the account is open."""
        v = self._masters.get(fid)
        if v is None or v.name != name:
            v = self._masters[fid] = FolderView(self, name, True, master=True)
        return v

    def _opened(self, fid: int) -> None:
        self._views[fid] = self._views.get(fid, 0) + 1
        self._infos.setdefault(fid, {})

    def _closed(self, fid: int) -> None:
        n = self._views.get(fid, 0) - 1
        if n > 0:
            self._views[fid] = n
        else:
            self._views.pop(fid, None)
            self._infos.pop(fid, None)

    # -- change notification ---------------------------------------------------------------

    def poke(self, disk: str) -> None:
        """Something in this folder (disk name, "" for INBOX) changed: wake whoever waits on it."""
        path = str(self.root / f".{disk}") if disk else str(self.root)
        f = self._dirs.get(path)
        if f is not None and f.event is not None:
            f.event.set()
            f.event = None

    async def wait(self, name: str, fid: int, since: int, timeout: float) -> None:
        """Return when the folder may have changed after MODSEQ `since`, or after `timeout` seconds."""
        d = self._dir(name)
        if self._highestmodseq(fid) != since:
            return
        with contextlib.suppress(FileNotFoundError):
            if self._mtimes(d.path) != d.seen_mtimes:  # a file came or went since the last look
                return
        if d.event is None:
            d.event = asyncio.Event()
        event = d.event
        d.waiters += 1
        if d.poller is None:
            d.poller = asyncio.get_running_loop().create_task(self._poll(d, name, fid))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            d.waiters -= 1

    def _highestmodseq(self, fid: int) -> int:
        with self._lock:
            row = self.db.execute("SELECT highestmodseq FROM folders WHERE id=?", (fid,)).fetchone()
        return row[0] if row else -1

    async def _poll(self, d: _Folder, name: str, fid: int) -> None:
        """While someone waits: another process's delivery or change, seen within POLL_INTERVAL."""
        try:
            mt = d.seen_mtimes
            hms = self._highestmodseq(fid)
            while d.waiters > 0:
                await asyncio.sleep(POLL_INTERVAL)
                try:
                    if not all(d.complete):
                        self.refresh(name)  # the last listing was too soon after a change: look again
                    now_mt, now_hms = self._mtimes(d.path), self._highestmodseq(fid)
                except (FileNotFoundError, NoSuchFolder):
                    now_mt, now_hms = (0, 0), -1
                if now_mt != mt or now_hms != hms:
                    mt, hms = now_mt, now_hms
                    if d.event is not None:
                        d.event.set()
                        d.event = None
        except FileNotFoundError:
            if d.event is not None:
                d.event.set()
                d.event = None
        finally:
            d.poller = None

    def close(self) -> None:
        with self._lock:
            self.db.close()


class FolderView:
    """A session's selected folder: its own sequence numbers, changed only by sync()."""

    def __init__(self, account: AccountStore, name: str, readonly: bool, *, master: bool = False):
        self.account = account
        self.name = name
        self.readonly = readonly
        fid = account.refresh(name)
        self.fid = fid
        acc = account
        acc._opened(fid)
        self.closed = False
        self._pending: dict[tuple[int, str], bytes] = {}
        self._master = master
        if master:  # the process's own copy of the folder, loaded from the index once
            info = acc._info
            with acc._lock:
                db = acc.db
                self.uidvalidity, self.uidnext, self.highestmodseq = _folder(
                    db, "uidvalidity, uidnext, highestmodseq", fid)
                self.messages: list[MessageInfo] = [
                    info(fid, uid, letters, kw, modseq, size, idate, key)
                    for uid, key, letters, kw, modseq, size, idate in db.execute(
                        "SELECT uid, key, letters, keywords, modseq, size, internaldate FROM messages "
                        "WHERE folder=? ORDER BY uid", (fid,))]
            self.recent: set[int] = set()
            return
        # A session's view starts as a copy of the process's up-to-date one: SELECT of a big
        # folder costs a list copy, not a read of every row.
        base = acc._master(fid, name)
        base.sync()
        self.uidvalidity, self.uidnext, self.highestmodseq = base.uidvalidity, base.uidnext, base.highestmodseq
        self.messages = list(base.messages)
        with acc._lock if readonly else acc._write():
            recent_uid = _folder(acc.db, "recent_uid", fid)[0]
            if not readonly and recent_uid < self.uidnext:  # the first to hear of these: \Recent is its own
                acc.db.execute("UPDATE folders SET recent_uid=? WHERE id=?", (self.uidnext, fid))
        self.recent = {m.uid for m in self.messages if m.uid >= recent_uid}

    # -- looking up ------------------------------------------------------------------------

    def seq(self, uid: int) -> int | None:
        """The sequence number of a UID in this view, or None."""
        msgs = self.messages  # ascending UID: bisect on it (no second list per session)
        i = bisect.bisect_left(msgs, uid, key=_uid_of)
        return i + 1 if i < len(msgs) and msgs[i].uid == uid else None

    def uids(self) -> list[int]:
        return [m.uid for m in self.messages]

    def read(self, uid: int) -> bytes:
        """The raw message with CRLF line ends; Expunged if it is gone."""
        for attempt in (1, 2):
            with self.account._lock:
                row = self.account.db.execute("SELECT file FROM messages WHERE folder=? AND uid=?",
                                              (self.fid, uid)).fetchone()
            if row is None:
                raise Expunged(f"message UID {uid} has been expunged")
            try:
                with open(os.path.join(self.account.folder_path(self.name), row[0]), "rb") as f:
                    data = f.read()
            except PermissionError as e:
                raise StoreError(f"message UID {uid} cannot be read: {e.strerror}") from None
            except FileNotFoundError:
                if attempt == 2:
                    raise Expunged(f"message UID {uid} has been expunged") from None
                self.account.refresh(self.name, force=True)  # renamed behind our back: find it again
                continue
            if b"\n" in data and data.count(b"\n") != data.count(b"\r\n"):
                data = _BARE_LF.sub(b"\r\n", data)
            return data
        raise AssertionError("unreachable")

    # -- the FETCH cache ---------------------------------------------------------------------

    def cached(self, uids: Iterable[int], item: str) -> dict[int, bytes]:
        """What `remember` kept for these UIDs under `item` (e.g. "ENVELOPE/1"), those that have it.

        A message's file never changes, so neither does what was computed from it; put a version
        in `item` when the way it is computed changes.
        """
        want = set(uids)
        out = {u: v for (u, i), v in self._pending.items() if i == item and u in want}
        with self.account._lock:
            rows = self.account.db.execute("SELECT uid, value FROM fetch_cache WHERE folder=? AND item=?",
                                           (self.fid, item)) if len(want) > 64 else (
                r for u in want for r in self.account.db.execute(
                    "SELECT uid, value FROM fetch_cache WHERE folder=? AND uid=? AND item=?", (self.fid, u, item)))
            for u, v in rows:
                if u in want:
                    out[u] = v
        return out

    def remember(self, uid: int, item: str, value: bytes) -> None:
        """Keep a computed FETCH item; written to the index in batches (at sync(), close(), or when many)."""
        self._pending[(uid, item)] = value
        if len(self._pending) >= CACHE_FLUSH:
            self.flush_cache()

    def flush_cache(self) -> None:
        if not self._pending:
            return
        rows = [(self.fid, u, i, v) for (u, i), v in self._pending.items()]
        self._pending = {}
        with self.account._write() as db:
            # Only for messages still there: an expunged one's rows must not come back.
            db.executemany("INSERT OR REPLACE INTO fetch_cache(folder, uid, item, value) SELECT ?, ?, ?, ? "
                           "WHERE EXISTS (SELECT 1 FROM messages WHERE folder=? AND uid=?)",
                           [(*r, r[0], r[1]) for r in rows])

    # -- syncing ---------------------------------------------------------------------------

    def sync(self) -> Changes:
        """Pick up what others (sessions, delivery, other tools) changed since the last sync."""
        self.flush_cache()
        acc = self.account
        ch = Changes()
        try:
            acc.refresh(self.name)
        except NoSuchFolder:
            return self._gone()
        with acc._lock:
            row = acc.db.execute("SELECT highestmodseq, uidnext, recent_uid FROM folders WHERE id=?",
                                 (self.fid,)).fetchone()
            if row is None:
                return self._gone()
            hms, uidnext, recent_uid = row
            if hms == self.highestmodseq:
                return ch
            gone = [r[0] for r in acc.db.execute(
                "SELECT uid FROM expunged WHERE folder=? AND modseq>? ORDER BY uid", (self.fid, self.highestmodseq))]
            rows = acc.db.execute(
                "SELECT uid, key, letters, keywords, modseq, size, internaldate FROM messages "
                "WHERE folder=? AND modseq>? ORDER BY uid", (self.fid, self.highestmodseq)).fetchall()
            top = max(uidnext, rows[-1][0] + 1) if rows else uidnext  # a commit may have come between
            if not self.readonly and top > recent_uid:
                with acc._write() as db:
                    recent_uid = _folder(db, "recent_uid", self.fid)[0]
                    db.execute("UPDATE folders SET recent_uid=max(recent_uid, ?) WHERE id=?", (top, self.fid))
        self._apply_expunged(gone, ch)
        for uid, key, letters, kw, modseq, size, idate in rows:
            info = acc._info(self.fid, uid, letters, kw, modseq, size, idate, key)
            i = self.seq(uid)
            if i is not None:
                if self.messages[i - 1].modseq != modseq:
                    self.messages[i - 1] = info
                    ch.flags.append(info)
            elif uid >= self.uidnext:
                ch.added.append(info)
                if uid >= recent_uid and not self._master:
                    self.recent.add(uid)
        self.messages.extend(ch.added)
        self.uidnext = max(self.uidnext, uidnext)
        self.highestmodseq = hms
        return ch

    def _apply_expunged(self, gone: list[int], ch: Changes) -> None:
        here = [(s, u) for u in gone if (s := self.seq(u)) is not None]
        if not here:
            return
        drop = {u for _s, u in here}
        ch.expunged = [u for _s, u in here]
        ch.expunged_seqs = [s for s, _u in sorted(here, reverse=True)]  # highest first: each stays valid
        self.messages = [m for m in self.messages if m.uid not in drop]
        self.recent -= drop

    def _gone(self) -> Changes:
        """The folder was deleted or renamed away: every message is expunged for this view."""
        self.highestmodseq = -1  # as the index now says: wait_change() waits instead of spinning
        ch = Changes()
        self._apply_expunged(self.uids(), ch)
        return ch

    # -- changing --------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.readonly:
            raise ReadOnly("the folder is read-only (EXAMINE)")

    def store(self, uids: Iterable[int], mode: str, flags: frozenset[str], unchangedsince: int | None = None
              ) -> StoreResult:
        """STORE flags ("+", "-", "="); the file is renamed first, then the index (see the module doc)."""
        self._writable()
        if mode not in ("+", "-", "="):
            raise ValueError(f"bad STORE mode {mode!r}")
        flags = canonical_flags(flags)
        acc = self.account
        path = acc.folder_path(self.name)
        wanted = sorted(set(uids))
        updated: list[MessageInfo] = []
        modified: list[int] = []
        for attempt in (1, 2):
            retry = False
            updated, modified = [], []
            with acc._write() as db:
                modseq = _folder(db, "highestmodseq", self.fid)[0] + 1
                changed = False
                for uid in wanted:
                    row = db.execute("SELECT key, file, letters, keywords, modseq, size, internaldate FROM messages "
                                     "WHERE folder=? AND uid=?", (self.fid, uid)).fetchone()
                    if row is None:
                        continue  # expunged meanwhile
                    key, file, letters, kw, mseq, size, idate = row
                    if unchangedsince is not None and mseq > unchangedsince:
                        modified.append(uid)
                        continue
                    new_letters = _with_letters(letters, flags, mode, letters)
                    new_kw = _with_keywords(kw, flags, mode)
                    if new_letters == letters and new_kw == kw:  # no change: its MODSEQ stays (RFC 7162)
                        updated.append(acc._info(self.fid, uid, letters, kw, mseq, size, idate, key))
                        continue
                    new_file = file
                    if new_letters != letters:
                        new_file = f"cur/{key}:2,{new_letters}"
                        try:
                            os.rename(os.path.join(path, file), os.path.join(path, new_file))
                        except FileNotFoundError:
                            retry = True  # renamed or removed behind our back
                            continue
                    db.execute("UPDATE messages SET file=?, letters=?, keywords=?, modseq=? WHERE folder=? AND uid=?",
                               (new_file, new_letters, new_kw, modseq, self.fid, uid))
                    changed = True
                    updated.append(acc._info(self.fid, uid, new_letters, new_kw, modseq, size, idate, key))
                if changed:
                    db.execute("UPDATE folders SET highestmodseq=? WHERE id=?", (modseq, self.fid))
            if not retry or attempt == 2:
                break
            acc.refresh(self.name, force=True)
        for info in updated:  # this session's own view shows its own change at once
            i = self.seq(info.uid)
            if i is not None:
                self.messages[i - 1] = info
        acc.poke(disk_name(self.name))
        return StoreResult(updated, modified)

    def expunge(self, uids: Iterable[int] | None = None) -> list[int]:
        """Remove the folder's \\Deleted messages (UID EXPUNGE: those among `uids`); returns their UIDs.

        The view's own list changes at the next sync(), which reports these like anyone's.
        """
        self._writable()
        acc = self.account
        path = acc.folder_path(self.name)
        only = set(uids) if uids is not None else None
        with acc._lock:
            rows = [(u, f) for u, f in acc.db.execute(
                "SELECT uid, file FROM messages WHERE folder=? AND instr(letters, 'T') > 0 ORDER BY uid", (self.fid,))
                if only is None or (u in only and self.seq(u) is not None)]
            if not rows:
                return []
            for _u, f in rows:
                try:
                    os.unlink(os.path.join(path, f))
                except FileNotFoundError:  # renamed behind our back (another tool's flag change)?
                    key = _split(f.partition("/")[2])[0]
                    for sub in ("cur", "new"):
                        for name in os.listdir(os.path.join(path, sub)):
                            if name.partition(":")[0] == key:
                                with contextlib.suppress(FileNotFoundError):
                                    os.unlink(os.path.join(path, sub, name))
            for sub in {os.path.dirname(f) for _u, f in rows}:
                fsync_dir(os.path.join(path, sub))
            with acc._write() as db:
                acc._expunge_rows(db, self.fid, [u for u, _f in rows])
        acc.poke(disk_name(self.name))
        return [u for u, _f in rows]

    async def copy(self, uids: Iterable[int], dest: str) -> CopyResult:
        return await self._transfer(uids, dest, move=False)

    async def move(self, uids: Iterable[int], dest: str) -> CopyResult:
        self._writable()
        return await self._transfer(uids, dest, move=True)

    async def _transfer(self, uids: Iterable[int], dest: str, *, move: bool) -> CopyResult:
        acc = self.account
        dest = normalize(dest)
        dest_fid = acc._folder_row(dest)[0]
        wanted = sorted(set(uids))
        result = await asyncio.to_thread(acc._copy_sync, self.fid, self.name, wanted, dest_fid, dest, move=move)
        acc.poke(disk_name(dest))
        if move:
            acc.poke(disk_name(self.name))
        return result

    # -- QRESYNC and IDLE ------------------------------------------------------------------

    def vanished_since(self, modseq: int) -> list[int]:
        """UIDs expunged after MODSEQ `modseq` (QRESYNC VANISHED (EARLIER))."""
        with self.account._lock:
            return [r[0] for r in self.account.db.execute(
                "SELECT uid FROM expunged WHERE folder=? AND modseq>? ORDER BY uid", (self.fid, modseq))]

    def changed_since(self, modseq: int) -> list[int]:
        """UIDs of this view's messages changed after MODSEQ `modseq` (CHANGEDSINCE, QRESYNC)."""
        return [m.uid for m in self.messages if m.modseq > modseq]

    async def wait_change(self, timeout: float) -> None:
        """Return when the folder may have changed (then call sync()), or after `timeout` seconds."""
        await self.account.wait(self.name, self.fid, self.highestmodseq, timeout)

    def close(self) -> None:
        """UNSELECT/CLOSE/logout: call it, or the folder's shared cache outlives the session."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(sqlite3.Error):  # a cache: losing it costs only time
                self.flush_cache()
            self.account._closed(self.fid)


"""`yuubin backup` and `yuubin restore`: a consistent copy of data_dir while the server runs.

What is copied, and why it is consistent without stopping anything:
- state.db through SQLite's online backup API (a snapshot of one moment, whatever writes).
- the spool's entries (spool/queue, spool/corrupt), read once and written as read; an entry whose
  bytes are not all there yet (its envelope records the length) was never acknowledged and is
  left out. Spool first, then the Maildirs: a message delivered meanwhile leaves the spool only
  after its Maildir copy is durable, so it is found in one place or the other.
- the Maildirs' new/ and cur/ (never tmp/, where files are still being written). A file appears
  there complete and never changes (flags are renames), so it is hard-linked when DEST is on the
  same file system (no copy, no space) or copied. In each Maildir new/ is read before cur/: a
  message moved from new/ to cur/ meanwhile is found in cur/.
- every other file under data_dir (DKIM keys, reports, the geo file), copied, tmp/ left out.
- manifest.json, written last: every file with its size and SHA-256, the schema version of
  state.db and the yuubin version. A directory without it is not a backup.

`restore` checks the manifest, then copies into a data_dir that must not hold anything yet.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from yuubin import __version__
from yuubin.durable import fsync_dir
from yuubin.queue.spool import MAGIC, Envelope, SpoolCorrupt
from yuubin.store import SCHEMA_VERSION, Store

MANIFEST = "manifest.json"
FORMAT = "yuubin-backup-1"
STATE_FILES = ("state.db", "state.db-wal", "state.db-shm", "state.db-journal")  # state.db: the online backup
SPOOL_PARTS = ("queue", "corrupt")  # spool/tmp holds writes in progress; locks and wake requests are not state


class BackupError(Exception):
    """The backup or restore cannot be made (the message says what to do)."""


@dataclass
class BackupResult:
    dest: Path
    files: int = 0
    bytes: int = 0
    linked: int = 0
    skipped_incomplete: int = 0  # spool entries still being written (never acknowledged)
    seconds: float = 0.0
    entries: list[dict[str, object]] = field(default_factory=list)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _spool_entry_complete(raw: bytes) -> bool:
    nl = raw.find(b"\n")
    if not raw.startswith(MAGIC) or nl < 0:
        return False
    try:
        env = Envelope.decode(raw[: nl + 1])
    except (ValueError, TypeError, KeyError, SpoolCorrupt):
        return False
    return len(raw) - nl - 1 == env.size


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_synced(src: Path, dst: Path) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(src, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _maildir_files(mail_root: Path) -> Iterator[Path]:
    """Every message file under mail/ in new/ then cur/ of each Maildir (and Maildir++ folder)."""
    for dirpath, dirnames, _files in os.walk(mail_root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("tmp", "new", "cur"))
        here = Path(dirpath)
        for sub in ("new", "cur"):  # this order: see the module docstring
            d = here / sub
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for name in sorted(os.listdir(d)):
                    yield d / name


def _empty_dir(path: Path, what: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BackupError(f"{what}: {path} exists and is not an empty directory (choose a new one)")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def backup(data_dir: Path, dest: Path, *, copy: bool = False) -> BackupResult:
    """Copy data_dir to dest (a new or empty directory) while the server may be running."""
    started = time.monotonic()
    state_db = data_dir / "state.db"
    if not state_db.exists():
        raise BackupError(f"data_dir: {data_dir} has no state.db: nothing to back up")
    _empty_dir(dest, "DEST")
    result = BackupResult(dest)
    made_dirs: set[Path] = {dest}

    def parent_of(target: Path) -> None:
        missing = []
        d = target.parent
        while d not in made_dirs:
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            os.mkdir(m, 0o700)
            made_dirs.add(m)

    def record(rel: Path, target: Path, linked: bool) -> None:
        size = target.stat().st_size
        result.entries.append({"path": rel.as_posix(), "size": size, "sha256": _sha256(target)})
        result.files += 1
        result.bytes += size
        result.linked += linked

    store = Store(state_db)
    try:
        store.backup_to(dest / "state.db")
        schema = store.schema_version()
    finally:
        store.close()
    record(Path("state.db"), dest / "state.db", False)

    spool = data_dir / "spool"
    for part in SPOOL_PARTS:
        d = spool / part
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(d)):
                try:
                    raw = (d / name).read_bytes()
                except (FileNotFoundError, IsADirectoryError):
                    continue  # delivered meanwhile: its Maildir copies come next
                if part == "queue" and not _spool_entry_complete(raw):
                    result.skipped_incomplete += 1
                    continue
                rel = Path("spool", part, name)
                parent_of(dest / rel)
                _write_synced(dest / rel, raw)
                record(rel, dest / rel, False)

    # Everything else under data_dir (DKIM keys, report stores, the geo file): small, copied.
    for dirpath, dirnames, files in os.walk(data_dir):
        here = Path(dirpath)
        if here == data_dir:
            dirnames[:] = sorted(d for d in dirnames if d not in ("spool", "mail", "tmp"))
            files = [f for f in files if f not in STATE_FILES and not f.startswith(MANIFEST)]
        else:
            dirnames[:] = sorted(d for d in dirnames if d != "tmp")
        for name in sorted(files):
            src = here / name
            if not src.is_file() or src.is_symlink():
                continue
            rel = src.relative_to(data_dir)
            parent_of(dest / rel)
            try:
                _copy_synced(src, dest / rel)
            except FileNotFoundError:
                continue
            record(rel, dest / rel, False)

    mail = data_dir / "mail"
    link = not copy
    for src in _maildir_files(mail):
        rel = Path("mail") / src.relative_to(mail)
        target = dest / rel
        parent_of(target)
        try:
            if link:
                try:
                    os.link(src, target)
                    record(rel, target, True)
                    continue
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                    link = False  # another file system: copy from now on
            _copy_synced(src, target)
        except FileNotFoundError:
            continue  # moved new/ -> cur/ (read after) or deleted by its reader
        record(rel, target, False)

    for d in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)
    manifest = {"format": FORMAT, "yuubin": __version__, "created": time.time(), "source": str(data_dir),
                "schema_version": schema, "files": result.entries}
    _write_synced(dest / (MANIFEST + ".new"), json.dumps(manifest, indent=1).encode())
    os.rename(dest / (MANIFEST + ".new"), dest / MANIFEST)
    fsync_dir(dest)
    result.seconds = time.monotonic() - started
    return result


def read_manifest(src: Path) -> dict:
    try:
        manifest = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackupError(f"SRC: {src} has no {MANIFEST}: not a yuubin backup, or one that did not finish") from None
    except (OSError, ValueError) as e:
        raise BackupError(f"SRC: {src / MANIFEST}: unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"SRC: {src / MANIFEST}: not a {FORMAT} manifest")
    return manifest


def verify(src: Path, manifest: dict) -> None:
    """Every file the manifest names is there with its size and SHA-256."""
    for entry in manifest["files"]:
        rel = Path(entry["path"])
        if rel.is_absolute() or ".." in rel.parts:
            raise BackupError(f"SRC: {MANIFEST} names {entry['path']!r}, outside the backup")
        path = src / rel
        if not path.is_file():
            raise BackupError(f"SRC: {path} is missing (the backup is damaged)")
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise BackupError(f"SRC: {path} differs from its manifest entry (the backup is damaged)")


def restore(src: Path, data_dir: Path, *, uid: int = -1, gid: int = -1) -> int:
    """Copy a checked backup into data_dir (new or empty); returns the number of files.
    With uid/gid (restore as root for `[server] user`) everything is given to that user."""
    manifest = read_manifest(src)
    schema = manifest.get("schema_version", 0)
    if not isinstance(schema, int) or schema > SCHEMA_VERSION:
        raise BackupError(f"SRC: state.db has schema version {schema}, newer than this yuubin knows "
                          f"({SCHEMA_VERSION}): restore it with the release that made it ({manifest.get('yuubin')})")
    verify(src, manifest)
    _empty_dir(data_dir, "--dir")
    made: set[Path] = {data_dir}
    for entry in manifest["files"]:
        rel = Path(entry["path"])
        target = data_dir / rel
        missing = []
        d = target.parent
        while d not in made:
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            os.mkdir(m, 0o700)
            made.add(m)
        _copy_synced(src / rel, target)
    if uid != -1 or gid != -1:
        for path in [*made, *(data_dir / e["path"] for e in manifest["files"])]:
            os.chown(path, uid, gid)
    for d in sorted(made, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)
    return len(manifest["files"])


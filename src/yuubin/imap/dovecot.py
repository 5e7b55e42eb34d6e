"""Moving an account between Dovecot's Maildir and yuubin without clients downloading again.

Dovecot keeps, in each Maildir++ folder, `dovecot-uidlist` (line 1: `3 V<uidvalidity>
N<next uid> G<guid>`; then `<uid> [fields] :<file name before ":2,">`) and `dovecot-keywords`
(`<n> <keyword>`: keyword n is the letter chr(ord('a') + n) in a file's `:2,` info). Folder
directories are named in modified UTF-7 (RFC 3501 5.1.3) with "." between levels; the
`subscriptions` file is `V\\t2`, a blank line, then one name a line with tabs between levels.

Import copies each message into yuubin's Maildir (durably, through the group commit) with the
same unique name, the upper-case (system) letters in the name and the keywords in the index,
and gives it Dovecot's UID under Dovecot's UIDVALIDITY — unless the yuubin folder already
holds mail, where the imported messages get new UIDs after it (said in the report).
Export writes the same files the other way, for a Dovecot to pick up.

Dovecot updates the uidlist header lazily, so UIDNEXT is taken as the larger of its `N` and
the highest UID listed plus one. Stop Dovecot before importing from its Maildir.
"""

from __future__ import annotations

import base64
import contextlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from yuubin.durable import FileWrite, GroupCommitter, fsync_dir
from yuubin.imap.store import DELIMITER, INBOX, AccountStore, FolderExists, disk_name, letters_of

BATCH = 200  # files per group commit (bounds the memory an import holds)


@dataclass(slots=True)
class FolderReport:
    name: str
    messages: int = 0
    kept_uids: bool = True
    uidvalidity: int = 0
    skipped: int = 0  # already there (an import run again)


@dataclass(slots=True)
class Report:
    folders: list[FolderReport] = field(default_factory=list)


# ---- modified UTF-7 ----------------------------------------------------------------------

def mutf7_decode(s: str) -> str:
    """RFC 3501 5.1.3 modified UTF-7 -> Unicode (a malformed run is kept as it is)."""
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c != "&":
            out.append(c)
            i += 1
            continue
        j = s.find("-", i)
        if j == -1:
            out.append(s[i:])
            break
        run = s[i + 1:j]
        if not run:
            out.append("&")
        else:
            b64 = run.replace(",", "/")
            try:
                out.append(base64.b64decode(b64 + "=" * (-len(b64) % 4)).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                out.append(s[i:j + 1])
        i = j + 1
    return "".join(out)


def mutf7_encode(s: str) -> str:
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            b = base64.b64encode("".join(run).encode("utf-16-be")).decode().rstrip("=").replace("/", ",")
            out.append(f"&{b}-")
            run.clear()

    for c in s:
        if 0x20 <= ord(c) <= 0x7E:
            flush()
            out.append("&-" if c == "&" else c)
        else:
            run.append(c)
    flush()
    return "".join(out)


# ---- reading Dovecot's files --------------------------------------------------------------

def read_uidlist(path: Path) -> tuple[int, int, dict[str, int]]:
    """(uidvalidity, next uid, {file name before ":2,": uid}); zeros and {} when absent."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return 0, 0, {}
    if not lines:
        return 0, 0, {}
    head = lines[0].split()
    uidvalidity = nextuid = 0
    uids: dict[str, int] = {}
    if head and head[0] == "1" and len(head) >= 3:  # version 1: "1 <uidvalidity> <next uid>", "<uid> <name>"
        uidvalidity, nextuid = int(head[1]), int(head[2])
        for line in lines[1:]:
            uid, _, name = line.partition(" ")
            if uid.isdigit() and name:
                uids[name.partition(":")[0]] = int(uid)
    else:  # version 3
        for f in head[1:]:
            if f[:1] == "V" and f[1:].isdigit():
                uidvalidity = int(f[1:])
            elif f[:1] == "N" and f[1:].isdigit():
                nextuid = int(f[1:])
        for line in lines[1:]:
            uid, _, rest = line.partition(" ")
            _, colon, name = rest.partition(":")
            if uid.isdigit() and colon and name:
                uids[name.partition(":")[0]] = int(uid)
    seen: set[int] = set()
    for k, u in list(uids.items()):  # a damaged list naming one UID twice: the second gets a new one
        if u in seen or u <= 0:
            del uids[k]
        seen.add(u)
    return uidvalidity, nextuid, uids


def read_keywords(path: Path) -> dict[str, str]:
    """{letter: keyword} from dovecot-keywords."""
    out: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        n, _, kw = line.partition(" ")
        if n.isdigit() and int(n) < 26 and kw:
            out[chr(ord("a") + int(n))] = kw
    return out


def read_subscriptions(root: Path) -> list[str]:
    try:
        lines = (root / "subscriptions").read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    if lines and lines[0].startswith("V\t"):  # version 2: levels separated by tabs
        return [line.replace("\t", DELIMITER) for line in lines[1:] if line]
    return [line.replace(".", DELIMITER) for line in lines if line]  # version 1 (Maildir++ names)


def source_folders(root: Path) -> list[tuple[str, Path]]:
    """(IMAP name, directory) of every folder of a Dovecot Maildir++, INBOX first."""
    out = [(INBOX, root)]
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.name.startswith(".") and e.name not in (".", "..") and e.is_dir():
            name = DELIMITER.join(mutf7_decode(p) for p in e.name[1:].split("."))
            out.append((INBOX if name.upper() == INBOX else name, Path(e.path)))
    return out


# ---- import ------------------------------------------------------------------------------

async def import_maildir(account: AccountStore, source: Path, committer: GroupCommitter) -> Report:
    """Copy a Dovecot Maildir into the account (see the module doc); safe to run again."""
    if not (source / "cur").is_dir() and not (source / "new").is_dir():
        raise ValueError(f"{source}: not a Maildir (no cur/ or new/)")
    report = Report()
    access = account.maildirs.access
    for name, src in source_folders(source):
        fr = FolderReport(name)
        report.folders.append(fr)
        with contextlib.suppress(FolderExists):
            account.create(name)
        uidvalidity, nextuid, uids = read_uidlist(src / "dovecot-uidlist")
        keywords = read_keywords(src / "dovecot-keywords")
        dest = Path(account.folder_path(name))
        # Run again after a crash: files already numbered are skipped; files copied but not yet
        # numbered are numbered now, with Dovecot's UIDs; a half-written tmp/ copy is made again.
        indexed = account.indexed_keys(name)
        copied = {f.partition(":")[0]: f"{sub}/{f}" for sub in ("cur", "new") for f in os.listdir(dest / sub)}
        entries: list[tuple[str, str, str, int | None, int, float]] = []
        writes: list[FileWrite] = []
        times: list[tuple[Path, float]] = []
        for sub in ("new", "cur"):
            if not (src / sub).is_dir():
                continue
            for fname in sorted(os.listdir(src / sub)):
                if fname.startswith("."):
                    continue
                key, _, info = fname.partition(":")
                if key in indexed:
                    fr.skipped += 1
                    continue
                letters = info[2:] if info.startswith("2,") else ""
                upper = "".join(sorted(c for c in letters if c.isupper()))
                kws = " ".join(sorted(keywords[c] for c in letters if c in keywords))
                path = src / sub / fname
                data = path.read_bytes()
                mtime = path.stat().st_mtime
                size = len(data) + data.count(b"\n") - data.count(b"\r\n")
                target = copied.get(key) or f"cur/{key}:2,{upper}"
                if key not in copied:
                    (dest / "tmp" / key).unlink(missing_ok=True)
                    writes.append(FileWrite(dest / "tmp" / key, data, rename_to=dest / target, access=access))
                    times.append((dest / target, mtime))
                entries.append((key, target, kws, uids.get(key), size, mtime))
                if len(writes) >= BATCH:
                    await _flush(committer, writes, times)
        await _flush(committer, writes, times)
        fsync_dir(dest / "cur")
        fr.messages = len(entries)
        fr.kept_uids = account.import_folder(name, uidvalidity, nextuid, entries)
        fr.uidvalidity = account.status(name).uidvalidity
    for name in read_subscriptions(source):
        account.subscribe(name, True)
    return report


async def _flush(committer: GroupCommitter, writes: list[FileWrite], times: list[tuple[Path, float]]) -> None:
    if writes:
        await committer.commit(list(writes))
    for path, mtime in times:
        os.utime(path, (mtime, mtime))  # INTERNALDATE, as Dovecot reads it from the file
    writes.clear()
    times.clear()


# ---- export ------------------------------------------------------------------------------

async def export_maildir(account: AccountStore, dest: Path, committer: GroupCommitter) -> Report:
    """Write the account as a Dovecot Maildir at `dest` (which must not exist or be empty)."""
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"{dest}: not empty")
    report = Report()
    for info in account.folders():
        if not info.exists:
            continue
        st = account.status(info.name)
        fr = FolderReport(info.name, uidvalidity=st.uidvalidity)
        report.folders.append(fr)
        d = disk_name(info.name)
        # Dovecot allows no "." in a name: "v1.2" becomes "v1%2E2" there, still one folder.
        folder_dir = dest / ("." + ".".join(mutf7_encode(p.replace(".", "%2E")) for p in info.name.split(DELIMITER))
                             if d else "")
        for sub in ("tmp", "new", "cur"):
            (folder_dir / sub).mkdir(parents=True, exist_ok=True)
        if d:
            (folder_dir / "maildirfolder").touch()
        letters: dict[str, str] = {}  # keyword -> letter
        lines = []
        writes: list[FileWrite] = []
        times: list[tuple[Path, float]] = []
        src = Path(account.folder_path(info.name))
        for msg, file in account.messages(info.name):
            kw_letters = ""
            for kw in sorted(f for f in msg.flags if not f.startswith("\\")):
                if kw not in letters and len(letters) < 26:
                    letters[kw] = chr(ord("a") + len(letters))
                kw_letters += letters.get(kw, "")
            other = "".join(c for c in file.partition(":2,")[2] if c.isupper() and c not in "SRFTD")
            name = f"{msg.key}:2,{''.join(sorted(letters_of(msg.flags) + other + kw_letters))}"
            try:
                data = (src / file).read_bytes()
            except FileNotFoundError:
                continue  # expunged meanwhile
            writes.append(FileWrite(folder_dir / "tmp" / msg.key, data, rename_to=folder_dir / "cur" / name))
            times.append((folder_dir / "cur" / name, msg.internaldate))
            lines.append(f"{msg.uid} :{msg.key}")
            if len(writes) >= BATCH:
                await _flush(committer, writes, times)
        await _flush(committer, writes, times)
        fr.messages = len(lines)
        guid = uuid.uuid4().hex
        (folder_dir / "dovecot-uidlist").write_text(
            f"3 V{st.uidvalidity} N{st.uidnext} G{guid}\n" + "".join(f"{line}\n" for line in lines), encoding="utf-8")
        if letters:
            (folder_dir / "dovecot-keywords").write_text(
                "".join(f"{ord(c) - ord('a')} {kw}\n" for kw, c in sorted(letters.items(), key=lambda x: x[1])),
                encoding="utf-8")
        fsync_dir(folder_dir / "cur")
    subs = [f.name for f in account.folders() if f.subscribed]
    (dest / "subscriptions").write_text("V\t2\n\n" + "".join(n.replace(DELIMITER, "\t") + "\n" for n in subs),
                                        encoding="utf-8")
    return report

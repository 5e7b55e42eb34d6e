"""Maildir delivery (tmp/ → new/, the format Dovecot, mutt and every IMAP server read).

Folders are Maildir++ (`.Junk/` inside the mailbox, with its own tmp/new/cur and a
`maildirfolder` marker), as Dovecot and Courier lay them out, so mail that policy quarantined
shows up in the client's Junk folder.

A file appears in new/ only complete: written in tmp/, fsynced, renamed; the directory is
fsynced by the group commit before the spool entry goes away.

Files and directories get the `FileAccess` the admin configured in `[mail]` (private by
default), so another program — Dovecot, a backup job — can read what yuubin delivers.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from yuubin.durable import PRIVATE, FileAccess, FileWrite, fsync_dir

_counter = itertools.count()
JUNK = "Junk"


class Maildirs:
    def __init__(self, root: Path, hostname: str, access: FileAccess = PRIVATE):
        self.root = root
        self.access = access
        # The root is set at every start, so a change of [mail] reaches it; what lies below
        # keeps what it was given when it was created.
        access.make_dirs(root)
        access.set_dir(root)
        self.hostname = hostname.replace("/", "\\057").replace(":", "\\072")
        self._ready: dict[str, tuple[str, str]] = {}
        self._pid = os.getpid()

    def path(self, mailbox: str) -> Path:
        local, _, domain = mailbox.rpartition("@")
        if "/" in local or "/" in domain or local in ("", ".", ".."):
            raise ValueError(f"unsafe mailbox name {mailbox!r}")
        return self.root / domain / local

    def ensure(self, mailbox: str, folder: str = "") -> Path:
        """Create the Maildir (or its Maildir++ folder) on first delivery, durably."""
        key = f"{mailbox}/{folder}"
        base = self.path(mailbox)
        if folder:
            if "/" in folder or folder.startswith("."):
                raise ValueError(f"unsafe folder name {folder!r}")
            self.ensure(mailbox)  # a Maildir++ folder lives inside its mailbox's Maildir
            base = base / f".{folder}"
        if key in self._ready:
            return base
        created = not base.exists()
        for sub in ("tmp", "new", "cur"):
            self.access.make_dirs(base / sub)
        if created:
            if folder:
                fd = os.open(base / "maildirfolder", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, self.access.mode)
                try:
                    self.access.set_fd(fd)
                finally:
                    os.close(fd)
            fsync_dir(base)
            fsync_dir(base.parent)
            if not folder:  # the domain directory may be new too
                fsync_dir(base.parent.parent)
        # Plain-string prefixes: pathlib costs tens of microseconds per message.
        self._ready[key] = (str(base / "tmp") + os.sep, str(base / "new") + os.sep)
        return base

    def forget(self, mailbox: str, folder: str) -> None:
        """A folder was deleted or renamed (IMAP): the next delivery to it makes it again."""
        self._ready.pop(f"{mailbox}/{folder}", None)

    def write(self, mailbox: str, parts: list[bytes], folder: str = "") -> FileWrite:
        """A FileWrite for one copy; call `ensure(mailbox, folder)` first."""
        tmp, new = self._ready[f"{mailbox}/{folder}"]
        size = sum(len(p) for p in parts)
        now = time.time()
        name = f"{int(now)}.M{int((now % 1) * 1e6)}P{self._pid}Q{next(_counter)}.{self.hostname},S={size}"
        return FileWrite(tmp + name, parts, rename_to=new + name, access=self.access)

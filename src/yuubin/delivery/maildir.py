"""Maildir delivery (tmp/ → new/, the format Dovecot, mutt and every IMAP server read).

Folders are Maildir++ (`.Junk/` inside the mailbox, with its own tmp/new/cur and a
`maildirfolder` marker), as Dovecot and Courier lay them out, so mail that policy quarantined
shows up in the client's Junk folder.

A file appears in new/ only complete: written in tmp/, fsynced, renamed; the directory is
fsynced by the group commit before the spool entry goes away.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from yuubin.durable import FileWrite, fsync_dir

_counter = itertools.count()
JUNK = "Junk"


class Maildirs:
    def __init__(self, root: Path, hostname: str):
        self.root = root
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
            (base / sub).mkdir(parents=True, exist_ok=True)
        if created:
            if folder:
                (base / "maildirfolder").touch()
            fsync_dir(base)
            fsync_dir(base.parent)
            if not folder:  # the domain directory may be new too
                fsync_dir(base.parent.parent)
        # Plain-string prefixes: pathlib costs tens of microseconds per message.
        self._ready[key] = (str(base / "tmp") + os.sep, str(base / "new") + os.sep)
        return base

    def write(self, mailbox: str, parts: list[bytes], folder: str = "") -> FileWrite:
        """A FileWrite for one copy; call `ensure(mailbox, folder)` first."""
        tmp, new = self._ready[f"{mailbox}/{folder}"]
        size = sum(len(p) for p in parts)
        now = time.time()
        name = f"{int(now)}.M{int((now % 1) * 1e6)}P{self._pid}Q{next(_counter)}.{self.hostname},S={size}"
        return FileWrite(tmp + name, parts, rename_to=new + name)

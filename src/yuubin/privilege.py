"""Least privilege: started as root, yuubin binds its ports and then becomes `[server] user`.

The drop happens after every listening socket is bound and before any part is built (so no file
is created as root under data_dir) and before any client byte is read. After setuid from root
to another user the kernel clears every capability; `drop_privileges` checks that from /proc and refuses
to go on if one is left. Plain os calls: there is nothing here a library would do better.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from yuubin.config import ConfigError, RunAs

log = logging.getLogger("yuubin.server")


class PrivilegeError(ConfigError):
    """yuubin would run with more rights than it should, or cannot become the configured user."""


def must_drop(run_as: RunAs) -> bool:
    """True when this process must switch users before serving (it runs as root and a user is
    set). Root with no user set is refused; `user = "root"` says so on purpose, with a warning."""
    if os.geteuid() != 0:
        return False
    if not run_as.user:
        raise PrivilegeError("server.user: yuubin refuses to run as root: set [server] user (e.g. \"yuubin\", "
                             "a user of its own) and it binds the ports as root, then runs as that user; "
                             "or start it as that user with CAP_NET_BIND_SERVICE (contrib/yuubin.service)")
    if run_as.uid == 0:
        log.warning('event=warning reason=running_as_root detail="server.user is root: every client byte '
                    'is parsed with all rights; name an unprivileged user"')
        return False
    return True


def check_identity(run_as: RunAs) -> None:
    """Not root: a configured user must be who we already are (no way to switch without root)."""
    if os.geteuid() == 0 or not run_as.user:
        return
    if os.geteuid() != run_as.uid:
        raise PrivilegeError(f"server.user: yuubin runs as uid {os.geteuid()}, not as {run_as.user!r} "
                             f"(uid {run_as.uid}); only root can switch users: start it as root or as that user")


def prepare_data_dir(data_dir: Path, run_as: RunAs) -> None:
    """As root, before the drop: data_dir exists, belongs to the user, and is not open to others.

    A data_dir that belongs to someone else is an error naming the fix (the admin or `yuubin init`
    chowns it): yuubin never chowns a tree it did not make, which could be the wrong directory."""
    if not data_dir.exists():
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(data_dir, 0o700)
        os.chown(data_dir, run_as.uid, run_as.gid)
        return
    st = data_dir.stat()
    if st.st_uid != run_as.uid:
        raise PrivilegeError(f"data_dir: {data_dir} belongs to uid {st.st_uid}, not to {run_as.user!r} "
                             f"(uid {run_as.uid}) that yuubin runs as: chown -R {run_as.user}: {data_dir}")


def drop_privileges(run_as: RunAs) -> None:
    """Become run_as for good: its supplementary groups, group, user; then check nothing is left."""
    os.initgroups(run_as.user, run_as.gid)  # the groups /etc/group gives it (e.g. a [mail] group)
    os.setgid(run_as.gid)
    os.setuid(run_as.uid)
    if os.getuid() == 0 or os.geteuid() == 0 or os.getgid() == 0 or os.getegid() == 0:
        raise PrivilegeError(f"server.user: still root after switching to {run_as.user!r}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeError("server.user: could switch back to root after the drop")
    left = capabilities()
    if any(left.get(k, 0) for k in ("CapEff", "CapPrm", "CapAmb")):
        raise PrivilegeError(f"server.user: capabilities left after the drop: {left}")
    log.info("event=privileges_dropped user=%s uid=%d gid=%d", run_as.user, run_as.uid, run_as.gid)


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of a process, from /proc (empty where there is no /proc)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.startswith("Cap"):
            out[name] = int(value.strip(), 16)
    return out


def warn_open_files(paths: list[Path]) -> list[Path]:
    """Log a warning for each file other users may read (the config names secrets' places, state.db
    holds password hashes); returns them. Not an error: the admin may have reasons, and is told."""
    found = []
    for path in paths:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if mode & stat.S_IROTH:
            found.append(path)
            log.warning('event=warning reason=world_readable path=%s mode=%04o detail="other users can read '
                        'this file: chmod o-rwx %s"', path, mode & 0o7777, path)
    return found

"""Small /proc readers shared by the benchmark scripts (Linux only)."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # The comm field may contain spaces and parentheses: split after the last ")".
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Direct children of pid."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == pid:
                out.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def tree(pid: int) -> list[int]:
    """pid and all its descendants that are alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def cpu_seconds(pid: int, include_reaped: bool = True) -> float:
    """utime+stime of pid (fields 14, 15), plus cutime+cstime (16, 17) of
    children it has waited for when include_reaped."""
    f = _stat_fields(pid)
    # After the comm field, index 0 is field 3 (state): field N is f[N - 3].
    ticks = int(f[11]) + int(f[12])
    if include_reaped:
        ticks += int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process tree: each live process's own time plus the time of
    the children it has reaped. A child alive at a first reading and reaped by
    the second moves from "live" to the parent's cutime/cstime, so deltas
    between two readings stay consistent."""
    total = 0.0
    for p in tree(pid):
        try:
            total += cpu_seconds(p, include_reaped=True)
        except (OSError, IndexError, ValueError):
            continue
    return total


def status_kb(pid: int, key: str) -> int | None:
    """A 'kB' field of /proc/PID/status, e.g. VmRSS or VmHWM, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_kib(pid: int) -> int | None:
    return status_kb(pid, "VmRSS")


def tree_rss_kib(pid: int) -> int:
    return sum(rss_kib(p) or 0 for p in tree(pid))


def raise_nofile(limit: int = 65536) -> None:
    """Raise the soft RLIMIT_NOFILE towards the hard limit (for 1000+ sockets)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

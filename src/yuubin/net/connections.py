"""Every connection a listener accepts: admission by limits, session ids, and a clean stop.

Shared by all listeners (SMTP now, IMAP and POP3 next) so one client cannot hold more than
`connections_per_ip` connections over all ports, and shutdown treats every session alike.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
from collections import Counter
from typing import Protocol

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Stoppable(Protocol):
    """What shutdown needs of a session: whether it is between transactions, and its task."""

    idle: bool
    task: asyncio.Task | None


_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def session_id_prefix(started: float, worker: int | None = None) -> str:
    """What every session id of one server start begins with: the start time (in tenths of a
    second, base 36) and the worker, so ids never repeat across restarts or between workers."""
    n = int(started * 10)
    stamp = ""
    while n:
        n, digit = divmod(n, 36)
        stamp = _BASE36[digit] + stamp
    return f"{stamp or '0'}-" if worker is None else f"{stamp or '0'}-{worker}-"


class Connections:
    def __init__(self, per_ip: int, total: int, *, workers: int = 1, id_prefix: str = ""):
        # With several worker processes each counts its own share of the limits.
        self.per_ip = -(-per_ip // workers)
        self.total = -(-total // workers)
        self.id_prefix = id_prefix  # from session_id_prefix(): unique per start and worker
        self.admitted = 0  # sessions served since the start, for the stop line
        self.stopping = False
        self.sessions: set[Stoppable] = set()
        self._ids = itertools.count(1)
        self._per_ip: Counter[IPAddress] = Counter()
        self._total = 0

    def next_id(self) -> str:
        return f"{self.id_prefix}{next(self._ids):x}"

    def admit(self, ip: IPAddress) -> bool:
        """Count a new connection; False when its address or the server is at the limit."""
        if self._per_ip[ip] >= self.per_ip or self._total >= self.total or self.stopping:
            return False
        self._per_ip[ip] += 1
        self._total += 1
        self.admitted += 1
        return True

    def release(self, ip: IPAddress) -> None:
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
        self._total -= 1

    async def stop(self, grace: float) -> int:
        """Close idle sessions now, give the others `grace` seconds to finish, then cancel them;
        returns how many had to be cancelled."""
        self.stopping = True
        for s in list(self.sessions):
            if s.idle and s.task is not None:
                s.task.cancel()
        tasks = [s.task for s in self.sessions if s.task is not None]
        if not tasks:
            return 0
        _done, pending = await asyncio.wait(tasks, timeout=grace)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        return len(pending)

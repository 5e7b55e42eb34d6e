"""Every connection a listener accepts: admission by limits, session ids, and a clean stop.

Shared by all listeners (SMTP now, IMAP and POP3 next) so one client cannot hold more than
`connections_per_ip` connections over all ports, and shutdown treats every session alike. Each
listener has its own pool (`pools`), so a flood on port 25 never takes 465's places. TLS
handshakes in progress are bounded per address and in total, and the message bytes all sessions
hold while receiving are one budget (`data_in_memory`): past it the session holding most is evicted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
from collections import Counter
from collections.abc import Callable
from typing import Protocol, cast

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Stoppable(Protocol):
    """What shutdown needs of a session: whether it is between transactions, and its task."""

    idle: bool
    task: asyncio.Task | None


TRIM_AFTER = 16  # connections closed since the peak before freed memory is handed back
TRIM_AFTER_BYTES = 16 << 20  # ... or message bytes in memory let go since their peak

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


class Holder(Stoppable, Protocol):
    """What the memory budget needs of a session: what it holds, and how to end it."""

    held: int

    def evict(self) -> None: ...


class Yielding(Protocol):
    """A session that can give its place up to a newcomer when its listener is full."""

    client: IPAddress | None
    pool: str
    idle: bool

    def make_room(self) -> None: ...


class Handshaking(Protocol):
    """A session whose TLS handshake is in progress: it can be told to give up."""

    def abort_handshake(self, why: str) -> None: ...


def listener_pools(total: int, explicit: list[int]) -> list[int]:
    """Each listener's pool: its own `max_connections`, or (0) an even share of what is left."""
    rest = total - sum(explicit)
    unset = sum(1 for n in explicit if not n)
    share = max(1, rest // unset) if unset else 0
    return [n or share for n in explicit]


class Connections:
    def __init__(self, per_ip: int, total: int, *, workers: int = 1, id_prefix: str = "",
                 pools: dict[str, int] | None = None, handshakes_per_ip: int = 1 << 30,
                 max_handshakes: int = 1 << 30, data_in_memory: int = 1 << 62,
                 give_back: Callable[[], object] | None = None):
        # With several worker processes each counts its own share of the limits.
        self.per_ip = -(-per_ip // workers)
        self.total = -(-total // workers)
        self.pools = {k: -(-n // workers) for k, n in (pools or {}).items()}
        self.handshakes_per_ip = -(-handshakes_per_ip // workers)
        self.max_handshakes = -(-max_handshakes // workers)
        self.data_in_memory = -(-data_in_memory // workers)
        self.in_memory = 0  # message bytes the sessions hold now
        # Called once a flood is over (open connections fell to a quarter of their peak, by at
        # least TRIM_AFTER): the memory it took goes back to the OS (heap.give_back).
        self.give_back = give_back
        self._peak = 0
        self._mem_peak = 0
        self.evicted = 0
        self._per_pool: Counter[str] = Counter()
        self._handshakes: dict[IPAddress, list[Handshaking]] = {}  # oldest first
        self._handshakes_total = 0
        self.id_prefix = id_prefix  # from session_id_prefix(): unique per start and worker
        self.admitted = 0  # sessions served since the start, for the stop line
        self.stopping = False
        self.sessions: set[Stoppable] = set()
        self._ids = itertools.count(1)
        self._per_ip: Counter[IPAddress] = Counter()
        self._total = 0

    def next_id(self) -> str:
        return f"{self.id_prefix}{next(self._ids):x}"

    def admit(self, ip: IPAddress, pool: str = "") -> str | None:
        """Count a new connection (from the TCP accept, before any TLS); None when admitted, else
        why not (its address, its listener's pool or the server at the limit)."""
        if self.stopping:
            return "server stopping"
        if self._per_ip[ip] >= self.per_ip:
            return "too many connections from the address (limits.connections_per_ip)"
        cap = self.pools.get(pool)
        if cap is not None and self._per_pool[pool] >= cap and not self._make_room(ip, pool):
            return "listener full (its max_connections)"
        if self._total >= self.total and not self._make_room(ip, None):
            return "too many connections (limits.max_connections)"
        self._per_ip[ip] += 1
        self._per_pool[pool] += 1
        self._total += 1
        self._peak = max(self._peak, self._total)
        self.admitted += 1
        return None

    def release(self, ip: IPAddress, pool: str = "") -> None:
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
        self._per_pool[pool] -= 1
        if self._per_pool[pool] <= 0:
            del self._per_pool[pool]
        self._total -= 1
        if self._peak - self._total >= TRIM_AFTER and self._total <= self._peak // 4:
            self._peak = self._total
            self._trim()

    def _trim(self) -> None:
        if self.give_back is not None:
            asyncio.get_running_loop().call_soon(self.give_back)  # after the objects let go are gone

    def _make_room(self, ip: IPAddress, pool: str | None) -> bool:
        """Full: an idle session (waiting for a command, not in a transaction) of the address
        holding the most places in `pool` (None: anywhere) gives its place up, when that address
        holds more than this one would. Many addresses flooding a port then cost each other their
        places, not a newcomer with one connection."""
        mine: Counter[IPAddress] = Counter()
        idle: dict[IPAddress, Yielding] = {}
        for s in self.sessions:
            y = cast(Yielding, s)
            if not hasattr(y, "make_room") or (pool is not None and y.pool != pool) or y.client is None:
                continue
            mine[y.client] += 1
            if y.idle and y.client not in idle:
                idle[y.client] = y
        candidates = [(n, c) for c, n in mine.items() if c in idle and n > mine[ip] + 1]
        if not candidates:
            return False
        _n, victim = max(candidates, key=lambda nc: nc[0])
        idle[victim].make_room()
        return True

    def open_handshake(self, ip: IPAddress, session: Handshaking) -> str | None:
        """Count a TLS handshake about to start; None when allowed, else why not. When all places
        are taken, the oldest handshake of the address holding the most goes, if that is more than
        this address holds: a flood from many addresses cannot keep a newcomer out for the whole
        handshake_timeout, while a real handshake (milliseconds) is rarely the one evicted."""
        mine = self._handshakes.get(ip, [])
        if len(mine) >= self.handshakes_per_ip:
            return "too many TLS handshakes in progress from the address (limits.handshakes_per_ip)"
        if self._handshakes_total >= self.max_handshakes:
            most = max(self._handshakes.values(), key=len)
            if len(most) <= len(mine) + 1:
                return "too many TLS handshakes in progress (limits.max_handshakes)"
            most[0].abort_handshake("its address holds the most of limits.max_handshakes")
            if self._handshakes_total >= self.max_handshakes:  # pragma: no cover - abort released it
                return "too many TLS handshakes in progress (limits.max_handshakes)"
        self._handshakes.setdefault(ip, []).append(session)
        self._handshakes_total += 1
        return None

    def close_handshake(self, ip: IPAddress, session: Handshaking) -> None:
        mine = self._handshakes.get(ip)
        if mine is None or session not in mine:
            return
        mine.remove(session)
        if not mine:
            del self._handshakes[ip]
        self._handshakes_total -= 1

    def hold(self, session: Holder, held: int) -> None:
        """A session now holds `held` message bytes; past the budget the biggest holder is evicted
        (a flood of large unfinished messages costs the flooders, not the RAM)."""
        self.in_memory += held - session.held
        session.held = held
        self._mem_peak = max(self._mem_peak, self.in_memory)
        if self._mem_peak - self.in_memory >= TRIM_AFTER_BYTES and self.in_memory <= self._mem_peak // 4:
            self._mem_peak = self.in_memory
            self._trim()
        while self.in_memory > self.data_in_memory:
            victim = max((s for s in self.sessions if isinstance(getattr(s, "held", None), int)),
                         key=lambda s: cast(Holder, s).held, default=None)
            if victim is None or cast(Holder, victim).held == 0:
                break
            v = cast(Holder, victim)
            self.in_memory -= v.held
            v.held = 0
            self.evicted += 1
            v.evict()

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

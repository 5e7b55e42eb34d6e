"""The brute-force guard for every password-taking port (587, 465; IMAP and POP3 later).

Failures are counted per source (an IPv4 address, or the /64 of an IPv6 one, since one host owns
a whole /64) and per account, in state.db, so a restart forgives nothing. Past
`auth_guard.max_failures` within `window` the *source* is locked out for `lockout`, doubling per
repeat offence up to `max_lockout`. An account is never locked: many failures on it from several
sources (a distributed attack) only slow down tries from sources that never logged in to it, so
the owner's own address keeps working. `network.trusted` is never locked out or slowed.

A locked source gets one reply whatever the account; an unknown account costs one Argon2id
verification like a known one (dummy hash), so neither reply nor timing says who exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from yuubin.auth.accounts import AddressInputError, normalize_address
from yuubin.auth.passwords import verify_password
from yuubin.config import AuthGuardConfig
from yuubin.store import Store, StoreBusy

log = logging.getLogger("yuubin.auth")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PRUNE_EVERY = 1000  # failures between deletions of rows older than the window
RECORD_WAIT = 0.1  # seconds a login waits for a locked state.db before its result is queued instead


def source_key(ip: IPAddress) -> str:
    """What a lockout applies to: the IPv4 address, or the IPv6 /64."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True, slots=True)
class Lockout:
    source: str
    until: float
    offences: int


@dataclass(frozen=True, slots=True)
class LoginResult:
    account: str | None  # the authenticated account, None on failure
    locked: Lockout | None = None  # refused without checking: the source is locked out
    delayed: float = 0.0  # seconds waited because the account is under a distributed attack

    @property
    def ok(self) -> bool:
        return self.account is not None


class AuthGuard:
    """Checks passwords and keeps the failure counts; shared by all listeners."""

    def __init__(self, store: Store, config: AuthGuardConfig, is_trusted: Callable[[IPAddress], bool],
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.config = config
        self.is_trusted = is_trusted
        self.clock = clock
        self._until_prune = PRUNE_EVERY
        # Each Argon2id check takes ~64 MiB and a core for a moment: a flood of logins must queue
        # here rather than exhaust the memory of a small home server.
        self._checks = asyncio.Semaphore(config.concurrent_checks)
        self._in_flight: Counter[str] = Counter()  # checks reserved and not yet recorded, per source
        self._unwritten: Counter[str] = Counter()  # failures queued while state.db was locked
        self._reserving = asyncio.Lock()

    # ---- the login itself --------------------------------------------------------------

    async def login(self, ip: IPAddress, username: str, password: str, session: str = "-",
                    authzid: str = "") -> LoginResult:
        """One password check. Every database call runs off the event loop (StoreBusy when state.db
        cannot answer: the caller gives a 4xx); a failure or success that cannot be written now is
        queued and written later, and counts from the moment it happened."""
        key = source_key(ip)
        trusted = self.is_trusted(ip)
        async with self._reserving:
            # Reserve before verifying: done + unwritten + in flight never pass max_failures, so
            # parallel guesses cannot check more passwords than a serial attacker. (One lock for
            # all sources: a reservation is one indexed read, and the table of locks stays empty.)
            lock, failures = await self.store.run(self._source_state, ip, key)
            if lock is not None:
                log.info("event=auth_refused session=%s client=%s source=%s reason=locked_out until=%s",
                         session, ip, lock.source, _stamp(lock.until))
                return LoginResult(None, locked=lock)
            taken = failures + self._unwritten[key] + self._in_flight[key]
            if not trusted and taken >= self.config.max_failures:
                log.info("event=auth_refused session=%s client=%s source=%s reason=attempts_in_flight "
                         "failures=%d in_flight=%d", session, ip, key, failures + self._unwritten[key],
                         self._in_flight[key])
                return LoginResult(None, locked=Lockout(key, self.clock(), 0))
            self._in_flight[key] += 1
        try:
            return await self._check(ip, key, username, password, session, authzid)
        finally:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]

    async def _check(self, ip: IPAddress, key: str, username: str, password: str, session: str,
                     authzid: str) -> LoginResult:
        try:
            account = normalize_address(username)
        except AddressInputError:
            account = None
        delay = await self.store.run(self.delay, ip, account) if account else 0.0
        if delay:
            log.info("event=auth_delayed session=%s client=%s account=%s delay=%gs reason=distributed_attack",
                     session, ip, account, delay)
            await asyncio.sleep(delay)
        row = await self.store.run(self.store.account, account) if account else None
        async with self._checks:
            ok = await asyncio.to_thread(verify_password, row.password_hash if row else None, password)
        if ok and authzid:
            try:
                ok = normalize_address(authzid) == account  # no acting as someone else
            except AddressInputError:
                ok = False
        if ok and account is not None:
            await self._record(key, self.success, ip, account, self.clock())
            log.info("event=auth_ok session=%s client=%s account=%s", session, ip, account)
            return LoginResult(account, delayed=delay)
        await self._record(key, self.failure, ip, account or username[:100], session, self.clock())
        return LoginResult(None, delayed=delay)

    def _source_state(self, ip: IPAddress, key: str) -> tuple[Lockout | None, int]:
        """(its lockout, failures in the window) for a source; in a database thread."""
        lock = self.locked(ip)
        if lock is not None:
            return lock, 0
        return None, self.store.auth_failures_since("source", key, self.clock() - self.config.window)

    async def _record(self, key: str, fn: Callable[..., object], *args: object) -> None:
        """A failure or success into state.db now, or (locked) queued in order; a queued failure
        counts towards the source's limit meanwhile."""
        if not self.store.pending_writes:
            with contextlib.suppress(StoreBusy):
                await self.store.run(fn, *args, wait=RECORD_WAIT)
                return
        if fn != self.failure:
            self.store.later(fn, *args)
            return
        self._unwritten[key] += 1

        def written() -> None:
            self._unwritten[key] -= 1
            if self._unwritten[key] <= 0:
                del self._unwritten[key]

        self.store.later(fn, *args, done=written)

    # ---- state -------------------------------------------------------------------------

    def locked(self, ip: IPAddress) -> Lockout | None:
        if self.is_trusted(ip):
            return None
        key = source_key(ip)
        row = self.store.auth_lockout(key)
        if row is None or row[0] <= self.clock():
            return None
        return Lockout(key, row[0], row[1])

    def delay(self, ip: IPAddress, account: str) -> float:
        """Seconds to wait before checking: only for unknown sources of an account under attack."""
        if self.is_trusted(ip) or self.store.is_known_source(account, source_key(ip)):
            return 0.0
        since = self.clock() - self.config.window
        if self.store.auth_failures_since("account", account, since) < self.config.account_max_failures:
            return 0.0
        if self.store.auth_failure_sources_since("account", account, since) < 2:
            return 0.0  # one source: its own lockout handles it
        return self.config.account_delay

    def failure(self, ip: IPAddress, account: str, session: str = "-", at: float | None = None) -> Lockout | None:
        """Record a failed login (one transaction: a retry after a locked state.db never counts it
        twice); returns the lockout it started or that already holds."""
        now = self.clock() if at is None else at
        key = source_key(ip)
        trusted = self.is_trusted(ip)
        db = self.store.db
        with db:
            db.execute("BEGIN IMMEDIATE")
            self.store.record_auth_failure("account", account, key, now)
            prune = self._until_prune <= 1
            if prune:  # keep the table to what the window needs
                self.prune()
            prev = None if trusted else self.store.auth_lockout(key)
            lock, failures, started = self._count_failure(key, now, prev, trusted)
        self._until_prune = PRUNE_EVERY if prune else self._until_prune - 1
        log.info("event=auth_failed session=%s client=%s source=%s account=%s", session, ip, key, account)
        if started and lock is not None:
            # One line per lockout, for fail2ban/CrowdSec: `event=auth_lockout client=<HOST> `.
            log.warning("event=auth_lockout client=%s source=%s session=%s failures=%d duration=%gs offence=%d "
                        "until=%s", ip, key, session, failures, lock.until - now, lock.offences, _stamp(lock.until))
        return lock

    def _count_failure(self, key: str, now: float, prev: tuple[float, int, float] | None,
                       trusted: bool) -> tuple[Lockout | None, int, bool]:
        """(lockout, failures, whether it starts now), inside failure()'s transaction."""
        if trusted:
            return None, 0, False
        if prev is not None and prev[0] > now:
            # An attempt that was in flight when the lock started: not a new offence.
            return Lockout(key, prev[0], prev[1]), 0, False
        self.store.record_auth_failure("source", key, key, now)
        failures = self.store.auth_failures_since("source", key, now - self.config.window)
        if failures < self.config.max_failures:
            return None, failures, False
        offences = prev[1] + 1 if prev and now - prev[2] < self.config.forget_after else 1
        duration = min(self.config.lockout * 2 ** (offences - 1), self.config.max_lockout)
        until = now + duration
        self.store.set_auth_lockout(key, until, offences, now)
        self.store.clear_auth_failures("source", key)
        return Lockout(key, until, offences), failures, True

    def success(self, ip: IPAddress, account: str, at: float | None = None) -> None:
        key = source_key(ip)
        with self.store.db:
            self.store.db.execute("BEGIN IMMEDIATE")
            self.store.clear_auth_failures("source", key)
            self.store.add_known_source(account, key, self.clock() if at is None else at)

    def unlock(self, target: str) -> list[str]:
        """Lift a source's lockout (IP or /64) or an account's slow-down; effective at once."""
        done = []
        try:
            ip = ipaddress.ip_address(target)
        except ValueError:
            ip = None
        if ip is not None or "/" in target:
            key = source_key(ip) if ip is not None else str(ipaddress.ip_network(target, strict=False))
            if self.store.remove_auth_lockout(key):
                done.append(f"source {key}: lockout lifted")
            if self.store.clear_auth_failures("source", key):
                done.append(f"source {key}: failure count cleared")
            return done
        account = normalize_address(target)
        if self.store.clear_auth_failures("account", account):
            done.append(f"account {account}: failure count cleared (no more slow-down)")
        return done

    def lockouts(self) -> tuple[list[Lockout], list[tuple[str, int, int]]]:
        """Locked sources, and accounts under a distributed attack (failures, sources)."""
        now = self.clock()
        sources = [Lockout(s, u, o) for s, u, o in self.store.active_auth_lockouts(now)]
        accounts = [(a, f, n) for a, f, n in self.store.accounts_with_failures_since(now - self.config.window)
                    if f >= self.config.account_max_failures and n >= 2]
        return sources, accounts

    def prune(self) -> None:
        self.store.prune_auth_failures(self.clock() - max(self.config.window, 86400.0))


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

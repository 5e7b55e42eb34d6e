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
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from yuubin.auth.accounts import AddressInputError, normalize_address
from yuubin.auth.passwords import verify_password
from yuubin.config import AuthGuardConfig
from yuubin.store import Store

log = logging.getLogger("yuubin.auth")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PRUNE_EVERY = 1000  # failures between deletions of rows older than the window


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

    # ---- the login itself --------------------------------------------------------------

    async def login(self, ip: IPAddress, username: str, password: str, session: str = "-",
                    authzid: str = "") -> LoginResult:
        lock = self.locked(ip)
        if lock is not None:
            log.info("event=auth_refused session=%s client=%s source=%s reason=locked_out until=%s",
                     session, ip, lock.source, _stamp(lock.until))
            return LoginResult(None, locked=lock)
        try:
            account = normalize_address(username)
        except AddressInputError:
            account = None
        delay = self.delay(ip, account) if account else 0.0
        if delay:
            log.info("event=auth_delayed session=%s client=%s account=%s delay=%gs reason=distributed_attack",
                     session, ip, account, delay)
            await asyncio.sleep(delay)
        row = self.store.account(account) if account else None
        async with self._checks:
            ok = await asyncio.to_thread(verify_password, row.password_hash if row else None, password)
        if ok and authzid:
            try:
                ok = normalize_address(authzid) == account  # no acting as someone else
            except AddressInputError:
                ok = False
        if ok and account is not None:
            self.success(ip, account)
            log.info("event=auth_ok session=%s client=%s account=%s", session, ip, account)
            return LoginResult(account, delayed=delay)
        self.failure(ip, account or username[:100], session)
        return LoginResult(None, delayed=delay)

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

    def failure(self, ip: IPAddress, account: str, session: str = "-") -> Lockout | None:
        now = self.clock()
        key = source_key(ip)
        self.store.record_auth_failure("account", account, key, now)
        self._until_prune -= 1
        if self._until_prune <= 0:  # keep the table to what the window needs
            self._until_prune = PRUNE_EVERY
            self.prune()
        log.info("event=auth_failed session=%s client=%s source=%s account=%s", session, ip, key, account)
        if self.is_trusted(ip):
            return None
        self.store.record_auth_failure("source", key, key, now)
        failures = self.store.auth_failures_since("source", key, now - self.config.window)
        if failures < self.config.max_failures:
            return None
        prev = self.store.auth_lockout(key)
        offences = prev[1] + 1 if prev and now - prev[2] < self.config.forget_after else 1
        duration = min(self.config.lockout * 2 ** (offences - 1), self.config.max_lockout)
        until = now + duration
        self.store.set_auth_lockout(key, until, offences, now)
        self.store.clear_auth_failures("source", key)
        # One line per lockout, for fail2ban/CrowdSec: `event=auth_lockout client=<HOST> `.
        log.warning("event=auth_lockout client=%s source=%s session=%s failures=%d duration=%gs offence=%d until=%s",
                    ip, key, session, failures, duration, offences, _stamp(until))
        return Lockout(key, until, offences)

    def success(self, ip: IPAddress, account: str) -> None:
        key = source_key(ip)
        self.store.clear_auth_failures("source", key)
        self.store.add_known_source(account, key, self.clock())

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

"""The brute-force guard against a real state.db, with a clock the test moves forward."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from yuubin.auth.guard import AuthGuard, source_key
from yuubin.auth.passwords import hash_password
from yuubin.config import AuthGuardConfig
from yuubin.store import Store

ip = ipaddress.ip_address
TRUSTED = ipaddress.ip_network("192.168.1.0/24")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def alice_hash() -> str:
    return hash_password("the right one, long enough")


@pytest.fixture
def guard(tmp_path, alice_hash):
    store = Store(tmp_path / "state.db")
    store.add_account("alice@example.test", alice_hash)
    clock = Clock()
    cfg = AuthGuardConfig(max_failures=3, window=600, lockout=100, max_lockout=350, forget_after=10_000,
                          account_max_failures=4, account_delay=0.2)
    g = AuthGuard(store, cfg, lambda a: a in TRUSTED, clock)
    g.clock_ref = clock
    yield g
    store.close()


def fail(g: AuthGuard, addr: str, n: int, account: str = "alice@example.test") -> None:
    for _ in range(n):
        g.failure(ip(addr), account)


def test_lockout_after_max_failures_and_it_expires(guard):
    fail(guard, "203.0.113.5", 2)
    assert guard.locked(ip("203.0.113.5")) is None
    fail(guard, "203.0.113.5", 1)
    lock = guard.locked(ip("203.0.113.5"))
    assert lock is not None and lock.until == guard.clock_ref.now + 100
    assert guard.locked(ip("203.0.113.6")) is None  # the neighbour is not punished
    guard.clock_ref.now += 101
    assert guard.locked(ip("203.0.113.5")) is None


def test_failures_outside_the_window_do_not_count(guard):
    fail(guard, "203.0.113.5", 2)
    guard.clock_ref.now += 601
    fail(guard, "203.0.113.5", 2)
    assert guard.locked(ip("203.0.113.5")) is None


def test_repeat_offenders_lockout_doubles_up_to_the_cap(guard):
    durations = []
    for _ in range(4):
        fail(guard, "203.0.113.5", 3)
        lock = guard.locked(ip("203.0.113.5"))
        durations.append(lock.until - guard.clock_ref.now)
        guard.clock_ref.now = lock.until + 1
    assert durations == [100, 200, 350, 350]
    guard.clock_ref.now += 10_001  # clean long enough: forgiven
    fail(guard, "203.0.113.5", 3)
    assert guard.locked(ip("203.0.113.5")).until - guard.clock_ref.now == 100


def test_ipv6_counts_per_64(guard):
    assert source_key(ip("2001:db8:1:2::1")) == "2001:db8:1:2::/64"
    guard.failure(ip("2001:db8:1:2::1"), "alice@example.test")
    guard.failure(ip("2001:db8:1:2::2"), "alice@example.test")
    guard.failure(ip("2001:db8:1:2:ffff::9"), "alice@example.test")
    assert guard.locked(ip("2001:db8:1:2::77")) is not None
    assert guard.locked(ip("2001:db8:1:3::1")) is None


def test_trusted_is_never_locked(guard):
    fail(guard, "192.168.1.10", 10)
    assert guard.locked(ip("192.168.1.10")) is None


def test_lockout_logged_once_for_fail2ban(guard, caplog):
    caplog.set_level(logging.INFO, logger="yuubin.auth")
    fail(guard, "203.0.113.5", 3)
    lines = [r.getMessage() for r in caplog.records if "event=auth_lockout" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("event=auth_lockout client=203.0.113.5 source=203.0.113.5 ")


def test_unlock_source_and_account(guard):
    fail(guard, "203.0.113.5", 3)
    assert guard.unlock("203.0.113.5")
    assert guard.locked(ip("203.0.113.5")) is None
    fail(guard, "203.0.113.5", 2)
    assert guard.locked(ip("203.0.113.5")) is None  # the count was cleared too
    assert guard.unlock("2001:db8::5") == []


async def test_login_success_failure_and_unknown_account(guard):
    ok = await guard.login(ip("203.0.113.5"), "Alice@Example.TEST", "the right one, long enough")
    assert ok.ok and ok.account == "alice@example.test"
    bad = await guard.login(ip("203.0.113.5"), "alice@example.test", "wrong")
    unknown = await guard.login(ip("203.0.113.5"), "nobody@example.test", "wrong")
    assert not bad.ok and not unknown.ok and bad.locked is None and unknown.locked is None
    assert guard.locked(ip("203.0.113.5")) is None  # 2 failures < 3
    await guard.login(ip("203.0.113.5"), "x@y.test", "wrong")  # unknown accounts count the same
    for user in ("alice@example.test", "nobody@example.test"):
        r = await guard.login(ip("203.0.113.5"), user, "the right one, long enough")
        assert r.locked is not None and not r.ok


async def test_authzid_must_be_the_user(guard):
    r = await guard.login(ip("203.0.113.5"), "alice@example.test", "the right one, long enough",
                          authzid="bob@example.test")
    assert not r.ok


async def test_success_clears_the_source_count(guard):
    fail(guard, "203.0.113.5", 2)
    assert (await guard.login(ip("203.0.113.5"), "alice@example.test", "the right one, long enough")).ok
    fail(guard, "203.0.113.5", 2)
    assert guard.locked(ip("203.0.113.5")) is None


async def test_distributed_attack_delays_unknown_sources_only(guard):
    # The owner logs in once from home: that source is now known for her account.
    assert (await guard.login(ip("198.51.100.7"), "alice@example.test", "the right one, long enough")).ok
    for i in range(4):  # a botnet: one failure each from many addresses, no source reaches a lockout
        guard.failure(ip(f"203.0.113.{i + 1}"), "alice@example.test")
    assert guard.delay(ip("203.0.113.99"), "alice@example.test") == 0.2
    assert guard.delay(ip("198.51.100.7"), "alice@example.test") == 0.0  # the owner: never slowed
    assert guard.delay(ip("192.168.1.5"), "alice@example.test") == 0.0  # trusted
    r = await guard.login(ip("203.0.113.99"), "alice@example.test", "the right one, long enough")
    assert r.ok and r.delayed == 0.2  # a delay, never a lock
    sources, accounts = guard.lockouts()
    assert sources == [] and accounts[0][0] == "alice@example.test"
    assert guard.unlock("alice@example.test")
    assert guard.delay(ip("203.0.113.98"), "alice@example.test") == 0.0


def test_one_source_hammering_an_account_does_not_slow_the_owner(guard):
    fail(guard, "203.0.113.5", 3)  # locked: that is its own punishment
    fail(guard, "203.0.113.5", 5)
    assert guard.delay(ip("198.51.100.7"), "alice@example.test") == 0.0


def test_old_failures_are_pruned(guard):
    fail(guard, "203.0.113.5", 2)
    guard.clock_ref.now += 2 * 86400
    guard._until_prune = 1
    fail(guard, "203.0.113.9", 1)
    assert guard.store.auth_failures_since("source", "203.0.113.5", 0) == 0
    assert guard.store.auth_failures_since("source", "203.0.113.9", 0) == 1


def test_unknown_accounts_cost_a_full_hash():
    """The dummy hash has the production parameters, so an unknown account costs the same time."""
    from argon2 import extract_parameters

    from yuubin.auth import passwords
    assert extract_parameters(passwords._DUMMY_HASH) == extract_parameters(hash_password("x"))
    assert extract_parameters(hash_password("x")).type.name == "ID"


async def test_password_checks_run_a_bounded_number_at_once(tmp_path, alice_hash, monkeypatch):
    import asyncio

    from yuubin.auth import guard as authguard
    store = Store(tmp_path / "state.db")
    store.add_account("alice@example.test", alice_hash)
    g = AuthGuard(store, AuthGuardConfig(max_failures=100, concurrent_checks=2), lambda a: False)
    running, peak = 0, 0
    real = authguard.verify_password

    def counting(h, pw):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return real(h, pw)
        finally:
            running -= 1

    monkeypatch.setattr(authguard, "verify_password", counting)
    await asyncio.gather(*(g.login(ip(f"203.0.113.{i}"), "alice@example.test", "nope") for i in range(6)))
    assert peak == 2
    store.close()


# ---- one login exchange (auth/login.py): SASL steps, then the guard ----

PASSWORD = "the right one, long enough"


def _b(text: str) -> bytes:
    return text.encode()


async def test_login_exchange_plain_with_initial_response(guard):
    import base64

    from yuubin.auth.login import LoginExchange
    ex = LoginExchange(guard, ip("203.0.113.5"), "s1")
    initial = base64.b64encode(_b(f"\0alice@example.test\0{PASSWORD}")).decode()
    result = await ex.start("PLAIN", initial)
    assert result.ok and result.account == "alice@example.test"


async def test_login_exchange_login_mechanism_challenges_then_checks(guard):
    from yuubin.auth.guard import LoginResult
    from yuubin.auth.login import LoginExchange
    from yuubin.auth.sasl import Challenge
    ex = LoginExchange(guard, ip("203.0.113.5"), "s1")
    assert await ex.start("LOGIN", None) == Challenge(b"Username:")
    assert await ex.respond(_b("alice@example.test")) == Challenge(b"Password:")
    result = await ex.respond(_b("wrong"))
    assert isinstance(result, LoginResult) and not result.ok and result.locked is None
    assert guard.store.auth_failures_since("source", "203.0.113.5", 0) == 1  # the guard counted it


async def test_login_exchange_malformed_is_not_a_failed_password(guard):
    from yuubin.auth.login import LoginExchange, Malformed
    ex = LoginExchange(guard, ip("203.0.113.5"), "s1")
    step = await ex.start("PLAIN", "not base64!")
    assert isinstance(step, Malformed) and "base64" in step.reason
    step = await ex.start("PLAIN", "AGFsaWNl")  # "\0alice": no password part
    assert isinstance(step, Malformed)
    assert isinstance(await ex.respond(b"late"), Malformed)  # nothing in progress any more
    assert guard.store.auth_failures_since("source", "203.0.113.5", 0) == 0


async def test_login_exchange_refuses_a_locked_source_without_checking(guard):
    import base64

    from yuubin.auth.login import LoginExchange
    fail(guard, "203.0.113.9", 3)
    ex = LoginExchange(guard, ip("203.0.113.9"), "s1")
    result = await ex.start("PLAIN", base64.b64encode(_b(f"\0alice@example.test\0{PASSWORD}")).decode())
    assert not result.ok and result.locked is not None

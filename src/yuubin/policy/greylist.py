"""Greylisting: a stranger's first attempt gets "try again later"; real servers do, spam bots rarely.

A (client network, sender, recipient) triplet seen for the first time gets 451 4.7.1. A retry
after `delay` and before `expire` is accepted, the triplet remembered for `ttl`, and the client's
network (/24, or /64 for IPv6: big senders retry from a neighbouring address) is not greylisted
again for `ttl`. A sender whose SPF passes is not greylisted (the big providers publish their
ranges; their retries come from anywhere). Trusted networks and logins are never greylisted;
unknown recipients are refused before this check runs. With `enabled = "s25r"` only S25R
suspects are greylisted. State lives in state.db, so it survives restarts; old rows are pruned.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

from yuubin.policy.pipeline import Decision, IPAddress, Transaction, accept, reject
from yuubin.policy.s25r import MARK as S25R_MARK
from yuubin.smtp.address import Address
from yuubin.store import Store

PRUNE_EVERY = 500  # greylist decisions between prunes


@dataclass(frozen=True, slots=True)
class GreylistSettings:
    only_s25r: bool  # greylist only S25R suspects
    delay: float = 300.0
    expire: float = 4 * 3600.0
    ttl: float = 36 * 86400.0


def client_network(ip: IPAddress) -> str:
    prefix = 64 if isinstance(ip, ipaddress.IPv6Address) else 24
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class Greylist:
    def __init__(self, store: Store, settings: GreylistSettings, clock: Callable[[], float] = time.time,
                 dry_run: bool = False):
        self.store = store
        self.settings = settings
        self.clock = clock
        self.dry_run = dry_run  # `policy explain`: say what would happen, remember nothing
        self._until_prune = PRUNE_EVERY

    async def rcpt(self, txn: Transaction, rcpt: Address) -> Decision:
        s = txn.session
        if s.trusted or s.auth_user:
            return accept("greylist", "trusted or logged in: not greylisted")
        if self.settings.only_s25r and not s.marks.get(S25R_MARK):
            return accept("greylist", "not an S25R suspect")
        if txn.results.get("spf") == "pass":
            return accept("greylist", "sender's SPF passes: not greylisted")
        now = self.clock()
        sender = txn.sender.key if txn.sender else ""
        # One database round trip, in a database thread (a locked state.db stalls only this RCPT).
        return await self.store.run(self._decide, client_network(s.client), sender, rcpt.key, now)

    def _decide(self, network: str, sender: str, rcpt: str, now: float) -> Decision:
        until = self.store.greylist_client_until(network)
        if until is not None and until > now:
            return accept("greylist", f"{network} retried before: known until {_day(until)}")
        triplet = f"{network} {sender} {rcpt}"
        entry = self.store.greylist_entry(triplet)
        st = self.settings
        if entry is not None:
            first, passed = entry
            if passed is not None and now - passed <= st.ttl:
                if not self.dry_run:
                    self.store.set_greylist_entry(triplet, first, now)
                return accept("greylist", "triplet passed before")
            if passed is None and st.delay <= now - first <= st.expire:
                if not self.dry_run:
                    self.store.set_greylist_entry(triplet, first, now)
                    self.store.set_greylist_client(network, now + st.ttl)
                    self._prune(now)
                return accept("greylist", f"retried after {now - first:.0f}s: passed")
            if passed is None and now - first < st.delay:
                return self._defer(f"retried too early ({now - first:.0f}s < greylist.delay {st.delay:g}s)",
                                   st.delay - (now - first))
        # New, or too old to count: (re)start the clock.
        if not self.dry_run:
            self.store.set_greylist_entry(triplet, now, None)
            self._prune(now)
        return self._defer("first attempt of this client, sender and recipient" +
                           ("; would be remembered" if self.dry_run else ""), st.delay)

    def _defer(self, why: str, wait: float) -> Decision:
        minutes = max(1, int(-(-wait // 60)))
        return reject("greylist", f"greylisted: {why}", 451, "4.7.1",
                      f"greylisted, please try again in {minutes} minute{'s' if minutes != 1 else ''}")

    def _prune(self, now: float) -> None:
        self._until_prune -= 1
        if self._until_prune <= 0:
            self._until_prune = PRUNE_EVERY
            st = self.settings
            self.store.prune_greylist(now - st.expire, now - st.ttl, now)


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))

"""DNS blocklist (DNSBL) check of connecting clients on the mx listener.

A DNSBL can only ever make us reject mail, so every doubt resolves to "not listed": a zone
that times out or fails is skipped, and answers that are not listing codes (Spamhaus's
127.255.255.x error codes, or junk outside 127.0.0.0/8 from a misused list or an
NXDOMAIN-rewriting resolver) are logged for the operator instead of rejecting everyone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from yuubin.dns import DnsLookup
from yuubin.policy.pipeline import Decision, SessionFacts, accept, reject

__all__ = ["DnsblCheck", "DnsblChecker", "Listing", "reverse_name"]

_LISTING_RANGE = ipaddress.IPv4Network("127.0.0.0/8")
_ERROR_RANGE = ipaddress.IPv4Network("127.255.255.0/24")
_ERROR_WARNING_INTERVAL = 3600.0

# Spamhaus answers these instead of a listing when it refuses to answer a query properly.
_ERROR_CAUSES = {
    "127.255.255.252": "zone name typo or unsupported query",
    "127.255.255.254": (
        "queries come through a public/open resolver; "
        "use a local recursive resolver ([dns].nameservers)"
    ),
    "127.255.255.255": "query volume exceeded: use a local resolver or a data feed",
}
_OUTSIDE_CAUSE = (
    "answer outside 127.0.0.0/8: the list is misused or the resolver rewrites NXDOMAIN"
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Listing:
    """Why a client is listed: the zone and its 127.x.y.z codes, for the log and the reply."""

    zone: str
    answers: tuple[str, ...]  # the 127.x.y.z codes


def reverse_name(ip: IPAddress | str, zone: str) -> str:
    """The DNSBL query name: reversed octets (IPv4) or nibbles (IPv6) under ``zone``.

    1.2.3.4 in zen.example gives "4.3.2.1.zen.example"; IPv6 uses 32 reversed hex nibbles.
    """
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv4Address):
        labels = [str(octet) for octet in reversed(addr.packed)]
    else:
        labels = list(reversed(addr.packed.hex()))
    return ".".join([*labels, zone.strip().strip(".")])


class DnsblChecker:
    """Looks clients up in the configured DNSBL zones, all zones at once."""

    def __init__(
        self,
        resolver: DnsLookup,
        zones: Sequence[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger | None = None,
    ):
        """``clock`` paces the hourly error-code warnings (injectable for tests)."""
        self._resolver = resolver
        self.zones = tuple(z.strip().strip(".").lower() for z in zones if z.strip().strip("."))
        self._clock = clock
        self._log = log if log is not None else logging.getLogger(__name__)
        self._last_error_warning: dict[str, float] = {}

    async def check(self, ip: IPAddress, session: str = "-") -> Listing | None:
        """The listing from the first zone (in configured order) listing ``ip``, else None.

        Takes at most about one resolver timeout, because the zones are queried concurrently.
        """
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # dual-stack sockets report IPv4 clients as ::ffff:a.b.c.d
        if not self.zones:
            return None
        results = await asyncio.gather(
            *(self._check_zone(ip, zone, session) for zone in self.zones)
        )
        for listing in results:
            if listing is not None:
                self._log.info(
                    "event=dnsbl_listed session=%s client=%s zone=%s codes=%s",
                    session, ip, listing.zone, ",".join(listing.answers),
                )
                return listing
        return None

    async def _check_zone(self, ip: IPAddress, zone: str, session: str) -> Listing | None:
        """One zone's verdict; failures and error codes count as not listed."""
        result = await self._resolver.lookup(reverse_name(ip, zone), "A")
        if result.status in ("timeout", "servfail"):
            self._log.info(
                "event=dnsbl_skip zone=%s status=%s session=%s client=%s",
                zone, result.status, session, ip,
            )
            return None
        if result.status != "ok":
            return None
        codes: list[ipaddress.IPv4Address] = []
        errors: list[str] = []
        for record in result.records:
            try:
                code = ipaddress.IPv4Address(record)
            except ValueError:
                errors.append(record)
                continue
            if code in _LISTING_RANGE and code not in _ERROR_RANGE:
                codes.append(code)
            else:
                errors.append(record)
        if errors:
            self._warn_error(zone, errors[0])
        if not codes:
            return None
        return Listing(zone, tuple(str(code) for code in sorted(codes)))

    def _warn_error(self, zone: str, code: str) -> None:
        """Tell the operator why a zone is useless, once per zone per hour, not per client."""
        now = self._clock()
        last = self._last_error_warning.get(zone)
        if last is not None and now - last < _ERROR_WARNING_INTERVAL:
            return
        self._last_error_warning[zone] = now
        if code in _ERROR_CAUSES:
            cause = _ERROR_CAUSES[code]
        elif code.startswith("127."):
            cause = "error code"
        else:
            cause = _OUTSIDE_CAUSE
        self._log.warning('event=dnsbl_error zone=%s code=%s cause="%s"', zone, code, cause)


class DnsblCheck:
    """The connect stage on port 25: a listed client gets 554 as its greeting (only QUIT works).

    Trusted networks are never looked up; a lookup that fails never rejects.
    """

    def __init__(self, checker: DnsblChecker | None):
        self.checker = checker

    async def connect(self, session: SessionFacts) -> Decision:
        if session.trusted:
            return accept("dnsbl", "trusted network: not checked")
        if self.checker is None or not self.checker.zones:
            return accept("dnsbl", "no zones configured")
        listing = await self.checker.check(session.client, session.session)
        if listing is None:
            return accept("dnsbl", "not listed")
        return reject("dnsbl", f"listed on {listing.zone} ({','.join(listing.answers)})", 554, "5.7.1",
                      f"service refused: client [{session.client}] is listed on {listing.zone}")

"""The one DNS resolver of the server.

Every component (DNSBL, outbound MX routing; SPF and DKIM later) resolves through one
``Resolver`` so that they share one TTL cache, one set of nameservers and one timeout policy. Lookups return a
``LookupResult`` instead of raising, because for a mail server a DNS failure is an outcome to
decide on (defer, skip a check), not a crash.

A nameserver that does not answer is the admin's to fix, and each lookup only waits and fails:
so the resolver warns once per silent nameserver per ``TIMEOUT_WARNING_INTERVAL`` (naming it), says
when it answers again, and a timed-out ``LookupResult`` names it for whoever records the failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

__all__ = ["DnsLookup", "LookupResult", "Resolver", "Status"]

log = logging.getLogger(__name__)

Status = Literal["ok", "nxdomain", "nodata", "timeout", "servfail"]

TIMEOUT_WARNING_INTERVAL = 3600.0  # seconds between warnings about the same silent nameserver


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The outcome of one lookup as plain data, so callers branch on ``status``.

    ``status`` is "ok" (``records`` non-empty), "nxdomain" (the name does not exist),
    "nodata" (the name exists, but has no records of that type), "timeout" (no answer within
    the resolver timeout) or "servfail" (every other failure: SERVFAIL, REFUSED, no usable
    nameserver, malformed reply or name). ``ttl`` is the seconds the answer (positive or
    negative) stays valid; 0 when unknown or for failures. ``silent`` names the nameservers a
    timeout waited for, so a deferral can say which one to look at.
    """

    status: Status
    records: tuple[str, ...] = ()
    ttl: int = 0
    silent: tuple[str, ...] = ()  # for "timeout": the nameservers that did not answer, as HOST:PORT


class DnsLookup(Protocol):
    """What everything that asks DNS depends on: the real Resolver, or a test resolver with
    fixed answers for unit tests (end-to-end tests use the Resolver against a real DNS server)."""

    async def lookup(self, name: str, rdtype: str) -> LookupResult: ...


class Resolver:
    """Async DNS for everything in yuubin (DNSBL, MX routing; SPF/DKIM later)."""

    def __init__(self, nameservers: Sequence[str], port: int = 53, timeout: float = 5.0, *,
                 clock: Callable[[], float] = time.monotonic):
        """Use ``nameservers`` on ``port``; none given means the system's /etc/resolv.conf.

        ``timeout`` bounds one whole lookup, retries included, so a dead resolver can stall an
        SMTP session by at most that long. ``clock`` paces the warnings (injectable for tests).
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = float(timeout)
        self._resolver = _make_resolver(nameservers, port)
        self._resolver.lifetime = self.timeout
        self._resolver.cache = dns.resolver.Cache()
        self._clock = clock
        self._warned: dict[str, float] = {}  # nameserver → when its silence was last warned about
        self._silent: set[str] = set()  # nameservers whose last query timed out

    @property
    def nameservers(self) -> tuple[str, ...]:
        """The nameservers in use, so startup can log where queries go."""
        return tuple(str(ns) for ns in self._resolver.nameservers)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The nameservers as HOST:PORT, the way warnings and deferrals name them."""
        return tuple(_endpoint(ns, self._resolver.port) for ns in self.nameservers)

    async def lookup(self, name: str, rdtype: str) -> LookupResult:
        """Resolve ``name``/``rdtype`` (e.g. "A", "MX", "TXT"); never raises for DNS failures.

        An unknown ``rdtype`` is a programming error and raises ``ValueError``.
        """
        try:
            qtype = dns.rdatatype.from_text(rdtype)
        except dns.rdatatype.UnknownRdatatype:
            raise ValueError(f"unknown DNS record type {rdtype!r}") from None
        try:
            # dnspython enforces the lifetime itself; this is the backstop for the guarantee.
            async with asyncio.timeout(self.timeout):
                answer = await self._resolver.resolve(
                    name, qtype, raise_on_no_answer=False, search=False
                )
        except dns.resolver.LifetimeTimeout as exc:
            return self._timed_out(_silent_servers(exc))
        except (TimeoutError, dns.exception.Timeout):
            return self._timed_out(())
        except dns.resolver.NXDOMAIN as exc:
            return LookupResult("nxdomain", ttl=self._negative_ttl(exc))
        except dns.resolver.NoAnswer:
            return LookupResult("nodata")
        except (dns.exception.DNSException, OSError, ValueError):
            # NoNameservers (SERVFAIL, REFUSED, unreachable), YXDOMAIN, bad names, bad replies.
            return LookupResult("servfail")
        if self._silent:
            self._answered(answer)
        ttl = _remaining(answer.expiration)
        if answer.rrset is None:
            return LookupResult("nodata", ttl=ttl)
        return LookupResult("ok", tuple(_to_text(rd) for rd in answer.rrset), ttl)

    def _timed_out(self, silent: tuple[str, ...]) -> LookupResult:
        """A timeout, with the nameservers it waited for (all of them when dnspython cannot say)."""
        silent = silent or self.endpoints
        now = self._clock()
        for ns in silent:
            self._silent.add(ns)
            last = self._warned.get(ns)
            if last is not None and now - last < TIMEOUT_WARNING_INTERVAL:
                continue
            self._warned[ns] = now
            log.warning('event=dns_timeout nameserver=%s timeout=%gs effect="lookups wait dns.timeout, then DNSBL '
                        'checks are skipped and outbound mail is deferred" hint="check that this nameserver runs '
                        'and answers, or set [dns].nameservers"', ns, self.timeout)
        return LookupResult("timeout", silent=silent)

    def _answered(self, answer: dns.resolver.Answer) -> None:
        """Say once that a nameserver we warned about answers again (a cached answer tells nothing)."""
        if not answer.nameserver:
            return
        ns = _endpoint(answer.nameserver, answer.port or self._resolver.port)
        if ns in self._silent:
            self._silent.discard(ns)
            log.info("event=dns_answering nameserver=%s", ns)

    def _negative_ttl(self, exc: dns.resolver.NXDOMAIN) -> int:
        """Seconds the NXDOMAIN stays cached, so callers may cache it as long as we do."""
        cache = self._resolver.cache
        for qname in exc.qnames():
            cached = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN)) if cache else None
            if cached is not None:
                return _remaining(cached.expiration)
        return 0


def _make_resolver(nameservers: Sequence[str], port: int) -> dns.asyncresolver.Resolver:
    """Build the dnspython resolver; a host without resolv.conf gets one that always fails."""
    if nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(nameservers)
        resolver.port = port
        return resolver
    try:
        return dns.asyncresolver.Resolver()
    except dns.resolver.NoResolverConfiguration:
        log.warning(
            'event=dns_no_nameservers cause="no nameservers in /etc/resolv.conf; '
            'set [dns].nameservers" effect="every lookup fails as servfail"'
        )
        return dns.asyncresolver.Resolver(configure=False)


def _endpoint(address: str, port: int) -> str:
    """HOST:PORT, with IPv6 in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _silent_servers(exc: dns.resolver.LifetimeTimeout) -> tuple[str, ...]:
    """The nameservers whose queries timed out, from dnspython's record of its tries."""
    found: list[str] = []
    for server, _tcp, port, error, _response in exc.kwargs.get("errors") or ():
        if not isinstance(error, dns.exception.Timeout):
            continue
        address = str(server).removeprefix("Do53:").rpartition("@")[0] or str(server)
        ns = _endpoint(address, port)
        if ns not in found:
            found.append(ns)
    return tuple(found)


def _remaining(expiration: float) -> int:
    """Whole seconds until ``expiration`` (a ``time.time()`` value), never negative."""
    return max(0, int(expiration - time.time()))


def _to_text(rdata: dns.rdata.Rdata) -> str:
    """Text form callers can use directly: TXT strings joined and decoded, others as in zones."""
    if rdata.rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
        return b"".join(rdata.strings).decode("utf-8", errors="replace")  # type: ignore[attr-defined]
    return rdata.to_text()

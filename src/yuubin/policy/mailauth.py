"""The mx's mail authentication check: SPF at MAIL, DKIM/ARC/DMARC at the end of DATA.

SPF is evaluated when MAIL FROM arrives (MAIL FROM's domain, or the HELO name for <>) and kept
in the transaction's results; the message stage verifies DKIM and ARC (through the verifiers
the app passes in: DKIM/ARC cryptography lives in ``yuubin.mailauth.dkim``/``arc``), then
DMARC, and decides by ``[mailauth]``:

- DMARC fail under p=reject: 550 5.7.1 in session (or quarantine/deliver if so configured);
  under p=quarantine: the recipients' Junk folder (or deliver);
- a From: in one of our local domains that fails DMARC: always 550 5.7.1 (a missing record of
  ours counts as p=reject);
- a DMARC fail is overridden when the ARC chain passes and its newest sealer is trusted;
- SPF or DKIM errors alone never reject; an SPF temperror defers (451) only with
  ``spf_temperror = "defer"``.

Trusted networks and logged-in clients are not checked. Every decision is one
``event=mailauth`` log line with all results; the message gets one Authentication-Results
header and loses incoming ones that claim our hostname.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from yuubin.auth.accounts import Directory
from yuubin.config import MailauthConfig
from yuubin.dns import DnsLookup
from yuubin.mailauth.dmarc import DmarcResult, TreeWalk, evaluate, from_domains
from yuubin.mailauth.results import ArcSummary, DkimSummary, authentication_results, claims_authserv
from yuubin.mailauth.spf import SpfResult, check_sender
from yuubin.policy.pipeline import Decision, Transaction, Verdict, accept, quarantine, reject
from yuubin.smtp.address import Address
from yuubin.smtp.replies import Reply

log = logging.getLogger("yuubin.mailauth")

CHECK = "mailauth"


class DkimVerdict(Protocol):
    """One verified signature, as ``yuubin.mailauth.dkim.DkimResult`` gives it."""

    @property
    def result(self) -> str: ...
    @property
    def domain(self) -> str: ...
    @property
    def selector(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def header_b(self) -> str: ...


class ArcVerdict(Protocol):
    """An ARC chain, as ``yuubin.mailauth.arc.ArcResult`` gives it."""

    @property
    def result(self) -> str: ...
    @property
    def sealers(self) -> tuple[str, ...]: ...
    @property
    def reason(self) -> str: ...


DkimVerifier = Callable[[bytes], Awaitable[Sequence[DkimVerdict]]]
ArcVerifier = Callable[[bytes], Awaitable[ArcVerdict]]


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


class MailAuthCheck:
    """SPF, DKIM, ARC and DMARC for mail from strangers on the mx."""

    def __init__(self, lookup: DnsLookup, directory: Directory, cfg: MailauthConfig, hostname: str, *,
                 verify_dkim: DkimVerifier | None = None, verify_arc: ArcVerifier | None = None,
                 clock: Callable[[], float] = time.time):
        self.lookup = lookup
        self.directory = directory
        self.cfg = cfg
        self.hostname = hostname
        self.verify_dkim = verify_dkim
        self.verify_arc = verify_arc
        self.clock = clock
        self.trusted_sealers = frozenset(cfg.trusted_arc_sealers)
        self._drop = claims_authserv(hostname)

    @staticmethod
    def _skipped(txn: Transaction) -> str | None:
        s = txn.session
        if s.auth_user:
            return "logged in"
        if s.trusted:
            return "trusted network"
        return None

    async def mail(self, txn: Transaction, sender: Address | None) -> Decision:
        if self._skipped(txn):
            return accept(CHECK, "not checked")
        s = txn.session
        helo = s.helo or ""
        mail_from = sender.text if sender is not None and sender.domain else None
        try:
            async with asyncio.timeout(self.cfg.check_timeout):
                spf = await check_sender(s.client, mail_from, helo, self.lookup, receiver=self.hostname,
                                         now=self.clock())
        except TimeoutError:
            spf = SpfResult("temperror", sender.domain if mail_from and sender else helo.lower(),
                            "mailfrom" if mail_from else "helo",
                            f"SPF evaluation took longer than {self.cfg.check_timeout:g}s")
        txn.results.update({"spf": spf.result, "spf.domain": spf.domain, "spf.identity": spf.identity,
                            "spf.value": mail_from or helo, "spf.reason": spf.reason})
        if spf.result == "temperror" and self.cfg.spf_temperror == "defer":
            log.info('event=mailauth session=%s client=%s from=<%s> spf=temperror spf_domain=%s action=defer '
                     'reason="%s"', s.session, s.client, mail_from or "", spf.domain, _quoted(spf.reason))
            return reject(CHECK, f"SPF temperror for {spf.domain}: {spf.reason}", 451, "4.7.24",
                          f"SPF check of {spf.domain} failed temporarily; try again later")
        return accept(CHECK, f"spf={spf.result}")

    async def message(self, txn: Transaction, data: bytes) -> Decision:
        if (skipped := self._skipped(txn)) is not None:
            return accept(CHECK, f"not checked: {skipped}", drop_header=self._drop)
        s = txn.session
        domains = from_domains(data)
        spf_result = txn.results.get("spf", "none")
        spf_domain = txn.results.get("spf.domain", "")
        spf_for_dmarc = (spf_result, spf_domain) if txn.results.get("spf.identity") == "mailfrom" else None
        own = [d for d in domains or () if self.directory.is_local(d)]
        dkims: Sequence[DkimVerdict] = ()
        arc: ArcVerdict = _NoChain()
        try:
            async with asyncio.timeout(self.cfg.check_timeout):
                # DMARC's policy discovery needs no signature: it walks while they are checked.
                walk = TreeWalk(self.lookup)
                prefetch = walk.prefetch(domains[0]) if domains else _nothing()
                dkims, arc, _ = await asyncio.gather(self._dkim(s.session, data), self._arc(s.session, data),
                                                     prefetch)
                dmarc = await evaluate(domains, spf_for_dmarc, [(d.result, d.domain.lower()) for d in dkims],
                                       self.lookup, own=own, walk=walk)
        except TimeoutError:
            dmarc = DmarcResult("temperror", domains[0] if domains else "",
                                reason=f"checks took longer than {self.cfg.check_timeout:g}s")
        action, why = self._action(dmarc, arc, own)
        header = authentication_results(
            self.hostname,
            spf=(spf_result, txn.results.get("spf.identity", "mailfrom"), txn.results.get("spf.value", ""),
                 txn.results.get("spf.reason", "")) if "spf" in txn.results else None,
            dkim=[DkimSummary(d.result, d.domain, d.selector, d.header_b, d.reason) for d in dkims],
            dmarc=(dmarc.result, dmarc.from_domain, dmarc.published, dmarc.reason),
            arc=ArcSummary(arc.result, arc.reason),
        )
        results = {"spf": spf_result, "spf.domain": spf_domain, "dmarc": dmarc.result,
                   "dmarc.domain": dmarc.from_domain, "dmarc.policy": dmarc.published,
                   "dmarc.disposition": action, "arc": arc.result,
                   "dkim": ",".join(f"{d.result}:{d.domain}" for d in dkims) or "none"}
        log.info('event=mailauth session=%s client=%s from=<%s> header_from=%s spf=%s spf_domain=%s dkim=%s '
                 'dmarc=%s dmarc_policy=%s arc=%s%s action=%s reason="%s"', s.session, s.client,
                 txn.sender.text if txn.sender else "", dmarc.from_domain or "-", spf_result, spf_domain or "-",
                 results["dkim"], dmarc.result, dmarc.published, arc.result,
                 f" arc_sealer={arc.sealers[-1]}" if arc.sealers else "", action, _quoted(why))
        if action == "reject":
            return Decision(Verdict.REJECT, CHECK, why, Reply(550, "5.7.1", why), results=results)
        if action == "quarantine":
            return quarantine(CHECK, why, headers=(header,), results=results, drop_header=self._drop)
        return accept(CHECK, why, headers=(header,), results=results, drop_header=self._drop)

    async def _dkim(self, session: str, data: bytes) -> Sequence[DkimVerdict]:
        """The signatures' results; a verifier that breaks is an error for the log and a
        temperror for the message, never an exception out of the session."""
        if self.verify_dkim is None or not _has_field(data, b"dkim-signature"):
            return ()  # unsigned: no need to parse the message again
        try:
            return await self.verify_dkim(data)
        except Exception as e:  # any bug in a verifier must not cost the session
            log.error('event=mailauth_error session=%s step=dkim error="%s"', session, _quoted(repr(e)))
            return (_Unverified("temperror", reason=f"DKIM verifier error: {type(e).__name__}"),)

    async def _arc(self, session: str, data: bytes) -> ArcVerdict:
        if self.verify_arc is None:
            return _NoChain()
        if not any(_has_field(data, name) for name in (b"arc-seal", b"arc-message-signature",
                                                        b"arc-authentication-results")):
            return _NoChain(reason="no ARC headers")
        try:
            return await self.verify_arc(data)
        except Exception as e:  # as in _dkim; a chain we could not check never passes
            log.error('event=mailauth_error session=%s step=arc error="%s"', session, _quoted(repr(e)))
            return _NoChain("fail", f"ARC verifier error: {type(e).__name__}")

    def _action(self, dmarc: DmarcResult, arc: ArcVerdict, own: Sequence[str]) -> tuple[str, str]:
        """(deliver|quarantine|reject, why) for a DMARC outcome."""
        if dmarc.result != "fail":
            return "deliver", f"dmarc={dmarc.result}" + (f": {dmarc.reason}" if dmarc.reason else "")
        domain = dmarc.from_domain
        if domain in own:
            return "reject", f"From: claims our domain {domain} but fails DMARC ({dmarc.reason})"
        if arc.result == "pass" and arc.sealers and arc.sealers[-1].lower() in self.trusted_sealers:
            return "deliver", f"DMARC fail for {domain} overridden: ARC chain passes, sealed by trusted " \
                              f"{arc.sealers[-1].lower()}"
        if dmarc.policy == "reject":
            how = self.cfg.dmarc_reject
            if how == "reject":
                return "reject", f"message rejected by the DMARC policy of {domain} ({dmarc.reason})"
            return how, f"DMARC fail for {domain} under p=reject; configured to {how}"
        if dmarc.policy == "quarantine":
            how = self.cfg.dmarc_quarantine
            return how, f"DMARC fail for {domain} under p=quarantine"
        return "deliver", f"DMARC fail for {domain}, policy {dmarc.published}" + \
                          (" (t=y: testing)" if dmarc.record is not None and dmarc.record.testing else "")


def _has_field(data: bytes, name: bytes) -> bool:
    """Does the header section have a field ``name`` (lowercase)? A cheap test that spares the
    verifiers a parse of every message that has nothing for them."""
    end = data.find(b"\r\n\r\n")
    head = b"\r\n" + (data[:end] if end >= 0 else data).lower()
    return b"\r\n" + name + b":" in head or b"\r\n" + name + b" :" in head


async def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class _NoChain:
    """An ARC result without a verified chain."""

    result: str = "none"
    reason: str = "ARC not checked"
    sealers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Unverified:
    """A DKIM result for signatures that could not be checked at all."""

    result: str
    reason: str
    domain: str = ""
    selector: str = ""
    header_b: str = ""

"""DKIM signing of outbound mail: two signatures (rsa-sha256 and ed25519-sha256) per message.

Signing happens at send time, just before the DATA bytes go out, because that is after the
last change to the message; the signature headers exist only in memory for that attempt and
are never written back to the spool. Some large providers ignore ed25519, so RSA signs too.
Keys are read once at start (``load``): a new key set is used from the next start on.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim

from yuubin.mailauth.dkim import LARGE_MESSAGE
from yuubin.mailauth.dkimkeys import active_set
from yuubin.queue.spool import Envelope

__all__ = ["SIGNED_HEADERS", "DkimSigner", "SigningKey", "originated_here"]

log = logging.getLogger("yuubin.dkim")

# Signed when present; From is signed once more than it occurs ("oversigned") so that no second
# From can be added without breaking the signature.
SIGNED_HEADERS = (
    "from", "reply-to", "sender", "to", "cc", "subject", "date", "message-id", "in-reply-to", "references",
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition", "list-id",
    "list-unsubscribe", "list-unsubscribe-post",
)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
OWN_ORIGINS = ("bounce", "internal")  # Envelope.listener of what the server writes itself (DSNs, notices)


def originated_here(env: Envelope) -> bool:
    """Whether we vouch for the entry: submitted by an account, sent from a trusted network, or
    written by the server itself. Mail from outside forwarded by an alias is never signed, even
    when its From: claims one of our domains: our signature would make a forgery pass DMARC."""
    return env.auth is not None or env.trusted or env.listener in OWN_ORIGINS


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key ready for dkimpy: its selector, algorithm and private key bytes."""

    selector: str
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: bytes


class DkimSigner:
    """Signs a message with the keys of the local domain it comes from, or leaves it as it is."""

    def __init__(self, keys: Mapping[str, Sequence[SigningKey]]):
        self.keys = {d.lower(): tuple(k) for d, k in keys.items() if k}

    @classmethod
    def load(cls, data_dir: Path, local_domains: Sequence[str], selectors: Sequence[str] = (), *,
             quiet: bool = False) -> DkimSigner:
        """Read the active key set of every local domain; a domain without keys signs nothing (logged).

        An unreadable or malformed key raises (OSError, ValueError). ``quiet`` only checks (no log).
        """
        keys: dict[str, list[SigningKey]] = {}
        for domain in local_domains:
            chosen = active_set(data_dir, domain, tuple(selectors))
            if chosen is not None:
                keys[domain] = [SigningKey(k.selector, k.signature_algorithm, k.signing_key()) for k in chosen.keys]
            if quiet:
                continue
            if chosen is None:
                log.warning('event=dkim_no_keys domain=%s effect="mail from this domain leaves unsigned" '
                            'hint="run: yuubin dkim keygen %s, publish the records, restart"', domain, domain)
                continue
            if selectors and chosen.name not in selectors:
                log.warning("event=dkim_selector_missing domain=%s wanted=%s using=%s", domain,
                            ",".join(selectors), chosen.name)
            log.info("event=dkim_keys domain=%s selectors=%s", domain, ",".join(k.selector for k in chosen.keys))
        return cls(keys)

    def domain_for(self, sender: str, data: bytes) -> str | None:
        """The local domain that signs: the From: domain if we have keys for it, else the envelope sender's."""
        for candidate in (*_from_domains(data), sender.rpartition("@")[2].lower() if "@" in sender else ""):
            if candidate in self.keys:
                return candidate
        return None

    def signature_headers(self, domain: str, data: bytes) -> bytes:
        """The DKIM-Signature header lines for ``data`` (CPU only: canonicalise, hash, sign)."""
        present = _header_names(data)
        include = [h.encode() for h in SIGNED_HEADERS if h in present] + [b"from"]
        signer = dkim.DKIM(data, logger=_QUIET, linesep=b"\r\n")
        out = b""
        for key in self.keys[domain]:
            header = signer.sign(key.selector.encode(), domain.encode(), key.private,
                                 signature_algorithm=key.algorithm, canonicalize=(b"relaxed", b"relaxed"),
                                 include_headers=include)
            out += header
        return out

    async def sign_entry(self, env: Envelope, data: bytes) -> bytes:
        """The outbound queue's ``sign``: ``data`` signed when the entry originated here (see ``originated_here``)."""
        if not originated_here(env):
            return data
        return await self.sign(env.sender, data, env.id)

    async def sign(self, sender: str, data: bytes, qid: str = "") -> bytes:
        """``data`` with our signatures on top, or ``data`` itself when it is not ours to sign.

        Never fails the delivery: a signing error is logged and the message goes out unsigned.
        """
        domain = self.domain_for(sender, data)
        if domain is None:
            return data
        try:
            if len(data) > LARGE_MESSAGE:
                headers = await asyncio.to_thread(self.signature_headers, domain, data)
            else:
                headers = self.signature_headers(domain, data)
        except (dkim.DKIMException, ValueError) as exc:
            log.error('event=dkim_sign_failed id=%s domain=%s error="%s" effect="sent unsigned"', qid, domain, exc)
            return data
        log.info("event=dkim_signed id=%s domain=%s selectors=%s", qid, domain,
                 ",".join(k.selector for k in self.keys[domain]))
        return headers + data


_QUIET = logging.getLogger("yuubin.mailauth.dkimpy")


def _head(data: bytes) -> bytes:
    found = _HEADER_END.search(data)
    return data[: found.start()] if found else data


def _header_names(data: bytes) -> set[str]:
    names = set()
    for line in _head(data).split(b"\n"):
        if line[:1] in (b" ", b"\t") or b":" not in line:
            continue
        names.add(line.split(b":", 1)[0].strip().decode("ascii", errors="replace").lower())
    return names


def _from_domains(data: bytes) -> list[str]:
    """The domains of the From: addresses, lowercase, in order (folded lines joined)."""
    fields: list[list[bytes]] = []
    in_from = False
    for line in _head(data).split(b"\n"):
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            if in_from:
                fields[-1].append(line)
            continue
        in_from = line.lower().startswith(b"from:")
        if in_from:
            fields.append([line[5:]])
    values = [b" ".join(parts).decode("utf-8", errors="replace") for parts in fields]
    return [address.rpartition("@")[2].strip().lower() for _name, address in email.utils.getaddresses(values)
            if "@" in address]

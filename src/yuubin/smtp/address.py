"""Envelope addresses (RFC 5321 section 4.1.2, RFC 6531 for SMTPUTF8).

Written here rather than taken from `email.utils`: that parser is for header syntax and is
lenient in ways that matter for relay decisions (source routes, quoted `@`, `%` hacks).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from yuubin.smtp.replies import Reply

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"(?:[{_ATEXT}]|[^\x00-\x7f])+(?:\.(?:[{_ATEXT}]|[^\x00-\x7f])+)*")
_QUOTED = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"')
_QUOTED_UTF8 = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*)"')
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LABEL_UTF8 = re.compile(
    r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f]){0,61}(?:[A-Za-z0-9]|[^\x00-\x7f]))?"
)
_SOURCE_ROUTE = re.compile(r"^@[^:,<>]+(?:,@[^:,<>]+)*:")

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256

BAD_SYNTAX = Reply(501, "5.1.3", "bad address syntax")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "non-ASCII address requires the SMTPUTF8 parameter")


class AddressError(ValueError):
    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox. `domain` is lower-cased; `local` keeps its case (compare with `.key`)."""

    local: str
    domain: str
    source_route: bool = False

    @property
    def text(self) -> str:
        local = self.local
        if not _DOT_STRING_UTF8.fullmatch(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}" if self.domain else local

    @property
    def key(self) -> str:
        """Case-folded `local@domain` used for account and alias lookups."""
        return f"{self.local.lower()}@{self.domain}"

    @property
    def routing_trick(self) -> bool:
        """True if some MTA could read this address as routing through another host.

        `%` and `!` (the old percent hack and UUCP bang paths), a quoted local part that holds
        `@`, or a source route: a relay decision made on our domain would be wrong for these.
        """
        return self.source_route or any(c in self.local for c in "%!@")

    def __str__(self) -> str:
        return self.text


def _domain(text: str, utf8: bool) -> str:
    if text.startswith("["):
        if not text.endswith("]"):
            raise AddressError(BAD_SYNTAX)
        inner = text[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                if ipaddress.IPv6Address(inner[5:]).scope_id is not None:
                    raise ValueError("a zone index (fe80::1%eth0) is not an address literal")
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise AddressError(BAD_SYNTAX) from None
        return text.lower()
    labels = text.split(".")
    pattern = _LABEL_UTF8 if utf8 else _LABEL
    if len(text) > MAX_DOMAIN or not all(pattern.fullmatch(lbl) for lbl in labels):
        raise AddressError(BAD_SYNTAX)
    return text.lower()


def parse_path(path: str, *, smtputf8: bool) -> Address | None:
    """Parse `<...>` from MAIL/RCPT; None means the null path `<>`.

    Raises AddressError carrying the reply to send.
    """
    if len(path) < 2 or path[0] != "<" or path[-1] != ">":
        raise AddressError(Reply(501, "5.5.4", "syntax: expected <address>"))
    inner = path[1:-1]
    if inner == "":
        return None
    if len(path.encode()) > MAX_PATH:  # octets, brackets included (RFC 5321 4.5.3.1.3)
        raise AddressError(BAD_SYNTAX)
    if not inner.isascii() and not smtputf8:
        raise AddressError(NEEDS_SMTPUTF8)
    routed = False
    m = _SOURCE_ROUTE.match(inner)
    if m:
        routed = True
        inner = inner[m.end():]
    if inner.startswith('"'):
        qm = (_QUOTED_UTF8 if smtputf8 else _QUOTED).match(inner)
        if not qm:
            raise AddressError(BAD_SYNTAX)
        local = re.sub(r"\\(.)", r"\1", qm.group(1))
        rest = inner[qm.end():]
    else:
        at = inner.rfind("@")
        if at < 0:
            # Only <postmaster> may come without a domain (RFC 5321 4.5.1); the caller decides.
            if inner.lower() == "postmaster" and not routed:
                return Address("postmaster", "")
            raise AddressError(BAD_SYNTAX)
        local = inner[:at]
        rest = inner[at:]
        if not (_DOT_STRING_UTF8 if smtputf8 else _DOT_STRING).fullmatch(local):
            raise AddressError(BAD_SYNTAX)
    if not rest.startswith("@") or len(local.encode()) > MAX_LOCAL or not local:
        raise AddressError(BAD_SYNTAX)
    return Address(local, _domain(rest[1:], smtputf8), routed)


_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")


def is_xtext(value: str) -> bool:
    """RFC 3461 xtext, used by ENVID and ORCPT."""
    return bool(_XTEXT.fullmatch(value))

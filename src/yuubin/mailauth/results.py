"""Authentication-Results (RFC 8601): what this server found, in one header field.

The header is written with ``authserv-id`` = our hostname. Readers (mail clients, filters)
trust a result only because it carries our authserv-id, so every incoming field that claims
it is a forgery and is removed before ours is added (``claims_authserv`` is the predicate the
intake applies to the header fields).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["ArcSummary", "DkimSummary", "authentication_results", "authserv_of", "claims_authserv"]

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+\Z")


@dataclass(frozen=True, slots=True)
class DkimSummary:
    """One checked DKIM signature, as the header shows it."""

    result: str
    domain: str
    selector: str = ""
    header_b: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ArcSummary:
    result: str  # none|pass|fail
    reason: str = ""


def _comment(text: str) -> str:
    """A safe ( comment ): no parentheses, backslashes or control characters, bounded."""
    clean = re.sub(r"[()\\\x00-\x1f\x7f]", " ", text).strip()
    clean = re.sub(r"\s+", " ", clean)[:120]
    return f" ({clean})" if clean else ""


def _value(text: str) -> str:
    """A property value: a token as it is, anything else as a quoted-string."""
    if text and _TOKEN.match(text) and text.isascii():
        return text
    escaped = re.sub(r"[\x00-\x1f\x7f]", "", text).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def authentication_results(authserv_id: str, *, spf: tuple[str, str, str, str] | None,
                           dkim: Sequence[DkimSummary], dmarc: tuple[str, str, str, str] | None,
                           arc: ArcSummary | None) -> bytes:
    """The header field, folded one result per line, with CRLF.

    ``spf`` is (result, identity "mailfrom"|"helo", the checked identity, reason); ``dmarc`` is
    (result, header.from domain, published policy, reason). No DKIM signature gives dkim=none.
    """
    parts: list[str] = []
    if spf is not None:
        result, identity, value, reason = spf
        prop = "smtp.mailfrom" if identity == "mailfrom" else "smtp.helo"
        parts.append(f"spf={result}{_comment(reason)} {prop}={_value(value)}")
    if not dkim:
        parts.append("dkim=none")
    for d in dkim:
        text = f"dkim={d.result}{_comment(d.reason)}"
        if d.domain:
            text += f" header.d={_value(d.domain)}"
        if d.selector:
            text += f" header.s={_value(d.selector)}"
        if d.header_b:
            text += f" header.b={_value(d.header_b)}"
        parts.append(text)
    if dmarc is not None:
        result, domain, policy, reason = dmarc
        text = f"dmarc={result}{_comment(reason)}"
        if domain:
            text += f" header.from={_value(domain)}"
        if result in ("pass", "fail"):
            text += f" policy.dmarc={policy}"
        parts.append(text)
    if arc is not None:
        parts.append(f"arc={arc.result}{_comment(arc.reason)}")
    body = ";\r\n\t".join([authserv_id, *parts])
    return f"Authentication-Results: {body}\r\n".encode("utf-8", errors="replace")


def authserv_of(field: bytes) -> str:
    """The authserv-id of an Authentication-Results field (name included), lowercase; "" if none."""
    text = field.decode("utf-8", errors="replace")
    _, _, value = text.partition(":")
    value = re.sub(r"\s+", " ", value)
    while True:  # leading comments, which may nest
        value = value.lstrip()
        if not value.startswith("("):
            break
        depth = 0
        for i, ch in enumerate(value):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                value = value[i + 1:]
                break
        else:
            return ""
    m = re.match(r"[^\s;()]+", value)
    return m.group(0).lower().rstrip(".") if m else ""


def claims_authserv(authserv_id: str) -> Callable[[str, bytes], bool]:
    """The predicate for header fields to drop: Authentication-Results claiming ``authserv_id``."""
    ours = authserv_id.lower().rstrip(".")

    def drop(name: str, field: bytes) -> bool:
        return name == "authentication-results" and authserv_of(field) == ours

    return drop

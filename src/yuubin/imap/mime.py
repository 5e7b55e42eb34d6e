"""The IMAP view of a message: ENVELOPE, BODYSTRUCTURE, BODY[section], BINARY and SEARCH text.

Pure functions over the raw message bytes; no I/O. The scanner is hand-written on purpose:
Python's `email` package rebuilds the message as objects and loses the octet offsets and line
counts that BODYSTRUCTURE and BODY[section] must report exactly, and it normalises headers on the
way. Here every part is a pair of offsets into the one `bytes` object (no copies), the header is
split from the body per part, and a multipart body is cut at its boundary lines with
`bytes.find` (no regular expression ever runs over a body). Parsing is lazy: `parse()` only
finds the end of the top-level header; the MIME tree is built the first time something needs it.

Broken MIME never raises: a missing closing boundary ends the part at its parent's end, a
multipart without a boundary parameter is a single text part, nesting deeper than `MAX_DEPTH`
or more than `MAX_PARTS` parts are kept as opaque leaves, 8-bit header bytes are kept (shown as
literals unless UTF8=ACCEPT is on), bare LF line ends are accepted wherever CRLF is.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import quopri
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import unquote_to_bytes

MAX_DEPTH = 100
"""Levels of multipart/message nesting parsed, the top level counted; a multipart or message on
the last level is an opaque leaf (application/octet-stream, as Dovecot shows it)."""
MAX_PARTS = 10_000
"""Parts in one message beyond this are not parsed (the rest of the body is a leaf)."""
DEFAULT_CTYPE = ("text", "plain")
DEFAULT_PARAMS: tuple[tuple[str, str], ...] = (("charset", "us-ascii"),)


class UnknownTransferEncoding(ValueError):
    """BINARY of a part whose Content-Transfer-Encoding we cannot decode (RFC 3516 UNKNOWN-CTE)."""


# --------------------------------------------------------------------------- header scanning


def _body_start(raw: bytes, start: int, end: int) -> int:
    """Offset just after the blank line that ends the header at `start` (`end` when there is none)."""
    if raw.startswith(b"\r\n", start, end):
        return start + 2
    if raw.startswith(b"\n", start, end):
        return start + 1
    a = raw.find(b"\n\r\n", start, end)
    b = raw.find(b"\n\n", start, end)
    if a < 0 and b < 0:
        return end
    if b < 0 or (0 <= a < b):
        return a + 3
    return b + 2


_FIELD = re.compile(rb"^([^: \t\r\n][^:\r\n]*):(.*(?:\r?\n[ \t].*)*)", re.MULTILINE)


_NAMES: dict[bytes, str] = {}
_NAMES_MAX = 4096  # field names seen are few; a message full of odd names does not grow this


def _fields(block: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw value with its folding) for each header field, in order; lines that
    are not fields are skipped. One regex pass over the header only (never a body)."""
    out: list[tuple[str, bytes]] = []
    names = _NAMES
    for raw_name, value in _FIELD.findall(block):
        name = names.get(raw_name)
        if name is None:
            name = raw_name.rstrip(b" \t").decode("latin-1").lower()
            if len(names) < _NAMES_MAX:
                names[raw_name] = name
        out.append((name, value[:-1] if value.endswith(b"\r") else value))
    return out


def _unfold(value: bytes) -> bytes:
    return _unfold_raw(value).strip(b" \t")


def _unfold_raw(value: bytes) -> bytes:
    """Folding removed; a fold's tab becomes a space (as Dovecot shows it in ENVELOPE)."""
    return value.replace(b"\r\n\t", b" ").replace(b"\n\t", b" ").replace(b"\r\n", b"").replace(b"\n", b"")


# --------------------------------------------------------------------------- structured headers

_TSPECIALS = frozenset(b'()<>@,;:\\"/[]?=')


def _skip_cfws(s: bytes, i: int) -> int:
    n = len(s)
    while i < n:
        c = s[i]
        if c in b" \t\r\n":
            i += 1
        elif c == 0x28:  # "("
            depth = 0
            while i < n:
                c = s[i]
                if c == 0x5C:
                    i += 2
                    continue
                if c == 0x28:
                    depth += 1
                elif c == 0x29:
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        else:
            break
    return i


_TOKEN = re.compile(rb'[^\x00-\x20()<>@,;:\\"/\[\]?=\x7f]*')


def _token(s: bytes, i: int) -> tuple[bytes, int]:
    m = _TOKEN.match(s, i)
    assert m is not None  # the pattern matches the empty string
    return m.group(), m.end()


_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)("?)', re.DOTALL)
_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)


def _quoted(s: bytes, i: int) -> tuple[bytes, int]:
    """The content of the quoted string whose opening quote is at `i`, and the offset after it
    (an unclosed one runs to the end)."""
    m = _QUOTED.match(s, i)
    if m is None:
        return b"", len(s)
    text = m.group(1)
    if b"\\" in text:
        text = _QUOTED_PAIR.sub(rb"\1", text)
    if b"\n" in text or b"\r" in text:
        text = text.replace(b"\r", b"").replace(b"\n", b"")
    return text, m.end()


def _parse_params(s: bytes, i: int) -> list[tuple[str, bytes]]:
    params: list[tuple[str, bytes]] = []
    while True:
        i = _skip_cfws(s, i)
        if i >= len(s):
            break
        if s[i] != 0x3B:  # ";"
            # junk: skip to the next ";"
            nxt = s.find(b";", i)
            if nxt < 0:
                break
            i = nxt
        i = _skip_cfws(s, i + 1)
        name, i = _token(s, i)
        i = _skip_cfws(s, i)
        if not name or i >= len(s) or s[i] != 0x3D:  # "="
            continue
        i = _skip_cfws(s, i + 1)
        if i < len(s) and s[i] == 0x22:
            value, i = _quoted(s, i)
        else:
            value, i = _token(s, i)
        params.append((name.decode("latin-1"), value))
    return params


def _rfc2231(params: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """Join RFC 2231 continuations (name*0, name*1*, ...), keeping order of first appearance.

    A parameter with any extended segment is shown as `name*` = "charset'lang'%XX..." (every
    segment percent-encoded), as Dovecot shows it; `decoded_param` turns that into text."""
    out: list[tuple[str, str | None]] = []
    groups: dict[str, list[tuple[int, bool, bytes]]] = {}
    for name, value in params:
        base, star, rest = name.partition("*")
        if star and (rest in ("", "*") or rest.rstrip("*").isdigit()):
            ext = name.endswith("*")
            num = int(rest.rstrip("*")) if rest.rstrip("*") else 0
            if base.lower() not in groups:
                groups[base.lower()] = []
                out.append((base, None))  # the joined value goes here
            groups[base.lower()].append((num, ext, value))
        else:
            out.append((name, value.decode("utf-8", "surrogateescape")))
    result: list[tuple[str, str]] = []
    for key, joined in out:
        if joined is not None:
            result.append((key, joined))
            continue
        segs = sorted(groups[key.lower()], key=lambda t: t[0])
        if any(ext for _, ext, _ in segs):
            pieces: list[str] = []
            for idx, (_num, ext, v) in enumerate(segs):
                text = v.decode("utf-8", "surrogateescape")
                if idx == 0 and not ext:
                    text = "''" + _pct(v)
                elif not ext:
                    text = _pct(v)
                pieces.append(text)
            result.append((key + "*", "".join(pieces)))
        else:
            result.append((key, "".join(v.decode("utf-8", "surrogateescape") for _, _, v in segs)))
    return result


def _pct(v: bytes) -> str:
    return "".join(chr(c) if (0x30 <= c <= 0x39 or 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A or c in b"-._~")
                   else f"%{c:02X}" for c in v)


def decoded_param(params: tuple[tuple[str, str], ...], name: str) -> str | None:
    """The text of parameter `name`, RFC 2231 charset decoding applied (for filenames, charsets)."""
    name = name.lower()
    for key, value in params:
        key = key.lower()
        if key == name:
            return value
        if key == name + "*":
            charset, _, rest = value.partition("'")
            _lang, _, data = rest.partition("'")
            return _decode_bytes(unquote_to_bytes(data), charset or "us-ascii")
    return None


def _content_type(value: bytes | None) -> tuple[str, str, list[tuple[str, bytes]]] | None:
    if value is None:
        return None
    i = _skip_cfws(value, 0)
    main, i = _token(value, i)
    i = _skip_cfws(value, i)
    if not main or i >= len(value) or value[i] != 0x2F:  # "/"
        return None
    i = _skip_cfws(value, i + 1)
    sub, i = _token(value, i)
    if not sub:
        return None
    return main.decode("latin-1"), sub.decode("latin-1"), _parse_params(value, i)


# --------------------------------------------------------------------------- the part tree


@dataclass(slots=True, eq=False)
class Part:
    """One MIME entity: offsets into the message's bytes, and what its MIME header says."""

    raw: bytes
    start: int          # first octet of the header
    body_start: int     # first octet of the body (after the blank line)
    end: int            # one past the last octet of the body
    depth: int
    in_digest: bool = False
    type: str = "text"        # lower case, for decisions
    subtype: str = "plain"
    shown: tuple[str, str] = ("text", "plain")   # as the header spells them, for BODYSTRUCTURE
    params: tuple[tuple[str, str], ...] = DEFAULT_PARAMS
    fields: list[tuple[str, bytes]] = field(default_factory=list)
    children: list[Part] = field(default_factory=list)
    message: Part | None = None   # the encapsulated message of a message/rfc822 part
    opaque: bool = False          # not parsed further (depth or part limit)
    first: dict[str, bytes] = field(default_factory=dict)  # name -> its first value

    def field(self, name: str) -> bytes | None:
        return self.first.get(name)

    @property
    def header(self) -> bytes:
        return self.raw[self.start:self.body_start]

    @property
    def body(self) -> memoryview:
        return memoryview(self.raw)[self.body_start:self.end]

    @property
    def multipart(self) -> bool:
        return self.type == "multipart" and not self.opaque

    @property
    def is_message(self) -> bool:
        return self.type == "message" and self.subtype == "rfc822" and self.message is not None

    def encoding(self) -> str:
        value = self.field("content-transfer-encoding")
        if value is None:
            return "7bit"
        token, _ = _token(value, _skip_cfws(value, 0))
        return token.decode("latin-1").lower() or "7bit"


class _Budget:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts = 0


def _build(raw: bytes, start: int, end: int, depth: int, budget: _Budget, *, in_digest: bool = False,
           body_start: int | None = None, fields: list[tuple[str, bytes]] | None = None) -> Part:
    """Parse the entity at [start, end): its header, type, and children."""
    budget.parts += 1
    bs = _body_start(raw, start, end) if body_start is None else body_start
    part = Part(raw, start, bs, end, depth, in_digest)
    part.fields = _fields(raw[start:bs]) if fields is None else fields
    part.first = dict(reversed(part.fields))
    ctype = _content_type(part.field("content-type"))
    if ctype is None:
        if in_digest:
            part.type, part.subtype, part.params = "message", "rfc822", ()
            part.shown = ("message", "rfc822")
    else:
        part.shown = (ctype[0], ctype[1])
        part.type, part.subtype = ctype[0].lower(), ctype[1].lower()
        part.params = tuple(_rfc2231(ctype[2]))
    boundary = decoded_param(part.params, "boundary") if part.type == "multipart" else None
    if part.type == "multipart" and not boundary:
        return part  # nothing can be cut: a multipart without parts (shown with one empty part)
    if depth + 1 >= MAX_DEPTH or budget.parts >= MAX_PARTS:
        if part.type in ("multipart", "message"):
            part.opaque = True
        return part
    if part.type == "multipart" and boundary:
        digest = part.subtype == "digest"
        for cs, ce in _split(raw, bs, end, boundary.encode("utf-8", "surrogateescape")):
            if budget.parts >= MAX_PARTS:
                break
            part.children.append(_build(raw, cs, ce, depth + 1, budget, in_digest=digest))
    elif part.type == "message" and part.subtype == "rfc822":
        # message/global stays a leaf: IMAP4rev1 (RFC 3501) has no envelope for it, most clients
        # speak rev1, and Dovecot shows it so too
        part.message = _build(raw, bs, end, depth + 1, budget)
    return part


def _split(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """[start, end) of each body part between `--boundary` lines (RFC 2046 5.1.1).

    The line break before a delimiter belongs to the delimiter. Without a closing delimiter
    the last part runs to `end`."""
    delim = b"--" + boundary
    parts: list[tuple[int, int]] = []
    part_start: int | None = None
    i = start
    while True:
        pos = raw.find(delim, i, end)
        if pos < 0:
            break
        i = pos + len(delim)
        if pos != start and raw[pos - 1] != 0x0A:
            continue
        eol = raw.find(b"\n", i, end)
        line_end = end if eol < 0 else eol
        rest = raw[i:line_end]
        closing = rest.startswith(b"--")
        if not closing and rest.strip(b" \t\r"):
            continue  # a longer boundary that merely starts with ours
        if part_start is not None:
            pe = pos
            if pe > part_start and raw[pe - 1] == 0x0A:
                pe -= 1
                if pe > part_start and raw[pe - 1] == 0x0D:
                    pe -= 1
            parts.append((part_start, max(pe, part_start)))
        if closing:
            return parts
        part_start = end if eol < 0 else eol + 1
        i = part_start
    if part_start is not None:
        parts.append((part_start, end))
    return parts


class ParsedMessage:
    """A message as IMAP sees it; the MIME tree is built on first use."""

    __slots__ = ("_first", "_root", "_top_fields", "body_start", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.body_start = _body_start(raw, 0, len(raw))
        self._top_fields: list[tuple[str, bytes]] | None = None
        self._first: dict[str, bytes] | None = None
        self._root: Part | None = None

    @property
    def fields(self) -> list[tuple[str, bytes]]:
        if self._root is not None:
            return self._root.fields
        if self._top_fields is None:
            self._top_fields = _fields(self.raw[:self.body_start])
        return self._top_fields

    def field(self, name: str) -> bytes | None:
        if self._first is None:
            self._first = dict(reversed(self.fields))
        return self._first.get(name)

    @property
    def root(self) -> Part:
        if self._root is None:
            self._root = _build(self.raw, 0, len(self.raw), 0, _Budget(), body_start=self.body_start,
                                fields=self._top_fields)
        return self._root


def parse(raw: bytes) -> ParsedMessage:
    """Wrap the raw message; never raises. Only the top-level header end is found now."""
    return ParsedMessage(bytes(raw))


# --------------------------------------------------------------------------- IMAP strings


def _safe_quoted(b: bytes, utf8: bool) -> bool:
    if b"\r" in b or b"\n" in b or b"\0" in b:
        return False
    if b.isascii():
        return True
    if not utf8:
        return False
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def quote(s: str | bytes | None, *, utf8: bool = False) -> bytes:
    """An IMAP string: quoted when safe, else a literal `{n}\\r\\n...`; NIL for None.

    8-bit text is quoted only with utf8=True and when it is valid UTF-8 (RFC 6855). NUL cannot
    appear in either form (RFC 9051 4.3), so it is dropped."""
    if s is None:
        return b"NIL"
    b = s.encode("utf-8", "surrogateescape") if isinstance(s, str) else bytes(s)
    if not b.translate(None, _PLAIN):
        return b'"' + b + b'"'
    if b"\0" in b:
        b = b.replace(b"\0", b"")
    if _safe_quoted(b, utf8):
        return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(b) + b


def _nstring(value: bytes | None, utf8: bool) -> bytes:
    return b"NIL" if value is None else quote(value, utf8=utf8)


# --------------------------------------------------------------------------- ENVELOPE

_ADDR_SPECIALS = b'()<>@,;:\\".[]'


_ADDR_TOKEN = re.compile(rb'[ \t\r\n]+|(")|(\()|(\[[^\]]*\]?)|([<>@,;:.\\\]])|([^ \t\r\n()<>@,;:\\".\[\]]+)')


def _addr_tokens(s: bytes) -> list[tuple[str, bytes]]:
    """RFC 5322 tokens: ('a', atom), ('q', quoted text), ('c', comment), ('s', special),
    ('w', whitespace: kept so a display name keeps the spacing it was written with)."""
    out: list[tuple[str, bytes]] = []
    i, n = 0, len(s)
    match = _ADDR_TOKEN.match
    while i < n:
        m = match(s, i)
        if m is None:  # cannot happen: every byte is one of the alternatives
            break
        kind = m.lastindex
        if kind is None:
            out.append(("w", b" "))
            i = m.end()
        elif kind == 1:
            text, i = _quoted(s, i)
            out.append(("q", text))
        elif kind == 2:
            j = _skip_cfws(s, i)
            inner = s[i + 1:j - 1] if j - 1 > i and s[j - 1] == 0x29 else s[i + 1:j]
            out.append(("c", inner.strip()))
            i = j
        elif kind == 4:
            out.append(("s", m.group()))
            i = m.end()
        else:
            out.append(("a", m.group()))
            i = m.end()
    return out


Address = tuple[bytes | None, bytes | None, bytes | None, bytes | None]


def _phrase(tokens: list[tuple[str, bytes]]) -> bytes | None:
    """A display name: its words (quoted ones unquoted) with one space where the header had
    whitespace, tabs as spaces, trimmed (as Dovecot shows it)."""
    out = b""
    space = False
    for k, v in tokens:
        if k == "w":
            space = True
        elif k in ("a", "q") or (k == "s" and v == b"."):
            if out and space:
                out += b" "
            out += v
            space = False
    return out.replace(b"\t", b" ").strip(b" ") or None


def _addr_spec(tokens: list[tuple[str, bytes]]) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(adl, mailbox, host) of the tokens of an addr-spec (with an optional route)."""
    adl = None
    colon = next((i for i, (k, v) in enumerate(tokens) if k == "s" and v == b":"), -1)
    if colon >= 0:
        adl = b"".join(v for k, v in tokens[:colon] if k not in ("c", "w")) or None
        tokens = tokens[colon + 1:]
    at = max((i for i, (k, v) in enumerate(tokens) if k == "s" and v == b"@"), default=-1)
    local_tokens = tokens if at < 0 else tokens[:at]
    local = b"".join(v for k, v in local_tokens if k not in ("c", "w"))  # quoted local part unquoted, as Dovecot
    host = None if at < 0 else b"".join(v for k, v in tokens[at + 1:] if k not in ("c", "w"))
    return adl, local or None, host or None


def _mailbox(tokens: list[tuple[str, bytes]]) -> Address | None:
    """One mailbox; what cannot be read is named as Dovecot names it (MISSING_MAILBOX,
    MISSING_DOMAIN, SYNTAX_ERROR for an unclosed <), so clients see the same thing from both."""
    if not any(k not in ("c", "w") for k, _ in tokens):
        return None
    lt = next((i for i, (k, v) in enumerate(tokens) if k == "s" and v == b"<"), -1)
    if lt >= 0:
        gt = next((i for i, (k, v) in enumerate(tokens) if i > lt and k == "s" and v == b">"), -1)
        name = _phrase(tokens[:lt])
        adl, mbox, host = _addr_spec(tokens[lt + 1:] if gt < 0 else tokens[lt + 1:gt])
        if gt < 0:
            host = b"SYNTAX_ERROR"
        elif name is None:
            comments = [v for k, v in tokens[gt:] if k == "c"]
            name = comments[0] if comments else None
    else:
        adl, mbox, host = _addr_spec(tokens)
        comments = [v for k, v in tokens if k == "c"]
        name = comments[-1] if comments else None
    return (name or None, adl, mbox if mbox is not None else b"MISSING_MAILBOX",
            host if host is not None else b"MISSING_DOMAIN")


_ATEXT = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+"
_DOMAIN = rb"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_NAMED_ADDR = re.compile(
    rb'[ \t]*(?:(?:([A-Za-z0-9]+(?: [A-Za-z0-9]+)*)|"([^"\\\r\n\t ](?:[^"\\\r\n\t]*[^"\\\r\n\t ])?)")[ \t]*)?'
    rb"<(" + _ATEXT + rb")@(" + _DOMAIN + rb")>[ \t]*")
_BARE_ADDR = re.compile(rb"[ \t]*(" + _ATEXT + rb")@(" + _DOMAIN + rb")[ \t]*")


def addresses(value: bytes) -> list[Address]:
    """The address list of a header as ENVELOPE wants it, groups as start/end markers."""
    simple = _simple_address(value)
    if simple is not None:
        return [simple]
    if b"," in value and not _NOT_SIMPLE.search(value):
        # a list of plain "Name <a@b>" / "a@b" with no comments, groups or escapes to split wrongly
        found: list[Address] = []
        pos, end = 0, len(value)
        while pos <= end:
            m = _LIST_ITEM.match(value, pos)
            item = _simple_address(m.group(1)) if m else None
            if m is None or item is None or (not m.group(2) and m.end() != end):
                return _tokenized_addresses(value)
            found.append(item)
            pos = m.end() if m.group(2) else end + 1
        return found
    return _tokenized_addresses(value)


_NOT_SIMPLE = re.compile(rb"[(:;\\\r\n]")
_LIST_ITEM = re.compile(rb'((?:"[^"]*"|[^,"])*)(,?)')  # one item (quotes may hold commas) and its comma


def _simple_address(value: bytes) -> Address | None:
    """The common single "Name <a@b>" / "a@b" without the tokenizer; None for anything else."""
    m = _BARE_ADDR.fullmatch(value)
    if m:
        return (None, None, m.group(1), m.group(2))
    m = _NAMED_ADDR.fullmatch(value)
    if m:
        return (m.group(1) or m.group(2), None, m.group(3), m.group(4))
    return None


def _tokenized_addresses(value: bytes) -> list[Address]:
    tokens = _addr_tokens(value)
    out: list[Address] = []
    item: list[tuple[str, bytes]] = []
    in_angle = False
    in_group = False
    for kind, v in tokens:
        if kind == "s":
            if v == b"<":
                in_angle = True
            elif v == b">":
                in_angle = False
            elif v == b":" and not in_angle and not in_group:
                out.append((None, None, _phrase(item) or b"", None))
                in_group = True
                item = []
                continue
            elif v == b";" and not in_angle and in_group:
                if (addr := _mailbox(item)) is not None:
                    out.append(addr)
                out.append((None, None, None, None))
                in_group = False
                item = []
                continue
            elif v == b"," and not in_angle:
                if (addr := _mailbox(item)) is not None:
                    out.append(addr)
                item = []
                continue
        item.append((kind, v))
    if (addr := _mailbox(item)) is not None:
        out.append(addr)
    if in_group:
        out.append((None, None, None, None))
    return out


def _address_list(value: bytes | None, utf8: bool) -> bytes:
    if value is None:
        return b"NIL"
    addrs = addresses(value)
    if not addrs:
        return b"NIL"
    return b"(" + b"".join(
        b"(" + b" ".join(_nstring(x, utf8) for x in a) + b")" for a in addrs) + b")"


def _envelope_string(value: bytes | None, utf8: bool) -> bytes:
    if value is None:
        return b"NIL"
    return quote(_unfold_raw(value).lstrip(b" \t"), utf8=utf8)


def _envelope_of(fields_of: Part | ParsedMessage, utf8: bool) -> bytes:
    get = fields_of.field
    from_ = get("from")
    sender = get("sender")
    reply_to = get("reply-to")
    if sender is None or not _unfold(sender):
        sender = from_
    if reply_to is None or not _unfold(reply_to):
        reply_to = from_
    from_list = _address_list(from_, utf8)
    items = [
        _envelope_string(get("date"), utf8),
        _envelope_string(get("subject"), utf8),
        from_list,
        from_list if sender is from_ else _address_list(sender, utf8),
        from_list if reply_to is from_ else _address_list(reply_to, utf8),
        _address_list(get("to"), utf8),
        _address_list(get("cc"), utf8),
        _address_list(get("bcc"), utf8),
        _envelope_string(get("in-reply-to"), utf8),
        _envelope_string(get("message-id"), utf8),
    ]
    return b"(" + b" ".join(items) + b")"


def envelope(msg: ParsedMessage, *, utf8: bool = False) -> bytes:
    """The ENVELOPE of RFC 9051 7.5.2 in wire form; encoded words are left as they are."""
    return _envelope_of(msg, utf8)


# --------------------------------------------------------------------------- BODYSTRUCTURE


def _params_list(params: tuple[tuple[str, str], ...], utf8: bool) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(quote(k, utf8=utf8) + b" " + quote(v, utf8=utf8) for k, v in params) + b")"


def _field_text(part: Part, name: str) -> bytes | None:
    value = part.field(name)
    if value is None:
        return None
    text = _unfold(value)
    return text or None


def _disposition(part: Part, utf8: bool) -> bytes:
    value = part.field("content-disposition")
    if value is None:
        return b"NIL"
    i = _skip_cfws(value, 0)
    kind, i = _token(value, i)
    if not kind:
        return b"NIL"
    params = tuple(_rfc2231(_parse_params(value, i)))
    return b"(" + quote(kind.decode("latin-1"), utf8=utf8) + b" " + _params_list(params, utf8) + b")"


def _language(part: Part, utf8: bool) -> bytes:
    value = part.field("content-language")
    if value is None:
        return b"NIL"
    langs = [t for t in (x.strip(b" \t\r\n") for x in re.sub(rb"\([^)]*\)", b"", value).split(b",")) if t]
    if not langs:
        return b"NIL"
    return b"(" + b" ".join(quote(x, utf8=utf8) for x in langs) + b")"


def _ext_tail(part: Part, utf8: bool) -> bytes:
    return b" ".join([_disposition(part, utf8), _language(part, utf8),
                      _nstring(_field_text(part, "content-location"), utf8)])


def _count_lines(part: Part) -> int:
    return part.raw.count(b"\n", part.body_start, part.end)


def _structure(part: Part, extended: bool, utf8: bool) -> bytes:
    if part.multipart:
        children = part.children
        if not children:
            # a multipart needs one part at least (RFC 9051 body-type-mpart): an empty text one
            inner = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0'
            inner += b" NIL NIL NIL NIL)" if extended else b")"
        else:
            inner = b"".join(_structure(c, extended, utf8) for c in children)
        out = inner + b" " + quote(part.shown[1], utf8=utf8)
        if extended:
            params = tuple(p for p in part.params)
            out += b" " + _params_list(params, utf8) + b" " + _ext_tail(part, utf8)
        return b"(" + out + b")"
    if part.opaque:
        main, sub, params = "application", "octet-stream", part.params
    else:
        (main, sub), params = part.shown, part.params
    if part.type == "text" and not part.opaque and decoded_param(params, "charset") is None:
        params = (*params, *DEFAULT_PARAMS)  # RFC 2045 5.2 default, spelled out as Dovecot does
    items = [quote(main, utf8=utf8), quote(sub, utf8=utf8), _params_list(params, utf8),
             _nstring(_field_text(part, "content-id"), utf8),
             _nstring(_field_text(part, "content-description"), utf8),
             quote(_cte_text(part), utf8=utf8),
             b"%d" % (part.end - part.body_start)]
    if not part.opaque and part.is_message and part.message is not None:
        items.append(_envelope_of(part.message, utf8))
        items.append(_structure(part.message, extended, utf8))
        items.append(b"%d" % _count_lines(part))
    elif part.type == "text" and not part.opaque:
        items.append(b"%d" % _count_lines(part))
    if extended:
        items.append(_nstring(_field_text(part, "content-md5"), utf8))
        items.append(_ext_tail(part, utf8))
    return b"(" + b" ".join(items) + b")"


def _cte_text(part: Part) -> str:
    value = part.field("content-transfer-encoding")
    if value is None:
        return "7bit"
    token, _ = _token(value, _skip_cfws(value, 0))
    return token.decode("latin-1") or "7bit"


def bodystructure(msg: ParsedMessage, *, extended: bool = True, utf8: bool = False) -> bytes:
    """BODYSTRUCTURE (extended=True) or BODY (False) in wire form (RFC 9051 7.5.2)."""
    return _structure(msg.root, extended, utf8)


# --------------------------------------------------------------------------- sections


def _resolve(root: Part, numbers: list[int]) -> Part | None:
    """The part a dotted section number names (RFC 9051 6.4.5).

    In a message (the top one, or one encapsulated in a message/rfc822 part) the numbers count
    the parts of its multipart body; a message that is not multipart has only part 1, its body."""
    part = root
    in_message = True
    child = False
    for n in numbers:
        if n < 1:
            return None
        if not in_message and part.is_message and part.message is not None:
            part = part.message
            in_message = True
        if part.multipart:
            if n > len(part.children):
                return None
            part = part.children[n - 1]
            child = True
            in_message = False
            continue
        # a message that is not multipart has only part 1; so has a leaf of a multipart
        # (Dovecot answers BODY[2.1] with part 2)
        if n != 1 or not (in_message or child):
            return None
        in_message = child = False
    return part


def _header_fields(header: bytes, names: set[str], negate: bool) -> bytes:
    out = bytearray()
    lines = header.split(b"\n")
    keep = False
    for line in lines:
        if not line or line in (b"\r",):
            continue
        if line[:1] in (b" ", b"\t"):
            if keep:
                out += line + (b"\n" if line.endswith(b"\r") else b"\r\n")
            continue
        colon = line.find(b":")
        name = line[:colon].strip().decode("latin-1").lower() if colon > 0 else None
        keep = name is not None and ((name in names) != negate)
        if keep:
            out += line + (b"\n" if line.endswith(b"\r") else b"\r\n")
    if not negate or header.endswith(b"\n\r\n") or header.endswith(b"\n\n") or header in (b"\r\n", b"\n"):
        out += b"\r\n"  # HEADER.FIELDS always ends with the blank line; .NOT keeps the header's own
    return bytes(out)


_FIELDS_RE = re.compile(r"^HEADER\.FIELDS(\.NOT)?\s*\((.*)\)\s*$", re.IGNORECASE | re.DOTALL)


def section(msg: ParsedMessage, spec: str) -> bytes | None:
    """The octets of BODY[spec]; None when the part does not exist.

    spec is what is inside the brackets: "", "HEADER", "TEXT", "1", "1.2.MIME", "2.HEADER",
    "HEADER.FIELDS (FROM TO)", "1.HEADER.FIELDS.NOT (X)". A partial <o.n> is the caller's."""
    raw = msg.raw
    spec = spec.strip()
    if spec == "":
        return raw
    numbers: list[int] = []
    rest = spec
    while rest and rest[0].isdigit():
        num, dot, tail = rest.partition(".")
        if not num.isdigit():
            return None
        numbers.append(int(num))
        rest = tail
        if not dot:
            break
    text = rest.upper()
    if numbers:
        part = _resolve(msg.root, numbers)
        if part is None:
            return None
        if not text:
            return raw[part.body_start:part.end]
        if text == "MIME":
            return raw[part.start:part.body_start]
        if not part.is_message or part.message is None:
            return None
        start, bs, end = part.message.start, part.message.body_start, part.message.end
    else:
        start, bs, end = 0, msg.body_start, len(raw)
    if text == "HEADER":
        return raw[start:bs]
    if text == "TEXT":
        return raw[bs:end]
    m = _FIELDS_RE.match(rest)
    if m:
        names = {n.strip('"').lower() for n in m.group(2).split() if n.strip('"')}
        return _header_fields(raw[start:bs], names, bool(m.group(1)))
    return None


# --------------------------------------------------------------------------- BINARY


def _part_for_binary(msg: ParsedMessage, part: str) -> Part | None:
    if part in ("",):
        return None
    try:
        numbers = [int(x) for x in part.split(".")]
    except ValueError:
        return None
    return _resolve(msg.root, numbers)


def _decode_cte(data: bytes, cte: str) -> bytes:
    if cte in ("7bit", "8bit", "binary", ""):
        return data
    if cte == "base64":
        clean = bytes(c for c in data if c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
        clean = clean[: len(clean) - len(clean) % 4] if len(clean) % 4 == 1 else clean
        clean += b"=" * (-len(clean) % 4)
        try:
            return base64.b64decode(clean)
        except (binascii.Error, ValueError):
            return b""
    if cte == "quoted-printable":
        return quopri.decodestring(data)
    raise UnknownTransferEncoding(cte)


def binary(msg: ParsedMessage, part: str) -> bytes | None:
    """The decoded content of BINARY[part] (RFC 3516); "" is the whole message.

    Raises UnknownTransferEncoding for a CTE other than 7bit/8bit/binary/base64/quoted-printable."""
    if part == "":
        return msg.raw
    p = _part_for_binary(msg, part)
    if p is None:
        return None
    data = msg.raw[p.body_start:p.end]
    if p.multipart:
        return data  # a multipart has no transfer encoding of its own (RFC 2045 6.4)
    return _decode_cte(data, p.encoding())


def binary_size(msg: ParsedMessage, part: str) -> int | None:
    data = binary(msg, part)
    return None if data is None else len(data)


# --------------------------------------------------------------------------- SEARCH text

_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(rb"(=\?[^?\s]+\?[QqBb]\?[^?\s]*\?=)[ \t\r\n]+(?==\?[^?\s]+\?[QqBb]\?[^?\s]*\?=)")


def _decode_bytes(data: bytes, charset: str) -> str:
    charset = charset.partition("*")[0].strip().lower() or "us-ascii"
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    if charset in ("us-ascii", "ascii"):
        charset = "utf-8"  # 8-bit text labelled ASCII is almost always UTF-8
    try:
        return data.decode(charset)
    except UnicodeDecodeError:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode(charset if charset != "utf-8" else "latin-1", "replace")
    except Exception:  # a broken codec: best effort
        return data.decode("latin-1")


def _decode_word(m: re.Match[bytes]) -> str:
    charset = m.group(1).decode("latin-1")
    enc = m.group(2).upper()
    text = m.group(3)
    if enc == b"B":
        text += b"=" * (-len(text) % 4)
        try:
            data = base64.b64decode(text)
        except (binascii.Error, ValueError):
            return _decode_bytes(m.group(0), "utf-8")
    else:
        data = quopri.decodestring(text.replace(b"_", b" "), header=True)
    return _decode_bytes(data, charset)


def decode_words(value: bytes) -> str:
    """Unfold a header value and decode its RFC 2047 encoded words (unknown charsets best effort);
    text between encoded words is UTF-8, or Latin-1 where it is not valid UTF-8."""
    value = _unfold(value)
    if b"=?" not in value:
        return _decode_bytes(value, "utf-8")
    value = _BETWEEN_WORDS.sub(rb"\1", value)
    out: list[str] = []
    pos = 0
    for m in _ENCODED_WORD.finditer(value):
        out.append(_decode_bytes(value[pos:m.start()], "utf-8"))
        out.append(_decode_word(m))
        pos = m.end()
    out.append(_decode_bytes(value[pos:], "utf-8"))
    return "".join(out)


def header_values(msg: ParsedMessage, name: str) -> list[str]:
    """Every value of header `name` of the message, unfolded and RFC 2047-decoded."""
    key = name.lower()
    return [decode_words(v) for k, v in msg.fields if k == key]


def _part_text(part: Part, out: list[str], own_header: bool, mime_headers: bool) -> None:
    if own_header:
        out.append("\n".join(f"{k}: {decode_words(v)}" for k, v in part.fields))
    if part.multipart:
        for child in part.children:
            _part_text(child, out, mime_headers, mime_headers)
        return
    if part.is_message and part.message is not None:
        _part_text(part.message, out, True, mime_headers)  # an encapsulated header is body text
        return
    if part.type != "text" or part.opaque:
        return
    try:
        data = _decode_cte(part.raw[part.body_start:part.end], part.encoding())
    except UnknownTransferEncoding:
        data = part.raw[part.body_start:part.end]
    out.append(_decode_bytes(data, decoded_param(part.params, "charset") or "us-ascii"))


def text_content(msg: ParsedMessage, *, headers: bool) -> str:
    """The message's text for SEARCH BODY (headers=False) or TEXT (True, with the header and the
    MIME header fields of the parts, RFC 9051 6.4.4): text/* parts with their transfer encoding and
    charset decoded, encapsulated messages (their header too) included."""
    out: list[str] = []
    _part_text(msg.root, out, headers, headers)
    return "\n".join(out)


def date_header(msg: ParsedMessage) -> datetime | None:
    """The Date: header as an aware datetime (UTC when the zone is -0000), None if absent or bad."""
    value = msg.field("date")
    if value is None:
        return None
    try:
        when = parsedate_to_datetime(_unfold(value).decode("latin-1"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- base subject

_WS = re.compile(r"[ \t\r\n]+")
_BLOB = r"\[[^\[\]]*\] *"
_LEADER = re.compile(rf"(?:(?:{_BLOB})*(?:re|fwd?) *(?:{_BLOB})?:| +)", re.IGNORECASE)
_LEADING_BLOB = re.compile(_BLOB)


def base_subject(subject: str) -> str:
    """The base subject of RFC 5256 section 2.1 (used by SORT SUBJECT and THREAD).

    Works on two offsets into the string, never re-slicing it, so a hostile subject of many
    "re:" or "[fwd:" layers costs linear time."""
    if "=?" in subject:
        subject = decode_words(subject.encode("utf-8", "surrogateescape"))
    s = _WS.sub(" ", subject)                                     # (1)
    low = s.lower()
    lo, hi = 0, len(s)
    while True:
        while True:                                               # (2)
            while hi > lo and s[hi - 1] == " ":
                hi -= 1
            if hi - lo >= 5 and low.endswith("(fwd)", lo, hi):
                hi -= 5
                continue
            break
        while True:
            before = lo
            while (m := _LEADER.match(s, lo, hi)) and m.end() > lo:  # (3)
                lo = m.end()
            m = _LEADING_BLOB.match(s, lo, hi)                    # (4)
            if m and m.end() < hi:
                lo = m.end()
            if lo == before:                                      # (5)
                break
        if hi - lo >= 6 and low.startswith("[fwd:", lo, hi) and s[hi - 1] == "]":  # (6)
            lo, hi = lo + 5, hi - 1
            continue
        return s[lo:hi]

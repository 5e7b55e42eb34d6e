"""The IMAP server protocol core, sans-IO (like smtp/protocol.py): bytes in, typed commands out.

Feed it bytes with `receive_data()`, pull commands with `next_command(now)`, answer them with
`untagged()` / `tagged()` / `continuation()`, and send what `data_to_send()` returns. It owns
the framing (lines, synchronising and non-synchronising literals with their "+" continuation),
every limit (line length, literal size, commands per second, errors), the parser (typed
commands: sequence sets, FETCH items, the SEARCH key tree, STORE, LIST, STATUS, APPEND...), the
state rules (one table, `_LEGAL`) and the capability list. It never touches a socket, clock or
file: the time of a command is the `now` its caller passes.

Commands it can answer alone (CAPABILITY, syntax errors, a command not legal in this state, a
literal over the limit) never come out of `next_command`; their error replies are kept with the
reason (`take_errors()`) for the session's `event=reject` line.

IMAP's grammar is hand-parsed: the Python IMAP libraries are clients (imaplib, imapclient) and
parse responses, not commands, so no library can parse what a client sends a server.
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Final, Union


class State(enum.Enum):
    NOT_AUTHENTICATED = "not-authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"


NEED_DATA: Final = _Sentinel.NEED_DATA
CLOSED: Final = _Sentinel.CLOSED

NA, AU, SE = State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED
_ANY = frozenset({NA, AU, SE})
_AUTH = frozenset({AU, SE})
_SEL = frozenset({SE})
# Which command runs in which state: the one place that decides (RFC 9051 6.1-6.4).
_LEGAL: dict[str, frozenset[State]] = {
    "CAPABILITY": _ANY, "NOOP": _ANY, "LOGOUT": _ANY, "ID": _ANY,
    "STARTTLS": frozenset({NA}), "AUTHENTICATE": frozenset({NA}), "LOGIN": frozenset({NA}),
    "ENABLE": _AUTH, "SELECT": _AUTH, "EXAMINE": _AUTH, "CREATE": _AUTH, "DELETE": _AUTH,
    "RENAME": _AUTH, "SUBSCRIBE": _AUTH, "UNSUBSCRIBE": _AUTH, "LIST": _AUTH, "LSUB": _AUTH,
    "NAMESPACE": _AUTH, "STATUS": _AUTH, "APPEND": _AUTH, "IDLE": _AUTH, "COMPRESS": _AUTH,
    "CHECK": _SEL, "CLOSE": _SEL, "UNSELECT": _SEL, "EXPUNGE": _SEL, "SEARCH": _SEL, "FETCH": _SEL,
    "STORE": _SEL, "COPY": _SEL, "MOVE": _SEL, "UID": _SEL, "SORT": _SEL, "THREAD": _SEL,
}

PRE_AUTH_LITERAL = 8192  # before login a literal is a user name or password

# Sent to every client before login (and in the greeting).
BASE_CAPABILITIES = ("IMAP4rev1", "IMAP4rev2", "SASL-IR", "LITERAL+", "ID", "ENABLE", "IDLE")


@dataclass(frozen=True, slots=True)
class Limits:
    line_length: int = 65536  # one command line, octets incl. CRLF (RFC 7162 3.2.6: at least 8192)
    literal_size: int = 26_214_400  # one literal (an APPENDed message): larger gets NO [TOOBIG]
    commands_per_second: float = 200.0  # sustained, with a burst of the same size; then BYE
    max_errors: int = 50  # BAD replies in one session before BYE


class SyntaxErr(Exception):
    """A command that breaks the grammar: answered BAD with this text."""


class Unsupported(SyntaxErr):
    """Well-formed but not something this server does: answered NO with a response code."""

    def __init__(self, reason: str, code: str):
        super().__init__(reason)
        self.code = code


# ---------------------------------------------------------------- values


STAR: Final = -1  # "*" in a sequence set: the largest number in use


@dataclass(frozen=True, slots=True)
class SeqSet:
    """A sequence set (RFC 9051 9): ranges whose ends may be STAR, or `$` (RFC 5182 saved result)."""

    ranges: tuple[tuple[int, int], ...] = ()
    saved: bool = False

    @classmethod
    def parse(cls, text: str) -> SeqSet:
        if text == "$":
            return cls((), True)
        ranges = []
        for part in text.split(","):
            lo, sep, hi = part.partition(":")
            a = _seq_number(lo)
            b = _seq_number(hi) if sep else a
            ranges.append((a, b))
        return cls(tuple(ranges))

    def text(self) -> str:
        if self.saved:
            return "$"
        out = []
        for a, b in self.ranges:
            sa, sb = ("*" if a == STAR else str(a)), ("*" if b == STAR else str(b))
            out.append(sa if a == b else f"{sa}:{sb}")
        return ",".join(out)

    def contains(self, n: int, largest: int) -> bool:
        for a, b in self.ranges:
            a = largest if a == STAR else a
            b = largest if b == STAR else b
            if min(a, b) <= n <= max(a, b):
                return True
        return False

    def iterate(self, largest: int) -> Iterator[int]:
        """The numbers named, each once, ascending, capped at `largest` (for message sequence numbers)."""
        seen: set[int] = set()
        for a, b in self.ranges:
            a = largest if a == STAR else a
            b = largest if b == STAR else b
            lo, hi = max(min(a, b), 1), min(max(a, b), largest)  # "*" of an empty folder is nothing
            seen.update(range(lo, hi + 1))
        return iter(sorted(seen))


def _seq_number(s: str) -> int:
    if s == "*":
        return STAR
    if not s.isdigit() or s.startswith("0") or not s.isascii() or int(s) > 0xFFFFFFFF:
        raise SyntaxErr(f"bad sequence number {s!r}")
    return int(s)


def _number(s: object, what: str, nz: bool = False, bits: int = 32) -> int:
    if not isinstance(s, str) or not s.isdigit() or not s.isascii() or int(s) >= 1 << bits or (nz and int(s) == 0):
        raise SyntaxErr(f"{what}: expected a number")
    return int(s)


# ---------------------------------------------------------------- tokens


@dataclass(frozen=True, slots=True)
class Atom:
    text: str


@dataclass(frozen=True, slots=True)
class Str:
    data: bytes
    literal: bool = False
    binary: bool = False  # literal8 ~{n}


Token = Union[Atom, Str, "list[Token]"]


def tokenize(parts: list[bytes]) -> list[Token]:
    """Lex a command: `parts` alternates line text and literal data (the `{n}` marker removed)."""
    root: list[Token] = []
    stack: list[list[Token]] = [root]
    for i, part in enumerate(parts):
        if i % 2:
            marker = parts[i - 1]
            stack[-1].append(Str(part, literal=True, binary=marker.endswith(b"~")))
            continue
        text = part[:-1] if part.endswith(b"~") and i + 1 < len(parts) else part
        _lex_line(text, stack)
    if len(stack) != 1:
        raise SyntaxErr("unbalanced parentheses")
    return root


def _lex_line(line: bytes, stack: list[list[Token]]) -> None:
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c == 0x20:
            i += 1
        elif c == 0x28:  # (
            new: list[Token] = []
            stack[-1].append(new)
            stack.append(new)
            i += 1
        elif c == 0x29:  # )
            if len(stack) == 1:
                raise SyntaxErr("unbalanced parentheses")
            stack.pop()
            i += 1
        elif c == 0x22:  # "
            out = bytearray()
            i += 1
            while True:
                if i >= n:
                    raise SyntaxErr("unterminated quoted string")
                ch = line[i]
                if ch == 0x5C:
                    if i + 1 >= n or line[i + 1] not in (0x22, 0x5C):
                        raise SyntaxErr("bad escape in quoted string")
                    out.append(line[i + 1])
                    i += 2
                elif ch == 0x22:
                    i += 1
                    break
                else:
                    out.append(ch)
                    i += 1
            stack[-1].append(Str(bytes(out)))
        elif c < 0x20 or c == 0x7F:
            raise SyntaxErr("control character in command")
        else:
            start = i
            depth = 0
            while i < n:
                ch = line[i]
                if ch == 0x5B:
                    depth += 1
                elif ch == 0x5D and depth:
                    depth -= 1
                elif depth == 0 and ch in (0x20, 0x28, 0x29, 0x22):
                    break
                elif ch < 0x20 or ch == 0x7F:
                    raise SyntaxErr("control character in command")
                i += 1
            if depth:
                raise SyntaxErr("unbalanced brackets")
            try:
                stack[-1].append(Atom(line[start:i].decode("utf-8")))
            except UnicodeDecodeError:
                raise SyntaxErr("atom is not UTF-8") from None


# ---------------------------------------------------------------- modified UTF-7 (RFC 3501 5.1.3)


def mutf7_encode(name: str) -> bytes:
    out = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.extend(b"&" + base64.b64encode(raw).rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.extend(b"&-" if ch == "&" else ch.encode())
        else:
            pending.append(ch)
    flush()
    return bytes(out)


def mutf7_decode(raw: bytes) -> str:
    out = []
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == 0x26:  # &
            end = raw.find(b"-", i)
            if end < 0:
                raise SyntaxErr("bad modified UTF-7 in mailbox name")
            chunk = raw[i + 1:end]
            if not chunk:
                out.append("&")
            else:
                b = chunk.replace(b",", b"/")
                try:
                    out.append(base64.b64decode(b + b"=" * (-len(b) % 4), validate=True).decode("utf-16-be"))
                except (ValueError, UnicodeDecodeError):
                    raise SyntaxErr("bad modified UTF-7 in mailbox name") from None
            i = end + 1
        elif 0x20 <= c <= 0x7E:
            out.append(chr(c))
            i += 1
        else:
            raise SyntaxErr("8-bit mailbox name (use modified UTF-7, or ENABLE UTF8=ACCEPT)")
    return "".join(out)


# ---------------------------------------------------------------- response encoding


_ATOM_SAFE = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\\]]+\Z")


def quoted(value: str | bytes | None, *, utf8: bool = False) -> bytes:
    """An IMAP string: quoted when it can be, else a literal; NIL for None."""
    if value is None:
        return b"NIL"
    data = value.encode("utf-8") if isinstance(value, str) else value
    if b"\r" in data or b"\n" in data or b"\0" in data or (not utf8 and any(c > 0x7E for c in data)) \
            or len(data) > 1024:
        return b"{%d}\r\n" % len(data) + data
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def astring(value: str, *, utf8: bool = False) -> bytes:
    data = value.encode("utf-8")
    if data and _ATOM_SAFE.match(data) and data.upper() != b"NIL":
        return data
    return quoted(data, utf8=utf8)


def mailbox_name(name: str, *, utf8: bool = False) -> bytes:
    """A mailbox name on the wire: modified UTF-7 unless UTF8=ACCEPT is enabled; always quoted."""
    if name.upper() == "INBOX":
        return b"INBOX"
    data = name.encode("utf-8") if utf8 else mutf7_encode(name)
    return quoted(data, utf8=utf8)


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def date_time(ts: float, offset_minutes: int = 0) -> bytes:
    """INTERNALDATE: "dd-Mon-yyyy hh:mm:ss +zzzz"."""
    tz = timezone(timedelta(minutes=offset_minutes))
    d = datetime.fromtimestamp(ts, tz)
    sign = "+" if offset_minutes >= 0 else "-"
    off = abs(offset_minutes)
    return (f'"{d.day:2d}-{_MONTHS[d.month - 1]}-{d.year:04d} {d.hour:02d}:{d.minute:02d}:{d.second:02d} '
            f'{sign}{off // 60:02d}{off % 60:02d}"').encode()


def parse_date_time(text: str) -> float:
    """APPEND's date-time → POSIX time."""
    m = re.fullmatch(r" ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)", text)
    if not m:
        raise SyntaxErr("bad date-time")
    mon = _month(m.group(2))
    try:
        d = datetime(int(m.group(3)), mon, int(m.group(1)), int(m.group(4)), int(m.group(5)), int(m.group(6)),
                     tzinfo=timezone((1 if m.group(7) == "+" else -1)
                                     * timedelta(hours=int(m.group(8)), minutes=int(m.group(9)))))
    except ValueError:
        raise SyntaxErr("bad date-time") from None
    return d.timestamp()


def _month(name: str) -> int:
    try:
        return [m.lower() for m in _MONTHS].index(name.lower()) + 1
    except ValueError:
        raise SyntaxErr(f"bad month {name!r}") from None


def parse_date(text: str) -> datetime:
    """A SEARCH date (d-Mon-yyyy) as a naive date at midnight."""
    m = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", text)
    if not m:
        raise SyntaxErr(f"bad date {text!r}")
    try:
        return datetime(int(m.group(3)), _month(m.group(2)), int(m.group(1)))
    except ValueError:
        raise SyntaxErr(f"bad date {text!r}") from None


def flag_list(flags: Iterable[str]) -> bytes:
    return b"(" + " ".join(flags).encode() + b")"


# ---------------------------------------------------------------- commands


@dataclass(slots=True)
class Command:
    tag: str
    name: str  # upper case; "UID FETCH" etc. for UID variants
    uid: bool = False


@dataclass(slots=True)
class Simple(Command):
    """A command without arguments (NOOP, LOGOUT, CHECK, CLOSE, UNSELECT, EXPUNGE, IDLE, NAMESPACE,
    STARTTLS)."""


@dataclass(slots=True)
class Login(Command):
    username: str = ""
    password: str = ""


@dataclass(slots=True)
class Authenticate(Command):
    mechanism: str = ""
    initial: str | None = None  # SASL-IR, base64 text ("=" for empty)


@dataclass(slots=True)
class Enable(Command):
    capabilities: tuple[str, ...] = ()


@dataclass(slots=True)
class Id(Command):
    fields: dict[str, str | None] | None = None


@dataclass(slots=True)
class Select(Command):
    mailbox: str = ""
    condstore: bool = False
    qresync: tuple[int, int, SeqSet | None, tuple[SeqSet, SeqSet] | None] | None = None  # uidvalidity, modseq...


@dataclass(slots=True)
class MailboxCommand(Command):
    """CREATE, DELETE, SUBSCRIBE, UNSUBSCRIBE (and RENAME with `new`)."""

    mailbox: str = ""
    new: str = ""
    special_use: tuple[str, ...] = ()


@dataclass(slots=True)
class ListCommand(Command):
    reference: str = ""
    patterns: tuple[str, ...] = ()
    selection: frozenset[str] = frozenset()  # SUBSCRIBED REMOTE RECURSIVEMATCH SPECIAL-USE
    returns: frozenset[str] = frozenset()  # SUBSCRIBED CHILDREN SPECIAL-USE
    status: tuple[str, ...] = ()  # RETURN (STATUS (...)) of LIST-STATUS
    lsub: bool = False


@dataclass(slots=True)
class Status(Command):
    mailbox: str = ""
    items: tuple[str, ...] = ()


@dataclass(slots=True)
class AppendMessage:
    flags: tuple[str, ...]
    internaldate: float | None
    data: bytes  # the message, or b"" with `catenate`
    catenate: tuple[tuple[str, bytes | str], ...] = ()  # ("TEXT", bytes) / ("URL", url)
    binary: bool = False


@dataclass(slots=True)
class Append(Command):
    mailbox: str = ""
    messages: list[AppendMessage] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FetchItem:
    name: str  # FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE BODY UID MODSEQ RFC822 RFC822.HEADER
    # RFC822.TEXT BODY[] BINARY BINARY.SIZE
    section: str | None = None  # inside [...] (upper-cased part names, field names kept)
    partial: tuple[int, int] | None = None
    peek: bool = False

    def label(self) -> str:
        """The item's name in the response (no .PEEK; partial shows only its origin)."""
        if self.section is None:
            return self.name
        base = f"{self.name}[{self.section}]"
        return base + (f"<{self.partial[0]}>" if self.partial else "")


@dataclass(slots=True)
class Fetch(Command):
    sequence: SeqSet = field(default_factory=SeqSet)
    items: tuple[FetchItem, ...] = ()
    changedsince: int | None = None
    vanished: bool = False


@dataclass(slots=True)
class Store(Command):
    sequence: SeqSet = field(default_factory=SeqSet)
    mode: str = "="  # "+", "-", "="
    silent: bool = False
    flags: tuple[str, ...] = ()
    unchangedsince: int | None = None


@dataclass(slots=True)
class CopyMove(Command):
    sequence: SeqSet = field(default_factory=SeqSet)
    mailbox: str = ""


@dataclass(slots=True)
class Expunge(Command):
    sequence: SeqSet | None = None  # UID EXPUNGE's set


@dataclass(frozen=True, slots=True)
class Key:
    """One SEARCH key; `op` is the keyword (ALL, SEEN, FROM, HEADER, SEQ, UID, OR, NOT, AND, ...)."""

    op: str
    value: object = None


@dataclass(slots=True)
class Search(Command):
    charset: str | None = None
    key: Key = field(default_factory=lambda: Key("ALL"))
    returns: tuple[str, ...] | None = None  # ESEARCH RETURN (...); None: a plain SEARCH
    sort: tuple[str, ...] = ()  # SORT criteria (REVERSE kept as a prefix "REVERSE ARRIVAL")
    thread: str = ""  # THREAD algorithm


@dataclass(slots=True)
class Compress(Command):
    mechanism: str = ""


Parsed = (Simple | Login | Authenticate | Enable | Id | Select | MailboxCommand | ListCommand | Status | Append
          | Fetch | Store | CopyMove | Expunge | Search | Compress | Command)


# ---------------------------------------------------------------- events other than commands


@dataclass(slots=True)
class AuthResponse:
    """A line answering an AUTHENTICATE challenge (base64, or "*" to cancel)."""

    tag: str
    line: str


@dataclass(slots=True)
class IdleDone:
    tag: str


@dataclass(slots=True)
class ProtocolError:
    tag: str
    reason: str
    response: bytes


Event = Parsed | AuthResponse | IdleDone


# ---------------------------------------------------------------- the connection


class _Mode(enum.Enum):
    COMMAND = 1
    AUTH = 2  # waiting for an AUTHENTICATE response line
    IDLE = 3  # waiting for DONE


_TAG = re.compile(r"[!#$&'\-\[\]-~,./0-9:;<=>?@A-Z^_`a-z|]+")  # ASTRING-CHAR but "+" (RFC 9051 9)
_LITERAL_AT_END = re.compile(rb"(~?)\{(\d{1,20})(\+|-)?\}\Z")


class IMAPServerConnection:
    def __init__(self, limits: Limits = Limits(), *, tls_available: bool, tls_active: bool,
                 auth_mechanisms: tuple[str, ...] = ("PLAIN",),
                 extensions: tuple[str, ...] = ()):
        self.limits = limits
        self.tls_available = tls_available
        self.tls_active = tls_active
        self.auth_mechanisms = auth_mechanisms
        self.extensions = extensions  # after login: what the session implements
        self.state = State.NOT_AUTHENTICATED
        self.utf8 = False  # UTF8=ACCEPT enabled
        self.errors = 0
        self._in = bytearray()
        self._out = bytearray()
        self._errors: list[ProtocolError] = []
        self._mode = _Mode.COMMAND
        self._pending_tag = ""
        # the command being framed: parts alternate line text and literal data
        self._parts: list[bytes] = []
        self._need_literal: int | None = None
        self._discard = 0  # bytes of an over-large non-synchronising literal still to skip
        self._skip_line = False
        self._command_size = 0  # literal octets of the command being framed
        self._bucket = limits.commands_per_second
        self._bucket_time: float | None = None
        self.closed = False

    # ---- I/O with the session ----

    def receive_data(self, data: bytes) -> None:
        self._in += data

    @property
    def unprocessed(self) -> int:
        return len(self._in)

    @property
    def pending_output(self) -> int:
        return len(self._out)

    def take_input(self) -> bytes:
        """The bytes received but not parsed (COMPRESS: they were compressed; the session inflates them)."""
        data = bytes(self._in)
        self._in.clear()
        return data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def take_errors(self) -> tuple[ProtocolError, ...]:
        errors = tuple(self._errors)
        self._errors.clear()
        return errors

    # ---- responses ----

    def greeting(self, text: str = "yuubin IMAP ready") -> None:
        self._out += b"* OK [CAPABILITY " + " ".join(self.capabilities()).encode() + b"] " + text.encode() + b"\r\n"

    def untagged(self, data: bytes) -> None:
        self._out += b"* " + data + b"\r\n"

    def tagged(self, tag: str, status: str, text: str, code: str | None = None) -> None:
        self._out += f"{tag} {status} ".encode() + (f"[{code}] ".encode() if code else b"") \
            + text.encode("utf-8", "replace") + b"\r\n"

    def continuation(self, data: bytes = b"") -> None:
        self._out += b"+ " + data + b"\r\n"

    def bye(self, text: str) -> None:
        self._out += b"* BYE " + text.encode() + b"\r\n"
        self.close()

    def close(self) -> None:
        self.closed = True
        self.state = State.LOGOUT

    def bad(self, tag: str, reason: str, code: str | None = None) -> None:
        """BAD from the core or the session: counted towards max_errors and kept for the log."""
        self.tagged(tag or "*", "BAD", reason, code)
        self._note_error(tag, reason, "BAD")

    def refuse(self, tag: str, reason: str, code: str | None = None) -> None:
        """NO the session logs as a refusal (not counted as a protocol error)."""
        self.tagged(tag, "NO", reason, code)
        self._errors.append(ProtocolError(tag, reason, b"NO"))

    def _note_error(self, tag: str, reason: str, kind: str) -> None:
        self._errors.append(ProtocolError(tag, reason, kind.encode()))
        self.errors += 1
        if self.errors >= self.limits.max_errors and not self.closed:
            self.bye("too many errors")
            self._errors.append(ProtocolError(tag, f"{self.errors} errors (limits max_errors)", b"BYE"))

    def capabilities(self) -> list[str]:
        caps = list(BASE_CAPABILITIES)
        if self.state is State.NOT_AUTHENTICATED:
            if self.tls_available and not self.tls_active:
                caps.append("STARTTLS")
            if self.tls_active:
                caps += [f"AUTH={m}" for m in self.auth_mechanisms]
            else:
                caps.append("LOGINDISABLED")
        else:
            caps += [c for c in self.extensions if c not in caps]
        return caps

    # ---- state changes the session makes ----

    def set_state(self, state: State) -> None:
        self.state = state

    def tls_started(self) -> None:
        self.tls_active = True
        self._in.clear()  # anything pipelined before the handshake is not trusted (RFC 9051 11.1)

    def expect_auth_response(self, tag: str, challenge: bytes) -> None:
        self.continuation(base64.b64encode(challenge))
        self._mode = _Mode.AUTH
        self._pending_tag = tag

    def start_idle(self, tag: str) -> None:
        self.continuation(b"idling")
        self._mode = _Mode.IDLE
        self._pending_tag = tag

    @property
    def idling(self) -> bool:
        return self._mode is _Mode.IDLE

    # ---- reading ----

    def next_command(self, now: float) -> Event | _Sentinel:
        while True:
            if self.closed:
                return CLOSED
            if self._discard:
                take = min(self._discard, len(self._in))
                del self._in[:take]
                self._discard -= take
                if self._discard:
                    return NEED_DATA
                self._skip_line = True
                continue
            if self._need_literal is not None:
                if len(self._in) < self._need_literal:
                    return NEED_DATA
                n = self._need_literal
                self._parts.append(bytes(self._in[:n]))
                del self._in[:n]
                self._need_literal = None
            end = self._in.find(b"\r\n")
            if end < 0:
                if len(self._in) > self.limits.line_length:
                    return self._line_too_long()
                return NEED_DATA
            if end + 2 > self.limits.line_length:
                tag = self._tag_of(self._parts[0] if self._parts else bytes(self._in[:64]))
                del self._in[:end + 2]
                self._parts.clear()
                self.bad(tag, f"command line too long (over {self.limits.line_length} octets)")
                continue
            line = bytes(self._in[:end])
            del self._in[:end + 2]
            if self._skip_line:  # the rest of a command whose literal was refused
                m = _LITERAL_AT_END.search(line)
                self._skip_line = False
                if m and m.group(3) is not None:
                    self._discard = int(m.group(2))
                continue
            if self._mode is _Mode.AUTH:
                self._mode = _Mode.COMMAND
                return AuthResponse(self._pending_tag, line.decode("ascii", "replace"))
            if self._mode is _Mode.IDLE:
                if line.upper() == b"DONE":
                    self._mode = _Mode.COMMAND
                    return IdleDone(self._pending_tag)
                self.bad("*", "expected DONE to end IDLE")
                continue
            result = self._line(line, now)
            if result is not None:
                return result

    def _line_too_long(self) -> _Sentinel:
        tag = self._tag_of(bytes(self._in[:64]))
        self._in.clear()
        self._parts.clear()
        self.bad(tag, f"command line too long (over {self.limits.line_length} octets)")
        self.bye("command line too long")
        return CLOSED

    @staticmethod
    def _tag_of(first: bytes) -> str:
        t = first.split(b" ", 1)[0].decode("ascii", "replace")
        return t if _TAG.fullmatch(t) else "*"

    def _line(self, line: bytes, now: float) -> Event | None:
        m = _LITERAL_AT_END.search(line)
        if m:
            n = int(m.group(2))
            sync = m.group(3) is None
            first = not self._parts
            self._parts.append(line[:m.start()] + (b"~" if m.group(1) else b""))
            tag = self._tag_of(self._parts[0])
            refusal = self._literal_refusal(n, first)
            if refusal is not None:
                self._parts.clear()
                reason, code, kind = refusal
                if kind == "BAD":
                    self.bad(tag, reason)
                else:
                    self.refuse(tag, reason, code)
                if not sync:  # it is coming anyway: read it away with the rest of the command
                    self._discard = n
                return None
            self._command_size += n
            self._need_literal = n
            if sync:
                self.continuation(b"Ready for literal data")
            return None
        self._parts.append(line)
        parts, self._parts = self._parts, []
        self._command_size = 0
        return self._command(parts, now)

    def _literal_refusal(self, n: int, first: bool) -> tuple[str, str | None, str] | None:
        """Why a literal must not be read: the command cannot run here, or it is too big (before
        login, a literal can only be a user name or password: 8 KiB at most)."""
        if first:
            words = self._parts[0].split(b" ", 2)
            name = words[1].decode("ascii", "replace").upper() if len(words) > 1 else ""
            legal = _LEGAL.get(name)
            if legal is None:
                return f"unknown command {name[:30]}", None, "BAD"
            if self.state not in legal:
                return f"{name} is not allowed in the {self.state.value} state", None, "BAD"
        limit = self.limits.literal_size if self.state is not State.NOT_AUTHENTICATED else PRE_AUTH_LITERAL
        if n > limit:
            return f"literal of {n} octets is over the limit of {limit}", "TOOBIG", "NO"
        if self._command_size + n > self.limits.literal_size + self.limits.line_length:
            return (f"the literals of one command are over the limit of {self.limits.literal_size} octets",
                    "TOOBIG", "NO")
        return None

    def _command(self, parts: list[bytes], now: float) -> Event | None:
        tag = self._tag_of(parts[0])
        if not self._rate_ok(now):
            self.bad(tag, f"more than {self.limits.commands_per_second:g} commands per second")
            self.bye("too many commands per second")
            return None
        try:
            tokens = tokenize(parts)
        except SyntaxErr as e:
            self.bad(tag, f"syntax error: {e}")
            return None
        if not tokens or not isinstance(tokens[0], Atom) or tag == "*":
            self.bad("*", "missing or invalid tag")
            return None
        if len(tokens) < 2 or not isinstance(tokens[1], Atom):
            self.bad(tag, "missing command name")
            return None
        name = tokens[1].text.upper()
        args = tokens[2:]
        legal = _LEGAL.get(name)
        if legal is None:
            self.bad(tag, f"unknown command {name[:30]}")
            return None
        if self.state not in legal:
            self.bad(tag, f"{name} is not allowed in the {self.state.value} state")
            return None
        try:
            cmd = self._parse(tag, name, args)
        except Unsupported as e:
            self.refuse(tag, f"{name}: {e}", e.code)
            return None
        except SyntaxErr as e:
            self.bad(tag, f"{name}: {e}")
            return None
        if cmd is None:
            return None
        return cmd

    def _rate_ok(self, now: float) -> bool:
        rate = self.limits.commands_per_second
        if self._bucket_time is not None:
            self._bucket = min(rate, self._bucket + (now - self._bucket_time) * rate)
        self._bucket_time = now
        if self._bucket < 1:
            return False
        self._bucket -= 1
        return True

    # ---- the grammar of each command ----

    def _parse(self, tag: str, name: str, a: list[Token]) -> Parsed | None:
        if name == "CAPABILITY":
            _no_args(a)
            self.untagged(b"CAPABILITY " + " ".join(self.capabilities()).encode())
            self.tagged(tag, "OK", "CAPABILITY completed")
            return None
        if name in ("NOOP", "LOGOUT", "CHECK", "CLOSE", "UNSELECT", "IDLE", "NAMESPACE"):
            _no_args(a)
            return Simple(tag, name)
        if name == "STARTTLS":
            _no_args(a)
            if self.tls_active or not self.tls_available:
                self.bad(tag, "STARTTLS not available here" if not self.tls_active else "TLS is already active")
                return None
            return Simple(tag, name)
        if name == "LOGIN":
            if len(a) != 2:
                raise SyntaxErr("expected LOGIN username password")
            if not self.tls_active:
                self.refuse(tag, "LOGIN needs TLS first (STARTTLS)", "PRIVACYREQUIRED")
                return None
            return Login(tag, name, username=_astring(a[0]), password=_astring(a[1]))
        if name == "AUTHENTICATE":
            if not 1 <= len(a) <= 2:
                raise SyntaxErr("expected AUTHENTICATE mechanism [initial-response]")
            mech = _atom(a[0]).upper()
            if not self.tls_active:
                self.refuse(tag, "authentication needs TLS first (STARTTLS)", "PRIVACYREQUIRED")
                return None
            if mech not in self.auth_mechanisms:
                self.refuse(tag, f"mechanism {mech} not supported", "CANNOT")
                return None
            initial = _atom(a[1]) if len(a) == 2 else None
            return Authenticate(tag, name, mechanism=mech, initial=initial)
        if name == "ENABLE":
            if not a:
                raise SyntaxErr("expected capability names")
            return Enable(tag, name, capabilities=tuple(_atom(x).upper() for x in a))
        if name == "ID":
            if len(a) != 1:
                raise SyntaxErr("expected ID (params) or NIL")
            return Id(tag, name, fields=_id_params(a[0]))
        if name in ("SELECT", "EXAMINE"):
            return self._select(tag, name, a)
        if name in ("CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE"):
            if not a:
                raise SyntaxErr("expected a mailbox name")
            special: tuple[str, ...] = ()
            if name == "CREATE" and len(a) == 2 and isinstance(a[1], list):
                opts = a[1]
                if len(opts) != 2 or _atom(opts[0]).upper() != "USE" or not isinstance(opts[1], list):
                    raise SyntaxErr("expected (USE (\\Special))")
                special = tuple(_atom(x) for x in opts[1])
            elif len(a) != 1:
                raise SyntaxErr("expected one mailbox name")
            return MailboxCommand(tag, name, mailbox=self._mailbox(a[0]), special_use=special)
        if name == "RENAME":
            if len(a) != 2:
                raise SyntaxErr("expected RENAME old new")
            return MailboxCommand(tag, name, mailbox=self._mailbox(a[0]), new=self._mailbox(a[1]))
        if name in ("LIST", "LSUB"):
            return self._list(tag, name, a)
        if name == "STATUS":
            if len(a) != 2 or not isinstance(a[1], list) or not a[1]:
                raise SyntaxErr("expected STATUS mailbox (items)")
            items = tuple(_atom(x).upper() for x in a[1])
            for it in items:
                if it not in STATUS_ITEMS:
                    raise SyntaxErr(f"unknown status item {it}")
            return Status(tag, name, mailbox=self._mailbox(a[0]), items=items)
        if name == "APPEND":
            return self._append(tag, a)
        if name == "COMPRESS":
            if len(a) != 1:
                raise SyntaxErr("expected COMPRESS DEFLATE")
            return Compress(tag, name, mechanism=_atom(a[0]).upper())
        if name == "EXPUNGE":
            _no_args(a)
            return Expunge(tag, name)
        if name == "UID":
            if not a:
                raise SyntaxErr("expected UID FETCH/STORE/SEARCH/COPY/MOVE/EXPUNGE/SORT/THREAD")
            sub = _atom(a[0]).upper()
            if sub not in ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE", "SORT", "THREAD"):
                raise SyntaxErr(f"UID {sub[:20]} is not a command")
            if sub == "EXPUNGE":
                if len(a) != 2:
                    raise SyntaxErr("expected UID EXPUNGE sequence-set")
                return Expunge(tag, "EXPUNGE", uid=True, sequence=_seqset(a[1]))
            cmd = self._selected(tag, sub, a[1:])
            cmd.uid = True
            return cmd
        return self._selected(tag, name, a)

    def _selected(self, tag: str, name: str, a: list[Token]) -> Parsed:
        if name == "FETCH":
            return _fetch(tag, a)
        if name == "STORE":
            return _store(tag, a)
        if name in ("COPY", "MOVE"):
            if len(a) != 2:
                raise SyntaxErr(f"expected {name} sequence-set mailbox")
            return CopyMove(tag, name, sequence=_seqset(a[0]), mailbox=self._mailbox(a[1]))
        if name == "SEARCH":
            return _search(tag, a)
        if name == "SORT":
            if len(a) < 3 or not isinstance(a[0], list):
                raise SyntaxErr("expected SORT (criteria) charset keys")
            crit = _sort_criteria(a[0])
            cmd = _search_keys(tag, "SORT", a[2:], charset=_astring(a[1]))
            cmd.sort = crit
            return cmd
        if name == "THREAD":
            if len(a) < 3:
                raise SyntaxErr("expected THREAD algorithm charset keys")
            alg = _atom(a[0]).upper()
            if alg not in ("ORDEREDSUBJECT", "REFERENCES"):
                raise SyntaxErr(f"unknown thread algorithm {alg}")
            cmd = _search_keys(tag, "THREAD", a[2:], charset=_astring(a[1]))
            cmd.thread = alg
            return cmd
        raise SyntaxErr(f"unknown command {name}")  # pragma: no cover - the table holds only these

    def _mailbox(self, t: Token) -> str:
        if isinstance(t, list):
            raise SyntaxErr("expected a mailbox name")
        raw = t.text.encode() if isinstance(t, Atom) else t.data
        if raw.upper() == b"INBOX":
            return "INBOX"
        if self.utf8:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SyntaxErr("mailbox name is not UTF-8") from None
        return mutf7_decode(raw)

    def _select(self, tag: str, name: str, a: list[Token]) -> Select:
        if not 1 <= len(a) <= 2:
            raise SyntaxErr(f"expected {name} mailbox [(params)]")
        cmd = Select(tag, name, mailbox=self._mailbox(a[0]))
        if len(a) == 2:
            params = a[1]
            if not isinstance(params, list):
                raise SyntaxErr("expected (select-params)")
            i = 0
            while i < len(params):
                p = _atom(params[i]).upper()
                if p == "CONDSTORE":
                    cmd.condstore = True
                    i += 1
                elif p == "QRESYNC" and i + 1 < len(params) and isinstance(params[i + 1], list):
                    q = params[i + 1]
                    assert isinstance(q, list)
                    if len(q) < 2:
                        raise SyntaxErr("QRESYNC needs uidvalidity and modseq")
                    uidvalidity = _number(_atomish(q[0]), "uidvalidity", nz=True)
                    modseq = _number(_atomish(q[1]), "modseq", bits=63)
                    known = None
                    pairs = None
                    rest = q[2:]
                    if rest and not isinstance(rest[0], list):
                        known = _seqset(rest[0])
                        rest = rest[1:]
                    if rest:
                        pr = rest[0]
                        if not isinstance(pr, list) or len(pr) != 2 or len(rest) != 1:
                            raise SyntaxErr("bad QRESYNC sequence match data")
                        pairs = (_seqset(pr[0]), _seqset(pr[1]))
                    cmd.qresync = (uidvalidity, modseq, known, pairs)
                    i += 2
                else:
                    raise SyntaxErr(f"unknown select parameter {p[:30]}")
        return cmd

    def _list(self, tag: str, name: str, a: list[Token]) -> ListCommand:
        cmd = ListCommand(tag, name, lsub=name == "LSUB")
        i = 0
        if name == "LIST" and a and isinstance(a[0], list):
            cmd.selection = frozenset(_atom(x).upper() for x in a[0])
            for s in cmd.selection:
                if s not in ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"):
                    raise SyntaxErr(f"unknown selection option {s[:30]}")
            if "RECURSIVEMATCH" in cmd.selection and cmd.selection == {"RECURSIVEMATCH"}:
                raise SyntaxErr("RECURSIVEMATCH needs another selection option")
            i = 1
        if len(a) < i + 2:
            raise SyntaxErr(f"expected {name} reference pattern")
        ref = a[i]
        if isinstance(ref, list):
            raise SyntaxErr("expected a reference name")
        cmd.reference = self._mailbox(ref) if not (isinstance(ref, Str) and ref.data == b"") else ""
        pat = a[i + 1]
        pats = pat if isinstance(pat, list) and name == "LIST" else [pat]
        cmd.patterns = tuple(self._pattern(p) for p in pats)
        rest = a[i + 2:]
        if rest:
            if name != "LIST" or len(rest) != 2 or _atomish(rest[0]).upper() != "RETURN" \
                    or not isinstance(rest[1], list):
                raise SyntaxErr("expected RETURN (options)")
            opts = rest[1]
            returns = set()
            j = 0
            while j < len(opts):
                o = _atom(opts[j]).upper()
                if o == "STATUS" and j + 1 < len(opts) and isinstance(opts[j + 1], list):
                    items = tuple(_atom(x).upper() for x in opts[j + 1])  # type: ignore[union-attr]
                    for it in items:
                        if it not in STATUS_ITEMS:
                            raise SyntaxErr(f"unknown status item {it}")
                    cmd.status = items
                    j += 2
                    continue
                if o not in ("SUBSCRIBED", "CHILDREN", "SPECIAL-USE"):
                    raise SyntaxErr(f"unknown return option {o[:30]}")
                returns.add(o)
                j += 1
            cmd.returns = frozenset(returns)
        return cmd

    def _pattern(self, t: Token) -> str:
        if isinstance(t, list):
            raise SyntaxErr("expected a mailbox pattern")
        raw = t.text.encode() if isinstance(t, Atom) else t.data
        if self.utf8:
            return raw.decode("utf-8", "replace")
        return mutf7_decode(raw)

    def _append(self, tag: str, a: list[Token]) -> Append:
        if len(a) < 2:
            raise SyntaxErr("expected APPEND mailbox [flags] [date-time] literal")
        cmd = Append(tag, "APPEND", mailbox=self._mailbox(a[0]))
        i = 1
        while i < len(a):
            flags: tuple[str, ...] = ()
            date: float | None = None
            t = a[i]
            if isinstance(t, list):
                flags = tuple(_flag(x) for x in t)
                i += 1
            if i < len(a) and isinstance(a[i], Str) and not a[i].literal:  # type: ignore[union-attr]
                date = parse_date_time(a[i].data.decode("ascii", "replace"))  # type: ignore[union-attr]
                i += 1
            if i >= len(a):
                raise SyntaxErr("expected the message literal")
            t = a[i]
            if isinstance(t, Str) and t.literal:
                cmd.messages.append(AppendMessage(flags, date, t.data, binary=t.binary))
                i += 1
            elif isinstance(t, Atom) and t.text.upper() == "UTF8" and i + 1 < len(a) and isinstance(a[i + 1], list):
                inner = a[i + 1]
                assert isinstance(inner, list)
                if len(inner) != 1 or not isinstance(inner[0], Str) or not inner[0].binary:
                    raise SyntaxErr("UTF8 takes (literal8)")
                cmd.messages.append(AppendMessage(flags, date, inner[0].data, binary=True))
                i += 2
            elif isinstance(t, Atom) and t.text.upper() == "CATENATE" and i + 1 < len(a) \
                    and isinstance(a[i + 1], list):
                cat = a[i + 1]
                assert isinstance(cat, list)
                pieces: list[tuple[str, bytes | str]] = []
                j = 0
                while j + 1 < len(cat):
                    kind = _atom(cat[j]).upper()
                    val = cat[j + 1]
                    if kind == "TEXT" and isinstance(val, Str) and val.literal:
                        pieces.append(("TEXT", val.data))
                    elif kind == "URL" and not isinstance(val, list):
                        pieces.append(("URL", _astring(val)))
                    else:
                        raise SyntaxErr("bad CATENATE part")
                    j += 2
                if j != len(cat) or not pieces:
                    raise SyntaxErr("bad CATENATE list")
                cmd.messages.append(AppendMessage(flags, date, b"", tuple(pieces)))
                i += 2
            else:
                raise SyntaxErr("expected the message as a literal")
        return cmd


STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "SIZE", "HIGHESTMODSEQ", "DELETED",
                "APPENDLIMIT")


def _no_args(a: list[Token]) -> None:
    if a:
        raise SyntaxErr("takes no arguments")


def _atom(t: Token) -> str:
    if not isinstance(t, Atom):
        raise SyntaxErr("expected an atom")
    return t.text


def _atomish(t: Token) -> str:
    if isinstance(t, Atom):
        return t.text
    if isinstance(t, Str):
        return t.data.decode("utf-8", "replace")
    raise SyntaxErr("expected an atom")


def _astring(t: Token) -> str:
    if isinstance(t, Atom):
        return t.text
    if isinstance(t, Str):
        try:
            return t.data.decode("utf-8")
        except UnicodeDecodeError:
            raise SyntaxErr("string is not UTF-8") from None
    raise SyntaxErr("expected a string")


def _nstring(t: Token) -> str | None:
    if isinstance(t, Atom) and t.text.upper() == "NIL":
        return None
    return _astring(t)


def _flag(t: Token) -> str:
    f = _atom(t)
    if f.startswith("\\"):
        canon = {x.upper(): x for x in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "\\Recent")}
        c = canon.get(f.upper())
        if c is None:
            raise SyntaxErr(f"unknown system flag {f[:30]}")
        if c == "\\Recent":
            raise SyntaxErr("\\Recent cannot be set by a client")
        return c
    if not f or not re.fullmatch(r"[!#$&'+-Z^-z|~]+", f):
        raise SyntaxErr(f"bad keyword {f[:30]!r}")
    return f


def _seqset(t: Token) -> SeqSet:
    if not isinstance(t, Atom):
        raise SyntaxErr("expected a sequence set")
    return SeqSet.parse(t.text)


def _id_params(t: Token) -> dict[str, str | None] | None:
    if isinstance(t, Atom) and t.text.upper() == "NIL":
        return None
    if not isinstance(t, list) or len(t) % 2:
        raise SyntaxErr("expected (field value ...)")
    out: dict[str, str | None] = {}
    for k, v in zip(t[::2], t[1::2], strict=True):
        if not isinstance(k, Str):
            raise SyntaxErr("ID field names are strings")
        out[k.data.decode("utf-8", "replace")[:30]] = _nstring(v)
    if len(out) > 30:
        raise SyntaxErr("too many ID fields")
    return out


# ---- FETCH

_FETCH_SIMPLE = {"FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY", "UID", "MODSEQ",
                 "RFC822", "RFC822.HEADER", "RFC822.TEXT"}
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SECTION = re.compile(
    r"(?P<part>(?:[1-9]\d*)(?:\.[1-9]\d*)*)?(?:(?:^|\.)(?P<text>HEADER\.FIELDS\.NOT|HEADER\.FIELDS|HEADER|TEXT|MIME)"
    r"(?: \((?P<fields>[^()]*)\))?)?\Z", re.IGNORECASE)
_BODY_ITEM = re.compile(r"(BODY\.PEEK|BODY|BINARY\.PEEK|BINARY\.SIZE|BINARY)\[(.*)\](?:<(\d+)(?:\.(\d+))?>)?\Z",
                        re.IGNORECASE | re.DOTALL)


def parse_fetch_item(text: str) -> FetchItem:
    up = text.upper()
    if up in _FETCH_SIMPLE:
        return FetchItem(up)
    m = _BODY_ITEM.match(text)
    if not m:
        raise SyntaxErr(f"unknown fetch item {text[:40]}")
    kind = m.group(1).upper()
    sec = m.group(2)
    peek = kind.endswith(".PEEK")
    kind = kind.removesuffix(".PEEK")
    partial = None
    if m.group(3) is not None:
        if kind == "BINARY.SIZE":
            raise SyntaxErr("BINARY.SIZE takes no partial")
        if m.group(4) is None:
            raise SyntaxErr("partial needs <origin.length>")
        origin, length = int(m.group(3)), int(m.group(4))
        if length == 0 or origin >= 1 << 32 or length >= 1 << 32:
            raise SyntaxErr("bad partial")
        partial = (origin, length)
    if kind.startswith("BINARY"):
        if sec and not re.fullmatch(r"[1-9]\d*(\.[1-9]\d*)*", sec):
            raise SyntaxErr("BINARY takes a part number")
        return FetchItem(kind, sec, partial, peek)
    sm = _SECTION.match(sec)
    if not sm:
        raise SyntaxErr(f"bad section {sec[:40]}")
    textpart = (sm.group("text") or "").upper()
    fields = sm.group("fields")
    if textpart.startswith("HEADER.FIELDS"):
        if fields is None or not fields.split():
            raise SyntaxErr("HEADER.FIELDS needs (field names)")
        names = [f.strip('"') for f in fields.split()]
        norm = (sm.group("part") + "." if sm.group("part") else "") + textpart + " (" + " ".join(
            n.upper() for n in names) + ")"
    else:
        if fields is not None:
            raise SyntaxErr("only HEADER.FIELDS takes field names")
        if textpart == "MIME" and not sm.group("part"):
            raise SyntaxErr("MIME needs a part number")
        norm = (sm.group("part") or "") + ("." if sm.group("part") and textpart else "") + textpart
    return FetchItem("BODY", norm, partial, peek)


def _fetch(tag: str, a: list[Token]) -> Fetch:
    if len(a) < 2:
        raise SyntaxErr("expected FETCH sequence-set items")
    cmd = Fetch(tag, "FETCH", sequence=_seqset(a[0]))
    spec = a[1]
    items: list[FetchItem] = []
    if isinstance(spec, list):
        if not spec:
            raise SyntaxErr("empty fetch item list")
        for t in spec:
            items.append(parse_fetch_item(_atom(t)))
    else:
        name = _atom(spec).upper()
        items = [FetchItem(n) for n in _MACROS[name]] if name in _MACROS else [parse_fetch_item(_atom(spec))]
    if len(a) > 2:
        mods = a[2]
        if len(a) != 3 or not isinstance(mods, list):
            raise SyntaxErr("expected (fetch-modifiers)")
        i = 0
        while i < len(mods):
            m = _atom(mods[i]).upper()
            if m == "CHANGEDSINCE" and i + 1 < len(mods):
                cmd.changedsince = _number(_atomish(mods[i + 1]), "CHANGEDSINCE", bits=63)
                i += 2
            elif m == "VANISHED":
                cmd.vanished = True
                i += 1
            else:
                raise SyntaxErr(f"unknown fetch modifier {m[:30]}")
        if cmd.vanished and cmd.changedsince is None:
            raise SyntaxErr("VANISHED needs CHANGEDSINCE")
    if cmd.changedsince is not None and not any(it.name == "MODSEQ" for it in items):
        items.append(FetchItem("MODSEQ"))
    cmd.items = tuple(items)
    return cmd


def _store(tag: str, a: list[Token]) -> Store:
    if len(a) < 3:
        raise SyntaxErr("expected STORE sequence-set [+-]FLAGS[.SILENT] flags")
    cmd = Store(tag, "STORE", sequence=_seqset(a[0]))
    i = 1
    if isinstance(a[1], list):
        mods = a[1]
        if len(mods) != 2 or _atom(mods[0]).upper() != "UNCHANGEDSINCE":
            raise SyntaxErr("expected (UNCHANGEDSINCE modseq)")
        cmd.unchangedsince = _number(_atomish(mods[1]), "UNCHANGEDSINCE", bits=63)
        i = 2
    if i >= len(a):
        raise SyntaxErr("expected FLAGS")
    item = _atom(a[i]).upper()
    m = re.fullmatch(r"([+-]?)FLAGS(\.SILENT)?", item)
    if not m:
        raise SyntaxErr(f"expected [+-]FLAGS[.SILENT], got {item[:30]}")
    cmd.mode = m.group(1) or "="
    cmd.silent = bool(m.group(2))
    rest = a[i + 1:]
    if len(rest) == 1 and isinstance(rest[0], list):
        rest = rest[0]
    cmd.flags = tuple(_flag(x) for x in rest)
    if not rest and cmd.mode != "=":
        raise SyntaxErr("expected flags")
    return cmd


# ---- SEARCH

_SEARCH_NOARG = {"ALL", "ANSWERED", "DELETED", "DRAFT", "FLAGGED", "NEW", "OLD", "RECENT", "SEEN", "UNANSWERED",
                 "UNDELETED", "UNDRAFT", "UNFLAGGED", "UNSEEN"}
_SEARCH_STRING = {"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"}
_SEARCH_DATE = {"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"}
_SEARCH_NUMBER = {"LARGER", "SMALLER"}
_SEARCH_RETURN = {"MIN", "MAX", "ALL", "COUNT", "SAVE"}


def _search(tag: str, a: list[Token]) -> Search:
    returns: tuple[str, ...] | None = None
    if len(a) >= 2 and isinstance(a[0], Atom) and a[0].text.upper() == "RETURN" and isinstance(a[1], list):
        opts = tuple(_atom(x).upper() for x in a[1])
        for o in opts:
            if o not in _SEARCH_RETURN:
                raise SyntaxErr(f"unknown search return option {o[:30]}")
        returns = opts or ("ALL",)
        a = a[2:]
    charset = None
    if len(a) >= 2 and isinstance(a[0], Atom) and a[0].text.upper() == "CHARSET":
        charset = _astring(a[1])
        a = a[2:]
    cmd = _search_keys(tag, "SEARCH", a, charset)
    cmd.returns = returns
    return cmd


def _search_keys(tag: str, name: str, a: list[Token], charset: str | None) -> Search:
    if not a:
        raise SyntaxErr("expected search keys")
    if charset is not None and charset.upper() not in ("US-ASCII", "UTF-8"):
        raise Unsupported(f"charset {charset[:30]} is not supported", "BADCHARSET (US-ASCII UTF-8)")
    it = iter(a)
    keys = []
    for t in it:
        keys.append(_search_key(t, it, 0))
    key = keys[0] if len(keys) == 1 else Key("AND", tuple(keys))
    return Search(tag, name, charset=charset, key=key)


def _next(it: Iterator[Token], what: str) -> Token:
    try:
        return next(it)
    except StopIteration:
        raise SyntaxErr(f"{what} needs an argument") from None


def _search_key(t: Token, it: Iterator[Token], depth: int) -> Key:
    if depth > 50:
        raise SyntaxErr("search keys nested too deep")
    if isinstance(t, list):
        if not t:
            raise SyntaxErr("empty parenthesised search key")
        sub = iter(t)
        keys = [_search_key(x, sub, depth + 1) for x in sub]
        return keys[0] if len(keys) == 1 else Key("AND", tuple(keys))
    if isinstance(t, Str):
        raise SyntaxErr("expected a search key")
    op = t.text.upper()
    if op in _SEARCH_NOARG:
        return Key(op)
    if op in _SEARCH_STRING:
        return Key(op, _astring(_next(it, op)))
    if op in _SEARCH_DATE:
        return Key(op, parse_date(_astringish(_next(it, op))))
    if op in _SEARCH_NUMBER:
        return Key(op, _number(_atomish(_next(it, op)), op, bits=63))
    if op in ("KEYWORD", "UNKEYWORD"):
        return Key(op, _flag(_next(it, op)))
    if op == "HEADER":
        fname = _astring(_next(it, op))
        return Key(op, (fname, _astring(_next(it, op))))
    if op == "UID":
        return Key(op, _seqset(_next(it, op)))
    if op == "NOT":
        return Key(op, _search_key(_next(it, op), it, depth + 1))
    if op == "OR":
        return Key(op, (_search_key(_next(it, op), it, depth + 1), _search_key(_next(it, op), it, depth + 1)))
    if op in ("YOUNGER", "OLDER"):
        return Key(op, _number(_atomish(_next(it, op)), op))
    if op == "MODSEQ":
        nxt = _next(it, op)
        if isinstance(nxt, Str):  # entry-name entry-type-req
            _next(it, op)
            nxt = _next(it, op)
        return Key(op, _number(_atomish(nxt), "MODSEQ", bits=63))
    if op[:1].isdigit() or op[:1] in ("*", "$"):
        return Key("SEQ", SeqSet.parse(t.text))
    raise SyntaxErr(f"unknown search key {op[:30]}")


def _astringish(t: Token) -> str:
    if isinstance(t, list):
        raise SyntaxErr("expected a date")
    return _atomish(t)


_SORT_KEYS = {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"}


def _sort_criteria(t: list[Token]) -> tuple[str, ...]:
    out = []
    reverse = False
    for x in t:
        k = _atom(x).upper()
        if k == "REVERSE":
            if reverse:
                raise SyntaxErr("REVERSE twice")
            reverse = True
            continue
        if k not in _SORT_KEYS:
            raise SyntaxErr(f"unknown sort key {k[:30]}")
        out.append(("REVERSE " if reverse else "") + k)
        reverse = False
    if reverse or not out:
        raise SyntaxErr("bad sort criteria")
    return tuple(out)

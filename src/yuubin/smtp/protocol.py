"""The SMTP server protocol core, sans-IO (in the style of h11).

Feed it bytes with `receive_data()`, pull events with `next_event()`, answer the events that need
a decision with `accept()`/`reject()`, and send what `data_to_send()` returns. It owns the state
machine, every limit and the DATA/BDAT framing; it never touches a socket, clock or resolver, so
policy can be async and the core stays testable byte for byte.

Commands that need no outside knowledge (NOOP, RSET, HELP, VRFY, syntax and sequence errors) are
answered inside; HELO/EHLO, MAIL, RCPT, a finished message, STARTTLS and QUIT surface as events.
While an event awaits its answer, parsing stops, so pipelined commands are answered in order.
Every error reply the core sends on its own is kept with its reason (`take_errors()`), so the
session can log it like a policy refusal without the core doing any I/O.

Which verb may run in which state is decided in one place, the `_SEQUENCE` table: for each state
that reads commands, the verbs it runs and the exact reply for each verb it refuses. A verb's own
state-independent checks (DATA/STARTTLS take no argument, STARTTLS/AUTH must be offered on this
connection) come before the table, and a refused BDAT still reads its chunk before replying.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from yuubin.config import LimitsConfig
from yuubin.smtp import replies as R
from yuubin.smtp.address import Address, AddressError, is_xtext, parse_path
from yuubin.smtp.replies import Reply

AUTH_LINE_LENGTH = 12288  # RFC 4954 4: a SASL response line may be this long


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"  # feed more bytes
    PAUSED = "PAUSED"  # an event awaits accept()/reject()
    CLOSED = "CLOSED"  # the session is over; flush data_to_send() and close
    FLUSH = "FLUSH"  # replies piled up (a pipelining client): send them, then call next_event() again


NEED_DATA: Final = _Sentinel.NEED_DATA
PAUSED: Final = _Sentinel.PAUSED
CLOSED: Final = _Sentinel.CLOSED
FLUSH: Final = _Sentinel.FLUSH
FLUSH_REPLIES = 32  # answers the core queues before it asks the shell to send them (and yield)

_DEFAULT_LIMITS = LimitsConfig()  # the defaults live in the config, and only there


@dataclass(frozen=True, slots=True)
class Limits:
    """The part of `LimitsConfig` the core enforces; its defaults are the config's defaults."""

    line_length: int = _DEFAULT_LIMITS.line_length
    message_size: int = _DEFAULT_LIMITS.message_size
    recipients: int = _DEFAULT_LIMITS.recipients
    max_errors: int = _DEFAULT_LIMITS.max_errors

    @classmethod
    def from_config(cls, config: LimitsConfig) -> Limits:
        return cls(config.line_length, config.message_size, config.recipients, config.max_errors)


@dataclass(slots=True)
class Hello:
    name: str
    extended: bool


@dataclass(slots=True)
class MailFrom:
    sender: Address | None  # None is the null sender <>
    params: dict[str, str]


@dataclass(slots=True)
class RcptTo:
    recipient: Address
    params: dict[str, str]


@dataclass(slots=True)
class AcceptedRecipient:
    address: Address
    params: dict[str, str]
    context: object = None  # whatever the shell attached on accept() (e.g. where it routes)


@dataclass(slots=True)
class MessageReceived:
    sender: Address | None
    mail_params: dict[str, str]
    recipients: list[AcceptedRecipient]
    data: bytes  # dot-unstuffed, CRLF line endings, without the final "."
    chunked: bool  # came by BDAT


@dataclass(slots=True)
class StartTLS:
    """The 220 is already queued: flush it, do the handshake, then call `tls_started()`."""


@dataclass(slots=True)
class AuthRequested:
    mechanism: str
    initial: str | None


@dataclass(slots=True)
class AuthResponse:
    """The client's answer to a 334 challenge, base64-decoded (the core refuses bad base64)."""

    data: bytes


@dataclass(slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """An error reply the core sent on its own, and why (for the session's log line)."""

    reply: Reply
    stage: str  # the command it answered ("mail", "data", ...), or "command" for a line that is none
    reason: str


Event = Hello | MailFrom | RcptTo | MessageReceived | StartTLS | AuthRequested | AuthResponse | Quit


class _State(enum.Enum):
    # States that read commands (each has a row in _SEQUENCE):
    CONNECTED = 1  # waiting for HELO/EHLO
    READY = 2  # greeted, no transaction
    MAIL = 3  # sender accepted, no recipient yet
    RCPT = 4  # at least one recipient accepted
    CHUNKING = 5  # a BDAT chunk was taken: only more BDAT continues the message
    REFUSED = 6  # greeting was 554: only QUIT works
    # States that read something else, or nothing:
    DATA = 7  # reading DATA content
    BDAT = 8  # reading a BDAT chunk
    AUTH = 9  # a 334 challenge was sent: the next line is a SASL response (or "*")
    TLS = 10  # STARTTLS accepted, waiting for the handshake
    CLOSED = 11


@dataclass(frozen=True, slots=True)
class _Rules:
    """One row of the sequence table: the verbs a state runs, and what every other verb gets."""

    allowed: frozenset[str]
    refused: dict[str, Reply] = field(default_factory=dict)
    # Set for a session that runs nothing but `allowed`: every other line, known verb or not, gets
    # this reply before its arguments are looked at.
    otherwise: Reply | None = None


# How a refusal from the sequence table is explained in the log: "<VERB> <when>".
_WHEN = {
    _State.CONNECTED: "before EHLO/HELO",
    _State.READY: "before MAIL",
    _State.MAIL: "in a transaction with no recipient accepted yet",
    _State.RCPT: "in a transaction",
    _State.CHUNKING: "after BDAT",
    _State.REFUSED: "after a refused greeting",
}

_ONLY_QUIT = Reply(503, "5.7.1", "service refused at connect; only QUIT is accepted")
_RCPT_AFTER_BDAT = Reply(503, "5.5.1", "RCPT not allowed after BDAT")
_AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a transaction")

_ALWAYS = frozenset({"EHLO", "HELO", "RSET", "NOOP", "QUIT", "VRFY", "EXPN", "HELP"})
_IN_TRANSACTION = {"MAIL": R.NESTED_MAIL, "AUTH": _AUTH_IN_TRANSACTION}  # RFC 5321 4.1.4, RFC 4954 4

# The sequence table (RFC 5321 4.1.4, RFC 3030 2, RFC 3207 4, RFC 4954 4). Every state that reads
# commands has a row; in each row but REFUSED, every verb in _COMMANDS is either allowed or refused.
_SEQUENCE: dict[_State, _Rules] = {
    _State.CONNECTED: _Rules(_ALWAYS, {"MAIL": R.NEED_HELO, "RCPT": R.NEED_MAIL, "DATA": R.NEED_MAIL,
                                       "BDAT": R.NEED_HELO, "STARTTLS": R.NEED_HELO, "AUTH": R.NEED_HELO}),
    _State.READY: _Rules(_ALWAYS | {"MAIL", "STARTTLS", "AUTH"},
                         {"RCPT": R.NEED_MAIL, "DATA": R.NEED_MAIL, "BDAT": R.NEED_MAIL}),
    _State.MAIL: _Rules(_ALWAYS | {"RCPT", "STARTTLS"},
                        {**_IN_TRANSACTION, "DATA": R.NEED_RCPT, "BDAT": R.NEED_RCPT}),
    _State.RCPT: _Rules(_ALWAYS | {"RCPT", "DATA", "BDAT", "STARTTLS"}, _IN_TRANSACTION),
    _State.CHUNKING: _Rules(_ALWAYS | {"BDAT", "STARTTLS"},
                            {**_IN_TRANSACTION, "RCPT": _RCPT_AFTER_BDAT, "DATA": R.MIXED_DATA_BDAT}),
    _State.REFUSED: _Rules(frozenset({"QUIT"}), otherwise=_ONLY_QUIT),
}


@dataclass(slots=True)
class _Transaction:
    sender: Address | None
    params: dict[str, str]
    recipients: list[AcceptedRecipient] = field(default_factory=list)


class SMTPServerConnection:
    """One SMTP session's protocol state. All I/O stays outside."""

    def __init__(
        self,
        hostname: str,
        limits: Limits | None = None,
        *,
        tls_available: bool = False,
        tls_active: bool = False,
        auth_mechanisms: tuple[str, ...] = (),
        auth_requires_tls: bool = True,
        auth_required: bool = False,
    ):
        self.hostname = hostname
        self.limits = limits if limits is not None else Limits.from_config(LimitsConfig())
        self.tls_available = tls_available
        self.tls_active = tls_active
        self.auth_mechanisms = auth_mechanisms
        self.auth_requires_tls = auth_requires_tls
        self.auth_required = auth_required  # submission: MAIL before a successful AUTH → 530
        self.authenticated = False
        self.helo: str | None = None
        self.esmtp = False
        self.errors = 0
        self.messages = 0
        self._state = _State.CONNECTED
        self._stage = "command"  # what the next error answers, for its ProtocolError
        self._errors: list[ProtocolError] = []
        self._in = bytearray()
        self._out: list[bytes] = []
        self._pending: Event | None = None
        self._txn: _Transaction | None = None
        self._discard_line = False
        # DATA/BDAT content buffer; DATA keeps a leading CRLF so the terminator search and
        # dot-unstuffing treat the first line like every other line.
        self._msg = bytearray()
        self._scan = 0
        self._oversize = False
        self._chunk_left = 0
        self._chunk_last = False
        self._chunk_error: Reply | None = None
        self._chunk_error_reason = ""

    # ---- driving the core ----------------------------------------------------------------

    def start(self, greeting: Reply | None = None) -> None:
        """Queue the banner. A 554 greeting leaves only QUIT usable (RFC 5321 3.1)."""
        if greeting is None:
            greeting = Reply(220, "", f"{self.hostname} ESMTP yuubin")
        elif greeting.code >= 500:
            self._state = _State.REFUSED
        self._out.append(greeting.encode())

    def receive_data(self, data: bytes) -> None:
        if self._state in (_State.CLOSED, _State.TLS):
            return  # bytes after STARTTLS or QUIT are never executed
        self._in += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def in_transaction(self) -> bool:
        return self._txn is not None

    @property
    def receiving_content(self) -> bool:
        return self._state in (_State.DATA, _State.BDAT)

    @property
    def unprocessed(self) -> int:
        """Bytes received but not yet parsed (the shell pauses reading when this grows)."""
        return len(self._in)

    @property
    def holding(self) -> int:
        """Bytes held in all: unparsed, and the message being received."""
        return len(self._in) + len(self._msg)

    def take_errors(self) -> tuple[ProtocolError, ...]:
        """The error replies the core sent on its own since the last call, oldest first."""
        if not self._errors:
            return ()
        errors = tuple(self._errors)
        self._errors.clear()
        return errors

    def close(self, reply: Reply) -> None:
        """End the session from outside (timeout, shutdown) with a final 421."""
        if self._state is not _State.CLOSED:
            self._out.append(reply.encode())
            self._state = _State.CLOSED
        self._pending = None
        # Nothing is read after this: what was buffered goes now (an evicted session's megabytes).
        self._in = bytearray()
        self._msg = bytearray()

    def next_event(self) -> Event | _Sentinel:
        while True:
            if self._state is _State.CLOSED:
                return CLOSED
            if self._pending is not None or self._state is _State.TLS:
                return PAUSED
            if len(self._out) >= FLUSH_REPLIES:
                return FLUSH
            ev: Event | _Sentinel | None
            if self._state is _State.AUTH:
                ev = self._read_auth_response()
            elif self._state is _State.DATA:
                ev = self._read_data()
            elif self._state is _State.BDAT:
                ev = self._read_chunk()
            else:
                ev = self._read_command()
            if ev is None:
                continue
            if isinstance(ev, _Sentinel):
                return ev
            self._pending = ev
            return ev

    def accept(self, reply: Reply | None = None, *, context: object = None) -> None:
        """Accept the pending event; `reply` overrides the default positive reply.

        For RcptTo, `context` is kept with the recipient and comes back in MessageReceived.
        """
        ev = self._take_pending()
        if isinstance(ev, Hello):
            self.helo = ev.name
            self.esmtp = ev.extended
            self._txn = None
            self._state = _State.READY
            self._send(reply or self._hello_reply(ev))
        elif isinstance(ev, MailFrom):
            self._txn = _Transaction(ev.sender, ev.params)
            self._state = _State.MAIL
            self._send(reply or R.SENDER_OK)
        elif isinstance(ev, RcptTo):
            assert self._txn is not None  # RCPT runs only in MAIL and RCPT, inside a transaction
            self._txn.recipients.append(AcceptedRecipient(ev.recipient, ev.params, context))
            self._state = _State.RCPT
            self._send(reply or R.RECIPIENT_OK)
        elif isinstance(ev, MessageReceived):
            self.messages += 1
            self._send(reply or R.OK)
        elif isinstance(ev, Quit):
            self._send(reply or R.BYE)
            self._state = _State.CLOSED
        elif isinstance(ev, AuthRequested | AuthResponse):
            self.authenticated = True
            self._send(reply or Reply(235, "2.7.0", "authentication succeeded"))
        else:  # pragma: no cover - StartTLS is answered by tls_started()
            raise RuntimeError(f"cannot accept {ev!r}")

    def reject(self, reply: Reply) -> None:
        """Refuse the pending event with a 4xx/5xx reply (421 also closes the session)."""
        ev = self._take_pending()
        if reply.code < 400:
            raise ValueError("reject() needs a 4xx or 5xx reply")
        if isinstance(ev, MessageReceived):
            self._end_transaction()
        self._count_error(reply)  # the caller logs its own refusals
        if reply.code == 421:
            self._state = _State.CLOSED

    def challenge(self, data: bytes) -> None:
        """Answer a pending AuthRequested/AuthResponse with a 334 challenge (`data` unencoded).

        The next line from the client comes back as AuthResponse; `*` cancels with 501.
        """
        if not isinstance(self._pending, AuthRequested | AuthResponse):
            raise RuntimeError("challenge() needs a pending AUTH exchange")
        self._pending = None
        self._send(Reply(334, "", base64.b64encode(data).decode("ascii")))
        self._state = _State.AUTH

    def tls_started(self) -> None:
        """The handshake finished: everything is forgotten and a new EHLO is required."""
        if self._state is not _State.TLS:
            raise RuntimeError("tls_started() without STARTTLS")
        self._pending = None
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self.authenticated = False
        self._txn = None
        self._state = _State.CONNECTED

    # ---- internals ---------------------------------------------------------------------

    def _take_pending(self) -> Event:
        ev = self._pending
        if ev is None:
            raise RuntimeError("no event is waiting for an answer")
        self._pending = None
        return ev

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.encode())

    def _error(self, reply: Reply, reason: str | None = None) -> None:
        """Send an error reply of the core's own, keep it with its reason (default: the reply's
        text), and count it."""
        self._errors.append(ProtocolError(reply, self._stage, reason or reply.lines[0]))
        self._count_error(reply)

    def _count_error(self, reply: Reply) -> None:
        """Send an error reply and count it; too many errors end the session."""
        self._send(reply)
        self.errors += 1
        if self.errors >= self.limits.max_errors and self._state is not _State.CLOSED:
            self._send(R.TOO_MANY_ERRORS)
            self._errors.append(ProtocolError(R.TOO_MANY_ERRORS, self._stage,
                                              f"{self.errors} errors in one session (limits.max_errors)"))
            self._state = _State.CLOSED

    def _end_transaction(self) -> None:
        self._txn = None
        self._msg = bytearray()
        self._oversize = False
        if self._state is not _State.CLOSED and self._state is not _State.REFUSED:
            self._state = _State.READY if self.helo is not None else _State.CONNECTED

    def _hello_reply(self, ev: Hello) -> Reply:
        if not ev.extended:
            return Reply(250, "", f"{self.hostname} greets {ev.name}")
        lines = [f"{self.hostname} greets {ev.name}", "PIPELINING", f"SIZE {self.limits.message_size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"]
        if self.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self.auth_mechanisms and (self.tls_active or not self.auth_requires_tls):
            lines.append("AUTH " + " ".join(self.auth_mechanisms))
        return Reply(250, "", tuple(lines))

    def _read_command(self) -> Event | _Sentinel | None:
        buf = self._in
        nl = buf.find(b"\n")
        limit = self.limits.line_length
        self._stage = "command"
        if nl < 0:
            if len(buf) > limit:
                # Keep reading until the end of this over-long line, then say 500 once.
                self._discard_line = True
                buf.clear()
            return NEED_DATA
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        if self._discard_line or nl + 1 > limit:
            self._discard_line = False
            self._error(R.LINE_TOO_LONG, f"command line longer than limits.line_length ({limit} octets)")
            return None
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\0" in line:
            self._error(R.BAD_COMMAND_ENCODING, "command line contains NUL")
            return None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(R.BAD_COMMAND_ENCODING, "command line is not valid UTF-8")
            return None
        verb, _, arg = text.partition(" ")
        # Verbs are ASCII: str.upper() would also read "quıt" as QUIT and "ſtarttls" as STARTTLS.
        verb = verb.upper() if verb.isascii() else verb
        return self._dispatch(verb, arg.strip(" "))

    def _dispatch(self, verb: str, arg: str) -> Event | None:
        """Run one command line: the verb's own checks, then the sequence table, then the verb."""
        rules = _SEQUENCE[self._state]
        allowed = verb in rules.allowed
        command = _COMMANDS.get(verb)
        self._stage = verb.lower() if command is not None else "command"
        if not allowed and rules.otherwise is not None:
            self._error(rules.otherwise, self._sequence_reason(verb if command is not None else "a command"))
            return None
        if command is None:
            shown = verb if verb.isascii() and verb.isalnum() and len(verb) <= 20 else "(not a command word)"
            self._error(R.UNKNOWN_COMMAND, f"unknown command {shown}")
            return None
        if command.check is not None:
            error = command.check(self, arg)
            if error is not None:
                self._error(error)
                return None
        if allowed:
            return command.run(self, arg)
        refusal = rules.refused[verb]
        if command.refuse is not None:
            return command.refuse(self, arg, refusal)
        self._error(refusal, self._sequence_reason(verb))
        return None

    def _sequence_reason(self, verb: str) -> str:
        return f"bad sequence: {verb} {_WHEN[self._state]}"

    # -- commands --

    def _cmd_helo(self, arg: str, extended: bool) -> Event | None:
        name = arg.split(" ")[0]
        if not arg:
            self._error(Reply(501, "5.5.4", f"syntax: {'EHLO' if extended else 'HELO'} hostname"))
            return None
        if not name.isprintable():
            # A CR, tab or other control character would end up inside our reply and Received:.
            self._error(Reply(501, "5.5.4", f"syntax: {'EHLO' if extended else 'HELO'} hostname "
                              "(no control characters)"), "control character in the HELO/EHLO name")
            return None
        return Hello(name, extended)

    def _cmd_ehlo(self, arg: str) -> Event | None:
        return self._cmd_helo(arg, True)

    def _cmd_helo_plain(self, arg: str) -> Event | None:
        return self._cmd_helo(arg, False)

    def _cmd_mail(self, arg: str) -> Event | None:
        if self.auth_required and not self.authenticated:
            self._error(Reply(530, "5.7.0", "authentication required: send AUTH first"))
            return None
        if arg[:5].upper() != "FROM:":
            self._error(Reply(501, "5.5.4", "syntax: MAIL FROM:<address> [parameters]"))
            return None
        parsed = self._path_and_params(arg[5:])
        if parsed is None:
            return None
        path, params = parsed
        error = self._check_mail_params(params)
        if error:
            too_big = error is R.MESSAGE_TOO_BIG  # the only way MAIL learns the size: say both numbers
            self._error(error, f"announced SIZE={params['SIZE'][:20]} over limits.message_size "
                               f"({self.limits.message_size} octets)" if too_big else None)
            return None
        try:
            sender = parse_path(path, smtputf8="SMTPUTF8" in params)
        except AddressError as e:
            self._error(e.reply)
            return None
        if sender is not None and not sender.domain:
            self._error(Reply(501, "5.1.7", "sender address needs a domain"))
            return None
        return MailFrom(sender, params)

    def _cmd_rcpt(self, arg: str) -> Event | None:
        txn = self._txn
        assert txn is not None  # RCPT runs only in MAIL and RCPT, inside a transaction
        if arg[:3].upper() != "TO:":
            self._error(Reply(501, "5.5.4", "syntax: RCPT TO:<address> [parameters]"))
            return None
        parsed = self._path_and_params(arg[3:])
        if parsed is None:
            return None
        path, params = parsed
        error = self._check_rcpt_params(params)
        if error:
            self._error(error)
            return None
        if len(txn.recipients) >= self.limits.recipients:
            self._error(R.TOO_MANY_RECIPIENTS, f"more than limits.recipients ({self.limits.recipients}) recipients")
            return None
        try:
            rcpt = parse_path(path, smtputf8="SMTPUTF8" in txn.params)
        except AddressError as e:
            self._error(e.reply)
            return None
        if rcpt is None:
            self._error(Reply(501, "5.1.3", "null recipient not allowed"))
            return None
        return RcptTo(rcpt, params)

    def _check_data(self, arg: str) -> Reply | None:
        return Reply(501, "5.5.4", "syntax: DATA takes no arguments") if arg else None

    def _cmd_data(self, arg: str) -> Event | None:
        self._state = _State.DATA
        self._msg = bytearray(b"\r\n")
        self._scan = 0
        self._oversize = False
        self._send(R.START_DATA)
        return None

    def _cmd_bdat(self, arg: str) -> Event | None:
        return self._start_chunk(arg, None)

    def _refuse_bdat(self, arg: str, refusal: Reply) -> Event | None:
        # The chunk follows whatever the state: read it first, or its bytes would run as commands.
        return self._start_chunk(arg, refusal)

    def _start_chunk(self, arg: str, refusal: Reply | None) -> Event | None:
        """Read the chunk BDAT announces; a `refusal` is sent once the chunk is skipped."""
        parts = arg.split()
        if not parts or len(parts) > 2 or not (parts[0].isascii() and parts[0].isdigit()) or (
                len(parts) == 2 and parts[1].upper() != "LAST"):
            # Without a valid size the chunk cannot be skipped: the stream is lost, so close.
            reply = Reply(501, "5.5.4", "syntax: BDAT size [LAST]; closing connection")
            self._send(reply)
            self._errors.append(ProtocolError(reply, self._stage, "BDAT without a valid size: the stream is lost"))
            self._state = _State.CLOSED
            return None
        self._chunk_left = int(parts[0])
        self._chunk_last = len(parts) == 2
        self._chunk_error = refusal
        if refusal is not None:
            self._chunk_error_reason = self._sequence_reason("BDAT")  # said once the chunk is read
        if refusal is None and self._state is _State.RCPT:  # the first chunk of the message
            self._msg = bytearray()
            self._oversize = False
        self._state = _State.BDAT
        return None

    def _cmd_rset(self, arg: str) -> Event | None:
        self._end_transaction()
        self._send(R.RESET_OK)
        return None

    def _cmd_noop(self, arg: str) -> Event | None:
        self._send(R.NOOP_OK)
        return None

    def _cmd_quit(self, arg: str) -> Event | None:
        return Quit()

    def _cmd_vrfy(self, arg: str) -> Event | None:
        if not arg:
            self._error(Reply(501, "5.5.4", "syntax: VRFY address"))
            return None
        self._send(R.VRFY_REPLY)
        return None

    def _cmd_expn(self, arg: str) -> Event | None:
        self._error(Reply(502, "5.5.1", "EXPN not available"))
        return None

    def _cmd_help(self, arg: str) -> Event | None:
        self._send(R.HELP_REPLY)
        return None

    def _check_starttls(self, arg: str) -> Reply | None:
        if arg:
            return Reply(501, "5.5.4", "syntax: STARTTLS takes no arguments")
        if self.tls_active:
            return R.TLS_ALREADY
        if not self.tls_available:
            return R.TLS_UNAVAILABLE
        return None

    def _cmd_starttls(self, arg: str) -> Event | None:
        self._send(R.READY_TLS)
        # Anything the client pipelined after STARTTLS was sent in clear text before the
        # handshake: drop it (CVE-2011-0411 class), never execute it.
        self._in.clear()
        self._state = _State.TLS
        return StartTLS()

    def _check_auth(self, arg: str) -> Reply | None:
        if not self.auth_mechanisms:
            return R.AUTH_NOT_HERE
        if self.auth_requires_tls and not self.tls_active:
            return Reply(538, "5.7.11", "encryption required: send STARTTLS first")
        return None

    def _cmd_auth(self, arg: str) -> Event | None:
        if self.authenticated:
            self._error(Reply(503, "5.5.1", "already authenticated"))
            return None
        parts = arg.split(" ")
        mech = parts[0].upper()
        if not mech or len(parts) > 2:
            self._error(Reply(501, "5.5.4", "syntax: AUTH mechanism [initial-response]"))
            return None
        if mech not in self.auth_mechanisms:
            self._error(Reply(504, "5.5.4", "unrecognized authentication mechanism"))
            return None
        return AuthRequested(mech, parts[1] if len(parts) == 2 else None)

    def _read_auth_response(self) -> Event | _Sentinel | None:
        """One SASL response line (RFC 4954 4): `*` cancels, anything else must be base64."""
        buf = self._in
        nl = buf.find(b"\n")
        self._stage = "auth"
        if nl < 0:
            if len(buf) > AUTH_LINE_LENGTH:
                buf.clear()
                self._state = _State.READY
                self._error(Reply(500, "5.5.6", "authentication exchange line too long"))
            return NEED_DATA
        line = bytes(buf[:nl]).rstrip(b"\r")
        del buf[: nl + 1]
        self._state = _State.READY
        if line == b"*":
            self._error(Reply(501, "5.0.0", "authentication cancelled"))
            return None
        try:
            data = binascii.a2b_base64(line, strict_mode=True) if line else b""
        except binascii.Error:
            self._error(Reply(501, "5.5.2", "cannot decode the response: not base64"))
            return None
        return AuthResponse(data)

    # -- parameters --

    def _path_and_params(self, rest: str) -> tuple[str, dict[str, str]] | None:
        rest = rest.lstrip(" ")
        if rest.startswith("<"):
            end = self._path_end(rest)
            if end < 0:
                self._error(Reply(501, "5.5.4", "syntax: expected <address>"))
                return None
            path, tail = rest[: end + 1], rest[end + 1 :]
        else:
            self._error(Reply(501, "5.5.4", "syntax: address must be in angle brackets"))
            return None
        params: dict[str, str] = {}
        if tail and not tail.startswith(" "):
            self._error(Reply(501, "5.5.4", "syntax: expected space before parameters"))
            return None
        for item in tail.split():
            key, eq, value = item.partition("=")
            key = key.upper()
            if not key or key in params or (eq and not value):
                self._error(Reply(501, "5.5.4", f"bad parameter {item!r}"))
                return None
            params[key] = value if eq else ""
        return path, params

    @staticmethod
    def _path_end(s: str) -> int:
        """Index of the `>` closing the path, skipping quoted local parts."""
        quoted = False
        i = 1
        while i < len(s):
            c = s[i]
            if quoted and c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == ">" and not quoted:
                return i
            i += 1
        return -1

    def _check_mail_params(self, params: dict[str, str]) -> Reply | None:
        for key, value in params.items():
            if key == "SIZE":
                if not (value.isascii() and value.isdigit()):  # isdigit() alone takes "²" and "١"
                    return Reply(501, "5.5.4", "SIZE needs a number")
                if int(value) > self.limits.message_size:
                    return R.MESSAGE_TOO_BIG
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return Reply(555, "5.5.4", "BODY must be 7BIT or 8BITMIME")
                params[key] = value.upper()
            elif key == "SMTPUTF8":
                if value:
                    return Reply(555, "5.5.4", "SMTPUTF8 takes no value")
            elif key == "RET":
                if value.upper() not in ("FULL", "HDRS"):
                    return Reply(501, "5.5.4", "RET must be FULL or HDRS")
                params[key] = value.upper()
            elif key == "ENVID":
                if not value or len(value) > 100 or not is_xtext(value):
                    return Reply(501, "5.5.4", "ENVID must be xtext of at most 100 characters")
            elif key == "AUTH":
                pass  # RFC 4954 AUTH=<> parameter: accepted and ignored
            else:
                return Reply(555, "5.5.4", f"unsupported MAIL parameter {key}")
        return None

    def _check_rcpt_params(self, params: dict[str, str]) -> Reply | None:
        for key, value in params.items():
            if key == "NOTIFY":
                items = value.upper().split(",")
                if not value or not set(items) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
                        "NEVER" in items and len(items) > 1):
                    return Reply(501, "5.5.4", "NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
                params[key] = value.upper()
            elif key == "ORCPT":
                addr_type, semi, addr = value.partition(";")
                if not semi or not addr_type or not addr or not is_xtext(addr):
                    return Reply(501, "5.5.4", "ORCPT must be addr-type;xtext")
            else:
                return Reply(555, "5.5.4", f"unsupported RCPT parameter {key}")
        return None

    # -- message content --

    def _too_big(self) -> None:
        self._end_transaction()
        self._error(R.MESSAGE_TOO_BIG, f"message larger than limits.message_size ({self.limits.message_size} octets)")

    def _read_data(self) -> Event | _Sentinel | None:
        self._stage = "data"
        msg = self._msg
        if self._in:
            msg += self._in
            self._in.clear()
        end = msg.find(b"\r\n.\r\n", self._scan)
        if end < 0:
            # msg is CRLF + content so far, whose last bytes may be the terminator's ".\r": the
            # size (`end` below) is at least len(msg) - 4, whatever the next read brings.
            if self._oversize or len(msg) - 4 > self.limits.message_size:
                # Past the limit only the terminator matters: keep its possible prefix.
                self._oversize = True
                del msg[:-4]
                self._scan = 0
            else:
                self._scan = max(0, len(msg) - 4)
            return NEED_DATA
        self._in = msg[end + 5 :]
        if self._oversize or end > self.limits.message_size:
            self._too_big()
            return None
        content = bytes(msg[: end + 2])
        self._msg = bytearray()
        self._state = _State.READY
        return self._finish(content.replace(b"\r\n.", b"\r\n")[2:], chunked=False)

    def _read_chunk(self) -> Event | _Sentinel | None:
        self._stage = "bdat"
        if self._chunk_left:
            take = self._in[: self._chunk_left]
            del self._in[: len(take)]
            self._chunk_left -= len(take)
            if self._chunk_error is None and not self._oversize:
                self._msg += take
                if len(self._msg) > self.limits.message_size:
                    self._oversize = True
                    self._msg = bytearray()
            if self._chunk_left:
                return NEED_DATA
        self._state = _State.READY if self.helo is not None else _State.CONNECTED
        if self._chunk_error is not None:
            error, self._chunk_error = self._chunk_error, None
            if self._txn is not None:
                self._end_transaction()
            self._error(error, self._chunk_error_reason)
            return None
        if self._oversize:
            self._too_big()
            return None
        self._state = _State.CHUNKING
        if not self._chunk_last:
            self._send(Reply(250, "2.0.0", f"{len(self._msg)} octets received"))
            return None
        content = bytes(self._msg)
        self._msg = bytearray()
        self._state = _State.READY
        if not content:
            # BDAT 0 LAST as the whole message: nothing to store (RFC 5322 needs at least headers).
            self._end_transaction()
            self._error(Reply(554, "5.6.0", "message is empty"), "empty message (BDAT 0 LAST with no data)")
            return None
        return self._finish(content, chunked=True)

    def _finish(self, content: bytes, chunked: bool) -> Event | None:
        """Check framing and hand the message up; the transaction ends either way."""
        txn = self._txn
        assert txn is not None
        self._txn = None
        crlf = content.count(b"\r\n")
        bare = [name for name, byte in (("CR", b"\r"), ("LF", b"\n")) if content.count(byte) != crlf]
        if bare:
            # A bare CR or LF is how SMTP smuggling hides a second message: refuse it whole.
            self._error(R.BARE_LINE_ENDING, f"bare {' and '.join(bare)} in the message (only CRLF ends a line)")
            return None
        if content and not content.endswith(b"\r\n"):
            content += b"\r\n"
        return MessageReceived(txn.sender, txn.params, txn.recipients, content, chunked)


class _Command(NamedTuple):
    """One verb: what runs it, what it checks before the sequence table, how a refusal is sent."""

    run: Callable[[SMTPServerConnection, str], Event | None]
    # What the verb needs whatever the state (no stray argument, an extension this connection
    # offers): a client cannot fix that by sending commands in another order, so it is said first.
    check: Callable[[SMTPServerConnection, str], Reply | None] | None = None
    # How a refusal from the table is sent, when not as an error reply at once.
    refuse: Callable[[SMTPServerConnection, str, Reply], Event | None] | None = None


_COMMANDS: dict[str, _Command] = {
    "EHLO": _Command(SMTPServerConnection._cmd_ehlo),
    "HELO": _Command(SMTPServerConnection._cmd_helo_plain),
    "MAIL": _Command(SMTPServerConnection._cmd_mail),
    "RCPT": _Command(SMTPServerConnection._cmd_rcpt),
    "DATA": _Command(SMTPServerConnection._cmd_data, check=SMTPServerConnection._check_data),
    "BDAT": _Command(SMTPServerConnection._cmd_bdat, refuse=SMTPServerConnection._refuse_bdat),
    "RSET": _Command(SMTPServerConnection._cmd_rset),
    "NOOP": _Command(SMTPServerConnection._cmd_noop),
    "QUIT": _Command(SMTPServerConnection._cmd_quit),
    "VRFY": _Command(SMTPServerConnection._cmd_vrfy),
    "EXPN": _Command(SMTPServerConnection._cmd_expn),
    "HELP": _Command(SMTPServerConnection._cmd_help),
    "STARTTLS": _Command(SMTPServerConnection._cmd_starttls, check=SMTPServerConnection._check_starttls),
    "AUTH": _Command(SMTPServerConnection._cmd_auth, check=SMTPServerConnection._check_auth),
}

"""SMTP replies with RFC 3463 enhanced status codes.

Every reply yuubin sends is one of these, so each carries an enhanced code and text that says
what the peer (or its human) should do next.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str  # enhanced status code "x.y.z"; "" only for the greeting/banner lines
    text: str | tuple[str, ...]
    wire: bytes = field(default=b"", init=False, compare=False, repr=False)

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __post_init__(self) -> None:
        # Encoded once: the fixed replies below are sent for every message.
        object.__setattr__(self, "wire", self._encode())

    def encode(self) -> bytes:
        return self.wire

    def _encode(self) -> bytes:
        lines = self.lines
        prefix = f"{self.status} " if self.status else ""
        out = []
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            # Enhanced codes go on every line of a multi-line reply (RFC 2034), except EHLO's.
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return self.encode().decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", " / ")


def reply(code: int, status: str, text: str) -> Reply:
    return Reply(code, status, text)


# Fixed replies used by the core; policy builds its own with specific text.
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "recipient OK")
RESET_OK = Reply(250, "2.0.0", "reset OK")
NOOP_OK = Reply(250, "2.0.0", "OK")
START_DATA = Reply(354, "", "end data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "bye")
VRFY_REPLY = Reply(252, "2.5.0", "cannot verify; send mail and it will be tried")
HELP_REPLY = Reply(214, "2.0.0", "see RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP")
READY_TLS = Reply(220, "2.0.0", "ready to start TLS")

LINE_TOO_LONG = Reply(500, "5.5.2", "line too long")
BAD_COMMAND_ENCODING = Reply(500, "5.5.2", "command line is not valid UTF-8 or contains NUL")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "command not recognized")
NEED_HELO = Reply(503, "5.5.1", "send EHLO or HELO first")
NESTED_MAIL = Reply(503, "5.5.1", "sender already given; send RSET to start over")
NEED_MAIL = Reply(503, "5.5.1", "send MAIL FROM first")
NEED_RCPT = Reply(554, "5.5.1", "no valid recipients")
MIXED_DATA_BDAT = Reply(503, "5.5.1", "DATA and BDAT cannot be mixed in one transaction")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "too many recipients; send the rest in another transaction")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "message exceeds the size limit")
BARE_LINE_ENDING = Reply(550, "5.5.2", "message contains a bare <CR> or <LF>; lines must end with <CR><LF>")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "too many errors; closing connection")
IDLE_TIMEOUT = Reply(421, "4.4.2", "idle timeout; closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "server shutting down; try again later")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
TLS_UNAVAILABLE = Reply(502, "5.5.1", "STARTTLS not available")
AUTH_NOT_HERE = Reply(503, "5.5.1", "AUTH not available on this port; submit mail on port 587 or 465")
LOCAL_ERROR = Reply(451, "4.3.0", "local error; try again later")

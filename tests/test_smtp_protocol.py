"""The sans-IO SMTP core driven directly: bytes in, events and reply bytes out, no sockets.

In the style of h11's tests: a small driver (`Session`) feeds bytes, answers every event the way
a permissive policy would (or as a test tells it to), and records the events and the replies, so
each test states a conversation and what a peer must see.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from yuubin.config import LimitsConfig
from yuubin.smtp import replies as R
from yuubin.smtp.protocol import (
    _COMMANDS,
    _SEQUENCE,
    CLOSED,
    NEED_DATA,
    PAUSED,
    AuthRequested,
    Hello,
    Limits,
    MailFrom,
    MessageReceived,
    Quit,
    RcptTo,
    SMTPServerConnection,
    StartTLS,
)
from yuubin.smtp.replies import Reply

# ---- the driver ----------------------------------------------------------------------------

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_LINE = re.compile(rb"(\d{3})([ -])(.*)")


@dataclass(frozen=True)
class Rep:
    """One reply as a peer parses it from the wire (multi-line replies joined)."""

    code: int
    status: str  # enhanced status code of the first line, "" if it has none
    lines: tuple[str, ...]  # text after "ddd-"/"ddd ", enhanced code included

    @property
    def short(self) -> str:
        return f"{self.code} {self.status}".rstrip()


def parse_replies(data: bytes) -> list[Rep]:
    """Split reply bytes into replies; fails on anything a strict client would not accept."""
    reps: list[Rep] = []
    lines: list[str] = []
    code = None
    assert data == b"" or data.endswith(b"\r\n"), data
    for raw in data.split(b"\r\n")[:-1]:
        m = _LINE.fullmatch(raw)
        assert m, f"malformed reply line {raw!r}"
        this = int(m.group(1))
        assert code is None or code == this, f"code changed inside a multi-line reply: {data!r}"
        code = this
        lines.append(m.group(3).decode("utf-8"))
        if m.group(2) == b" ":
            first = lines[0].split(" ", 1)[0]
            reps.append(Rep(code, first if _STATUS.fullmatch(first) else "", tuple(lines)))
            lines, code = [], None
    assert not lines, f"unterminated multi-line reply: {data!r}"
    return reps


@dataclass(frozen=True)
class Accept:
    """A decision: accept, optionally with a reply of our own and a context for RCPT."""

    reply: Reply | None = None
    context: object = None


Decision = Accept | Reply | None  # None accepts; a Reply with code >= 400 rejects
Policy = Callable[[object], Decision]


class Session:
    """One connection: feed bytes, answer events by `policy`, keep every event and reply."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        limits: Limits | None = None,
        greeting: Reply | None = None,
        handshake: bool = True,
        **options: object,
    ):
        self.conn = SMTPServerConnection("mx.test", limits or Limits(), **options)  # type: ignore[arg-type]
        self.policy = policy or (lambda ev: None)
        self.handshake = handshake  # answer StartTLS by "finishing" the TLS handshake at once
        self.events: list[object] = []
        self.closed = False
        self.conn.start(greeting)
        self.wire = bytearray(self.conn.data_to_send())
        self.banner = parse_replies(bytes(self.wire))

    def feed(self, data: bytes) -> list[Rep]:
        """Give the core bytes, answer what comes out; return the replies this produced."""
        start = len(self.wire)
        self.conn.receive_data(data)
        self.pump()
        return parse_replies(bytes(self.wire[start:]))

    def pump(self) -> None:
        while True:
            ev = self.conn.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                break
            if ev is CLOSED:
                self.closed = True
                break
            self.events.append(ev)
            self.answer(ev)
            self.wire += self.conn.data_to_send()
        self.wire += self.conn.data_to_send()

    def answer(self, ev: object) -> None:
        if isinstance(ev, StartTLS):
            self.wire += self.conn.data_to_send()  # the 220 goes out before the handshake
            if self.handshake:
                self.conn.tls_started()
            return
        decision = self.policy(ev)
        if decision is None:
            self.conn.accept()
        elif isinstance(decision, Accept):
            self.conn.accept(decision.reply, context=decision.context)
        elif decision.code < 400:
            self.conn.accept(decision)
        else:
            self.conn.reject(decision)

    def say(self, *lines: str | bytes) -> list[str]:
        """Send command lines (CRLF added) in one receive_data; return the short replies."""
        data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\r\n" for x in lines)
        return [r.short for r in self.feed(data)]

    @property
    def replies(self) -> list[Rep]:
        return parse_replies(bytes(self.wire))

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def messages(self) -> list[MessageReceived]:
        return self.of(MessageReceived)


def greeted(**kwargs: object) -> Session:
    s = Session(**kwargs)  # type: ignore[arg-type]
    assert s.say("EHLO client.test")[0] == "250"
    return s


def in_transaction(rcpts: int = 1, **kwargs: object) -> Session:
    s = greeted(**kwargs)
    assert s.say("MAIL FROM:<alice@example.org>") == ["250 2.1.0"]
    for i in range(rcpts):
        assert s.say(f"RCPT TO:<user{i}@mx.test>") == ["250 2.1.5"]
    return s


TRANSACTION = b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@mx.test>\r\nDATA\r\n"


def ehlo_keywords(s: Session) -> list[str]:
    [rep] = [r for r in s.feed(b"EHLO client.test\r\n")]
    assert rep.code == 250
    return [line.split(" ")[0] for line in rep.lines[1:]]


def refuse(code: int, status: str, text: str = "no") -> Reply:
    return Reply(code, status, text)


# ---- greeting, EHLO, HELO ------------------------------------------------------------------


def test_banner_is_220_with_hostname() -> None:
    s = Session()
    assert [r.code for r in s.banner] == [220]
    assert s.banner[0].lines[0].startswith("mx.test ")


def test_ehlo_advertises_extensions() -> None:
    s = Session()
    rep = s.feed(b"EHLO client.test\r\n")
    assert len(rep) == 1 and rep[0].code == 250 and len(rep[0].lines) > 1
    assert "client.test" in rep[0].lines[0]
    words = [line.split(" ")[0] for line in rep[0].lines[1:]]
    for ext in ("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"):
        assert ext in words
    assert f"SIZE {Limits().message_size}" in rep[0].lines
    assert "STARTTLS" not in words  # no certificate: not offered
    assert "AUTH" not in words  # port 25 never offers AUTH
    [hello] = s.of(Hello)
    assert hello == Hello("client.test", True)
    assert s.conn.esmtp and s.conn.helo == "client.test"


def test_ehlo_size_follows_limits() -> None:
    [rep] = Session(limits=Limits(message_size=1234)).feed(b"EHLO c\r\n")
    assert "SIZE 1234" in rep.lines


def test_helo_is_one_line_and_not_extended() -> None:
    s = Session()
    [rep] = s.feed(b"HELO client.test\r\n")
    assert rep.code == 250 and len(rep.lines) == 1
    assert s.of(Hello) == [Hello("client.test", False)]
    assert not s.conn.esmtp


@pytest.mark.parametrize("verb", ["EHLO", "HELO", "ehlo", "helo "])
def test_hello_needs_a_name(verb: str) -> None:
    s = Session()
    assert s.say(verb) == ["501 5.5.4"]
    assert s.of(Hello) == []


def test_commands_are_case_insensitive() -> None:
    s = Session()
    assert s.say("ehlo c", "mail from:<a@b.test>", "rcpt to:<c@mx.test>", "Noop") == [
        "250", "250 2.1.0", "250 2.1.5", "250 2.0.0"]


def test_rejected_hello_leaves_session_ungreeted() -> None:
    s = Session(lambda ev: refuse(550, "5.7.1") if isinstance(ev, Hello) else None)
    assert s.say("EHLO bad.test", "MAIL FROM:<a@b.test>") == ["550 5.7.1", "503 5.5.1"]
    assert s.of(MailFrom) == []


def test_ehlo_again_resets_the_transaction() -> None:
    s = in_transaction()
    assert s.say("EHLO again.test")[0] == "250"
    assert s.say("RCPT TO:<x@mx.test>", "DATA") == ["503 5.5.1", "503 5.5.1"]
    assert s.say("MAIL FROM:<a@b.test>") == ["250 2.1.0"]
    assert s.conn.helo == "again.test"


def test_accept_with_custom_reply_is_sent() -> None:
    s = Session(lambda ev: Accept(Reply(250, "2.1.0", "hello alice")) if isinstance(ev, MailFrom) else None)
    s.say("EHLO c")
    [rep] = s.feed(b"MAIL FROM:<alice@example.org>\r\n")
    assert rep.lines == ("2.1.0 hello alice",)


# ---- MAIL ----------------------------------------------------------------------------------


def test_mail_before_ehlo_is_bad_sequence() -> None:
    s = Session()
    assert s.say("MAIL FROM:<a@b.test>") == ["503 5.5.1"]
    assert s.of(MailFrom) == []


def test_mail_event_carries_sender_and_params() -> None:
    s = greeted()
    assert s.say("MAIL FROM:<Alice@Example.ORG> SIZE=100 BODY=8bitmime") == ["250 2.1.0"]
    [ev] = s.of(MailFrom)
    assert ev.sender is not None
    assert (ev.sender.local, ev.sender.domain) == ("Alice", "example.org")
    assert ev.params == {"SIZE": "100", "BODY": "8BITMIME"}
    assert s.conn.in_transaction


def test_null_sender() -> None:
    s = greeted()
    assert s.say("MAIL FROM:<>") == ["250 2.1.0"]
    assert s.of(MailFrom)[0].sender is None


def test_space_after_colon_is_tolerated() -> None:
    s = greeted()
    assert s.say("MAIL FROM: <a@b.test>", "RCPT TO: <c@mx.test>") == ["250 2.1.0", "250 2.1.5"]


@pytest.mark.parametrize("line", [
    "MAIL", "MAIL TO:<a@b.test>", "MAIL FROM:a@b.test", "MAIL FROM:<a@b.test", "MAIL FROM:<a@b.test>SIZE=1",
    "MAIL FROM:<a@b.test> SIZE=1 SIZE=2", "MAIL FROM:<a@b.test> SIZE=",
])
def test_mail_syntax_errors(line: str) -> None:
    s = greeted()
    assert s.say(line) == ["501 5.5.4"]
    assert s.of(MailFrom) == [] and not s.conn.in_transaction


@pytest.mark.parametrize("path", ["<a..b@x.test>", "<a@b@x.test>", "<@x.test>", "<a@>", "<a@-x.test>",
                                  "<a b@x.test>", "<a@x..test>"])
def test_mail_bad_address_is_501_5_1_3(path: str) -> None:
    s = greeted()
    assert s.say(f"MAIL FROM:{path}") == ["501 5.1.3"]


def test_mail_sender_needs_a_domain() -> None:
    s = greeted()
    assert s.say("MAIL FROM:<postmaster>") == ["501 5.1.7"]


def test_nested_mail_is_bad_sequence() -> None:
    s = greeted()
    assert s.say("MAIL FROM:<a@b.test>", "MAIL FROM:<c@d.test>") == ["250 2.1.0", "503 5.5.1"]
    assert len(s.of(MailFrom)) == 1


@pytest.mark.parametrize("param", ["FOO=1", "XYZ", "BODY=BINARYMIME", "BODY=9BIT", "SMTPUTF8=yes"])
def test_unsupported_mail_params_are_555(param: str) -> None:
    s = greeted()
    assert s.say(f"MAIL FROM:<a@b.test> {param}") == ["555 5.5.4"]
    assert s.of(MailFrom) == []


def test_rejected_mail_starts_no_transaction() -> None:
    s = greeted(policy=lambda ev: refuse(550, "5.7.1") if isinstance(ev, MailFrom) else None)
    assert s.say("MAIL FROM:<a@b.test>", "RCPT TO:<c@mx.test>") == ["550 5.7.1", "503 5.5.1"]
    assert not s.conn.in_transaction
    assert s.of(RcptTo) == []


# ---- RCPT ----------------------------------------------------------------------------------


def test_rcpt_before_mail_is_bad_sequence() -> None:
    s = greeted()
    assert s.say("RCPT TO:<c@mx.test>") == ["503 5.5.1"]


def test_rcpt_event_and_params() -> None:
    s = greeted()
    s.say("MAIL FROM:<a@b.test>")
    assert s.say("RCPT TO:<Bob@MX.test>") == ["250 2.1.5"]
    [ev] = s.of(RcptTo)
    assert (ev.recipient.local, ev.recipient.domain, ev.params) == ("Bob", "mx.test", {})


def test_rcpt_postmaster_without_domain_is_accepted() -> None:
    s = greeted()
    assert s.say("MAIL FROM:<a@b.test>", "RCPT TO:<Postmaster>") == ["250 2.1.0", "250 2.1.5"]
    assert s.of(RcptTo)[0].recipient.local == "postmaster"


@pytest.mark.parametrize(("line", "reply"), [
    ("RCPT TO:<>", "501 5.1.3"),
    ("RCPT TO:<user@other@mx.test>", "501 5.1.3"),
    ("RCPT TO:<no-domain>", "501 5.1.3"),
    ("RCPT FROM:<c@mx.test>", "501 5.5.4"),
    ("RCPT TO:c@mx.test", "501 5.5.4"),
    ("RCPT TO:<c@mx.test> FOO=bar", "555 5.5.4"),
])
def test_rcpt_errors(line: str, reply: str) -> None:
    s = greeted()
    s.say("MAIL FROM:<a@b.test>")
    assert s.say(line) == [reply]
    assert s.of(RcptTo) == []


def test_rcpt_context_round_trips_to_message() -> None:
    routes = {"bob": "maildir:bob", "carol": "relay:carol"}

    def policy(ev: object) -> Decision:
        if isinstance(ev, RcptTo):
            return Accept(context=routes[ev.recipient.local])
        return None

    s = greeted(policy=policy)
    s.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<bob@mx.test>\r\nRCPT TO:<carol@mx.test>\r\nDATA\r\nhi\r\n.\r\n")
    [msg] = s.messages
    assert [(r.address.local, r.context) for r in msg.recipients] == [
        ("bob", "maildir:bob"), ("carol", "relay:carol")]


def test_rejected_recipient_is_not_delivered_to() -> None:
    s = greeted(policy=lambda ev: refuse(550, "5.1.1") if isinstance(ev, RcptTo) and ev.recipient.local == "nobody"
                else None)
    assert s.say("MAIL FROM:<a@b.test>", "RCPT TO:<nobody@mx.test>", "RCPT TO:<bob@mx.test>") == [
        "250 2.1.0", "550 5.1.1", "250 2.1.5"]
    s.feed(b"DATA\r\nhi\r\n.\r\n")
    [msg] = s.messages
    assert [r.address.local for r in msg.recipients] == ["bob"]


def test_too_many_recipients_is_452_4_5_3() -> None:
    s = greeted(limits=Limits(recipients=3))
    s.say("MAIL FROM:<a@b.test>")
    got = s.say(*[f"RCPT TO:<u{i}@mx.test>" for i in range(5)])
    assert got == ["250 2.1.5"] * 3 + ["452 4.5.3"] * 2
    assert len(s.of(RcptTo)) == 3  # the fourth never reaches policy
    s.feed(b"DATA\r\nhi\r\n.\r\n")
    assert len(s.messages[0].recipients) == 3


def test_rejected_recipients_do_not_count_against_the_limit() -> None:
    s = greeted(limits=Limits(recipients=2),
                policy=lambda ev: refuse(550, "5.1.1") if isinstance(ev, RcptTo) and ev.recipient.local == "x"
                else None)
    s.say("MAIL FROM:<a@b.test>")
    got = s.say("RCPT TO:<x@mx.test>", "RCPT TO:<x@mx.test>", "RCPT TO:<a@mx.test>", "RCPT TO:<b@mx.test>",
                "RCPT TO:<c@mx.test>")
    assert got == ["550 5.1.1", "550 5.1.1", "250 2.1.5", "250 2.1.5", "452 4.5.3"]


# ---- DATA ----------------------------------------------------------------------------------


def test_data_delivers_one_message() -> None:
    s = greeted()
    reps = s.feed(TRANSACTION)
    assert [r.short for r in reps] == ["250 2.1.0", "250 2.1.5", "354"]
    assert s.conn.receiving_content
    reps = s.feed(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    assert [r.short for r in reps] == ["250 2.0.0"]
    [msg] = s.messages
    assert msg.data == b"Subject: hi\r\n\r\nhello\r\n"
    assert msg.sender is not None and msg.sender.text == "alice@example.org"
    assert [r.address.text for r in msg.recipients] == ["bob@mx.test"]
    assert msg.chunked is False
    assert not s.conn.in_transaction and s.conn.messages == 1
    # A second transaction on the same session works.
    s.feed(TRANSACTION + b"again\r\n.\r\n")
    assert [m.data for m in s.messages] == [b"Subject: hi\r\n\r\nhello\r\n", b"again\r\n"]


def test_data_without_mail_is_bad_sequence() -> None:
    s = greeted()
    assert s.say("DATA") == ["503 5.5.1"]
    assert not s.conn.receiving_content


def test_data_with_no_accepted_recipient_is_554_5_5_1() -> None:
    s = greeted(policy=lambda ev: refuse(550, "5.1.1") if isinstance(ev, RcptTo) else None)
    assert s.say("MAIL FROM:<a@b.test>", "RCPT TO:<x@mx.test>", "DATA") == ["250 2.1.0", "550 5.1.1", "554 5.5.1"]
    assert not s.conn.receiving_content
    assert s.say("NOOP") == ["250 2.0.0"]  # the next line is a command again


def test_data_takes_no_argument() -> None:
    s = in_transaction()
    assert s.say("DATA now") == ["501 5.5.4"]
    assert not s.conn.receiving_content


def test_dot_unstuffing() -> None:
    s = in_transaction()
    s.feed(b"DATA\r\n..leading dot\r\nmiddle . dot\r\n...\r\n..\r\n.x\r\nend\r\n.\r\n")
    assert s.messages[0].data == b".leading dot\r\nmiddle . dot\r\n..\r\n.\r\nx\r\nend\r\n"


def test_empty_message() -> None:
    s = in_transaction()
    assert [r.short for r in s.feed(b"DATA\r\n.\r\n")] == ["354", "250 2.0.0"]
    assert s.messages[0].data == b""


def test_eight_bit_content_passes_unchanged() -> None:
    body = "Subject: ゆうびん\r\n\r\n日本語\r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n"
    s = in_transaction()
    s.feed(b"DATA\r\n" + body + b".\r\n")
    assert s.messages[0].data == body


def test_data_split_byte_by_byte_gives_the_same_result() -> None:
    stream = (b"EHLO c\r\n" + TRANSACTION + b"Subject: x\r\n\r\n..dot\r\nline\r\n.\r\n" + TRANSACTION
              + b"\r\n.\r\n" + b"QUIT\r\n")
    whole = Session()
    whole.feed(stream)
    split = Session()
    for i in range(len(stream)):
        split.feed(stream[i : i + 1])
    assert whole.events == split.events
    assert whole.wire == split.wire
    assert [m.data for m in whole.messages] == [b"Subject: x\r\n\r\n.dot\r\nline\r\n", b"\r\n"]
    assert whole.closed and split.closed


def test_rejected_message_ends_the_transaction() -> None:
    s = greeted(policy=lambda ev: refuse(554, "5.7.1") if isinstance(ev, MessageReceived) else None)
    assert [r.short for r in s.feed(TRANSACTION + b"spam\r\n.\r\n")][-1] == "554 5.7.1"
    assert not s.conn.in_transaction and s.conn.messages == 0
    assert s.say("RCPT TO:<x@mx.test>") == ["503 5.5.1"]


def test_crlf_dot_crlf_inside_a_message_ends_it() -> None:
    """The one and only terminator: what follows it is commands again, by definition."""
    s = greeted()
    s.feed(TRANSACTION + b"one\r\n.\r\nNOOP\r\n")
    assert [m.data for m in s.messages] == [b"one\r\n"]
    assert s.replies[-1].short == "250 2.0.0"


# ---- SMTP smuggling ------------------------------------------------------------------------

SMUGGLED = (b"MAIL FROM:<ceo@bank.test>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\n"
            b"From: ceo@bank.test\r\n\r\nsmuggled\r\n")


@pytest.mark.parametrize("fake_end", [
    b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\n",
])
def test_smuggling_fake_end_of_data_rejects_the_message(fake_end: bytes) -> None:
    s = greeted()
    s.feed(TRANSACTION + b"From: alice@example.org\r\n\r\nbody" + fake_end + SMUGGLED + b".\r\nQUIT\r\n")
    assert s.messages == []
    assert [m.sender.local for m in s.of(MailFrom) if m.sender] == ["alice"]  # never "ceo"
    shorts = [r.short for r in s.replies]
    assert shorts.count("550 5.5.2") == 1
    assert shorts[-2:] == ["550 5.5.2", "221 2.0.0"]


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"])
def test_smuggling_then_a_real_second_message_gives_exactly_one(fake_end: bytes) -> None:
    s = greeted()
    s.feed(TRANSACTION + b"body" + fake_end + SMUGGLED + b".\r\n" + TRANSACTION + b"honest\r\n.\r\n")
    [msg] = s.messages
    assert msg.data == b"honest\r\n"


@pytest.mark.parametrize("bad", [b"bare\nLF\r\n", b"bare\rCR\r\n", b"ends with CR\r", b"\n", b"x\r\r\n"])
def test_bare_cr_or_lf_rejects_the_message(bad: bytes) -> None:
    s = in_transaction()
    reps = s.feed(b"DATA\r\n" + bad + b"\r\n.\r\n")
    assert [r.short for r in reps] == ["354", "550 5.5.2"]
    assert s.messages == [] and not s.conn.in_transaction


def test_smuggling_split_byte_by_byte_is_still_rejected() -> None:
    stream = b"EHLO c\r\n" + TRANSACTION + b"body\n.\n" + SMUGGLED + b".\r\n"
    s = Session()
    for i in range(len(stream)):
        s.feed(stream[i : i + 1])
    assert s.messages == [] and len(s.of(MailFrom)) == 1
    assert s.replies[-1].short == "550 5.5.2"


def test_bare_lf_inside_bdat_rejects_the_message() -> None:
    s = in_transaction()
    chunk = b"body\n.\n" + SMUGGLED
    assert [r.short for r in s.feed(b"BDAT %d LAST\r\n" % len(chunk) + chunk)] == ["550 5.5.2"]
    assert s.messages == [] and len(s.of(MailFrom)) == 1


def test_fake_terminator_inside_bdat_is_content() -> None:
    s = in_transaction()
    chunk = b"a\r\n.\r\nMAIL FROM:<x@y.test>\r\n"
    assert [r.short for r in s.feed(b"BDAT %d LAST\r\n" % len(chunk) + chunk)] == ["250 2.0.0"]
    [msg] = s.messages
    assert msg.data == chunk  # BDAT content is taken verbatim: no dot-unstuffing, no terminator
    assert len(s.of(MailFrom)) == 1


# ---- BDAT (CHUNKING) -----------------------------------------------------------------------


def test_bdat_single_chunk_last() -> None:
    s = in_transaction()
    assert [r.short for r in s.feed(b"BDAT 14 LAST\r\nSubject: x\r\n\r\n")] == ["250 2.0.0"]
    [msg] = s.messages
    assert msg.data == b"Subject: x\r\n\r\n" and msg.chunked


def test_bdat_multi_chunk() -> None:
    s = in_transaction()
    reps = s.feed(b"BDAT 5\r\nHello")
    assert [r.short for r in reps] == ["250 2.0.0"] and reps[0].lines == ("2.0.0 5 octets received",)
    assert s.messages == [] and s.conn.in_transaction
    reps = s.feed(b"BDAT 9\r\n, world\r\nBDAT 7 LAST\r\n..end\r\n")
    assert [r.short for r in reps] == ["250 2.0.0", "250 2.0.0"]
    assert reps[0].lines == ("2.0.0 14 octets received",)
    [msg] = s.messages
    assert msg.data == b"Hello, world\r\n..end\r\n"  # no dot-unstuffing in BDAT
    assert msg.chunked and not s.conn.in_transaction


def test_bdat_0_last_ends_a_chunked_message() -> None:
    s = in_transaction()
    s.feed(b"BDAT 5\r\nabc\r\n")
    assert [r.short for r in s.feed(b"BDAT 0 LAST\r\n")] == ["250 2.0.0"]
    assert s.messages[0].data == b"abc\r\n"


def test_bdat_0_last_alone_is_an_empty_message_and_refused() -> None:
    s = in_transaction()
    assert [r.short for r in s.feed(b"BDAT 0 LAST\r\n")] == ["554 5.6.0"]
    assert s.messages == []
    # The transaction is over; the session goes on.
    assert [r.short for r in s.feed(b"MAIL FROM:<a@b.test>\r\n")] == ["250 2.1.0"]


def test_bdat_message_without_final_crlf_gets_one() -> None:
    s = in_transaction()
    s.feed(b"BDAT 3 LAST\r\nabc")
    assert s.messages[0].data == b"abc\r\n"


def test_bdat_pipelined_with_following_commands() -> None:
    s = greeted()
    reps = s.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@mx.test>\r\nBDAT 4 LAST\r\nabcdNOOP\r\nQUIT\r\n")
    assert [r.short for r in reps] == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "221 2.0.0"]
    assert s.messages[0].data == b"abcd\r\n"


def test_bdat_split_byte_by_byte_gives_the_same_result() -> None:
    stream = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@mx.test>\r\nBDAT 7\r\nabc\r\n.\nBDAT 2 LAST\r\n\r\n"
    whole, split = Session(), Session()
    whole.feed(stream)
    for i in range(len(stream)):
        split.feed(stream[i : i + 1])
    assert whole.events == split.events and whole.wire == split.wire
    assert [m.data for m in whole.messages] == []  # bare LF in chunk 1: rejected
    assert whole.replies[-1].short == "550 5.5.2"


@pytest.mark.parametrize(("setup", "reply"), [
    ((), "503 5.5.1"),  # no EHLO
    (("EHLO c",), "503 5.5.1"),  # no MAIL
    (("EHLO c", "MAIL FROM:<a@b.test>"), "554 5.5.1"),  # no recipient
])
def test_bdat_out_of_sequence_swallows_its_chunk(setup: tuple[str, ...], reply: str) -> None:
    s = Session()
    if setup:
        s.say(*setup)
    chunk = b"MAIL FROM:<evil@x.test>\r\n"
    reps = s.feed(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert [r.short for r in reps] == [reply, "250 2.0.0"]  # the chunk never ran as a command
    assert len(s.of(MailFrom)) == (1 if len(setup) == 2 else 0)
    assert s.messages == []


@pytest.mark.parametrize("line", ["BDAT", "BDAT x", "BDAT 5 NOTLAST", "BDAT 5 LAST more", "BDAT -1", "BDAT 1.5"])
def test_bdat_bad_syntax_closes(line: str) -> None:
    s = in_transaction()
    assert s.say(line, "NOOP") == ["501 5.5.4"]
    assert s.conn.closed and s.closed


def test_bdat_size_in_non_ascii_digits_is_a_syntax_error() -> None:
    """str.isdigit() accepts '²' and '٣', int() does not (or reads them): both must be refused."""
    for digits in ("²", "٣", "１"):
        s = in_transaction()
        assert s.say(f"BDAT {digits} LAST") == ["501 5.5.4"]
        assert s.closed and s.messages == []


def test_data_after_bdat_is_bad_sequence() -> None:
    s = in_transaction()
    s.feed(b"BDAT 3\r\nabc")
    assert s.say("DATA") == ["503 5.5.1"]
    assert s.say("RCPT TO:<more@mx.test>") == ["503 5.5.1"]
    assert [r.short for r in s.feed(b"BDAT 0 LAST\r\n")] == ["250 2.0.0"]
    assert s.messages[0].data == b"abc\r\n"


# ---- RSET, NOOP, QUIT, VRFY, EXPN, HELP ----------------------------------------------------


def test_rset_clears_the_transaction() -> None:
    s = in_transaction()
    assert s.say("RSET") == ["250 2.0.0"]
    assert not s.conn.in_transaction
    assert s.say("RCPT TO:<c@mx.test>", "DATA") == ["503 5.5.1", "503 5.5.1"]
    assert s.say("MAIL FROM:<a@b.test>") == ["250 2.1.0"]  # still greeted


def test_rset_after_bdat_chunk_discards_it() -> None:
    s = in_transaction()
    s.feed(b"BDAT 3\r\nabc")
    s.say("RSET", "MAIL FROM:<a@b.test>", "RCPT TO:<c@mx.test>")
    s.feed(b"BDAT 3 LAST\r\nxyz")
    assert s.messages[0].data == b"xyz\r\n"


def test_rset_and_noop_before_ehlo() -> None:
    s = Session()
    assert s.say("RSET", "NOOP", "NOOP anything") == ["250 2.0.0"] * 3
    assert s.say("MAIL FROM:<a@b.test>") == ["503 5.5.1"]


def test_noop_keeps_the_transaction() -> None:
    s = in_transaction()
    assert s.say("NOOP") == ["250 2.0.0"]
    s.feed(b"DATA\r\nx\r\n.\r\n")
    assert len(s.messages) == 1


def test_quit_closes_and_ignores_what_follows() -> None:
    s = greeted()
    reps = s.feed(b"QUIT\r\nMAIL FROM:<a@b.test>\r\n")
    assert [r.short for r in reps] == ["221 2.0.0"]
    assert s.of(Quit) == [Quit()] and s.of(MailFrom) == []
    assert s.closed and s.conn.next_event() is CLOSED
    s.conn.receive_data(b"NOOP\r\n")
    assert s.conn.next_event() is CLOSED and s.conn.data_to_send() == b""


def test_quit_before_ehlo() -> None:
    s = Session()
    assert s.say("QUIT") == ["221 2.0.0"]
    assert s.closed


def test_quit_mid_transaction_delivers_nothing() -> None:
    s = in_transaction()
    assert s.say("QUIT") == ["221 2.0.0"]
    assert s.messages == []


def test_vrfy_is_252_and_reveals_nothing() -> None:
    s = greeted()
    assert s.say("VRFY root", "VRFY nosuchuser@mx.test") == ["252 2.5.0", "252 2.5.0"]
    a, b = [r.lines for r in s.replies[-2:]]
    assert a == b  # same answer whether the user exists or not
    assert s.say("VRFY") == ["501 5.5.4"]


def test_expn_is_refused() -> None:
    s = greeted()
    assert s.say("EXPN staff") == ["502 5.5.1"]


def test_help() -> None:
    s = Session()
    assert s.say("HELP", "HELP MAIL") == ["214 2.0.0", "214 2.0.0"]


def test_unknown_command_is_500_5_5_1() -> None:
    s = greeted()
    assert s.say("FOO", "XCLIENT ADDR=1.2.3.4", "", "MAILFROM:<a@b.test>") == ["500 5.5.1"] * 4
    assert s.say("NOOP") == ["250 2.0.0"]


def test_commands_with_non_ascii_case_folding_are_unknown() -> None:
    """'ı'.upper() == 'I' and 'ſ'.upper() == 'S': verbs are ASCII, or a proxy and we disagree."""
    s = greeted(tls_available=True)
    assert s.say("quıt", "ſtarttls", "noop") == ["500 5.5.1", "500 5.5.1", "250 2.0.0"]
    assert not s.closed and s.of(Quit) == [] and s.of(StartTLS) == []


def test_non_utf8_and_nul_in_command_are_500_5_5_2() -> None:
    s = greeted()
    assert s.say(b"NOOP \xff\xfe", b"NO\x00OP", b"NOOP") == ["500 5.5.2", "500 5.5.2", "250 2.0.0"]


def test_bare_lf_ends_a_command_line() -> None:
    s = Session()
    assert [r.short for r in s.feed(b"EHLO c\nNOOP\n")] == ["250", "250 2.0.0"]


# ---- STARTTLS ------------------------------------------------------------------------------


def test_starttls_offered_only_when_available_and_not_active() -> None:
    assert "STARTTLS" in ehlo_keywords(Session(tls_available=True))
    assert "STARTTLS" not in ehlo_keywords(Session(tls_available=False))
    assert "STARTTLS" not in ehlo_keywords(Session(tls_available=True, tls_active=True))


def test_starttls_resets_and_requires_new_ehlo() -> None:
    s = greeted(tls_available=True)
    s.say("MAIL FROM:<a@b.test>")
    assert s.say("STARTTLS") == ["220 2.0.0"]
    assert s.of(StartTLS) == [StartTLS()]
    assert s.conn.tls_active and s.conn.helo is None and not s.conn.in_transaction
    assert s.say("MAIL FROM:<a@b.test>") == ["503 5.5.1"]  # EHLO first
    assert "STARTTLS" not in ehlo_keywords(s)  # not offered after TLS
    assert s.say("STARTTLS") == ["503 5.5.1"]
    assert s.say("MAIL FROM:<a@b.test>", "RCPT TO:<c@mx.test>") == ["250 2.1.0", "250 2.1.5"]


def test_starttls_discards_pipelined_commands_in_the_same_read() -> None:
    """CVE-2011-0411: commands injected in clear text after STARTTLS must never run."""
    s = greeted(tls_available=True)
    reps = s.feed(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@mx.test>\r\nNOOP\r\n")
    assert [r.short for r in reps] == ["220 2.0.0"]
    assert s.of(MailFrom) == [] and s.of(RcptTo) == []
    assert s.conn.unprocessed == 0
    # After the handshake, only what the client sends over TLS counts.
    assert s.say("EHLO c", "NOOP") == ["250", "250 2.0.0"]
    assert s.of(MailFrom) == []


def test_starttls_discards_bytes_arriving_before_the_handshake_ends() -> None:
    s = greeted(tls_available=True, handshake=False)
    assert s.say("STARTTLS") == ["220 2.0.0"]
    assert s.conn.next_event() is PAUSED
    s.conn.receive_data(b"MAIL FROM:<evil@x.test>\r\n")  # still clear text: ignored
    assert s.conn.next_event() is PAUSED and s.conn.unprocessed == 0
    s.conn.tls_started()
    assert s.say("MAIL FROM:<a@b.test>") == ["503 5.5.1"]
    assert s.of(MailFrom) == []


def test_starttls_errors() -> None:
    assert Session().say("EHLO c", "STARTTLS") == ["250", "502 5.5.1"]  # no certificate
    s = Session(tls_available=True)
    assert s.say("STARTTLS") == ["503 5.5.1"]  # EHLO first
    assert s.say("EHLO c", "STARTTLS now") == ["250", "501 5.5.4"]
    assert s.of(StartTLS) == []


def test_tls_started_without_starttls_is_an_error() -> None:
    s = greeted(tls_available=True)
    with pytest.raises(RuntimeError):
        s.conn.tls_started()


# ---- AUTH ----------------------------------------------------------------------------------


def test_auth_refused_when_no_mechanisms_before_and_after_tls() -> None:
    s = greeted(tls_available=True)
    assert s.say("AUTH PLAIN AGFsaWNlAHNlY3JldA==", "AUTH LOGIN") == ["503 5.5.1", "503 5.5.1"]
    assert s.say("STARTTLS") == ["220 2.0.0"]
    assert s.say("EHLO c") == ["250"]
    assert s.say("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == ["503 5.5.1"]
    assert s.of(AuthRequested) == []
    assert "AUTH" not in ehlo_keywords(s)


def test_auth_needs_tls_when_configured() -> None:
    s = greeted(tls_available=True, auth_mechanisms=("PLAIN",))
    assert "AUTH" not in ehlo_keywords(s)
    assert s.say("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == ["538 5.7.11"]
    s.say("STARTTLS")
    assert "AUTH" in ehlo_keywords(s)
    assert s.say("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == ["235 2.7.0"]
    assert s.of(AuthRequested) == [AuthRequested("PLAIN", "AGFsaWNlAHNlY3JldA==")]


# ---- limits --------------------------------------------------------------------------------


def test_limits_defaults_are_the_config_defaults() -> None:
    assert Limits() == Limits.from_config(LimitsConfig())
    assert SMTPServerConnection("mx.test").limits == Limits.from_config(LimitsConfig())


def test_limits_from_config_takes_every_field() -> None:
    config = LimitsConfig(line_length=1000, message_size=5000, recipients=7, max_errors=3)
    assert Limits.from_config(config) == Limits(line_length=1000, message_size=5000, recipients=7, max_errors=3)
    # The positional order callers rely on: line_length, message_size, recipients, max_errors.
    assert Limits(1000, 5000, 7, 3) == Limits.from_config(config)


def test_command_line_of_512_octets_is_accepted_and_513_is_not() -> None:
    s = greeted()
    ok = "NOOP " + "x" * (512 - 2 - 5)  # 512 octets with CRLF
    long = ok + "x"
    assert len(ok) + 2 == 512
    assert s.say(ok, long, "NOOP") == ["250 2.0.0", "500 5.5.2", "250 2.0.0"]


def test_long_line_is_one_error_and_memory_stays_bounded() -> None:
    s = greeted()
    for _ in range(100):
        assert s.feed(b"MAIL FROM:<" + b"a" * 1000) == []
        assert s.conn.unprocessed <= Limits().line_length
    reps = s.feed(b"@b.test>\r\nNOOP\r\n")
    assert [r.short for r in reps] == ["500 5.5.2", "250 2.0.0"]
    assert s.of(MailFrom) == []  # the tail of the long line never runs as a command


def test_long_line_limit_is_configurable() -> None:
    s = greeted(limits=Limits(line_length=20))
    assert s.say("NOOP 1234567890123", "NOOP 12345678901234") == ["250 2.0.0", "500 5.5.2"]


def test_message_of_exactly_the_size_limit_is_accepted_however_it_arrives() -> None:
    limit = 100
    body = b"x" * (limit - 2) + b"\r\n"
    stream = b"EHLO c\r\n" + TRANSACTION + body + b".\r\n"
    for cut in range(len(stream) - 8, len(stream)):
        s = Session(limits=Limits(message_size=limit))
        s.feed(stream[:cut])
        s.feed(stream[cut:])
        assert [m.data for m in s.messages] == [body], cut
        assert s.replies[-1].short == "250 2.0.0"


def test_message_over_size_is_552_5_3_4_however_it_arrives() -> None:
    limit = 100
    body = b"x" * (limit - 1) + b"\r\n"
    stream = b"EHLO c\r\n" + TRANSACTION + body + b".\r\nNOOP\r\n"
    end = len(stream) - len(b"NOOP\r\n")  # just past the terminator
    for cut in [end - 40, *range(end - 8, end + 1)]:
        s = Session(limits=Limits(message_size=limit))
        s.feed(stream[:cut])
        s.feed(stream[cut:])
        assert s.messages == []
        assert [r.short for r in s.replies][-2:] == ["552 5.3.4", "250 2.0.0"]
        assert not s.conn.in_transaction


def test_oversize_data_is_not_buffered() -> None:
    s = in_transaction(limits=Limits(message_size=1000))
    s.feed(b"DATA\r\n")
    for _ in range(200):
        s.feed(b"y" * 998 + b"\r\n")
        assert s.conn.unprocessed == 0
    assert len(s.conn._msg) < 2000  # past the limit only a terminator prefix is kept
    assert [r.short for r in s.feed(b".\r\n")] == ["552 5.3.4"]
    assert s.messages == []


def test_announced_size_over_limit_is_552_5_3_4() -> None:
    s = greeted(limits=Limits(message_size=1000))
    assert s.say("MAIL FROM:<a@b.test> SIZE=1001") == ["552 5.3.4"]
    assert not s.conn.in_transaction
    assert s.say("MAIL FROM:<a@b.test> SIZE=1000") == ["250 2.1.0"]
    assert s.of(MailFrom)[0].params == {"SIZE": "1000"}


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", "²", "１０"])
def test_size_must_be_ascii_digits(value: str) -> None:
    s = greeted()
    assert s.say(f"MAIL FROM:<a@b.test> SIZE={value}") == ["501 5.5.4"]
    assert s.of(MailFrom) == []


def test_bdat_over_size_is_552_5_3_4() -> None:
    s = in_transaction(limits=Limits(message_size=10))
    reps = s.feed(b"BDAT 6\r\n123456BDAT 6\r\n789012BDAT 0 LAST\r\nNOOP\r\n")
    assert [r.short for r in reps] == ["250 2.0.0", "552 5.3.4", "503 5.5.1", "250 2.0.0"]
    assert s.messages == [] and not s.conn.in_transaction


def test_bdat_of_exactly_the_size_limit_is_accepted() -> None:
    s = in_transaction(limits=Limits(message_size=10))
    s.feed(b"BDAT 4\r\n1234BDAT 6 LAST\r\n56789\n")
    assert s.replies[-1].short == "550 5.5.2"  # size fine; the bare LF is what fails
    s = in_transaction(limits=Limits(message_size=10))
    s.feed(b"BDAT 4\r\n1234BDAT 6 LAST\r\n5678\r\n")
    assert [m.data for m in s.messages] == [b"12345678\r\n"]


def test_too_many_errors_is_421_and_closed() -> None:
    s = greeted(limits=Limits(max_errors=3))
    reps = s.feed(b"FOO\r\nBAR\r\nBAZ\r\nMAIL FROM:<a@b.test>\r\n")
    assert [r.short for r in reps] == ["500 5.5.1", "500 5.5.1", "500 5.5.1", "421 4.7.0"]
    assert s.closed and s.of(MailFrom) == []
    s.conn.receive_data(b"NOOP\r\n")
    assert s.conn.next_event() is CLOSED and s.conn.data_to_send() == b""


def test_policy_rejections_count_as_errors() -> None:
    s = greeted(limits=Limits(max_errors=2), policy=lambda ev: refuse(550, "5.1.1") if isinstance(ev, RcptTo)
                else None)
    assert s.say("MAIL FROM:<a@b.test>", "RCPT TO:<x@mx.test>", "RCPT TO:<y@mx.test>", "NOOP") == [
        "250 2.1.0", "550 5.1.1", "550 5.1.1", "421 4.7.0"]
    assert s.closed


def test_the_core_keeps_every_error_reply_of_its_own_with_its_reason() -> None:
    """The session logs these (the core does no I/O); the policy's refusals it logs itself."""
    s = Session(lambda ev: refuse(550, "5.1.1") if isinstance(ev, RcptTo) else None,
                limits=Limits(message_size=1000, max_errors=5))
    s.say("MAIL FROM:<a@b.test>", "EHLO c.test", "MAIL FROM:<a@b.test> SIZE=2000", "MAIL FROM:<a@b.test>",
          "RCPT TO:<x@mx.test>", "DATA")
    errors = s.conn.take_errors()
    assert [(e.stage, e.reply.code) for e in errors] == [("mail", 503), ("mail", 552), ("data", 554)]
    assert errors[0].reason == "bad sequence: MAIL before EHLO/HELO"
    assert errors[1].reason == "announced SIZE=2000 over limits.message_size (1000 octets)"
    assert errors[2].reason == "bad sequence: DATA in a transaction with no recipient accepted yet"
    assert [r.short for r in s.replies if r.code >= 400] == ["503 5.5.1", "552 5.3.4", "550 5.1.1", "554 5.5.1"]
    assert s.conn.take_errors() == ()
    s.say("FOO")  # the fifth error: the 421 that ends the session is kept too
    assert [(e.reply.code, e.reason) for e in s.conn.take_errors()] == [
        (500, "unknown command FOO"), (421, "5 errors in one session (limits.max_errors)")]


@pytest.mark.parametrize(("content", "bare"), [(b"a\nb\r\n", "bare LF"), (b"a\rb\r\n", "bare CR"),
                                               (b"a\rb\nc\r\n", "bare CR and LF")])
def test_a_bare_line_ending_is_kept_with_which_one(content: bytes, bare: str) -> None:
    s = in_transaction()
    s.feed(b"DATA\r\n" + content + b".\r\n")
    [error] = s.conn.take_errors()
    assert (error.stage, error.reply) == ("data", R.BARE_LINE_ENDING)
    assert error.reason.startswith(bare + " in the message")


def test_line_too_long_and_oversized_data_name_their_limits() -> None:
    s = in_transaction(limits=Limits(line_length=100, message_size=50))
    s.feed(b"NOOP " + b"x" * 200 + b"\r\nDATA\r\n" + b"y" * 60 + b"\r\n.\r\n")
    assert [(e.stage, e.reply, e.reason) for e in s.conn.take_errors()] == [
        ("command", R.LINE_TOO_LONG, "command line longer than limits.line_length (100 octets)"),
        ("data", R.MESSAGE_TOO_BIG, "message larger than limits.message_size (50 octets)")]


def test_reject_with_421_closes() -> None:
    s = greeted(policy=lambda ev: refuse(421, "4.3.2") if isinstance(ev, MailFrom) else None)
    assert s.say("MAIL FROM:<a@b.test>", "NOOP") == ["421 4.3.2"]
    assert s.closed


def test_close_from_outside_sends_421_once() -> None:
    s = greeted()
    s.conn.close(R.IDLE_TIMEOUT)
    s.conn.close(R.SHUTTING_DOWN)
    assert parse_replies(s.conn.data_to_send()) == [Rep(421, "4.4.2", ("4.4.2 idle timeout; closing connection",))]
    assert s.conn.next_event() is CLOSED


def test_close_during_data_delivers_nothing() -> None:
    s = in_transaction()
    s.feed(b"DATA\r\npartial\r\n")
    s.conn.close(R.SHUTTING_DOWN)
    s.conn.receive_data(b".\r\n")
    assert s.conn.next_event() is CLOSED and s.messages == []


# ---- PIPELINING ----------------------------------------------------------------------------


def test_pipelined_commands_are_answered_in_order() -> None:
    s = Session(lambda ev: refuse(550, "5.1.1") if isinstance(ev, RcptTo) and ev.recipient.local == "nobody"
                else None)
    reps = s.feed(b"EHLO c\r\nNOOP\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<nobody@mx.test>\r\nVRFY x\r\n"
                  b"RCPT TO:<bob@mx.test>\r\nFOO\r\nDATA\r\n")
    assert [r.short for r in reps] == ["250", "250 2.0.0", "250 2.1.0", "550 5.1.1", "252 2.5.0", "250 2.1.5",
                                       "500 5.5.1", "354"]
    reps = s.feed(b"hi\r\n.\r\nMAIL FROM:<c@d.test>\r\nRCPT TO:<bob@mx.test>\r\nBDAT 2 LAST\r\nhiQUIT\r\n")
    assert [r.short for r in reps] == ["250 2.0.0", "250 2.1.0", "250 2.1.5", "250 2.0.0", "221 2.0.0"]
    assert [m.data for m in s.messages] == [b"hi\r\n", b"hi\r\n"]


def test_parsing_stops_while_an_event_is_pending() -> None:
    conn = SMTPServerConnection("mx.test")
    conn.start()
    conn.data_to_send()
    conn.receive_data(b"EHLO c\r\nNOOP\r\nMAIL FROM:<a@b.test>\r\nNOOP\r\nRCPT TO:<c@mx.test>\r\n")
    assert isinstance(conn.next_event(), Hello)
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED
    assert conn.data_to_send() == b""  # NOOP waits behind the pending EHLO
    assert conn.unprocessed > 0
    conn.accept()
    ev = conn.next_event()
    assert isinstance(ev, MailFrom)
    assert [r.short for r in parse_replies(conn.data_to_send())] == ["250", "250 2.0.0"]
    assert conn.next_event() is PAUSED
    conn.reject(Reply(451, "4.3.0", "try later"))
    assert conn.next_event() is NEED_DATA  # NOOP answered; RCPT refused without asking policy
    assert [r.short for r in parse_replies(conn.data_to_send())] == ["451 4.3.0", "250 2.0.0", "503 5.5.1"]


def test_answering_without_a_pending_event_is_an_error() -> None:
    conn = SMTPServerConnection("mx.test")
    conn.start()
    with pytest.raises(RuntimeError):
        conn.accept()
    with pytest.raises(RuntimeError):
        conn.reject(Reply(550, "5.0.0", "no"))
    conn.receive_data(b"EHLO c\r\n")
    conn.next_event()
    with pytest.raises(ValueError):
        conn.reject(Reply(250, "2.0.0", "not a rejection"))


# ---- 554 greeting --------------------------------------------------------------------------


def test_554_greeting_leaves_only_quit() -> None:
    s = Session(greeting=Reply(554, "5.7.1", "listed on zen.test"))
    assert [r.short for r in s.banner] == ["554 5.7.1"]
    got = s.say("EHLO c", "HELO c", "MAIL FROM:<a@b.test>", "RCPT TO:<c@mx.test>", "DATA", "NOOP", "STARTTLS")
    assert got == ["503 5.7.1"] * 7
    assert s.events == []
    assert s.say("QUIT") == ["221 2.0.0"]
    assert s.closed and s.of(Quit) == [Quit()]


# ---- the sequence table, cell by cell ------------------------------------------------------
# What every verb gets in every state that reads commands, written from the RFCs rather than
# copied from the core's table: RFC 5321 4.1.4 (command order, 503 for a bad sequence) and 3.3
# (DATA with no valid recipient: 554), RFC 3030 2 (no RCPT after BDAT, DATA and BDAT not mixed),
# RFC 3207 4 (STARTTLS once EHLO has offered it; it resets the session, so a transaction does not
# forbid it), RFC 4954 4 (no AUTH during a transaction), RFC 5321 3.1 (after a 554 greeting only
# QUIT). A refusal also names a word its text must contain, so two different 503s cannot swap.

SEQUENCE_STATES = ("CONNECTED", "READY", "MAIL", "RCPT", "CHUNKING", "REFUSED")
SEQUENCE_SETUP: dict[str, tuple[bytes, ...]] = {
    "CONNECTED": (),
    "READY": (b"EHLO c.test\r\n",),
    "MAIL": (b"EHLO c.test\r\n", b"MAIL FROM:<a@b.test>\r\n"),
    "RCPT": (b"EHLO c.test\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@mx.test>\r\n"),
    "CHUNKING": (b"EHLO c.test\r\n", b"MAIL FROM:<a@b.test>\r\n", b"RCPT TO:<c@mx.test>\r\n", b"BDAT 3\r\nabc"),
    "REFUSED": (),
}
SEQUENCE_LINE = {
    "EHLO": "EHLO c.test", "HELO": "HELO c.test", "MAIL": "MAIL FROM:<a@b.test>", "RCPT": "RCPT TO:<d@mx.test>",
    "DATA": "DATA", "BDAT": "BDAT 0 LAST", "RSET": "RSET", "NOOP": "NOOP", "QUIT": "QUIT", "VRFY": "VRFY d@mx.test",
    "EXPN": "EXPN staff", "HELP": "HELP", "STARTTLS": "STARTTLS", "AUTH": "AUTH PLAIN AGFAAGI=", "XYZZY": "XYZZY",
}
HELO_FIRST = ("503 5.5.1", "EHLO")
MAIL_FIRST = ("503 5.5.1", "MAIL")
NESTED = ("503 5.5.1", "RSET")
NO_RCPT = ("554 5.5.1", "recipient")
AFTER_BDAT = ("503 5.5.1", "after BDAT")
MIXED = ("503 5.5.1", "mixed")
IN_TXN = ("503 5.5.1", "during a transaction")
ONLY_QUIT = ("503 5.7.1", "QUIT")
SEQUENCE_EXPECTED: dict[str, tuple[str | tuple[str, str], ...]] = {
    #            CONNECTED    READY        MAIL         RCPT         CHUNKING     REFUSED
    "EHLO":     ("250",       "250",       "250",       "250",       "250",       ONLY_QUIT),
    "HELO":     ("250",       "250",       "250",       "250",       "250",       ONLY_QUIT),
    "MAIL":     (HELO_FIRST,  "250 2.1.0", NESTED,      NESTED,      NESTED,      ONLY_QUIT),
    "RCPT":     (MAIL_FIRST,  MAIL_FIRST,  "250 2.1.5", "250 2.1.5", AFTER_BDAT,  ONLY_QUIT),
    "DATA":     (MAIL_FIRST,  MAIL_FIRST,  NO_RCPT,     "354",       MIXED,       ONLY_QUIT),
    "BDAT":     (HELO_FIRST,  MAIL_FIRST,  NO_RCPT,     "554 5.6.0", "250 2.0.0", ONLY_QUIT),  # 0 LAST alone: empty
    "RSET":     ("250 2.0.0", "250 2.0.0", "250 2.0.0", "250 2.0.0", "250 2.0.0", ONLY_QUIT),
    "NOOP":     ("250 2.0.0", "250 2.0.0", "250 2.0.0", "250 2.0.0", "250 2.0.0", ONLY_QUIT),
    "QUIT":     ("221 2.0.0", "221 2.0.0", "221 2.0.0", "221 2.0.0", "221 2.0.0", "221 2.0.0"),
    "VRFY":     ("252 2.5.0", "252 2.5.0", "252 2.5.0", "252 2.5.0", "252 2.5.0", ONLY_QUIT),
    "EXPN":     ("502 5.5.1", "502 5.5.1", "502 5.5.1", "502 5.5.1", "502 5.5.1", ONLY_QUIT),
    "HELP":     ("214 2.0.0", "214 2.0.0", "214 2.0.0", "214 2.0.0", "214 2.0.0", ONLY_QUIT),
    "STARTTLS": (HELO_FIRST,  "220 2.0.0", "220 2.0.0", "220 2.0.0", "220 2.0.0", ONLY_QUIT),
    "AUTH":     (HELO_FIRST,  "235 2.7.0", IN_TXN,      IN_TXN,      IN_TXN,      ONLY_QUIT),
    "XYZZY":    ("500 5.5.1", "500 5.5.1", "500 5.5.1", "500 5.5.1", "500 5.5.1", ONLY_QUIT),
}


@pytest.mark.parametrize("state", SEQUENCE_STATES)
@pytest.mark.parametrize("verb", list(SEQUENCE_EXPECTED))
def test_sequence_table_cell(verb: str, state: str) -> None:
    # STARTTLS and AUTH offered, so what is tested is the sequence, not whether they exist here.
    s = Session(greeting=refuse(554, "5.7.1") if state == "REFUSED" else None,
                tls_available=True, auth_mechanisms=("PLAIN",), auth_requires_tls=False)
    for data in SEQUENCE_SETUP[state]:
        reps = s.feed(data)
        assert reps and all(r.code < 400 for r in reps), (state, reps)
    expected = SEQUENCE_EXPECTED[verb][SEQUENCE_STATES.index(state)]
    short, word = expected if isinstance(expected, tuple) else (expected, "")
    rep = s.feed(SEQUENCE_LINE[verb].encode() + b"\r\n")[0]
    assert rep.short == short
    assert word in rep.lines[0]


def test_sequence_table_decides_every_verb_in_every_command_state() -> None:
    """Each row allows or refuses every verb the core knows; the cell test covers them all."""
    assert set(SEQUENCE_EXPECTED) == {*_COMMANDS, "XYZZY"}
    assert {state.name for state in _SEQUENCE} == set(SEQUENCE_STATES)
    for state, rules in _SEQUENCE.items():
        assert not rules.allowed & rules.refused.keys(), state
        if rules.otherwise is None:
            assert rules.allowed | rules.refused.keys() == set(_COMMANDS), state
        else:
            assert rules.allowed == {"QUIT"} and not rules.refused, state


# ---- DSN parameters (RFC 3461) -------------------------------------------------------------


def test_dsn_parameters_are_kept_in_the_envelope() -> None:
    s = greeted()
    s.feed(b"MAIL FROM:<a@b.test> RET=hdrs ENVID=QQ314159+2Bx\r\n"
           b"RCPT TO:<c@mx.test> NOTIFY=success,failure ORCPT=rfc822;c+40mx.test\r\n"
           b"RCPT TO:<d@mx.test> NOTIFY=NEVER\r\n"
           b"DATA\r\nx\r\n.\r\n")
    [msg] = s.messages
    assert msg.mail_params == {"RET": "HDRS", "ENVID": "QQ314159+2Bx"}
    assert [r.params for r in msg.recipients] == [
        {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;c+40mx.test"}, {"NOTIFY": "NEVER"}]


@pytest.mark.parametrize("params", ["RET=ALL", "RET=", "ENVID=a=b", "ENVID=a+zz", "ENVID=" + "x" * 101])
def test_bad_mail_dsn_values_are_rejected(params: str) -> None:
    s = greeted()
    assert s.say(f"MAIL FROM:<a@b.test> {params}") == ["501 5.5.4"]
    assert s.of(MailFrom) == []


@pytest.mark.parametrize("params", ["NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "NOTIFY=SUCCESS,", "ORCPT=rfc822",
                                    "ORCPT=;a@b.test", "ORCPT=rfc822;", "ORCPT=rfc822;a=b"])
def test_bad_rcpt_dsn_values_are_rejected(params: str) -> None:
    s = greeted()
    s.say("MAIL FROM:<a@b.test>")
    assert s.say(f"RCPT TO:<c@mx.test> {params}") == ["501 5.5.4"]
    assert s.of(RcptTo) == []


# ---- SMTPUTF8, 8BITMIME, BINARYMIME --------------------------------------------------------


def test_non_ascii_sender_needs_smtputf8() -> None:
    s = greeted()
    assert s.say("MAIL FROM:<ゆうびん@例え.jp>") == ["553 5.6.7"]
    assert s.say("MAIL FROM:<ゆうびん@例え.jp> SMTPUTF8") == ["250 2.1.0"]
    [ev] = s.of(MailFrom)
    assert ev.sender is not None and ev.sender.text == "ゆうびん@例え.jp" and ev.params == {"SMTPUTF8": ""}


def test_non_ascii_recipient_needs_smtputf8_on_mail() -> None:
    s = greeted()
    s.say("MAIL FROM:<a@b.test>")
    assert s.say("RCPT TO:<josé@mx.test>") == ["553 5.6.7"]
    s.say("RSET", "MAIL FROM:<a@b.test> SMTPUTF8")
    assert s.say("RCPT TO:<josé@mx.test>") == ["250 2.1.5"]
    s.feed(b"DATA\r\nx\r\n.\r\n")
    assert s.messages[0].recipients[0].address.local == "josé"


def test_body_8bitmime_and_7bit_accepted_binarymime_refused() -> None:
    s = greeted()
    assert s.say("MAIL FROM:<a@b.test> BODY=7bit", "RSET", "MAIL FROM:<a@b.test> BODY=8BITMIME") == [
        "250 2.1.0", "250 2.0.0", "250 2.1.0"]
    s.say("RSET")
    assert s.say("MAIL FROM:<a@b.test> BODY=BINARYMIME") == ["555 5.5.4"]


# ---- every reply carries an enhanced status code -------------------------------------------

TRANSCRIPT = [
    b"NOOP", b"HELP", b"MAIL FROM:<a@b.test>", b"EHLO c", b"FOO", b"\xff", b"X" * 600, b"VRFY x", b"VRFY",
    b"EXPN x", b"AUTH PLAIN", b"STARTTLS", b"RCPT TO:<a@mx.test>", b"DATA", b"MAIL FROM:<a@@b>",
    b"MAIL FROM:<a@b.test> SIZE=999999999", b"MAIL FROM:<\xc3\xa9@b.test>", b"MAIL FROM:<a@b.test> RET=X",
    b"MAIL FROM:<a@b.test> BODY=BINARYMIME", b"MAIL FROM:<postmaster>", b"MAIL FROM:<a@b.test>",
    b"MAIL FROM:<a@b.test>", b"RCPT TO:<>", b"RCPT TO:<x@mx.test> NOTIFY=X", b"RCPT TO:<a@mx.test>",
    b"RCPT TO:<b@mx.test>", b"RCPT TO:<c@mx.test>", b"DATA x", b"BDAT 3", b"abcDATA", b"RSET",
    b"MAIL FROM:<a@b.test>", b"RCPT TO:<a@mx.test>", b"DATA", b"bare\nlf", b".", b"MAIL FROM:<a@b.test>",
    b"RCPT TO:<a@mx.test>", b"DATA", b"y" * 200, b".", b"MAIL FROM:<a@b.test>", b"RCPT TO:<a@mx.test>",
    b"BDAT 1 LAST", b"xQUIT",
]


def test_every_reply_has_an_enhanced_status_code() -> None:
    s = Session(limits=Limits(recipients=2, message_size=100, max_errors=100))
    for line in TRANSCRIPT:
        s.feed(line + b"\r\n")
    reps = s.replies
    assert reps[-1].short == "221 2.0.0"
    seen = {r.code for r in reps}
    assert {214, 221, 250, 252, 354, 452, 500, 501, 502, 503, 550, 552, 553, 555} <= seen
    hello_replies = {id(r) for r in reps[1:] if r.code == 250 and r.lines[0].startswith("mx.test greets")}
    for r in reps[1:]:  # the banner is exempt (RFC 2034), and so are EHLO/HELO replies
        if id(r) in hello_replies or r.code == 354:
            continue
        assert r.status, f"no enhanced status code: {r}"
        assert r.status[0] == str(r.code)[0], f"class mismatch: {r}"
        for line in r.lines:  # and on every line of a multi-line reply
            assert line.startswith(r.status + " ") or line == r.status


def test_reply_constants_all_have_enhanced_codes() -> None:
    for name in dir(R):
        value = getattr(R, name)
        if isinstance(value, Reply) and value.code not in (354,):
            assert value.status and value.status[0] == str(value.code)[0], name

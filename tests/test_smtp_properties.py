"""Property tests for the sans-IO SMTP core: random bytes, random pipelined sessions, random
chunkings. The core must never raise, never turn one message into two, and never care how the
bytes were split across reads.
"""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_smtp_protocol import Accept, Session, parse_replies
from yuubin.smtp.protocol import Event, Limits, MailFrom, MessageReceived, RcptTo
from yuubin.smtp.replies import Reply

PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---- strategies ----------------------------------------------------------------------------

_FIXED = [
    b"EHLO c.test", b"HELO c.test", b"MAIL FROM:<a@b.test>", b"MAIL FROM:<>", b"MAIL FROM:<a@b.test> SIZE=40",
    b"MAIL FROM:<a@b.test> SMTPUTF8", b"MAIL FROM:<a@b.test> RET=HDRS ENVID=x", b"RCPT TO:<c@mx.test>",
    b"RCPT TO:<drop@mx.test>", b"RCPT TO:<postmaster>", b"RCPT TO:<d@mx.test> NOTIFY=NEVER",
    "RCPT TO:<ü@mx.test>".encode(), b"DATA", b"BDAT 0 LAST", b"BDAT 5", b"BDAT 3 LAST", b"BDAT 1", b"RSET",
    b"NOOP", b"VRFY x", b"EXPN x", b"HELP", b"STARTTLS", b"AUTH PLAIN", b".", b"..", b"", b"x" * 600,
    b"Subject: reject me", b"\x00", b"\xff\xfe", b"QUIT",
]
_SEPARATORS = [b"\r\n"] * 10 + [b"\n", b"\r", b"", b"\r\n.\r\n", b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"]


def _templated() -> st.SearchStrategy[bytes]:
    text = st.text(max_size=12)
    digits = st.text(st.sampled_from("0179²³¹①٣١２"), min_size=1, max_size=3)  # all str.isdigit()
    return st.one_of(
        digits.map(lambda t: f"BDAT {t}".encode()),
        digits.map(lambda t: f"MAIL FROM:<a@b.test> SIZE={t}".encode()),
        text.map(lambda t: f"BDAT {t}".encode()),
        text.map(lambda t: f"MAIL FROM:<a@b.test> SIZE={t}".encode()),
        text.map(lambda t: f"MAIL FROM:<{t}>".encode()),
        text.map(lambda t: f"RCPT TO:<{t}@mx.test>".encode()),
        text.map(lambda t: f"RCPT TO:<c@mx.test> ORCPT={t}".encode()),
        text.map(str.encode),
        st.binary(max_size=16),
    )


piece = st.one_of(st.sampled_from(_FIXED), _templated())
separator = st.sampled_from(_SEPARATORS)


@st.composite
def sessions(draw: st.DrawFn, max_pieces: int = 30) -> bytes:
    """A pipelined client stream: mostly well-framed commands, some garbage and fake ends."""
    parts = draw(st.lists(st.tuples(piece, separator), max_size=max_pieces))
    opening = b"EHLO c.test\r\n" if draw(st.booleans()) else b""
    return opening + b"".join(p + s for p, s in parts)


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """`data` cut into reads at random places (sometimes byte by byte, when that stays quick)."""
    if data and len(data) <= 1500 and draw(st.integers(0, 9)) == 0:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


limits = st.builds(
    Limits,
    line_length=st.sampled_from([24, 512]),
    message_size=st.sampled_from([8, 40, 1000]),
    recipients=st.sampled_from([1, 3, 100]),
    max_errors=st.sampled_from([4, 20, 10_000]),
)


def deterministic_policy(ev: object) -> Accept | Reply | None:
    """Decisions that depend only on the event, so two runs of one stream decide alike."""
    if isinstance(ev, RcptTo) and ev.recipient.local == "drop":
        return Reply(550, "5.1.1", "no such user")
    if isinstance(ev, RcptTo):
        return Accept(context=ev.recipient.key)
    if isinstance(ev, MessageReceived) and b"reject" in ev.data:
        return Reply(554, "5.7.1", "rejected")
    return None


def run(chunks: list[bytes], **kwargs: object) -> Session:
    s = Session(**kwargs)  # type: ignore[arg-type]
    for chunk in chunks:
        s.feed(chunk)  # parse_replies inside checks every reply is well formed
    return s


def check_outputs(s: Session) -> None:
    for ev in s.events:
        assert isinstance(ev, Event), ev  # the documented events, nothing else
    reps = parse_replies(bytes(s.wire))
    for rep in reps:
        assert 200 <= rep.code < 600
    if s.closed:
        assert s.conn.closed and reps[-1].code in (221, 421, 501)
    for msg in s.messages:
        assert msg.recipients, "a message with no recipient"
        assert msg.data == b"" or msg.data.endswith(b"\r\n")
        crlf = msg.data.count(b"\r\n")
        assert msg.data.count(b"\r") == crlf and msg.data.count(b"\n") == crlf, "bare CR/LF passed"


# ---- the core never raises -----------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=3000), st.data())
def test_random_bytes_never_raise(data: bytes, draw: st.DataObject) -> None:
    s = run(draw.draw(split(data)), tls_available=True)
    check_outputs(s)


@PROPERTY
@given(st.data(), limits, st.randoms(use_true_random=False))
def test_random_sessions_never_raise(draw: st.DataObject, lims: Limits, rnd: random.Random) -> None:
    stream = draw.draw(sessions())

    def policy(ev: object) -> Accept | Reply | None:
        roll = rnd.random()
        if roll < 0.15:
            return Reply(550, "5.7.1", "no")
        if roll < 0.18:
            return Reply(421, "4.3.2", "bye")
        if roll < 0.3:
            return Accept(context=roll)
        return None

    s = run(draw.draw(split(stream)), policy=policy, limits=lims, tls_available=True)
    check_outputs(s)
    # Messages never outnumber the commands that can end one.
    assert len(s.messages) <= stream.count(b"DATA") + stream.count(b"LAST")


# ---- how the bytes are split never matters -------------------------------------------------


@PROPERTY
@given(st.data(), limits)
def test_splitting_does_not_change_events_or_replies(draw: st.DataObject, lims: Limits) -> None:
    # No TLS here: after STARTTLS, bytes in the same read are dropped and later reads are (in real
    # life) ciphertext, so a split right after STARTTLS is a different conversation by design.
    stream = draw.draw(sessions())
    one = run([stream], policy=deterministic_policy, limits=lims)
    other = run(draw.draw(split(stream)), policy=deterministic_policy, limits=lims)
    assert other.events == one.events
    assert other.wire == one.wire
    assert other.closed == one.closed
    check_outputs(one)


@PROPERTY
@given(st.integers(30, 50), st.data())
def test_size_limit_does_not_depend_on_splitting(length: int, draw: st.DataObject) -> None:
    """A message right at the limit is accepted however its terminator arrives; one byte over is not."""
    body = b"x" * (length - 2) + b"\r\n"
    stream = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@mx.test>\r\nDATA\r\n" + body + b".\r\nNOOP\r\n"
    s = run(draw.draw(split(stream)), limits=Limits(message_size=40))
    shorts = [r.short for r in s.replies]
    if length <= 40:
        assert [m.data for m in s.messages] == [body]
        assert shorts[-2:] == ["250 2.0.0", "250 2.0.0"]
    else:
        assert s.messages == []
        assert shorts[-2:] == ["552 5.3.4", "250 2.0.0"]


# ---- one message sent is at most one message received --------------------------------------

body_piece = st.sampled_from([
    b"a", b"Subject: x", b" ", b".", b"..", b"\r\n", b"\r\n", b"\r\n", b"\r", b"\n", b"\r\n.\r\n", b"\n.\n",
    b"\r\n.\n", b"\n.\r\n", b"MAIL FROM:<ceo@bank.test>", b"RCPT TO:<victim@mx.test>", b"DATA", b"QUIT",
    b"BDAT 5 LAST", b"\x00", b"\xff", "日本".encode(),
])
bodies = st.lists(body_piece, max_size=40).map(b"".join)


def clean(content: bytes) -> bool:
    crlf = content.count(b"\r\n")
    return content.count(b"\r") == crlf and content.count(b"\n") == crlf


@PROPERTY
@given(bodies, st.data())
def test_one_data_message_is_at_most_one_message(body: bytes, draw: st.DataObject) -> None:
    """An honest client dot-stuffs after each CRLF; a bare LF or CR must never end the message."""
    stuffed = (b"\r\n" + body).replace(b"\r\n.", b"\r\n..")[2:]
    stream = (b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@mx.test>\r\nDATA\r\n" + stuffed
              + b"\r\n.\r\nQUIT\r\n")
    s = run(draw.draw(split(stream)))
    assert len(s.of(MailFrom)) == 1 and len(s.of(RcptTo)) == 1
    shorts = [r.short for r in s.replies]
    if clean(body + b"\r\n"):
        assert [m.data for m in s.messages] == [body + b"\r\n"]
        assert shorts[-2:] == ["250 2.0.0", "221 2.0.0"]
    else:
        assert s.messages == []
        assert shorts[-2:] == ["550 5.5.2", "221 2.0.0"]
    assert s.closed


@PROPERTY
@given(bodies, st.data())
def test_one_bdat_message_is_at_most_one_message(body: bytes, draw: st.DataObject) -> None:
    sizes = draw.draw(st.lists(st.integers(0, 12), max_size=6))
    chunks, rest = [], body
    for n in sizes:
        chunks.append(rest[:n])
        rest = rest[n:]
    framed = b"".join(b"BDAT %d\r\n" % len(c) + c for c in chunks) + b"BDAT %d LAST\r\n" % len(rest) + rest
    stream = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@mx.test>\r\n" + framed + b"QUIT\r\n"
    s = run(draw.draw(split(stream)))
    assert len(s.of(MailFrom)) == 1 and len(s.of(RcptTo)) == 1
    shorts = [r.short for r in s.replies]
    if body == b"":  # nothing in any chunk: an empty message is refused
        assert s.messages == []
        assert shorts[-2:] == ["554 5.6.0", "221 2.0.0"]
    elif clean(body):
        expected = body if body.endswith(b"\r\n") else body + b"\r\n"
        assert [(m.data, m.chunked) for m in s.messages] == [(expected, True)]
        assert shorts[-2:] == ["250 2.0.0", "221 2.0.0"]
    else:
        assert s.messages == []
        assert shorts[-2:] == ["550 5.5.2", "221 2.0.0"]
    assert shorts.count("250 2.0.0") == len(chunks) + (1 if clean(body) and body else 0)

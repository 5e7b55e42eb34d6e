"""imap/mime.py: each rule on its own (structure, offsets, ENVELOPE, sections, BINARY, SEARCH text,
base subject, quoting) and property tests: any bytes parse without raising, and quote() output
reads back through imapclient's response parser as the same string."""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imapclient.response_parser import parse_fetch_response, parse_response

from yuubin.imap import mime

CORPUS = Path(__file__).parent / "data" / "mime"


def _msg(text: str | bytes) -> mime.ParsedMessage:
    raw = text.encode() if isinstance(text, str) else text
    return mime.parse(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def _corpus(name: str) -> mime.ParsedMessage:
    return mime.parse((CORPUS / name).read_bytes())


def _read(wire: bytes) -> tuple[Any, ...]:
    """Parse IMAP wire text (with literals) the way imapclient parses a server response."""
    return parse_response(_items(wire))


def _bs(msg: mime.ParsedMessage, extended: bool = True) -> Any:
    """BODYSTRUCTURE as imapclient's FETCH parser gives it: a multipart is ([parts], subtype, ...)."""
    key = b"BODYSTRUCTURE" if extended else b"BODY"
    return parse_fetch_response(_items(b"1 (" + key + b" " + mime.bodystructure(msg, extended=extended) + b")"))[1][key]


def _items(wire: bytes) -> list[Any]:
    items: list[Any] = []
    pos = 0
    for m in re.finditer(rb"\{(\d+)\}\r\n", wire):
        if m.start() < pos:
            continue
        n = int(m.group(1))
        items.append((wire[pos:m.start()] + m.group(0)[:-2], wire[m.end():m.end() + n]))
        pos = m.end() + n
    items.append(wire[pos:])
    return items


# ---------------------------------------------------------------- structure, sizes, lines

SIMPLE = """From: a@example.org
Subject: hi
Content-Type: text/plain; charset=utf-8

line one
line two
"""


def test_single_part_size_and_lines_are_the_body_octets_and_line_count() -> None:
    msg = _msg(SIMPLE)
    bs = _bs(msg)
    body = b"line one\r\nline two\r\n"
    assert bs[:8] == (b"text", b"plain", (b"charset", b"utf-8"), None, None, b"7bit", len(body), 2)
    assert mime.section(msg, "TEXT") == body
    assert mime.section(msg, "1") == body


def test_no_content_type_is_text_plain_us_ascii_7bit() -> None:
    bs = _bs(_msg("Subject: x\n\nbody\n"), False)
    assert bs == (b"text", b"plain", (b"charset", b"us-ascii"), None, None, b"7bit", 6, 1)


MULTI = """From: a@example.org
Content-Type: multipart/mixed; boundary="XX"

preamble
--XX
Content-Type: text/plain

first
--XX
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename="f.bin"

AAEC
--XX--
epilogue
"""


def test_multipart_parts_end_before_the_crlf_of_the_next_boundary() -> None:
    msg = _msg(MULTI)
    assert mime.section(msg, "1") == b"first"
    assert mime.section(msg, "2") == b"AAEC"
    assert mime.section(msg, "1.MIME") == b"Content-Type: text/plain\r\n\r\n"
    assert mime.section(msg, "3") is None
    bs = _bs(msg)
    assert bs[0][0][6:8] == (5, 0)
    assert bs[0][1][:7] == (b"application", b"octet-stream", None, None, None, b"base64", 4)
    assert bs[0][1][8] == (b"attachment", (b"filename", b"f.bin"))
    assert bs[1:3] == (b"mixed", (b"boundary", b"XX"))


def test_multipart_without_extension_data_for_body() -> None:
    bs = _bs(_msg(MULTI), False)
    assert bs[1] == b"mixed" and len(bs) == 2
    assert len(bs[0][0]) == 8 and len(bs[0][1]) == 7


def test_missing_closing_boundary_runs_the_last_part_to_the_end() -> None:
    msg = _msg(MULTI.replace("--XX--\nepilogue\n", ""))
    assert mime.section(msg, "2") == b"AAEC\r\n"


def test_bare_lf_line_ends_are_accepted() -> None:
    raw = MULTI.encode()  # LF only
    msg = mime.parse(raw)
    assert mime.section(msg, "1") == b"first"
    assert mime.section(msg, "1.MIME") == b"Content-Type: text/plain\n\n"
    assert mime.section(msg, "HEADER").endswith(b"boundary=\"XX\"\n\n")
    assert mime.binary(msg, "2") == b"\x00\x01\x02"


def test_nested_message_rfc822_has_envelope_structure_and_lines() -> None:
    msg = _corpus("04-nested-rfc822.eml")
    bs = _bs(msg)
    inner = bs[0][1]
    assert inner[:2] == (b"message", b"rfc822")
    assert inner[7][1] == b"Meeting notes"           # its ENVELOPE's subject
    assert inner[8][2] == b"alternative"               # its BODYSTRUCTURE (imapclient leaves it flat)
    assert inner[9] == mime.section(msg, "2").count(b"\n")
    assert mime.section(msg, "2.HEADER").startswith(b"Date: Wed, 4 Nov 2026")
    assert mime.section(msg, "2.HEADER").endswith(b"\r\n\r\n")
    assert mime.section(msg, "2.TEXT").startswith(b"--b2\r\n")
    assert mime.section(msg, "2.1") == b"Notes: we agreed on the plan."
    assert mime.section(msg, "2.2.MIME") == b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    assert mime.section(msg, "1.HEADER") is None      # part 1 is not a message
    assert mime.section(msg, "2.3") is None


def test_digest_parts_default_to_message_rfc822() -> None:
    bs = _bs(_corpus("11-digest.eml"))
    assert [p[:2] for p in bs[0]] == [(b"message", b"rfc822")] * 2
    assert bs[0][0][7][1] == b"first"


def test_multipart_without_boundary_shows_one_empty_text_part() -> None:
    bs = _bs(_corpus("08-broken-no-boundary.eml"))
    assert bs[0] == [(b"text", b"plain", (b"charset", b"us-ascii"), None, None, b"7bit", 0, 0,
                      None, None, None, None)]
    assert bs[1] == b"mixed"


def test_zero_byte_parts_and_a_part_without_header() -> None:
    msg = _corpus("10-empty-parts.eml")
    bs = _bs(msg)
    assert [p[6] for p in bs[0]] == [0, 22, 0]
    assert mime.section(msg, "2") == b"no header in this part"
    assert mime.section(msg, "2.MIME") == b"\r\n"


def test_nesting_stops_at_max_depth_without_recursion_error() -> None:
    depth = 500
    lines = ["Content-Type: multipart/mixed; boundary=L0", ""]
    for i in range(1, depth):
        lines += [f"--L{i - 1}", f"Content-Type: multipart/mixed; boundary=L{i}", ""]
    lines += [f"--L{depth - 1}", "", "x"]
    msg = _msg("\n".join(lines))
    wire = mime.bodystructure(msg)
    assert wire.count(b'"mixed"') == mime.MAX_DEPTH - 1
    assert b'"application" "octet-stream" ("boundary" "L99")' in wire
    assert _read(wire)  # still one valid structure


def test_part_count_is_capped() -> None:
    n = mime.MAX_PARTS + 50
    body = "".join(f"--B\n\n{i}\n" for i in range(n)) + "--B--\n"
    msg = _msg("Content-Type: multipart/mixed; boundary=B\n\n" + body)
    assert len(msg.root.children) == mime.MAX_PARTS - 1


def test_longer_boundary_that_starts_with_the_outer_one_is_not_a_delimiter() -> None:
    msg = _corpus("17-prefix-boundaries.eml")
    bs = _bs(msg, False)
    assert bs[0][0][1] == b"alternative" and len(bs[0][0][0]) == 2
    assert mime.section(msg, "2") == b"outer two"


def test_content_params_rfc2231_continuations_and_charset() -> None:
    bs = _bs(_corpus("05-encoded-words.eml"))
    att = bs[0][1]
    assert att[2] == (b"name*", b"UTF-8''%E8%AB%8B%E6%B1%82%E6%9B%B8.txt")
    assert bs[0][2][2] == (b"charset", b"us-ascii", b"title", b"long title continued")
    part = _corpus("05-encoded-words.eml").root.children[1]
    assert mime.decoded_param(part.params, "name") == "請求書.txt"


def test_extension_data_md5_disposition_language_location() -> None:
    bs = _bs(_corpus("03-mixed-attachment.eml"))
    pdf = bs[0][1]
    assert pdf[3:5] == (b"<part2.report@example.jp>", b"Quarterly report")
    assert pdf[7:] == (b"Q2hlY2sgSW50ZWdyaXR5IQ==", (b"attachment", (b"filename", b"report.pdf", b"size", b"768")),
                       (b"en", b"de"), b"http://example.jp/report.pdf")
    assert bs[0][0][10] == (b"en",)


def test_type_names_keep_their_spelling() -> None:
    bs = _bs(_msg("Content-Type: TEXT/Html; CHARSET=UTF-8\n\n<p>\n"))
    assert bs[:3] == (b"TEXT", b"Html", (b"CHARSET", b"UTF-8"))


def test_header_without_blank_line_is_all_header() -> None:
    msg = _corpus("18-header-only.eml")
    assert mime.section(msg, "TEXT") == b""
    assert mime.section(msg, "HEADER") == (CORPUS / "18-header-only.eml").read_bytes()


# ---------------------------------------------------------------- ENVELOPE


def test_envelope_fields_and_sender_reply_to_default_to_from() -> None:
    env = _read(mime.envelope(_corpus("01-plain.eml")))[0]
    assert env[0] == b"Mon, 2 Nov 2026 10:59:01 +0100"
    assert env[1] == b"Lunch on Friday?"
    alice = ((b"Alice Example", None, b"alice", b"example.org"),)
    assert env[2] == env[3] == env[4] == alice
    assert env[5] == ((b"Bob", None, b"bob", b"example.net"),)
    assert env[6:9] == (None, None, None)
    assert env[9] == b"<20261102105901.1234@example.org>"


def test_envelope_groups_routes_comments_and_missing_parts() -> None:
    env = _read(mime.envelope(_corpus("09-groups-no-date.eml")))[0]
    assert env[0] is None
    assert env[5] == ((None, None, b"Friends", None), (None, None, b"alice", b"example.org"),
                      (b"Bob B.", None, b"bob", b"example.net"), (None, None, None, None),
                      (None, None, b"undisclosed-recipients", None), (None, None, None, None))
    assert env[6] == ((None, None, b"root", b"MISSING_DOMAIN"), (None, b"@route1,@route2", b"user", b"example.com"),
                      (b"Joe Public", None, b"joe", b"example.com"))
    assert env[7] is None  # "Bcc:" with nothing


def test_envelope_keeps_encoded_words_and_quotes_8bit_as_literal() -> None:
    env = mime.envelope(_corpus("05-encoded-words.eml"))
    assert b'"=?UTF-8?B?5pel5pys6Kqe44Gu5Lu25ZCN?= =?UTF-8?B?44Gn44GZ?="' in env
    eight = _corpus("06-eightbit-headers.eml")
    assert b"{37}\r\nGr\xc3\xbc\xc3\x9fe" in mime.envelope(eight)
    assert b'"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln' in mime.envelope(eight, utf8=True)
    assert _read(mime.envelope(eight))[0][1] == "Grüße aus Köln – 8-bit im Header".encode()


def test_envelope_empty_subject_is_empty_string_and_empty_from_is_nil() -> None:
    env = _read(mime.envelope(_msg("Subject: \nFrom: \n\n")))[0]
    assert env[1] == b"" and env[2] is None and env[3] is None


def test_envelope_quoted_names_with_commas_and_escapes() -> None:
    env = _read(mime.envelope(_msg('From: "Quoted \\"Nick\\" Name" <n@x.org>\nTo: "Doe, J" <j@x.org>, k@x.org\n\n')))[0]
    assert env[2] == ((b'Quoted "Nick" Name', None, b"n", b"x.org"),)
    assert env[5] == ((b"Doe, J", None, b"j", b"x.org"), (None, None, b"k", b"x.org"))


_WORD = st.text(alphabet="abcXYZ019", min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(_WORD, max_size=3), st.booleans(), st.booleans(), _WORD, _WORD,
       st.sampled_from(["", " ", "  ", "\t"]))
def test_the_simple_address_fast_path_agrees_with_the_tokenizer(
        words: list[str], quoted: bool, angle: bool, local: str, domain: str, pad: str) -> None:
    name = " ".join(words)
    if quoted:
        name = f'"{name}"'
    addr = f"{local}@{domain}.example"
    value = f"{pad}{name}{pad}<{addr}>{pad}" if name or angle else f"{pad}{addr}{pad}"
    assert mime.addresses(value.encode()) == mime._tokenized_addresses(value.encode())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"a@b.example", b" Al Bo <al@b.example>", b"<x@y.example> ", b"", b" ",
                                 b"Name<n@m.example>", b"broken <x@y", b"root", b"q\"x\" <q@x.example>",
                                 b"g: a@b.example;", b"(c) c@d.example", b'"Last, First" <l@f.example>',
                                 b'a@b.example "open', b'"x" y@z.example']), min_size=1, max_size=5))
def test_the_address_list_fast_path_agrees_with_the_tokenizer(items: list[bytes]) -> None:
    value = b",".join(items)
    assert mime.addresses(value) == mime._tokenized_addresses(value)


# ---------------------------------------------------------------- sections


def test_header_fields_and_not_keep_folding_and_order() -> None:
    msg = _msg("Subject: a\n b\nX-A: 1\nFrom: f@x\nx-a: 2\n\nbody\n")
    assert mime.section(msg, "HEADER.FIELDS (X-A SUBJECT)") == b"Subject: a\r\n b\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
    assert mime.section(msg, "HEADER.FIELDS.NOT (x-a subject)") == b"From: f@x\r\n\r\n"
    assert mime.section(msg, "HEADER.FIELDS (NOPE)") == b"\r\n"
    assert mime.section(msg, "") == msg.raw
    assert mime.section(msg, "BOGUS") is None
    assert mime.section(msg, "0") is None


def test_header_fields_of_an_encapsulated_message() -> None:
    msg = _corpus("04-nested-rfc822.eml")
    assert mime.section(msg, "2.HEADER.FIELDS (SUBJECT)") == b"Subject: Meeting notes\r\n\r\n"
    assert mime.section(msg, "1.HEADER.FIELDS (SUBJECT)") is None


# ---------------------------------------------------------------- BINARY


def test_binary_decodes_base64_and_quoted_printable() -> None:
    msg = _corpus("02-alternative.eml")
    assert mime.binary(msg, "1") == "Grüße aus dem Shop!\r\nAlle Angebote: https://shop.example/angebote?a=1&b=2".encode()
    assert mime.binary_size(msg, "1") == len(mime.binary(msg, "1") or b"")
    assert mime.binary(_corpus("05-encoded-words.eml"), "2") == b"hello world\n"
    assert mime.binary(msg, "9") is None and mime.binary_size(msg, "9") is None
    assert mime.binary(msg, "") == msg.raw


def test_binary_of_unknown_transfer_encoding_raises() -> None:
    msg = _msg("Content-Transfer-Encoding: x-uuencode\n\nbegin 644 f\n")
    with pytest.raises(mime.UnknownTransferEncoding):
        mime.binary(msg, "1")
    with pytest.raises(mime.UnknownTransferEncoding):
        mime.binary_size(msg, "1")


def test_binary_of_broken_base64_is_best_effort() -> None:
    msg = _msg("Content-Transfer-Encoding: base64\n\naGVsbG8*!gd29y\nbGQ\n")
    assert mime.binary(msg, "1") == b"hello world"


# ---------------------------------------------------------------- SEARCH text, headers, dates


def test_header_values_decode_encoded_words_and_unfold() -> None:
    msg = _corpus("05-encoded-words.eml")
    assert mime.header_values(msg, "Subject") == ["日本語の件名です"]
    assert mime.header_values(msg, "from") == ["André Pirard <PIRARD@vm1.ulg.ac.be>"]
    assert mime.header_values(msg, "x-missing") == []
    assert mime.header_values(_corpus("15-odd-params.eml"), "subject") == ["odd parameters and a folded subject line"]


def test_header_values_unknown_charset_and_8bit_are_best_effort() -> None:
    msg = _msg(b"Subject: =?x-unknown?Q?caf=C3=A9?= \xff\n\n")
    assert mime.header_values(msg, "subject")[0].startswith("café")


def test_text_content_decodes_transfer_encoding_and_charset_of_text_parts() -> None:
    text = mime.text_content(_corpus("02-alternative.eml"), headers=False)
    assert "Grüße aus dem Shop!" in text and "a=1&b=2" in text
    jp = mime.text_content(_corpus("05-encoded-words.eml"), headers=False)
    assert "こんにちは" in jp
    assert "aGVsbG8" not in jp  # not a text part
    latin = mime.text_content(_msg(b"Content-Type: text/plain; charset=iso-8859-1\n\ncaf\xe9\n"), headers=False)
    assert "café" in latin
    nested = mime.text_content(_corpus("04-nested-rfc822.eml"), headers=True)
    assert "subject: fwd: meeting notes" in nested.lower() and "we agreed on the plan" in nested
    assert "subject: meeting notes" in nested.lower()  # the encapsulated message's header
    assert "fwd: meeting notes" not in mime.text_content(_corpus("04-nested-rfc822.eml"), headers=False).lower()
    assert "content-disposition: inline" in nested.lower()  # a part's MIME header counts for TEXT
    assert "inline" not in mime.text_content(_corpus("04-nested-rfc822.eml"), headers=False)


def test_date_header() -> None:
    assert mime.date_header(_corpus("01-plain.eml")) == datetime(2026, 11, 2, 10, 59, 1,
                                                                  tzinfo=timezone(timedelta(hours=1)))
    assert mime.date_header(_corpus("09-groups-no-date.eml")) is None
    assert mime.date_header(_msg("Date: not a date\n\n")) is None
    assert mime.date_header(_msg("Date: 2 Nov 2026 10:00:00 -0000\n\n")) == datetime(2026, 11, 2, 10, tzinfo=UTC)


@pytest.mark.parametrize(("subject", "base"), [
    ("Hello", "Hello"),
    ("Re: Hello", "Hello"),
    ("RE: re: Fwd: Hello", "Hello"),
    ("Re[2]: Hello", "Hello"),                    # subj-refwd may carry a blob before its colon
    ("Rex: Hello", "Rex: Hello"),
    ("Re: Re: Re:   Hello", "Hello"),
    ("Re [2]: Hello", "Hello"),
    ("[list] Re: Hello", "Hello"),
    ("[list] [other] Hello", "Hello"),
    ("[list]", "[list]"),                         # removing the blob would leave nothing
    ("Hello (fwd)", "Hello"),
    ("Hello (fwd) (FWD)  ", "Hello"),
    ("[Fwd: Re: Hello]", "Hello"),
    ("Re: [Fwd: [list] Hello (fwd)]", "Hello"),
    ("  Fw:   Hello \t world  ", "Hello world"),
    ("=?UTF-8?Q?Re=3A_Gr=C3=BC=C3=9Fe?=", "Grüße"),
    ("", ""),
    ("Re:", ""),
])
def test_base_subject_rfc5256(subject: str, base: str) -> None:
    assert mime.base_subject(subject) == base


def test_base_subject_of_a_hostile_subject_is_linear() -> None:
    import time

    start = time.perf_counter()
    assert mime.base_subject("re: " * 50_000 + "x" + " (fwd)" * 50_000) == "x"
    assert mime.base_subject("[fwd: " * 20_000 + "y" + "]" * 20_000) == "y"
    assert mime.base_subject("(fwd) " * 50_000 + "z") == "(fwd) " * 50_000 + "z"
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------- quoting


def test_quote_forms() -> None:
    assert mime.quote(None) == b"NIL"
    assert mime.quote("plain") == b'"plain"'
    assert mime.quote('a"b\\c') == b'"a\\"b\\\\c"'
    assert mime.quote("two\r\nlines") == b"{10}\r\ntwo\r\nlines"
    assert mime.quote("Grüße") == b"{7}\r\nGr\xc3\xbc\xc3\x9fe"
    assert mime.quote("Grüße", utf8=True) == b'"Gr\xc3\xbc\xc3\x9fe"'
    assert mime.quote(b"\xff", utf8=True) == b"{1}\r\n\xff"   # not UTF-8: a literal still
    assert mime.quote("") == b'""'


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80)), st.booleans())
def test_quote_round_trips_through_imapclient(value: str | bytes, utf8: bool) -> None:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    parsed = _read(b"X " + mime.quote(value, utf8=utf8) + b" Y")
    assert parsed == (b"X", raw.replace(b"\0", b""), b"Y")


# ---------------------------------------------------------------- never raises

_FRAGMENTS = st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=B\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Type: multipart/digest; boundary=\"B\"\r\n", b"Content-Type: text/plain; charset*0*=x'y'%\r\n",
    b"--B\r\n", b"--B--\r\n", b"\r\n", b"\n", b"From: <a@b\r\n", b"To: g: a@b, (c\r\n", b"Subject: =?x?Q?=?=\r\n",
    b" folded\r\n", b"Content-Transfer-Encoding: base64\r\n", b"Content-Disposition: a; filename*1*=%ZZ\r\n",
    b"\xff\xfe\x00", b"body line\r\n", b"Content-Language: (x\r\n", b"Date: Mon, 99 Foo 2026 99:99:99 +9999\r\n",
])


def _exercise(raw: bytes) -> None:
    msg = mime.parse(raw)
    _read(b"* 1 FETCH (ENVELOPE " + mime.envelope(msg) + b" BODYSTRUCTURE " + mime.bodystructure(msg) + b")")
    mime.bodystructure(msg, extended=False)
    for spec in ("", "HEADER", "TEXT", "1", "1.MIME", "2", "2.1", "1.HEADER", "HEADER.FIELDS (FROM)"):
        mime.section(msg, spec)
    for part in ("1", "2", "1.1"):
        with contextlib.suppress(mime.UnknownTransferEncoding):
            mime.binary_size(msg, part)
    mime.text_content(msg, headers=True)
    mime.header_values(msg, "subject")
    mime.date_header(msg)
    for subject in mime.header_values(msg, "subject"):
        mime.base_subject(subject)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    _exercise(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FRAGMENTS, max_size=40))
def test_mime_shaped_garbage_never_raises(fragments: list[bytes]) -> None:
    _exercise(b"".join(fragments))


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda p: p.name)
def test_corpus_answers_parse_as_imap(path: Path) -> None:
    _exercise(path.read_bytes())


def test_bodystructure_utf8_quotes_8bit_parameters() -> None:
    msg = _corpus("15-odd-params.eml")
    assert b"{11}\r\nGr\xc3\xbc\xc3\x9fe.txt" in mime.bodystructure(msg)
    assert b'"Gr\xc3\xbc\xc3\x9fe.txt"' in mime.bodystructure(msg, utf8=True)


def test_the_module_is_pure() -> None:
    """No sockets, files, clocks or event loop: the listener and the store own all I/O."""
    import ast

    tree = ast.parse(Path(mime.__file__).read_text(encoding="utf-8"))
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not roots & {"asyncio", "socket", "ssl", "time", "os", "selectors", "io", "pathlib", "dns", "sqlite3"}


HOSTILE = {
    "50k parts": b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
                 + b"--B\r\nContent-Type: text/plain\r\n\r\nx\r\n" * 50_000 + b"--B--\r\n",
    "folded header field": b"Subject: " + b"a\r\n " * 150_000 + b"\r\nTo: " + b"x@y, " * 50_000 + b"\r\n\r\nbody",
    "boundary-like lines": b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n\r\n" + b"--Bx\r\n" * 300_000,
    "unclosed comments": b"From: " + b"(" * 300_000 + b"\r\nContent-Type: text/plain; a=" + b"(" * 300_000
                         + b"\r\n\r\n",
    "unclosed quotes": b"To: " + b'"a\\",' * 100_000 + b"\r\n\r\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_shapes_cost_linear_time(name: str) -> None:
    import time

    start = time.perf_counter()
    _exercise(HOSTILE[name])
    assert time.perf_counter() - start < 20, name

"""Differential test of SEARCH, SORT and THREAD against Dovecot: the MIME corpus in a private
Dovecot (the fixture of tests/test_imap_mime_dovecot.py) and in yuubin, in the same order, the same
commands, the answers compared. Where we differ on purpose, KNOWN says why, with the RFC."""

from __future__ import annotations

import imaplib
import re

import pytest

from tests.harness import ACCOUNTS
from tests.test_imap_mime_dovecot import CORPUS, dovecot  # noqa: F401 - the fixture

ALICE = "alice@example.test"

KEYS = [
    "ALL", "SUBJECT test", "SUBJECT message", "FROM example", "FROM alice", "TO bob", "CC example",
    "HEADER Content-Type multipart", "HEADER Message-ID \"\"", "HEADER X-Nothing \"\"",
    "BODY hello", "BODY the", "TEXT boundary", "TEXT from", "LARGER 1000", "SMALLER 500",
    "SENTBEFORE 1-Jan-2015", "SENTSINCE 1-Jan-2020", "SENTON 1-Jan-2024",
    "NOT SUBJECT test", "OR FROM alice TO bob", "1:3", "UID 2:*", "NEW", "UNSEEN", "ALL NOT DELETED",
    "SUBJECT für", "SUBJECT 日本語", "SUBJECT köln", "SUBJECT \"meeting notes\"", "SUBJECT ✓", "SUBJECT fwd",
    "FROM \"\"", "TO undisclosed", "BODY angebote", "TEXT köln", "TEXT deep", "HEADER Subject \"re: [list]\"",
    "BODY grüße",
    "KEYWORD $Junk", "UNKEYWORD $Junk", "OR SMALLER 300 LARGER 3000", "NOT (FROM a TO b)",
]
SORTS = ["(ARRIVAL)", "(SUBJECT)", "(REVERSE DATE)", "(FROM)", "(TO)", "(CC)", "(SIZE)", "(DISPLAYFROM)",
         "(SUBJECT DATE)"]

# (command) -> why we differ from Dovecot and are right
KNOWN: dict[str, str] = {
    "SEARCH CHARSET UTF-8 SENTBEFORE 1-Jan-2015": (
        "Messages without a Date: header (or with one that does not parse): RFC 9051 6.4.4 defines "
        "SENTBEFORE/SENTON/SENTSINCE by the Date: header, so a message without one has no sent date "
        "and matches none of them; Dovecot takes a missing date as 1970 and matches it as 'before'."),
}


# (command) -> a difference where Dovecot is right and we are not yet: the test checks the
# difference is still there, so a fix shows up as a failure that asks to remove the entry.
DEFECTS: dict[str, str] = {
    "SEARCH CHARSET UTF-8 BODY grüße": (
        "mime.text_content keeps a message/global part (RFC 6532) a leaf, as BODYSTRUCTURE does, so "
        "the text of the message inside is not searched; Dovecot searches it (corpus 26)."),
}


@pytest.fixture
def ours(make_server, client_tls, dovecot):  # noqa: F811 - the fixture
    server = make_server(listener=[{"kind": "mx", "address": "127.0.0.1:0"},
                                   {"kind": "imaps", "address": "127.0.0.1:0"}])
    c = imaplib.IMAP4_SSL("127.0.0.1", server.port("imaps"), ssl_context=client_tls, timeout=20)
    c.login(ALICE, ACCOUNTS[ALICE])
    typ, dates = dovecot.fetch("1:*", "(INTERNALDATE)")  # the same arrival times as Dovecot's copy
    assert typ == "OK"
    for path, date in zip(CORPUS, dates, strict=True):
        when = re.search(rb'INTERNALDATE ("[^"]+")', date).group(1).decode()
        typ, data = c.append("INBOX", None, when, path.read_bytes())
        assert typ == "OK", data
    typ, data = c.select("INBOX", readonly=True)
    assert typ == "OK" and int(data[0]) == len(CORPUS)
    yield c
    c.logout()


def _answer(client: imaplib.IMAP4, *args: str) -> str:
    if not args[-1].isascii():  # imaplib sends a literal last: a non-ASCII value goes as one
        *head, last = args
        client.literal = last.encode("utf-8")
        args = tuple(head)
    typ, data = client._simple_command(*args)
    assert typ == "OK", (args, typ, data)
    typ, data = client._untagged_response(typ, data, args[0])
    return " ".join(x.decode() for x in data if x)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_search_sort_thread_match_dovecot(dovecot, ours):  # noqa: F811 - the fixture
    diffs = []
    commands: list[tuple[str, ...]] = [("SEARCH", "CHARSET", "UTF-8", *(k.rsplit(" ", 1) if not k.isascii() else [k]))
                                       for k in KEYS]
    commands += [("SORT", s, "UTF-8", "ALL") for s in SORTS]
    commands += [("THREAD", alg, "UTF-8", "ALL") for alg in ("ORDEREDSUBJECT", "REFERENCES")]
    for cmd in commands:
        theirs, mine = _norm(_answer(dovecot, *cmd)), _norm(_answer(ours, *cmd))
        name = " ".join(cmd)
        if name in DEFECTS:
            assert theirs != mine, f"{name} agrees with Dovecot now: remove it from DEFECTS"
        elif theirs != mine and name not in KNOWN:
            diffs.append(f"{name}: dovecot {theirs!r}, yuubin {mine!r}")
    assert not diffs, "\n".join(diffs)



def _threaded() -> list[bytes]:
    """Replies with References, with only In-Reply-To, to a missing parent, subject-only kin, a loop."""
    spec = [  # (id, references, subject, day)
        ("a", "", "plans", 1), ("b", "<a@x>", "Re: plans", 2), ("c", "<a@x> <b@x>", "Re: plans", 3),
        ("d", "<missing@x>", "Re: lost", 4), ("e", "<missing@x>", "Re: lost", 5), ("f", "", "Re: plans", 6),
        ("g", "", "other", 7), ("h", "<g@x>", "Fwd: other", 8), ("i", "<i@x>", "self", 9),
        ("j", "<k@x>", "loop", 10), ("k", "<j@x>", "loop", 11), ("l", "", "[list] plans (fwd)", 12),
        ("m", "IRT:<c@x>", "Re: Re: plans", 13), ("n", "", "", 14), ("o", "", "", 15),
    ]
    out = []
    for mid, refs, subject, day in spec:
        head = f"From: t@example.test\r\nMessage-ID: <{mid}@x>\r\nSubject: {subject}\r\n"
        head += f"Date: {day:02d} Jan 2024 10:00:00 +0000\r\n"
        if refs.startswith("IRT:"):
            head += f"In-Reply-To: {refs[4:]}\r\n"
        elif refs:
            head += f"References: {refs}\r\n"
        out.append((head + "\r\nbody\r\n").encode())
    return out


def test_thread_references_matches_dovecot(dovecot, make_server, client_tls):  # noqa: F811 - the fixture
    server = make_server(listener=[{"kind": "mx", "address": "127.0.0.1:0"},
                                   {"kind": "imaps", "address": "127.0.0.1:0"}])
    ours = imaplib.IMAP4_SSL("127.0.0.1", server.port("imaps"), ssl_context=client_tls, timeout=20)
    ours.login(ALICE, ACCOUNTS[ALICE])
    when = '"01-Feb-2024 10:00:00 +0000"'
    for client in (dovecot, ours):
        assert client.create("Threads")[0] == "OK"
        for msg in _threaded():
            assert client.append("Threads", None, when, msg)[0] == "OK"
        assert client.select("Threads", readonly=True)[0] == "OK"
    try:
        for alg in ("REFERENCES", "ORDEREDSUBJECT"):
            theirs, mine = _norm(_answer(dovecot, "THREAD", alg, "UTF-8", "ALL")), _norm(
                _answer(ours, "THREAD", alg, "UTF-8", "ALL"))
            assert mine == theirs and mine.count("(") >= 5, (alg, theirs, mine)
        for crit in ("(SUBJECT)", "(DATE)", "(REVERSE SUBJECT)"):
            assert _norm(_answer(ours, "SORT", crit, "UTF-8", "ALL")) == _norm(
                _answer(dovecot, "SORT", crit, "UTF-8", "ALL")), crit
    finally:
        dovecot.select("INBOX", readonly=True)
        ours.logout()

"""The sans-IO IMAP core, byte for byte: framing, literals, limits, state rules, the parser of each
command, the response encoder, and property tests of the parser and encoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imapclient.response_parser import parse_fetch_response, parse_response

from yuubin.imap import protocol as P
from yuubin.imap.protocol import NEED_DATA, IMAPServerConnection, Limits, SeqSet, State


def conn(state: State = State.SELECTED, *, tls: bool = True, limits: Limits | None = None,
         **kw) -> IMAPServerConnection:
    c = IMAPServerConnection(limits or Limits(), tls_available=True, tls_active=tls, **kw)
    c.set_state(state)
    return c


def feed(c: IMAPServerConnection, data: bytes, now: float = 0.0) -> tuple[list, bytes]:
    c.receive_data(data)
    events = []
    while True:
        ev = c.next_command(now)
        if ev is NEED_DATA or ev is P.CLOSED:
            break
        events.append(ev)
    return events, c.data_to_send()


def one(line: bytes, state: State = State.SELECTED, **kw):
    c = conn(state, **kw)
    evs, out = feed(c, line)
    assert len(evs) == 1, out
    return evs[0]


# ---- greeting, capabilities, state -------------------------------------------------------


def test_greeting_before_tls_offers_starttls_and_disables_login():
    c = conn(State.NOT_AUTHENTICATED, tls=False)
    c.greeting("ready")
    out = c.data_to_send()
    assert out.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b"STARTTLS" in out and b"LOGINDISABLED" in out and b"AUTH=" not in out


def test_after_tls_auth_plain_is_offered_and_starttls_is_not():
    c = conn(State.NOT_AUTHENTICATED)
    evs, out = feed(c, b"a CAPABILITY\r\n")
    assert evs == []
    assert b"AUTH=PLAIN" in out and b"STARTTLS" not in out and b"LOGINDISABLED" not in out
    assert out.endswith(b"a OK CAPABILITY completed\r\n")


def test_extensions_only_after_login():
    c = conn(State.NOT_AUTHENTICATED, extensions=("UIDPLUS", "MOVE"))
    assert "MOVE" not in c.capabilities()
    c.set_state(State.AUTHENTICATED)
    assert "MOVE" in c.capabilities() and "UIDPLUS" in c.capabilities()


def test_login_before_tls_is_refused_with_privacyrequired():
    c = conn(State.NOT_AUTHENTICATED, tls=False)
    evs, out = feed(c, b"a1 LOGIN joe secret\r\na2 AUTHENTICATE PLAIN\r\n")
    assert evs == []
    assert out == (b"a1 NO [PRIVACYREQUIRED] LOGIN needs TLS first (STARTTLS)\r\n"
                   b"a2 NO [PRIVACYREQUIRED] authentication needs TLS first (STARTTLS)\r\n")


@pytest.mark.parametrize("line,state", [
    (b"a FETCH 1 FLAGS\r\n", State.NOT_AUTHENTICATED),
    (b"a SELECT INBOX\r\n", State.NOT_AUTHENTICATED),
    (b"a FETCH 1 FLAGS\r\n", State.AUTHENTICATED),
    (b"a LOGIN a b\r\n", State.AUTHENTICATED),
    (b"a EXPUNGE\r\n", State.AUTHENTICATED),
    (b"a UID FETCH 1 FLAGS\r\n", State.AUTHENTICATED),
])
def test_commands_outside_their_state_get_bad(line, state):
    c = conn(state)
    evs, out = feed(c, line)
    assert evs == [] and out.startswith(b"a BAD ") and b"not allowed" in out
    assert c.take_errors()[0].tag == "a"


def test_starttls_when_active_is_bad_and_pipelined_plaintext_is_dropped():
    c = conn(State.NOT_AUTHENTICATED, tls=True)
    _evs, out = feed(c, b"a STARTTLS\r\n")
    assert out == b"a BAD TLS is already active\r\n"
    c = conn(State.NOT_AUTHENTICATED, tls=False)
    c.receive_data(b"a STARTTLS\r\nb LOGIN x y\r\n")
    ev = c.next_command(0)
    assert isinstance(ev, P.Simple) and ev.name == "STARTTLS"
    c.tls_started()
    assert c.next_command(0) is NEED_DATA


def test_unknown_command_and_garbage_never_raise():
    c = conn()
    _evs, out = feed(c, b"a FROB\r\n\r\n* NOOP\r\nb\r\nc (\r\nd FETCH\r\n")
    assert out.count(b" BAD ") == 6


# ---- literals and limits --------------------------------------------------------------------


def test_synchronising_literal_gets_a_continuation():
    c = conn(State.AUTHENTICATED)
    evs, out = feed(c, b"a APPEND INBOX {5}\r\n")
    assert evs == [] and out == b"+ Ready for literal data\r\n"
    evs, out = feed(c, b"hello\r\n")
    assert out == b""
    assert isinstance(evs[0], P.Append) and evs[0].messages[0].data == b"hello"


def test_non_synchronising_literal_has_no_continuation():
    evs, out = feed(conn(State.AUTHENTICATED), b"a LOGIN {3+}\r\njoe {2+}\r\npw\r\n")
    assert out.startswith(b"a BAD")  # LOGIN in the authenticated state
    c = conn(State.NOT_AUTHENTICATED)
    evs, out = feed(c, b"a LOGIN {3+}\r\njoe {2-}\r\npw\r\n")
    assert out == b""
    assert (evs[0].username, evs[0].password) == ("joe", "pw")


def test_too_big_literal_is_refused_with_toobig_and_the_session_goes_on():
    c = conn(State.AUTHENTICATED, limits=Limits(literal_size=10))
    evs, out = feed(c, b"a APPEND INBOX {11}\r\n")
    assert out == b"a NO [TOOBIG] literal of 11 octets is over the limit of 10\r\n"
    evs, out = feed(c, b"b NOOP\r\n")
    assert isinstance(evs[0], P.Simple) and evs[0].tag == "b"


def test_too_big_non_synchronising_literal_is_read_away():
    c = conn(State.AUTHENTICATED, limits=Limits(literal_size=10))
    evs, out = feed(c, b"a APPEND INBOX {12+}\r\n0123456789ab\r\nb NOOP\r\n")
    assert out.startswith(b"a NO [TOOBIG]")
    assert [e.tag for e in evs] == ["b"]


def test_overlong_line_is_bad_and_too_long_without_end_closes():
    c = conn(limits=Limits(line_length=8192))
    evs, out = feed(c, b"a NOOP " + b"x" * 9000 + b"\r\nb NOOP\r\n")
    assert out.startswith(b"a BAD command line too long")
    assert [e.tag for e in evs] == ["b"]
    c = conn(limits=Limits(line_length=8192))
    evs, out = feed(c, b"a NOOP " + b"x" * 9000)
    assert b"BYE" in out and c.closed


def test_commands_per_second_limit_says_bye():
    c = conn(limits=Limits(commands_per_second=5))
    evs, out = feed(c, b"a NOOP\r\n" * 8, now=100.0)
    assert len(evs) == 5 and b"* BYE too many commands per second" in out and c.closed


def test_commands_per_second_refill_with_time():
    c = conn(limits=Limits(commands_per_second=2))
    for t in range(10):
        evs, _ = feed(c, b"a NOOP\r\n", now=float(t))
        assert len(evs) == 1


def test_max_errors_ends_the_session():
    c = conn(limits=Limits(max_errors=3))
    _evs, out = feed(c, b"a X\r\nb X\r\nc X\r\nd NOOP\r\n")
    assert out.count(b" BAD ") == 3 and b"* BYE too many errors" in out and c.closed


# ---- commands ------------------------------------------------------------------------------


def test_fetch_items_macros_sections_and_partials():
    ev = one(b"a FETCH 1:*,3 (FLAGS BODY.PEEK[HEADER.FIELDS (From to)]<0.100> BODY[1.2.MIME] BINARY[2] "
             b"RFC822.SIZE)\r\n")
    assert isinstance(ev, P.Fetch)
    assert ev.sequence == SeqSet(((1, P.STAR), (3, 3)))
    names = [(i.name, i.section, i.partial, i.peek) for i in ev.items]
    assert names == [("FLAGS", None, None, False), ("BODY", "HEADER.FIELDS (FROM TO)", (0, 100), True),
                     ("BODY", "1.2.MIME", None, False), ("BINARY", "2", None, False),
                     ("RFC822.SIZE", None, None, False)]
    assert ev.items[1].label() == "BODY[HEADER.FIELDS (FROM TO)]<0>"
    ev = one(b"a FETCH 2 ALL\r\n")
    assert [i.name for i in ev.items] == ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]
    ev = one(b"a UID FETCH 2 (FLAGS) (CHANGEDSINCE 12345 VANISHED)\r\n")
    assert ev.uid and ev.changedsince == 12345 and ev.vanished and ev.items[-1].name == "MODSEQ"


@pytest.mark.parametrize("bad", [b"a FETCH 0 FLAGS\r\n", b"a FETCH 1 (FLAGS\r\n", b"a FETCH 1 BODY[X]\r\n",
                                 b"a FETCH 1 BODY[]<5>\r\n", b"a FETCH x FLAGS\r\n", b"a FETCH 1 MIME\r\n",
                                 b"a FETCH 1 BODY[MIME]\r\n", b"a FETCH 1 (FLAGS) (VANISHED)\r\n"])
def test_bad_fetch_is_bad(bad):
    _evs, out = feed(conn(), bad)
    assert out.startswith(b"a BAD")


def test_store_forms():
    ev = one(b"a STORE 1:3 +FLAGS.SILENT (\\Seen \\deleted $Label)\r\n")
    assert (ev.mode, ev.silent, ev.flags) == ("+", True, ("\\Seen", "\\Deleted", "$Label"))
    ev = one(b"a UID STORE 5 (UNCHANGEDSINCE 7) FLAGS \\Flagged\r\n")
    assert ev.uid and ev.unchangedsince == 7 and ev.flags == ("\\Flagged",) and ev.mode == "="
    _evs, out = feed(conn(), b"a STORE 1 +FLAGS (\\Recent)\r\n")
    assert out.startswith(b"a BAD")


def test_search_tree_with_charset_literal_and_esearch():
    ev = one(b"a UID SEARCH RETURN (MIN COUNT) CHARSET UTF-8 OR FROM {4+}\r\n\xc3\xa9tt SUBJECT \"x y\" "
             b"NOT (1:3 UNSEEN) HEADER X-A \"\" SINCE 1-Feb-2020 LARGER 10 MODSEQ 5\r\n")
    assert ev.uid and ev.returns == ("MIN", "COUNT") and ev.charset == "UTF-8"
    K = P.Key
    assert ev.key.op == "AND"
    parts = ev.key.value
    assert parts[0] == K("OR", (K("FROM", "étt"), K("SUBJECT", "x y")))
    assert parts[1] == K("NOT", K("AND", (K("SEQ", SeqSet(((1, 3),))), K("UNSEEN"))))
    assert parts[2] == K("HEADER", ("X-A", ""))
    assert parts[4] == K("LARGER", 10) and parts[5] == K("MODSEQ", 5)


def test_search_bad_charset_and_unknown_key():
    _evs, out = feed(conn(), b"a SEARCH CHARSET KOI8-R ALL\r\nb SEARCH FROBNICATE\r\nc SEARCH\r\n")
    assert out.startswith(b"a NO [BADCHARSET (US-ASCII UTF-8)] ")
    assert out.count(b" BAD ") == 2


def test_list_extended_and_status():
    ev = one(b'a LIST (SUBSCRIBED) "" ("*" "&AOk-") RETURN (STATUS (MESSAGES SIZE) CHILDREN)\r\n',
             State.AUTHENTICATED)
    assert ev.patterns == ("*", "é") and ev.selection == {"SUBSCRIBED"} and ev.status == ("MESSAGES", "SIZE")
    ev = one(b"a STATUS Drafts (UIDNEXT UNSEEN HIGHESTMODSEQ)\r\n", State.AUTHENTICATED)
    assert ev.mailbox == "Drafts" and ev.items == ("UIDNEXT", "UNSEEN", "HIGHESTMODSEQ")
    ev = one(b'a LSUB "" *\r\n', State.AUTHENTICATED)
    assert ev.lsub and ev.patterns == ("*",)


def test_select_qresync_and_append_multi_catenate():
    ev = one(b"a SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211 (1,3 10,30)))\r\n", State.AUTHENTICATED)
    assert ev.mailbox == "INBOX" and ev.qresync[:2] == (67890007, 20050715194045000)
    c = conn(State.AUTHENTICATED)
    evs, _out = feed(c, b'a APPEND Sent (\\Seen) "05-Jan-2024 10:00:00 +0100" {3+}\r\nabc (\\Draft) {2+}\r\nde '
                       b"CATENATE (TEXT {1+}\r\nx URL \"/INBOX;UID=3\")\r\n")
    app = evs[0]
    assert [m.data for m in app.messages] == [b"abc", b"de", b""]
    assert app.messages[0].flags == ("\\Seen",) and app.messages[1].internaldate is None
    assert app.messages[2].catenate == (("TEXT", b"x"), ("URL", "/INBOX;UID=3"))


def test_authenticate_idle_done_and_enable():
    c = conn(State.NOT_AUTHENTICATED)
    evs, _ = feed(c, b"a AUTHENTICATE PLAIN AGpvZQBwdw==\r\n")
    assert evs[0].initial == "AGpvZQBwdw=="
    c.expect_auth_response("b", b"")
    evs, out = feed(c, b"AGpvZQBwdw==\r\n")
    assert out == b"+ \r\n" and isinstance(evs[0], P.AuthResponse) and evs[0].line == "AGpvZQBwdw=="
    c.set_state(State.SELECTED)
    evs, _ = feed(c, b"i IDLE\r\n")
    c.start_idle("i")
    evs, out = feed(c, b"done\r\n")
    assert out == b"+ idling\r\n" and isinstance(evs[0], P.IdleDone)
    ev = one(b"e ENABLE CONDSTORE utf8=accept\r\n")
    assert ev.capabilities == ("CONDSTORE", "UTF8=ACCEPT")


# ---- encoder ------------------------------------------------------------------------------------


def test_mutf7_round_trip_and_known_values():
    assert P.mutf7_encode("Entwürfe") == b"Entw&APw-rfe"
    assert P.mutf7_encode("~peter/mail/台北/日本語") == b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert P.mutf7_encode("A&B") == b"A&-B"
    assert P.mutf7_decode(b"~peter/mail/&U,BTFw-/&ZeVnLIqe-") == "~peter/mail/台北/日本語"


@given(st.text(max_size=40))
def test_mutf7_round_trips(name):
    assert P.mutf7_decode(P.mutf7_encode(name)) == name


seqsets = st.lists(st.tuples(st.one_of(st.just(P.STAR), st.integers(1, 2**32 - 1)),
                             st.one_of(st.just(P.STAR), st.integers(1, 2**32 - 1))), min_size=1, max_size=6)


@given(seqsets)
def test_sequence_sets_round_trip(ranges):
    s = SeqSet(tuple(ranges))
    assert SeqSet.parse(s.text()).text() == s.text()
    assert SeqSet.parse(s.text()) == SeqSet.parse(SeqSet.parse(s.text()).text())


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_the_parser_never_raises(data):
    for state in (State.NOT_AUTHENTICATED, State.AUTHENTICATED, State.SELECTED):
        c = conn(state)
        c.receive_data(data + b"\r\n")
        for _ in range(50):
            ev = c.next_command(0)
            if ev is NEED_DATA or ev is P.CLOSED:
                break
        c.data_to_send()


_words = st.sampled_from([b"a", b"FETCH", b"1:*", b"(", b")", b"BODY[", b"]", b"{3}\r\nabc", b"{2+}\r\nxy", b'"q"',
                          b"SEARCH", b"OR", b"NOT", b"UID", b"STORE", b"+FLAGS", b"\\Seen", b"HEADER", b"*",
                          b"APPEND", b"LIST", b'""', b"CHARSET", b"UTF-8", b"ALL", b"$", b"<0.1>", b"~{1}\r\n\x00"])


@settings(max_examples=300)
@given(st.lists(_words, max_size=12))
def test_the_parser_never_raises_on_near_commands(words):
    c = conn()
    c.receive_data(b"t " + b" ".join(words) + b"\r\n")
    for _ in range(20):
        ev = c.next_command(0)
        if ev is NEED_DATA or ev is P.CLOSED:
            break


@given(st.one_of(st.none(), st.binary(max_size=200).filter(lambda b: b"\0" not in b),
                 st.text(max_size=100).filter(lambda t: "\0" not in t)))
def test_strings_encode_so_a_client_parser_reads_them_back(value):
    wire = b"1 (BODY[] " + P.quoted(value) + b")"
    parsed = parse_fetch_response(_split_literal(wire))
    got = parsed[1][b"BODY[]"]
    want = None if value is None else (value.encode() if isinstance(value, str) else value)
    assert got == want


@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30))
def test_mailbox_names_encode_so_a_client_parser_reads_them_back(name):
    wire = b'(\\HasNoChildren) "/" ' + P.mailbox_name(name)
    parsed = parse_response(_split_literal(wire))
    raw = parsed[2]
    raw = raw if isinstance(raw, bytes) else str(raw).encode()
    assert P.mutf7_decode(raw) == (name if name.upper() != "INBOX" else "INBOX")


def _split_literal(wire: bytes) -> list:
    """imaplib's shape of one response: [(text up to {n}, literal), rest] or [text]."""
    import re
    m = re.search(rb"\{(\d+)\}\r\n", wire)
    if not m:
        return [wire]
    n = int(m.group(1))
    rest = wire[m.end() + n:]
    return [(wire[:m.end() - 2], wire[m.end():m.end() + n])] + ([rest] if rest else [])


def test_date_time_round_trip():
    ts = P.parse_date_time("05-Jan-2024 10:00:00 +0100")
    assert P.date_time(ts, 60) == b'" 5-Jan-2024 10:00:00 +0100"'


def test_literal_of_a_command_not_allowed_here_is_refused_before_the_continuation():
    c = conn(State.NOT_AUTHENTICATED)
    _evs, out = feed(c, b"a APPEND INBOX {100}\r\n")
    assert out == b"a BAD APPEND is not allowed in the not-authenticated state\r\n"
    _evs, out = feed(c, b"b FROB {5}\r\n")
    assert out == b"b BAD unknown command FROB\r\n"


def test_before_login_literals_are_small():
    c = conn(State.NOT_AUTHENTICATED)
    _evs, out = feed(c, b"a LOGIN {9000}\r\n")
    assert out == b"a NO [TOOBIG] literal of 9000 octets is over the limit of 8192\r\n"
    _evs, out = feed(c, b"b LOGIN {3}\r\n")
    assert out == b"+ Ready for literal data\r\n"


def test_literals_of_one_command_together_are_capped():
    c = conn(State.AUTHENTICATED, limits=Limits(literal_size=5000, line_length=8192))
    m = b"x" * 5000
    evs, out = feed(c, b"a APPEND INBOX {5000+}\r\n" + m + b" {5000+}\r\n" + m + b" {5000+}\r\n" + m
                    + b"\r\nb NOOP\r\n")
    assert out.startswith(b"a NO [TOOBIG] the literals of one command")
    assert [e.tag for e in evs] == ["b"]


def test_append_utf8_literal8():
    ev = one(b"a APPEND INBOX UTF8 (~{3+}\r\n\xc3\xa9!)\r\n", State.AUTHENTICATED)
    assert ev.messages[0].data == b"\xc3\xa9!" and ev.messages[0].binary


def test_imap_config_keys_and_their_floors():
    from yuubin.config import ConfigError, from_dict
    base = {"hostname": "h.example", "domains": {"local": ["example.test"]}}
    cfg = from_dict({**base, "imap": {"literal_size": 1000, "idle_timeout": "45m", "sessions_per_account": 3}})
    assert (cfg.imap.literal_size, cfg.imap.idle_timeout, cfg.imap.sessions_per_account) == (1000, 2700.0, 3)
    assert from_dict(base).imap.idle_timeout == 1800.0
    with pytest.raises(ConfigError, match=r"imap\.idle_timeout"):
        from_dict({**base, "imap": {"idle_timeout": "10m"}})
    with pytest.raises(ConfigError, match=r"imap\.line_length"):
        from_dict({**base, "imap": {"line_length": 1000}})
    with pytest.raises(ConfigError, match="literl_size"):
        from_dict({**base, "imap": {"literl_size": 1000}})
    with pytest.raises(ConfigError, match=r"tls\.cert"):
        from_dict({**base, "listener": [{"kind": "imap", "address": "127.0.0.1:143"}]})


@given(seqsets, st.integers(0, 50))
def test_sequence_set_iteration_stays_in_range(ranges, largest):
    got = list(SeqSet(tuple(ranges)).iterate(largest))
    assert all(1 <= n <= largest for n in got) and got == sorted(set(got))

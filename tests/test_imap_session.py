"""IMAP end to end over real sockets and real TLS: imaplib and imapclient against the server.

Each test starts a server in-process (make_server) with an `imaps` and an `imap` listener on
loopback; mail arrives by SMTP on the mx listener, as it would in life.
"""

from __future__ import annotations

import imaplib
import smtplib
import socket
import sqlite3
import ssl
import threading
import time
from pathlib import Path

import pytest
from imapclient import IMAPClient

from tests.harness import ACCOUNTS

ALICE = "alice@example.test"
PASSWORD = ACCOUNTS[ALICE]

LISTENERS = [{"kind": "mx", "address": "127.0.0.1:0"}, {"kind": "imaps", "address": "127.0.0.1:0"},
             {"kind": "imap", "address": "127.0.0.1:0"}]

MESSAGE = (b"From: Bob Example <bob@example.test>\r\nTo: alice@example.test\r\nSubject: =?UTF-8?Q?caf=C3=A9?= plans\r\n"
           b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <m1@example.test>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
           b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nlet us meet at noon\r\n"
           b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"AQIDBA==\r\n--XX--\r\n")


@pytest.fixture
def server(make_server):
    return make_server(listener=LISTENERS)


def imaps(server, client_tls) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL("127.0.0.1", server.port("imaps"), ssl_context=client_tls, timeout=10)


def deliver(server, body: bytes = MESSAGE, to: str = ALICE) -> None:
    with smtplib.SMTP("127.0.0.1", server.port("mx"), timeout=10) as s:
        s.sendmail("bob@example.test", [to], body)


def test_starttls_listener_refuses_login_before_tls_then_logs_in(server, client_tls):
    c = imaplib.IMAP4("127.0.0.1", server.port("imap"), timeout=10)
    assert "LOGINDISABLED" in c.capabilities and "STARTTLS" in c.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        c.login(ALICE, PASSWORD)
    c.starttls(ssl_context=client_tls)
    caps = c.capability()[1][0].split()
    assert b"AUTH=PLAIN" in caps and b"LOGINDISABLED" not in caps
    assert c.login(ALICE, PASSWORD)[0] == "OK"
    assert c.logout()[0] == "BYE"


def test_wrong_password_is_no_and_counts_in_the_guard(server, client_tls):
    c = imaps(server, client_tls)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        c.login(ALICE, "wrong")
    assert c.login(ALICE, PASSWORD)[0] == "OK"
    c.logout()
    db = sqlite3.connect(server.config.state_db)
    failures = db.execute("SELECT count(*) FROM auth_failures WHERE source='127.0.0.1'").fetchone()[0]
    db.close()
    assert failures >= 1


def test_authenticate_plain_with_sasl_ir(server, client_tls):
    c = imaps(server, client_tls)
    typ, _ = c.authenticate("PLAIN", lambda _: f"\0{ALICE}\0{PASSWORD}".encode())
    assert typ == "OK"
    c.logout()


def test_special_use_folders_list_and_select(server, client_tls):
    with IMAPClient("127.0.0.1", server.port("imaps"), ssl_context=client_tls, timeout=10) as c:
        c.login(ALICE, PASSWORD)
        names = {name: flags for flags, _d, name in c.list_folders()}
        assert {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"} <= set(names)
        assert b"\\Sent" in names["Sent"] and b"\\Trash" in names["Trash"]
        info = c.select_folder("INBOX")
        assert info[b"EXISTS"] == 0 and info[b"UIDVALIDITY"] > 0 and b"HIGHESTMODSEQ" in info


def test_delivered_mail_fetch_envelope_structure_and_body(server, client_tls):
    deliver(server)
    server.wait_delivered(ALICE, 1)
    with IMAPClient("127.0.0.1", server.port("imaps"), ssl_context=client_tls, timeout=10) as c:
        c.login(ALICE, PASSWORD)
        c.select_folder("INBOX")
        uids = c.search(["SUBJECT", "café"], charset="UTF-8")
        assert len(uids) == 1
        uid = uids[0]
        data = c.fetch([uid], ["FLAGS", "ENVELOPE", "BODYSTRUCTURE", "RFC822.SIZE", "INTERNALDATE",
                              "BODY.PEEK[1]", "BINARY.PEEK[2]", "BODY.PEEK[HEADER.FIELDS (FROM)]"])[uid]
        env = data[b"ENVELOPE"]
        assert env.subject == b"=?UTF-8?Q?caf=C3=A9?= plans" and env.from_[0].mailbox == b"bob"
        assert data[b"BODY[1]"] == b"let us meet at noon"
        assert data[b"BINARY[2]"] == b"\x01\x02\x03\x04"
        assert data[b"BODY[HEADER.FIELDS (FROM)]"].startswith(b"From: Bob Example")
        assert b"\\Seen" not in data[b"FLAGS"]
        assert data[b"BODYSTRUCTURE"].is_multipart
        full = c.fetch([uid], ["BODY[]"])[uid]
        assert full[b"BODY[]"].endswith(b"--XX--\r\n") and len(full[b"BODY[]"]) == data[b"RFC822.SIZE"]
        assert b"\\Seen" in c.get_flags([uid])[uid]
        assert c.search(["BODY", "NOON"]) == [uid] and c.search(["UNSEEN"]) == []


def test_store_expunge_copy_move_with_uidplus(server, client_tls):
    with IMAPClient("127.0.0.1", server.port("imaps"), ssl_context=client_tls, timeout=10) as c:
        c.login(ALICE, PASSWORD)
        for i in range(3):
            c.append("INBOX", MESSAGE.replace(b"plans", b"plans %d" % i), flags=[b"$Label1"] if i == 0 else [])
        c.select_folder("INBOX")
        uids = c.search()
        assert len(uids) == 3
        assert set(c.get_flags([uids[0]])[uids[0]]) == {b"$Label1", b"\\Recent"}
        c.add_flags([uids[1]], [b"\\Flagged"])
        assert c.search(["FLAGGED"]) == [uids[1]]
        typ, _data = c._imap.uid("COPY", str(uids[0]), "Archive")
        copyuid = c._imap.untagged_responses.pop("COPYUID")[0].split()  # imaplib keeps response codes here
        assert typ == "OK" and copyuid[1] == str(uids[0]).encode()
        c.move([uids[2]], "Trash")
        assert c.search() == uids[:2]
        c.delete_messages([uids[0]])
        assert c.expunge()
        assert c.search() == [uids[1]]
        st = c.folder_status("Archive", ["MESSAGES", "SIZE", "UIDNEXT"])
        assert st[b"MESSAGES"] == 1 and st[b"SIZE"] > 0
        assert c.folder_status("Trash", ["MESSAGES"])[b"MESSAGES"] == 1


def test_append_returns_appenduid_and_literal_plus(server, client_tls):
    c = imaps(server, client_tls)
    c.login(ALICE, PASSWORD)
    typ, data = c.append("Drafts", "(\\Draft)", imaplib.Time2Internaldate(time.time()), MESSAGE)
    assert typ == "OK" and b"APPENDUID" in data[0]
    c.logout()


def test_idle_announces_delivery_within_a_second(server, client_tls):
    maildir = server.maildir(ALICE)
    with IMAPClient("127.0.0.1", server.port("imaps"), ssl_context=client_tls, timeout=10) as c:
        c.login(ALICE, PASSWORD)
        c.select_folder("INBOX")
        c.idle()
        written = [0.0]  # when the delivered file showed up in the Maildir

        def send() -> None:
            time.sleep(0.3)
            deliver(server)
            while not any(any(d.iterdir()) for d in (maildir / "new", maildir / "cur") if d.exists()):
                time.sleep(0.002)  # (the store may already have moved it on to cur/)
            written[0] = time.monotonic()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        responses = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(r[1] == b"EXISTS" for r in responses):
            responses += c.idle_check(timeout=1)
        announced = time.monotonic()
        c.idle_done()
        sender.join(10)
        assert any(r[1] == b"EXISTS" for r in responses)
        # the file may be seen by this thread a moment after the session announced it: never later by 1 s
        assert written[0] and announced - written[0] < 1.0, announced - written[0]


def test_two_sessions_see_each_others_flags_and_expunges(server, client_tls):
    deliver(server)
    deliver(server)
    server.wait_delivered(ALICE, 2)
    with IMAPClient("127.0.0.1", server.port("imaps"), ssl_context=client_tls, timeout=10) as a, \
            IMAPClient("127.0.0.1", server.port("imaps"), ssl_context=client_tls, timeout=10) as b:
        a.login(ALICE, PASSWORD)
        b.login(ALICE, PASSWORD)
        a.select_folder("INBOX")
        b.select_folder("INBOX")
        uids = a.search()
        a.add_flags([uids[0]], [b"\\Flagged"])
        got = b.noop()[1]
        assert any(r[1] == b"FETCH" and b"\\Flagged" in r[2][r[2].index(b"FLAGS") + 1] for r in got), got
        a.delete_messages([uids[1]])
        a.expunge()
        got = b.noop()[1]
        assert (2, b"EXPUNGE") in got, got


class Raw:
    """A line-level IMAP client over TLS, for exact responses (imaplib hides some of them)."""

    def __init__(self, server, client_tls):
        raw = socket.create_connection(("127.0.0.1", server.port("imaps")), timeout=10)
        self.sock = client_tls.wrap_socket(raw, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")
        self.greeting = self.file.readline()
        self.n = 0

    def cmd(self, text: str | bytes) -> list[bytes]:
        """Send one command; every line up to its tagged reply, which comes last without its tag."""
        self.n += 1
        tag = b"t%d" % self.n
        data = text.encode() if isinstance(text, str) else text
        self.sock.sendall(tag + b" " + data + b"\r\n")
        lines = []
        while True:
            line = self.file.readline()
            assert line, lines
            lines.append(line)
            if line.startswith(tag + b" "):
                lines[-1] = line[len(tag) + 1:]
                return lines

    def close(self) -> None:
        self.sock.close()


def test_condstore_qresync_vanished(server, client_tls):
    deliver(server)
    deliver(server)
    server.wait_delivered(ALICE, 2)
    c = Raw(server, client_tls)
    c.cmd(f'LOGIN {ALICE} "{PASSWORD}"')
    assert c.cmd("ENABLE QRESYNC")[0] == b"* ENABLED QRESYNC\r\n"
    sel = c.cmd("SELECT INBOX")
    uidvalidity = int(next(x for x in sel if b"UIDVALIDITY" in x).split()[3].rstrip(b"]"))
    hms = int(next(x for x in sel if b"HIGHESTMODSEQ" in x).split()[3].rstrip(b"]"))
    store = c.cmd("UID STORE 1 +FLAGS (\\Answered)")
    assert store[0].startswith(b"* 1 FETCH (FLAGS (\\Answered") and b"UID 1" in store[0] and b"MODSEQ (" in store[0]
    assert c.cmd(f"UID STORE 1 (UNCHANGEDSINCE {hms}) +FLAGS (\\Flagged)")[-1].startswith(b"OK [MODIFIED 1]")
    fetch = c.cmd(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {hms})")
    assert len(fetch) == 2 and b"UID 1 " in fetch[0] and b"MODSEQ" in fetch[0]
    assert any(b"SEARCH 1 (MODSEQ " in x for x in c.cmd(f"SEARCH MODSEQ {hms + 1}"))
    c.cmd("UID STORE 2 +FLAGS.SILENT (\\Deleted)")
    assert b"* VANISHED 2\r\n" in c.cmd("EXPUNGE")
    vanished = c.cmd(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {hms} VANISHED)")
    assert vanished[0] == b"* VANISHED (EARLIER) 2\r\n"
    c.cmd("UNSELECT")
    resync = c.cmd(f"SELECT INBOX (QRESYNC ({uidvalidity} {hms}))")
    assert b"* VANISHED (EARLIER) 2\r\n" in resync
    assert any(x.startswith(b"* 1 FETCH (UID 1 FLAGS (\\Answered") for x in resync)
    c.close()


def test_esearch_sort_thread(server, client_tls):
    with IMAPClient("127.0.0.1", server.port("imaps"), ssl_context=client_tls, timeout=10) as c:
        c.login(ALICE, PASSWORD)
        subjects = [b"b topic", b"Re: a topic", b"a topic"]
        for i, s in enumerate(subjects):
            msg = (b"From: x@example.test\r\nSubject: " + s + b"\r\nDate: Mon, 0%d Jan 2024 10:00:00 +0000\r\n"
                   b"Message-ID: <t%d@x>\r\n\r\nbody\r\n") % (3 - i, i)
            c.append("INBOX", msg)
        c.select_folder("INBOX")
        assert c.sort(["SUBJECT"]) == [2, 3, 1]
        assert c.sort(["REVERSE", "DATE"]) == [1, 2, 3]
        threads = c.thread("ORDEREDSUBJECT")
        assert sorted(tuple(t) for t in threads) == [(1,), (3, 2)]
    r = Raw(server, client_tls)
    r.cmd(f'LOGIN {ALICE} "{PASSWORD}"')
    r.cmd("SELECT INBOX")
    assert r.cmd("UID SEARCH RETURN (MIN MAX COUNT) ALL")[0] == b'* ESEARCH (TAG "t3") UID MIN 1 MAX 3 COUNT 3\r\n'
    assert r.cmd("SEARCH RETURN (SAVE) SUBJECT topic NOT SUBJECT re")[0].startswith(b"OK")
    assert r.cmd("FETCH $ (UID)")[:2] == [b"* 1 FETCH (UID 1)\r\n", b"* 3 FETCH (UID 3)\r\n"]
    assert r.cmd("THREAD REFERENCES UTF-8 ALL")[0] == b"* THREAD (3 2)(1)\r\n"
    r.close()


def test_bad_syntax_never_kills_the_session(server, client_tls):
    raw = socket.create_connection(("127.0.0.1", server.port("imaps")), timeout=10)
    s = client_tls.wrap_socket(raw, server_hostname="127.0.0.1")
    f = s.makefile("rb")
    assert f.readline().startswith(b"* OK")
    s.sendall(b"a1 FETCH (\r\nx\r\n\r\na2 LOGIN {3}\r\n")
    lines = [f.readline() for _ in range(4)]
    assert lines[0].startswith(b"a1 BAD") and lines[-1] == b"+ Ready for literal data\r\n"
    s.sendall(b"abc " + f'"{PASSWORD}"'.encode() + b"\r\n")
    assert f.readline().startswith(b"a2 NO [AUTHENTICATIONFAILED]")
    s.sendall(b"a3 LOGOUT\r\n")
    assert f.readline().startswith(b"* BYE")
    s.close()


def test_compress_deflate(server, client_tls):
    import zlib
    raw = socket.create_connection(("127.0.0.1", server.port("imaps")), timeout=10)
    s = client_tls.wrap_socket(raw, server_hostname="127.0.0.1")
    f = s.makefile("rb")
    f.readline()
    s.sendall(f'a LOGIN {ALICE} "{PASSWORD}"\r\nb COMPRESS DEFLATE\r\n'.encode())
    assert f.readline().startswith(b"a OK") and f.readline().startswith(b"b OK")
    comp, decomp = zlib.compressobj(6, zlib.DEFLATED, -15), zlib.decompressobj(-15)
    s.sendall(comp.compress(b"c NOOP\r\n") + comp.flush(zlib.Z_SYNC_FLUSH))
    got = b""
    while b"c OK" not in got:
        got += decomp.decompress(s.recv(4096))
    s.close()


def test_session_limit_per_account(make_server, client_tls):
    server = make_server(listener=LISTENERS, imap={"sessions_per_account": 1})
    a = imaps(server, client_tls)
    a.login(ALICE, PASSWORD)
    b = imaps(server, client_tls)
    with pytest.raises(imaplib.IMAP4.error, match="LIMIT"):
        b.login(ALICE, PASSWORD)
    a.logout()
    b.logout()


def test_ssl_required_context_is_real(server):
    ctx = ssl.create_default_context()  # not trusting the test CA: the certificate is checked
    with pytest.raises(ssl.SSLError):
        imaplib.IMAP4_SSL("127.0.0.1", server.port("imaps"), ssl_context=ctx, timeout=10)


CORPUS = sorted((Path(__file__).parent / "data" / "mime").glob("*.eml"))


def test_hostile_and_broken_mime_never_breaks_a_session(server, client_tls):
    """Every corpus message (missing boundaries, 8-bit headers, deep nesting, empty parts), plus
    garbage, fetched with every item: each command gets a tagged reply and the session goes on."""
    c = Raw(server, client_tls)
    c.cmd(f'LOGIN {ALICE} "{PASSWORD}"')
    bodies = [p.read_bytes() for p in CORPUS] + [b"\r\n", b"no header at all", b"Content-Type: multipart/mixed\r\n\r\n",
                                                  b"X: " + bytes(range(1, 256)) + b"\r\n\r\n\xff\xfe"]
    for body in bodies:
        assert c.cmd(b"APPEND INBOX {%d+}\r\n" % len(body) + body)[-1].split()[0] == b"OK"
    c.cmd("SELECT INBOX")
    items = ("(FLAGS ENVELOPE BODYSTRUCTURE BODY RFC822.SIZE BODY.PEEK[] BODY.PEEK[1] BODY.PEEK[1.MIME] "
             "BODY.PEEK[2.1.HEADER] BODY.PEEK[TEXT]<3.10> BINARY.SIZE[1] BINARY.PEEK[1])")
    for n in range(1, len(bodies) + 1):
        reply = c.cmd(f"FETCH {n} {items}")
        status = reply[-1].split()[0]
        assert status in (b"OK", b"NO"), reply[-1]  # NO only for [UNKNOWN-CTE]
        if status == b"NO":
            assert b"UNKNOWN-CTE" in reply[-1]
        assert c.cmd(f"FETCH {n} (ENVELOPE BODYSTRUCTURE)")[-1].split()[0] == b"OK"
    for key in ("TEXT nothing", "FROM x", "HEADER X y", "SENTSINCE 1-Jan-2000", "BODY z"):
        assert c.cmd(f"SEARCH {key}")[-1].split()[0] == b"OK"
    assert c.cmd("SORT (SUBJECT DATE FROM) UTF-8 ALL")[-1].split()[0] == b"OK"
    assert c.cmd("THREAD REFERENCES UTF-8 ALL")[-1].split()[0] == b"OK"
    assert c.cmd("NOOP")[-1].split()[0] == b"OK"
    c.close()


def test_localserve_demo_account_reads_mail_over_2993_and_2143(tmp_path):
    """The README's "point a mail client at 2993/2143" works out of the box."""
    import re

    from tests.harness import LocalServe, port_2525
    with port_2525():
        for port in (2143, 2993):
            try:
                socket.create_server(("127.0.0.1", port)).close()
            except OSError:
                pytest.skip(f"127.0.0.1:{port} is in use")
        ls = LocalServe(tmp_path / "ls")
        try:
            text = ls.banner()
            assert re.search(r"imaps\s+127\.0\.0\.1:2993\b", text) and re.search(r"imap\s+127\.0\.0\.1:2143\b", text)
            assert "mail client  IMAP 127.0.0.1:2993 (TLS), 127.0.0.1:2143 (STARTTLS)" in text, text
            password = re.search(r"demo@localhost\.test\s+password:\s*(\S+)", text).group(1)
            ctx = ssl.create_default_context(cafile=str(tmp_path / "ls" / "tls" / "cert.pem"))
            ctx.check_hostname = False
            with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as s:
                s.sendmail("friend@remote.example", ["demo@localhost.test"], MESSAGE)
            ls.wait_delivered("demo@localhost.test", 1)
            c = imaplib.IMAP4_SSL("127.0.0.1", 2993, ssl_context=ctx, timeout=10)
            c.login("demo@localhost.test", password)
            assert c.select("INBOX") == ("OK", [b"1"])
            c.logout()
            c = imaplib.IMAP4("127.0.0.1", 2143, timeout=10)
            c.starttls(ssl_context=ctx)
            c.login("demo@localhost.test", password)
            c.logout()
        finally:
            assert ls.interrupt() == 0, ls.log_text()


def _login(server, client_tls) -> Raw:
    c = Raw(server, client_tls)
    assert c.cmd(f'LOGIN {ALICE} "{PASSWORD}"')[-1].startswith(b"OK [CAPABILITY ")
    return c


def test_folder_commands_list_extended_status_and_namespace(server, client_tls):
    c = _login(server, client_tls)
    assert c.cmd("NAMESPACE")[0] == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
    assert c.cmd('ID ("name" "test")')[0] == b'* ID ("name" "yuubin")\r\n'
    assert c.cmd("CREATE Projekte/Entw&APw-rfe")[-1].split()[0] == b"OK"
    assert c.cmd("CREATE Projekte/Entw&APw-rfe")[-1].startswith(b"NO [ALREADYEXISTS]")
    assert c.cmd("CREATE Stuff (USE (\\Flagged))")[-1].split()[0] == b"OK"
    assert c.cmd("CREATE Bad (USE (\\Nope))")[-1].startswith(b"NO [USEATTR]")
    lines = c.cmd('LIST "" "Projekte/%"')
    assert lines[0] == b'* LIST (\\HasNoChildren) "/" "Projekte/Entw&APw-rfe"\r\n'
    assert c.cmd('LIST "" Projekte')[0] == b'* LIST (\\HasChildren) "/" "Projekte"\r\n'
    special = c.cmd('LIST (SPECIAL-USE) "" "*"')
    assert {b"\\Sent", b"\\Drafts", b"\\Trash", b"\\Junk", b"\\Archive", b"\\Flagged"} <= {
        w.strip(b"()") for line in special[:-1] for w in line.split()}
    assert not any(b"INBOX" in line for line in special)
    c.cmd(b"APPEND Sent {%d+}\r\n" % len(MESSAGE) + MESSAGE)
    ls = c.cmd('LIST "" "Sent" RETURN (STATUS (MESSAGES UNSEEN SIZE) SUBSCRIBED)')
    assert ls[0].startswith(b'* LIST (\\HasNoChildren \\Sent') and b'"/" "Sent"' in ls[0]
    assert ls[1] == b'* STATUS "Sent" (MESSAGES 1 UNSEEN 1 SIZE %d)\r\n' % len(MESSAGE)
    assert c.cmd("SUBSCRIBE Stuff")[-1].split()[0] == b"OK"
    assert b'* LSUB () "/" "Stuff"\r\n' in c.cmd('LSUB "" "*"')
    assert b'* LIST (\\HasNoChildren \\Flagged \\Subscribed) "/" "Stuff"\r\n' in c.cmd('LIST (SUBSCRIBED) "" "*"')
    assert c.cmd("RENAME Stuff Things")[-1].split()[0] == b"OK"
    assert c.cmd("DELETE Projekte")[-1].startswith(b"NO [HASCHILDREN]")
    assert c.cmd("DELETE Things")[-1].split()[0] == b"OK"
    assert c.cmd("SELECT Things")[-1].startswith(b"NO [NONEXISTENT]")
    assert c.cmd('STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY HIGHESTMODSEQ APPENDLIMIT)')[0].startswith(
        b'* STATUS INBOX (MESSAGES 0 UIDNEXT 1 UIDVALIDITY ')
    c.close()


def test_examine_is_read_only_and_unselect_keeps_deleted(server, client_tls):
    c = _login(server, client_tls)
    c.cmd(b"APPEND INBOX (\\Deleted) {%d+}\r\n" % len(MESSAGE) + MESSAGE)
    ex = c.cmd("EXAMINE INBOX")
    assert ex[-1].startswith(b"OK [READ-ONLY]") and b"* OK [PERMANENTFLAGS ()] read-only\r\n" in ex
    assert c.cmd("STORE 1 +FLAGS (\\Seen)")[-1].startswith(b"NO [READ-ONLY]")
    assert c.cmd("FETCH 1 (BODY[TEXT])")[0].startswith(b"* 1 FETCH (BODY[TEXT] {")
    assert b"\\Seen" not in b"".join(c.cmd("FETCH 1 (FLAGS)"))  # EXAMINE never sets \Seen
    sel = c.cmd("SELECT INBOX")
    assert sel[-1].startswith(b"OK [READ-WRITE]")
    assert c.cmd("UNSELECT")[-1].split()[0] == b"OK"
    assert c.cmd("STATUS INBOX (MESSAGES DELETED)")[0] == b"* STATUS INBOX (MESSAGES 1 DELETED 1)\r\n"
    c.cmd("SELECT INBOX")
    assert c.cmd("CLOSE")[-1].split()[0] == b"OK"  # CLOSE expunges, silently
    assert c.cmd("STATUS INBOX (MESSAGES)")[0] == b"* STATUS INBOX (MESSAGES 0)\r\n"
    assert c.cmd("FETCH 1 FLAGS")[-1].split()[0] == b"BAD"  # not selected any more
    c.close()


def test_multiappend_catenate_binary_and_utf8_accept(server, client_tls):
    c = _login(server, client_tls)
    two = c.cmd(b"APPEND INBOX {%d+}\r\n" % len(MESSAGE) + MESSAGE + b" (\\Seen) {%d+}\r\n" % len(MESSAGE) + MESSAGE)
    assert two[-1].startswith(b"OK [APPENDUID ") and two[-1].split()[3] == b"1:2]"
    cat = c.cmd(b'APPEND Drafts CATENATE (TEXT {26+}\r\nSubject: forward\r\nX: y\r\n\r\n '
                b'URL "/INBOX/;UID=1/;SECTION=1")')
    assert cat[-1].startswith(b"OK [APPENDUID ")
    bad = c.cmd(b'APPEND Drafts CATENATE (URL "/INBOX/;UID=99")')
    assert bad[-1].startswith(b"NO [BADURL ")
    nul = b"Subject: nul\r\n\r\na\x00b\r\n"
    assert c.cmd(b"APPEND Drafts ~{%d+}\r\n" % len(nul) + nul)[-1].split()[0] == b"OK"
    c.cmd("SELECT Drafts")
    assert c.cmd("FETCH 1 (BODY.PEEK[TEXT])")[:2] == [b"* 1 FETCH (BODY[TEXT] {19}\r\n",
                                                        b"let us meet at noon)\r\n"]
    binary = c.cmd("FETCH 2 (BINARY.PEEK[1] BINARY.SIZE[1])")
    assert b"".join(binary[:-1]) == b"* 2 FETCH (BINARY[1] ~{5}\r\na\x00b\r\n BINARY.SIZE[1] 5)\r\n"
    assert c.cmd("ENABLE UTF8=ACCEPT")[0] == b"* ENABLED UTF8=ACCEPT\r\n"
    assert c.cmd('CREATE "Übersicht"')[-1].split()[0] == b"OK"
    assert c.cmd('LIST "" "Ü*"')[0] == '* LIST (\\HasNoChildren) "/" "Übersicht"\r\n'.encode()
    c.close()


def test_pipelined_commands_are_answered_in_order(server, client_tls):
    c = _login(server, client_tls)
    c.sock.sendall(b"p1 SELECT INBOX\r\np2 NOOP\r\np3 SEARCH ALL\r\np4 LOGOUT\r\n")
    tags = []
    while True:
        line = c.file.readline()
        if not line:
            break
        if not line.startswith(b"*"):
            tags.append(line.split()[0])
    assert tags == [b"p1", b"p2", b"p3", b"p4"]
    c.close()


def test_shutdown_says_bye_to_idle_and_idling_sessions(make_server, client_tls):
    server = make_server(listener=LISTENERS)
    plain = _login(server, client_tls)
    idling = _login(server, client_tls)
    idling.cmd("SELECT INBOX")
    idling.sock.sendall(b"i IDLE\r\n")
    assert idling.file.readline() == b"+ idling\r\n"
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 5  # nobody waits for the grace time: none of them is mid-command
    for c in (plain, idling):
        assert c.file.readline() == b"* BYE server shutting down\r\n"
        c.close()


def test_idle_timeout_logs_out(make_server, client_tls):
    server = make_server(listener=LISTENERS)
    # the limit itself is at least 30 minutes (checked by the config); the session takes it as given
    for _index, lst in server.server.imap_listeners:
        object.__setattr__(lst, "idle_timeout", 0.5)
    c = _login(server, client_tls)
    assert c.file.readline() == b"* BYE autologout; idle for too long\r\n"
    c.close()


def test_suspended_account_can_still_read(server, client_tls):
    from yuubin.store import Store
    store = Store(server.config.state_db)
    try:
        assert store.set_suspended(ALICE, True, by="test")
    finally:
        store.close()
    c = _login(server, client_tls)
    assert c.cmd("SELECT INBOX")[-1].startswith(b"OK [READ-WRITE]")
    c.close()


def test_sessions_per_ip_limit(make_server, client_tls):
    server = make_server(listener=LISTENERS, imap={"sessions_per_ip": 1})
    first = Raw(server, client_tls)
    assert first.greeting.startswith(b"* OK [CAPABILITY ")
    second = Raw(server, client_tls)
    assert second.greeting == b"* BYE too many IMAP sessions from your address\r\n"
    second.close()
    first.close()


def test_uid_expunge_only_the_named_and_trycreate(server, client_tls):
    c = _login(server, client_tls)
    for _ in range(3):
        c.cmd(b"APPEND INBOX (\\Deleted) {%d+}\r\n" % len(MESSAGE) + MESSAGE)
    c.cmd("SELECT INBOX")
    assert c.cmd("UID EXPUNGE 2")[:-1] == [b"* 2 EXPUNGE\r\n"]
    assert c.cmd("UID SEARCH ALL")[0] == b"* SEARCH 1 3\r\n"
    assert c.cmd("COPY 1 Nowhere")[-1].startswith(b"NO [TRYCREATE]")
    assert c.cmd(b"APPEND Nowhere {%d+}\r\n" % len(MESSAGE) + MESSAGE)[-1].startswith(b"NO [TRYCREATE]")
    assert c.cmd("FETCH 9 FLAGS")[-1].startswith(b"BAD")  # no message 9
    assert c.cmd("FETCH 2:* (UID)")[:-1] == [b"* 2 FETCH (UID 3)\r\n"]
    c.close()


def test_a_failing_command_is_no_serverbug_and_the_session_goes_on(server, client_tls, monkeypatch):
    from yuubin.imap import mime

    def broken(*_a, **_k):
        raise RuntimeError("a bug")

    c = _login(server, client_tls)
    c.cmd(b"APPEND INBOX {%d+}\r\n" % len(MESSAGE) + MESSAGE)
    c.cmd("SELECT INBOX")
    monkeypatch.setattr(mime, "bodystructure", broken)
    assert c.cmd("FETCH 1 BODYSTRUCTURE")[-1].startswith(b"NO [SERVERBUG]")
    assert c.cmd("FETCH 1 (FLAGS)")[-1].startswith(b"OK")
    c.close()


def test_imap4rev2_after_enable(server, client_tls):
    c = Raw(server, client_tls)
    assert b" IMAP4rev1 IMAP4rev2 " in c.greeting
    c.cmd(f'LOGIN {ALICE} "{PASSWORD}"')
    c.cmd(b"APPEND INBOX {%d+}\r\n" % len(MESSAGE) + MESSAGE)
    assert c.cmd("ENABLE IMAP4rev2")[0] == b"* ENABLED IMAP4rev2\r\n"
    sel = c.cmd("SELECT INBOX")
    assert b'* LIST () "/" INBOX\r\n' in sel and not any(b"RECENT" in x or b"[UNSEEN" in x for x in sel), sel
    assert c.cmd("FETCH 1 (FLAGS)")[0] == b"* 1 FETCH (FLAGS ())\r\n"  # no \Recent in IMAP4rev2
    assert c.cmd("SEARCH ALL")[0] == b'* ESEARCH (TAG "t6") ALL 1\r\n'
    assert c.cmd("UID SEARCH SUBJECT nothing-like-this")[0] == b'* ESEARCH (TAG "t7") UID\r\n'
    assert c.cmd('CREATE "Größe"')[-1].startswith(b"OK")  # mailbox names are UTF-8
    assert c.cmd('LIST "" "Gr*"')[0] == '* LIST (\\HasNoChildren) "/" "Größe"\r\n'.encode()
    assert b"* OK [CLOSED] previous folder closed\r\n" in c.cmd('SELECT "Größe"')
    c.close()


@pytest.mark.slow
def test_idle_across_worker_processes(make_config, serve_process, client_tls):
    """With two workers, the delivering process is often not the one holding the IDLE session:
    the store's poll (every second) still announces it."""
    sc = make_config(listener=LISTENERS, server={"workers": 2})
    sc.add_accounts()
    sc.write()
    sp = serve_process(sc)
    latencies = []
    for _ in range(3):
        c = Raw(sp, client_tls)
        c.cmd(f'LOGIN {ALICE} "{PASSWORD}"')
        c.cmd("SELECT INBOX")
        c.sock.sendall(b"i IDLE\r\n")
        assert c.file.readline() == b"+ idling\r\n"
        t0 = time.monotonic()
        deliver(sp)
        line = c.file.readline()
        latencies.append(time.monotonic() - t0)
        assert line.endswith(b" EXISTS\r\n"), line
        c.close()
    # from before the SMTP delivery: its fsyncs, then the other process's poll (at most 1 s)
    assert max(latencies) < 3.0, latencies  # a loaded test machine must not make this flaky


def test_failed_logins_count_with_submission_and_lock_the_source_out(make_server, client_tls):
    server = make_server(listener=[*LISTENERS, {"kind": "submission", "address": "127.0.0.1:0"}],
                         auth_guard={"max_failures": 3}, network={"trusted": []})
    c = imaps(server, client_tls)
    for _ in range(2):
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            c.login(ALICE, "wrong")
    with smtplib.SMTP("127.0.0.1", server.port("submission"), timeout=10) as s:
        s.starttls(context=client_tls)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login(ALICE, "wrong too")
    with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):  # the right password, but locked out
        c.login(ALICE, PASSWORD)
    c.logout()


def test_random_commands_never_break_a_live_session(make_server, client_tls, caplog):
    """Hundreds of near-valid commands (a fixed pseudo-random mix of real command words) against a
    selected folder with mail: every one gets its tagged reply, nothing is logged as a session error."""
    import random
    rnd = random.Random(20261128)
    words = ["FETCH", "UID", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE", "SORT", "THREAD", "1", "2:*", "*", "$",
             "1:3,5", "(FLAGS)", "BODY[]", "BODY.PEEK[1.MIME]", "BINARY[2]", "BODY[HEADER.FIELDS (FROM)]<0.5>",
             "+FLAGS", "-FLAGS.SILENT", "(\\Seen)", "(\\Deleted $X)", "ALL", "OR", "NOT", "FROM", "x", '""',
             "INBOX", "Trash", "(SUBJECT)", "UTF-8", "REFERENCES", "(CHANGEDSINCE 1)", "(UNCHANGEDSINCE 1)",
             "RETURN", "(MIN SAVE)", "CHARSET", "ENVELOPE", "BODYSTRUCTURE", "LARGER", "10", "MODSEQ", "HEADER"]
    # many of these are BAD on purpose, and they come fast
    server = make_server(listener=LISTENERS, imap={"max_errors": 1000, "commands_per_second": 100000})
    c = _login(server, client_tls)
    for _ in range(3):
        c.cmd(b"APPEND INBOX {%d+}\r\n" % len(MESSAGE) + MESSAGE)
    c.cmd("SELECT INBOX")
    statuses = set()
    sets = ["1", "2:*", "*", "$", "1:3,5", "4:2", "1:*"]
    items = ["(FLAGS)", "BODY[]", "BODY.PEEK[1.MIME]", "BINARY.PEEK[2]", "BODY[HEADER.FIELDS (FROM)]<0.5>", "ALL",
             "(ENVELOPE BODYSTRUCTURE RFC822.SIZE)", "(BODY.PEEK[TEXT]<2.3> MODSEQ)", "FAST"]
    keys = ["ALL", "OR FROM x SEEN", "NOT DELETED", "LARGER 10", "MODSEQ 1", "HEADER Subject plans", "BODY noon",
            "UID 1:*", "$", "SENTSINCE 1-Jan-2020", "TEXT café"]
    templates = [
        lambda: f"FETCH {rnd.choice(sets)} {rnd.choice(items)}",
        lambda: f"UID FETCH {rnd.choice(sets)} {rnd.choice(items)}",
        lambda: f"STORE {rnd.choice(sets)} {rnd.choice(['+FLAGS', '-FLAGS.SILENT', 'FLAGS'])} (\\Seen $X)",
        lambda: f"UID SEARCH RETURN (MIN SAVE) {rnd.choice(keys)}", lambda: f"SEARCH CHARSET UTF-8 {rnd.choice(keys)}",
        lambda: f"UID COPY {rnd.choice(sets)} Trash", lambda: f"MOVE {rnd.choice(sets)} Archive", lambda: "EXPUNGE",
        lambda: f"SORT (REVERSE SUBJECT) UTF-8 {rnd.choice(keys)}",
        lambda: f"UID THREAD REFERENCES UTF-8 {rnd.choice(keys)}",
        lambda: "NOOP", lambda: " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 6))),
        lambda: f"{rnd.choice(['CREATE', 'DELETE', 'SUBSCRIBE', 'UNSUBSCRIBE'])} {rnd.choice(boxes)}",
        lambda: f"RENAME {rnd.choice(boxes)} {rnd.choice(boxes)}",
        lambda: f'LIST {rnd.choice(["", "(SUBSCRIBED)", "(SPECIAL-USE)"])} "" "{rnd.choice(["*", "%", "A/%", ""])}"'
                f' {rnd.choice(["", "RETURN (STATUS (MESSAGES SIZE HIGHESTMODSEQ) CHILDREN)"])}',
        lambda: f"STATUS {rnd.choice(boxes)} (MESSAGES UNSEEN UIDNEXT SIZE DELETED RECENT)",
        lambda: f"{rnd.choice(['SELECT', 'EXAMINE'])} {rnd.choice(boxes)}", lambda: "UNSELECT", lambda: "CLOSE",
        lambda: f"ENABLE {rnd.choice(['CONDSTORE', 'QRESYNC', 'UTF8=ACCEPT', 'IMAP4rev2', 'X'])}",
    ]
    boxes = ["INBOX", "A", "A/B", "&AOk-", "Trash", '"Sent"', "Nope/Deeper"]
    for _ in range(400):
        line = rnd.choice(templates)()
        statuses.add(c.cmd(line)[-1].split()[0])
        if rnd.random() < 0.05:
            c.cmd(b"APPEND INBOX {%d+}\r\n" % len(MESSAGE) + MESSAGE)
        if rnd.random() < 0.03:
            c.sock.sendall(b"i IDLE\r\n")
            assert c.file.readline() == b"+ idling\r\n"
            c.sock.sendall(b"DONE\r\n")
            while not (reply := c.file.readline()).startswith(b"i "):
                assert reply.startswith(b"* "), reply
            statuses.add(reply.split()[1])
    assert statuses <= {b"OK", b"NO", b"BAD"} and b"OK" in statuses
    assert c.cmd("NOOP")[-1].startswith(b"OK")
    c.close()
    assert "session_error" not in caplog.text


def test_random_commands_before_login(make_server, client_tls, caplog):
    import random
    rnd = random.Random(7)
    server = make_server(listener=LISTENERS, imap={"max_errors": 1000, "commands_per_second": 100000})
    c = Raw(server, client_tls)
    lines = ["CAPABILITY", "NOOP", "STARTTLS", "ID NIL", 'ID ("a" "b")', "LOGIN", "LOGIN a", 'LOGIN "" ""',
             "AUTHENTICATE", "AUTHENTICATE X", "AUTHENTICATE PLAIN !!!", "AUTHENTICATE PLAIN =",
             "AUTHENTICATE PLAIN AGEAYg==", "SELECT INBOX", "ENABLE QRESYNC", "FETCH 1 ALL", "IDLE", "x y z",
             "LOGIN {3+}\r\nabc {2+}\r\nde", "APPEND INBOX {3+}\r\nabc"]
    statuses = set()
    for _ in range(60):
        statuses.add(c.cmd(rnd.choice(lines))[-1].split()[0])
    c.n += 1
    c.sock.sendall(b"t%d AUTHENTICATE PLAIN\r\n" % c.n)
    assert c.file.readline() == b"+ \r\n"
    c.sock.sendall(b"*\r\n")  # cancelled
    assert c.file.readline().startswith(b"t%d BAD" % c.n)
    assert statuses <= {b"OK", b"NO", b"BAD"}
    assert c.cmd(f'LOGIN {ALICE} "{PASSWORD}"')[-1].startswith(b"OK")
    c.close()
    assert "session_error" not in caplog.text

"""End-to-end: ports 587 and 465 over real TLS, the policy.md rows for `submission`/`submissions`."""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
import time

import pytest

from tests.harness import run_yuubin
from tests.smtpclient import RawSMTP
from yuubin.queue.spool import Spool

ALICE, ALICE_PW = "alice@example.test", "correct horse battery staple"
BOB, BOB_PW = "bob@example.test", "bob's long password 42"
LISTENERS = [
    {"kind": "mx", "address": "127.0.0.1:0"},
    {"kind": "submission", "address": "127.0.0.1:0"},
    {"kind": "submissions", "address": "127.0.0.1:0"},
]
INTERNET = "127.1.0.10"  # outside network.trusted (127.0.0.0/16): a roaming user
PORTS = ["submission", "submissions"]


def msg(frm: str = ALICE, to: str = "carol@far.test", extra: str = "") -> str:
    return f"From: {frm}\r\nTo: {to}\r\nSubject: hi\r\n{extra}\r\nbody\r\n"


def queued(spool: Spool) -> list:
    """The envelopes in the queue now (entries delivered meanwhile are skipped)."""
    out = []
    for qid in spool.ids():
        with contextlib.suppress(FileNotFoundError):
            out.append(spool.load(qid)[0])
    return out


@pytest.fixture
def srv(make_server):
    return make_server(listener=LISTENERS)


def connect(srv, kind: str, client_tls, source: str = INTERNET, login: tuple[str, str] | None = None):
    """smtplib session on 587 (after STARTTLS) or 465 (implicit TLS), optionally logged in."""
    if kind == "submission":
        s = smtplib.SMTP("127.0.0.1", srv.port(kind), source_address=(source, 0), timeout=10)
        s.ehlo("client.test")
        s.starttls(context=client_tls)
    else:
        s = smtplib.SMTP_SSL("127.0.0.1", srv.port(kind), source_address=(source, 0), timeout=10,
                             context=client_tls)
    s.ehlo("client.test")
    if login:
        s.login(*login)
    return s


# ---- TLS and AUTH rules -----------------------------------------------------------------------

def test_587_offers_starttls_and_hides_auth_before_it(srv):
    s = smtplib.SMTP("127.0.0.1", srv.port("submission"), source_address=(INTERNET, 0), timeout=10)
    code, _ = s.ehlo("client.test")
    assert code == 250
    assert s.has_extn("starttls")
    assert not s.has_extn("auth")
    assert s.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABwdw==")[0] == 538
    assert s.docmd("MAIL", "FROM:<alice@example.test>")[0] == 530
    s.quit()


@pytest.mark.parametrize("kind", PORTS)
def test_auth_advertised_after_tls_and_mandatory_before_mail(srv, client_tls, kind):
    s = connect(srv, kind, client_tls)
    assert s.has_extn("auth")
    assert set(s.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
    code, text = s.docmd("MAIL", "FROM:<alice@example.test>")
    assert (code, text[:5]) == (530, b"5.7.0")
    code, text = s.docmd("RCPT", "TO:<alice@example.test>")
    assert code == 503
    s.quit()


def test_465_plaintext_client_gets_no_banner(srv):
    sock = socket.create_connection(("127.0.0.1", srv.port("submissions")), timeout=1.0,
                                    source_address=(INTERNET, 0))
    try:
        with pytest.raises(TimeoutError):
            sock.recv(100)  # a banner would arrive here at once on a plaintext port
        sock.sendall(b"EHLO client.test\r\n")
        sock.settimeout(5.0)
        try:
            data = sock.recv(100)
        except (ConnectionResetError, TimeoutError):
            data = b""
        assert not data.startswith(b"220")  # nothing but (at most) a TLS alert
    finally:
        sock.close()


@pytest.mark.parametrize("kind", PORTS)
@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_login_mechanisms(srv, client_tls, kind, mech):
    s = connect(srv, kind, client_tls)
    s.user, s.password = ALICE, ALICE_PW
    code, _text = s.auth(mech, getattr(s, f"auth_{mech.lower()}"), initial_response_ok=(mech == "PLAIN"))
    assert code == 235
    s.quit()


@pytest.mark.parametrize("kind", PORTS)
def test_bad_credentials_535_and_unknown_user_same(srv, client_tls, kind):
    s = connect(srv, kind, client_tls)
    for user in (ALICE, "nobody@example.test"):
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login(user, "wrong password")
        assert e.value.smtp_code == 535
        assert e.value.smtp_error.startswith(b"5.7.8")
    s.quit()


@pytest.mark.parametrize("kind", PORTS)
def test_star_cancels_auth_with_501(srv, client_tls, kind):
    s = connect(srv, kind, client_tls)
    code, _ = s.docmd("AUTH", "LOGIN")
    assert code == 334
    code, _ = s.docmd("*")
    assert code == 501
    assert s.noop()[0] == 250
    s.login(ALICE, ALICE_PW)
    s.quit()


# ---- what an authenticated user may do --------------------------------------------------------

@pytest.mark.parametrize("kind", PORTS)
def test_local_delivery_and_relay_after_auth(srv, dns_server, client_tls, kind):
    dns_server.set_behaviour("far.test", "timeout")  # outbound can only defer: the entry stays queued
    s = connect(srv, kind, client_tls, login=(ALICE, ALICE_PW))
    s.sendmail(ALICE, [BOB], msg(to=BOB))
    s.sendmail(ALICE, ["carol@far.test"], msg())  # relay: any domain after AUTH
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        s.sendmail(ALICE, ["nobody@example.test"], msg(to="nobody@example.test"))
    code, text = e.value.recipients["nobody@example.test"]
    assert code == 550 and text.startswith(b"5.1.1")
    s.quit()
    [delivered] = srv.wait_delivered(BOB, 1)
    assert b"Subject: hi" in delivered
    spool = Spool(srv.config.spool_dir, None)
    relayed = queued(spool)
    assert any(env.remote and env.remote[0].to == "carol@far.test" and env.auth == ALICE for env in relayed)


def test_received_hides_client_ip_and_missing_headers_added(srv, client_tls):
    s = connect(srv, "submission", client_tls, source="127.1.0.77", login=(ALICE, ALICE_PW))
    s.sendmail(ALICE, [BOB], f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: no id\r\n\r\nbody\r\n")
    s.quit()
    [m] = srv.wait_delivered(BOB, 1)
    head = m.split(b"\r\n\r\n")[0]
    assert b"127.1.0.77" not in m
    assert b"client.test" not in head  # the EHLO name of the user's device stays out too
    assert b"with ESMTPSA" in head
    assert b"\r\nMessage-ID: <" in head and b"\r\nDate: " in head


def test_received_shows_client_when_configured(make_server, client_tls):
    srv = make_server(listener=LISTENERS, submission={"received_client_ip": True})
    s = connect(srv, "submission", client_tls, source="127.1.0.78", login=(ALICE, ALICE_PW))
    s.sendmail(ALICE, [BOB], msg(to=BOB, extra="Message-ID: <given@client.test>\r\nDate: Fri, 1 Jan 2027 "
                                               "00:00:00 +0000\r\n"))
    s.quit()
    [m] = srv.wait_delivered(BOB, 1)
    assert b"[127.1.0.78]" in m
    assert m.count(b"Message-ID:") == 1 and m.count(b"\r\nDate:") == 1  # present ones are kept


def test_dnsbl_not_applied_on_submission(make_server, dns_server, client_tls):
    srv = make_server(listener=LISTENERS)
    dns_server.add("10.0.1.127.zen.dnsbl.test", "A", "127.0.0.2")
    mx = RawSMTP(srv.port("mx"), source=INTERNET)
    assert mx.reply()[0] == 554  # listed: port 25 refuses it
    mx.close()
    s = connect(srv, "submission", client_tls, login=(ALICE, ALICE_PW))
    s.sendmail(ALICE, [BOB], msg(to=BOB))
    s.quit()


# ---- sender ownership -------------------------------------------------------------------------

@pytest.fixture
def owned_srv(make_server):
    return make_server(listener=LISTENERS, aliases={
        "sales@example.test": [ALICE],
        "team@example.test": [ALICE, BOB],
        "ext@example.test": ["someone@far.test"],
    })


@pytest.mark.parametrize("kind", PORTS)
def test_envelope_sender_must_be_owned(owned_srv, client_tls, kind):
    s = connect(owned_srv, kind, client_tls, login=(ALICE, ALICE_PW))
    for sender in [ALICE, "Alice@Example.TEST", "alice+lists@example.test", "sales@example.test"]:
        assert s.mail(sender)[0] == 250, sender
        s.rset()
    for sender in [BOB, "team@example.test", "ext@example.test", "ceo@far.test", "bob+x@example.test",
                   "nobody@example.test", "alice%far.test@example.test"]:
        code, text = s.mail(sender)
        assert (code, text[:5]) == (553, b"5.7.1"), sender
    s.quit()


def test_from_header_must_be_owned_550_at_end_of_data(owned_srv, client_tls):
    s = connect(owned_srv, "submission", client_tls, login=(ALICE, ALICE_PW))
    for header in [f"Bob <{BOB}>", "ceo@far.test", "team@example.test", f"{ALICE}, {BOB}"]:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail(ALICE, [BOB], msg(frm=header, to=BOB))
        assert e.value.smtp_code == 550 and e.value.smtp_error.startswith(b"5.7.1"), header
    with pytest.raises(smtplib.SMTPDataError) as e:
        s.sendmail(ALICE, [BOB], f"To: {BOB}\r\nSubject: no from\r\n\r\nbody\r\n")
    assert e.value.smtp_code == 550
    s.sendmail(ALICE, [BOB], msg(frm='"Alice Example" <alice+news@example.test>', to=BOB))
    s.quit()
    assert len(owned_srv.wait_delivered(BOB, 1)) == 1


def test_null_sender_allowed_but_from_header_still_checked(owned_srv, client_tls):
    s = connect(owned_srv, "submission", client_tls, login=(ALICE, ALICE_PW))
    s.sendmail("<>", [BOB], msg(to=BOB))
    with pytest.raises(smtplib.SMTPDataError):
        s.sendmail("<>", [BOB], msg(frm=BOB, to=BOB))
    s.quit()


# ---- who may connect: allow lists -------------------------------------------------------------

DELEGATED = """2|apnic|20261127|4|19830613|20261126|+1000
apnic|*|ipv4|*|3|summary
apnic|*|ipv6|*|1|summary
apnic|JP|ipv4|127.2.0.0|65536|20100101|allocated
apnic|CN|ipv4|127.3.0.0|65536|20100101|allocated
apnic|JP|ipv4|127.5.0.0|512|20100101|assigned
apnic|JP|ipv6|2001:db8::|32|20100101|allocated
apnic||ipv4|127.6.0.0|256||available
"""


@pytest.fixture
def allow_srv(make_server, tmp_path):
    geo = tmp_path / "delegated-apnic-latest"
    geo.write_text(DELEGATED)
    return make_server(geo={"source": str(geo)}, listener=[
        {"kind": "mx", "address": "127.0.0.1:0"},
        {"kind": "submission", "address": "127.0.0.1:0", "allow": ["JP", "127.4.0.0/24"]},
        {"kind": "submissions", "address": "127.0.0.1:0", "allow": ["JP", "127.4.0.0/24"]},
    ])


def raw_banner(srv, kind: str, source: str, client_tls) -> tuple[bytes, bool]:
    """(first bytes the server sent, whether it then closed) — over TLS for 465."""
    sock = socket.create_connection(("127.0.0.1", srv.port(kind)), timeout=5, source_address=(source, 0))
    if kind == "submissions":
        sock = client_tls.wrap_socket(sock, server_hostname="127.0.0.1")
    try:
        first = sock.recv(1000)
        if first.startswith(b"220"):
            return first, False
        try:
            rest = sock.recv(1000)
        except (TimeoutError, ssl.SSLError, ConnectionResetError):
            rest = b"?"
        return first, rest == b""
    finally:
        sock.close()


@pytest.mark.parametrize("kind", PORTS)
def test_allow_list_cidr_and_country(allow_srv, client_tls, kind):
    for source, allowed in [
        ("127.2.0.5", True),     # JP by the delegated file
        ("127.5.1.200", True),   # JP, a 512-address block that is not a CIDR boundary
        ("127.4.0.9", True),     # the CIDR in allow
        ("127.3.0.5", False),    # CN
        ("127.5.2.1", False),    # just past the JP block
        ("127.6.0.1", False),    # "available" space has no country
    ]:
        first, closed = raw_banner(allow_srv, kind, source, client_tls)
        if allowed:
            assert first.startswith(b"220 "), source
        else:
            assert first.startswith(b"554 5.7.1 "), source
            assert closed, source  # no QUIT needed, no AUTH possible


def test_refused_client_cannot_even_try_auth(allow_srv, client_tls):
    s = smtplib.SMTP(timeout=5)
    s.source_address = ("127.3.0.5", 0)
    code, _ = s.connect("127.0.0.1", allow_srv.port("submission"))
    assert code == 554
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.ehlo("client.test")


def test_country_without_geo_source_is_config_error(make_server):
    from yuubin.config import ConfigError
    with pytest.raises(ConfigError, match=r"geo\.source"):
        make_server(listener=[{"kind": "submission", "address": "127.0.0.1:0", "allow": ["JP"]}])


def test_unreadable_geo_source_refuses_to_start(make_server, tmp_path):
    from yuubin.config import ConfigError
    with pytest.raises(ConfigError, match=r"geo\.source"):
        make_server(geo={"source": str(tmp_path / "missing-file")},
                    listener=[{"kind": "submission", "address": "127.0.0.1:0", "allow": ["JP"]}])


# ---- brute force --------------------------------------------------------------------------------

ATTACKER = "127.1.6.6"
DICTIONARY = [f"guess{i:02d}" for i in range(49)] + [ALICE_PW]  # 50 passwords; the last one is right


def attack(srv, client_tls, source: str, passwords: list[str]) -> list[int]:
    """Try each password for alice from `source` over 465; reconnect (and retry that password)
    when the server ends the session after too many errors."""
    codes: list[int] = []
    s = None
    todo = list(passwords)
    while todo:
        if s is None:
            s = connect(srv, "submissions", client_tls, source=source)
        s.user, s.password = ALICE, todo[0]
        try:
            s.auth("PLAIN", s.auth_plain)  # one attempt per password (login() would try each mechanism)
            codes.append(235)
            s.quit()
            s = None
        except (smtplib.SMTPServerDisconnected, ConnectionError):
            s = None
            continue
        except smtplib.SMTPResponseException as e:
            if e.smtp_code == 421:  # "too many errors": this password was not tried
                s.close()
                s = None
                continue
            codes.append(e.smtp_code)
        todo.pop(0)
    if s is not None:
        s.close()
    return codes


@pytest.mark.slow
def test_dictionary_attack_locked_out_owner_still_logs_in_and_restart_keeps_it(make_server, client_tls, caplog):
    caplog.set_level("INFO", logger="yuubin.auth")
    srv = make_server(listener=LISTENERS, auth_guard={"max_failures": 5})
    codes = attack(srv, client_tls, ATTACKER, DICTIONARY)
    assert codes[:5] == [535] * 5
    assert set(codes[5:]) == {454}  # locked: even the right password (the 50th) is refused
    assert 235 not in codes
    lockouts = [r.getMessage() for r in caplog.records if "event=auth_lockout" in r.getMessage()]
    assert len(lockouts) == 1 and f"client={ATTACKER} " in lockouts[0]
    # the owner, from her own address, is not locked out by the attack on her account
    s = connect(srv, "submission", client_tls, source="127.1.7.7", login=(ALICE, ALICE_PW))
    s.quit()
    # a locked source gets the same reply for an account that does not exist
    s = connect(srv, "submission", client_tls, source=ATTACKER)
    for user in (ALICE, "nobody@example.test"):
        s.user, s.password = user, "whatever"
        with pytest.raises(smtplib.SMTPResponseException) as e:
            s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert (e.value.smtp_code, e.value.smtp_error) == (454, b"4.7.0 too many failed logins from your "
                                                           b"address; try again later")
    s.quit()
    # a restart forgives nothing
    srv.stop()
    srv2 = make_server(listener=LISTENERS, data_dir=srv.config.data_dir)
    assert attack(srv2, client_tls, ATTACKER, [ALICE_PW]) == [454]
    # `yuubin auth lockouts` shows it, `yuubin auth unlock` lifts it at once, without a restart
    from yuubin.cli import main
    cfg = srv2.config_file()
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["-c", str(cfg), "auth", "lockouts"]) == 0
        assert main(["-c", str(cfg), "auth", "unlock", ATTACKER]) == 0
    assert f"source\t{ATTACKER}\tlocked until" in out.getvalue()
    assert attack(srv2, client_tls, ATTACKER, [ALICE_PW]) == [235]


def test_trusted_network_never_locked_out(make_server, client_tls):
    srv = make_server(listener=LISTENERS, auth_guard={"max_failures": 2})
    codes = attack(srv, client_tls, "127.0.9.9", ["bad1", "bad2", "bad3", "bad4", ALICE_PW])
    assert codes == [535, 535, 535, 535, 235]


def test_success_clears_the_source_count(make_server, client_tls):
    srv = make_server(listener=LISTENERS, auth_guard={"max_failures": 3})
    assert attack(srv, client_tls, "127.1.8.8", ["bad1", "bad2", ALICE_PW, "bad3", "bad4", ALICE_PW]) == \
        [535, 535, 235, 535, 535, 235]


# ---- compromised account: outbound limits, suspension, hold -----------------------------------

@pytest.mark.slow
def test_account_over_hourly_limit_is_suspended_and_its_queue_held(make_server, dns_server, client_tls, caplog):
    caplog.set_level("INFO")
    dns_server.set_behaviour("far.test", "timeout")  # remote mail can only wait in the queue
    srv = make_server(listener=LISTENERS, outbound={"max_per_hour": 3},
                      accounts={ALICE: ALICE_PW, BOB: BOB_PW, "postmaster@example.test": "pm's own long passphrase"})
    s = connect(srv, "submission", client_tls, source="127.1.9.9", login=(ALICE, ALICE_PW))
    for i in range(3):
        s.sendmail(ALICE, [f"victim{i}@far.test"], msg(to=f"victim{i}@far.test"))
    code, text = s.mail(ALICE)
    assert (code, text[:5]) == (451, b"4.7.1")
    code, text = s.mail(ALICE)
    assert code >= 500 and text[:5] == b"5.7.1"
    s.quit()
    # other accounts are unaffected
    s = connect(srv, "submissions", client_tls, login=(BOB, BOB_PW))
    s.sendmail(BOB, [ALICE], msg(frm=BOB, to=ALICE))
    s.quit()
    # postmaster is told: account, counts, source address
    [note] = srv.wait_delivered("postmaster@example.test", 1)
    assert ALICE.encode() in note and b"127.1.9.9" in note and b"3" in note
    assert b"Subject: [yuubin] account alice@example.test suspended" in note
    spool = Spool(srv.config.spool_dir, None)
    deadline = time.monotonic() + 10
    while True:
        mine = [e for e in queued(spool) if e.auth == ALICE]
        if (len(mine) == 3 and all(e.held for e in mine)) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(mine) == 3 and all(e.held for e in mine)  # kept, not sent, not deleted
    from yuubin.store import Store
    store = Store(srv.config.state_db)
    assert store.account(ALICE).suspended and not store.account(BOB).suspended
    store.close()
    lines = [r.getMessage() for r in caplog.records if "event=account_suspended" in r.getMessage()]
    assert len(lines) == 1 and "account=alice@example.test" in lines[0] and "clients=127.1.9.9" in lines[0]


def test_distinct_recipients_per_day_limit(make_server, dns_server, client_tls):
    dns_server.set_behaviour("far.test", "timeout")
    srv = make_server(listener=LISTENERS, outbound={"max_recipients_per_day": 2})
    s = connect(srv, "submissions", client_tls, login=(ALICE, ALICE_PW))
    s.sendmail(ALICE, ["r1@far.test", "r2@far.test"], msg(to="r1@far.test"))
    s.sendmail(ALICE, ["r1@far.test"], msg(to="r1@far.test"))  # already counted today: no new recipient
    s.mail(ALICE)
    code, text = s.rcpt("r3@far.test")
    assert (code, text[:5]) == (451, b"4.7.1")
    s.rset()
    code, text = s.mail(ALICE)
    assert (code, text[:5]) == (550, b"5.7.1")
    assert b"suspended after unusual sending" in text
    s.quit()


def test_an_account_suspended_by_the_admin_is_told_so(make_server, client_tls):
    srv = make_server(listener=LISTENERS)
    p = run_yuubin(["account", "suspend", ALICE], config=srv.config_file())
    assert p.returncode == 0, p.stderr
    s = connect(srv, "submissions", client_tls, login=(ALICE, ALICE_PW))
    code, text = s.mail(ALICE)
    assert (code, text) == (550, b"5.7.1 account suspended by the administrator; contact the postmaster")
    s.quit()
    listed = run_yuubin(["account", "list"], config=srv.config_file()).stdout
    assert f"{ALICE}\t" in listed and "suspended by the administrator" in listed


def test_message_finished_after_suspension_is_held(make_server, dns_server, client_tls):
    from yuubin.store import Store
    dns_server.set_behaviour("far.test", "timeout")
    srv = make_server(listener=LISTENERS)
    s = connect(srv, "submission", client_tls, login=(ALICE, ALICE_PW))
    s.mail(ALICE)
    s.rcpt("carol@far.test")
    assert s.docmd("DATA")[0] == 354
    s.send(msg().encode())
    store = Store(srv.config.state_db)
    store.set_suspended(ALICE, True)  # what `yuubin account suspend` does, mid-DATA
    store.close()
    s.send(b".\r\n")
    code, text = s.getreply()
    assert code == 250
    s.quit()
    qid = text.decode().rsplit(" ", 1)[1]
    env, _ = Spool(srv.config.spool_dir, None).load(qid)
    assert env.held and env.auth == ALICE


def test_ipv6_allow_cidr(make_server, client_tls):
    srv = make_server(listener=[
        {"kind": "mx", "address": "127.0.0.1:0"},
        {"kind": "submission", "address": "[::1]:0", "allow": ["::1/128"]},
        {"kind": "submissions", "address": "127.0.0.1:0", "allow": ["::1/128"]},
    ])
    try:
        s = smtplib.SMTP("::1", srv.port("submission"), timeout=10)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    assert s.ehlo("client.test")[0] == 250
    s.quit()
    first, closed = raw_banner(srv, "submissions", INTERNET, client_tls)
    assert first.startswith(b"554 5.7.1 ") and closed

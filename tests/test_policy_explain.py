"""`yuubin policy explain`: the real pipelines in dry run, with real DNS (the test DNS server).

Each row of the per-port table of policy.md shown through the command, and the promise that
nothing is stored or counted: a broken sending limit suspends nobody, a submission is not counted.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.harness import run_yuubin
from yuubin.store import Store

ALICE = "alice@example.test"


@pytest.fixture(autouse=True)
def _hash_each_password_once(cached_hashes):
    """No password is checked: reuse the accounts' Argon2id hashes."""


@pytest.fixture
def config(make_config):
    sc = make_config(listener=[{"kind": "mx", "address": "127.0.0.1:0"},
                               {"kind": "submission", "address": "127.0.0.1:0", "allow": ["127.0.0.0/8"]}],
                     outbound={"max_per_hour": 3})
    path = sc.write()
    sc.add_accounts(cached=True)
    return sc, path


def explain(path, *args: str) -> dict:
    r = run_yuubin(["policy", "explain", "--json", *args], config=path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def checks(step: dict) -> list[tuple[str, str]]:
    return [(c["check"], c["verdict"]) for c in step["checks"]]


def test_listed_client_is_refused_at_connect_naming_the_zone(config, dns_server):
    _, path = config
    dns_server.add("9.0.1.127.zen.dnsbl.test", "A", "127.0.0.2")
    out = explain(path, "--client", "127.1.0.9", "--from", "a@remote.example", "--to", ALICE)
    assert [s["stage"] for s in out["steps"]] == ["connect"]
    step = out["steps"][0]
    assert step["reply"].startswith("554 5.7.1") and "zen.dnsbl.test" in step["reply"]
    assert checks(step) == [("dnsbl", "reject")]
    assert out["result"].startswith("refused at CONNECT")
    assert any(q[0] == "9.0.1.127.zen.dnsbl.test" for q in dns_server.queries)  # a real lookup


def test_internet_client_gets_local_recipients_only(config):
    _, path = config
    out = explain(path, "--client", "127.1.0.10", "--from", "a@remote.example",
                  "--to", ALICE, "--to", "x@remote.example", "--to", "nobody@example.test")
    rcpts = [s for s in out["steps"] if s["stage"] == "rcpt"]
    assert [s["reply"][:3] for s in rcpts] == ["250", "554", "550"]
    assert "relay access denied" in rcpts[1]["reply"]
    assert out["accepted_recipients"] == [ALICE]


def test_trusted_lan_may_relay(config):
    _, path = config
    out = explain(path, "--client", "127.0.0.5", "--from", "pc@example.test", "--to", "x@remote.example")
    assert out["trusted"] is True
    assert out["accepted_recipients"] == ["x@remote.example"]


def test_stranger_claiming_our_domain_is_refused_at_mail(config):
    _, path = config
    out = explain(path, "--client", "127.1.0.11", "--from", ALICE, "--to", ALICE)
    mail = out["steps"][-1]
    assert mail["stage"] == "mail" and mail["reply"].startswith("5")
    assert out["result"].startswith("refused at MAIL")


def test_submission_needs_a_login_and_an_existing_account(config):
    _, path = config
    out = explain(path, "--listener", "submission", "--client", "127.0.0.9", "--from", ALICE,
                  "--to", "x@remote.example")
    assert out["steps"][-1]["reply"].startswith("530 5.7.0")
    out = explain(path, "--listener", "submission", "--client", "127.0.0.9", "--auth", "ghost@example.test",
                  "--from", "ghost@example.test", "--to", "x@remote.example")
    auth = next(s for s in out["steps"] if s["stage"] == "auth")
    assert auth["reply"].startswith("535") and checks(auth) == [("login", "reject")]


def test_logged_in_user_relays_and_nothing_is_counted(config):
    sc, path = config
    for _ in range(2):
        out = explain(path, "--listener", "submission", "--client", "127.0.0.9", "--auth", ALICE,
                      "--from", ALICE, "--to", "x@remote.example")
        assert out["accepted_recipients"] == ["x@remote.example"]
        assert "SenderOwnership" in out["message_checks"]
    store = Store(sc.load().state_db)
    try:
        assert store.submissions_since(ALICE, time.time() - 3600) == 0
    finally:
        store.close()


def test_a_broken_limit_is_explained_but_suspends_nobody(config):
    sc, path = config
    store = Store(sc.load().state_db)
    try:
        for _ in range(3):  # outbound.max_per_hour = 3
            store.record_submission(ALICE, time.time(), "127.0.0.9", ["x@remote.example"])
        out = explain(path, "--listener", "submission", "--client", "127.0.0.9", "--auth", ALICE,
                      "--from", ALICE, "--to", "x@remote.example")
        mail = out["steps"][-1]
        assert mail["reply"].startswith("451 4.7.1")
        assert "would be suspended" in mail["checks"][-1]["reason"]
        assert not store.account(ALICE).suspended
    finally:
        store.close()


def test_text_output_and_errors(config):
    _, path = config
    r = run_yuubin(["policy", "explain", "--client", "127.1.0.12", "--from", "a@remote.example", "--to", ALICE],
                   config=path)
    assert r.returncode == 0, r.stderr
    assert "dry run, nothing stored" in r.stdout
    assert "-> 250 2.1.5" in r.stdout and r.stdout.rstrip().splitlines()[-1].startswith("result: DATA would be")
    r = run_yuubin(["policy", "explain", "--client", "not-an-ip", "--to", ALICE], config=path)
    assert r.returncode == 2 and "--client" in r.stderr
    r = run_yuubin(["policy", "explain", "--listener", "submissions", "--client", "127.0.0.1", "--to", ALICE],
                   config=path)
    assert r.returncode == 2 and "no submissions listener" in r.stderr
    r = run_yuubin(["policy", "explain", "--client", "127.0.0.1", "--auth", ALICE, "--to", ALICE], config=path)
    assert r.returncode == 2 and "--auth" in r.stderr


# ---- explain and a real session must never disagree ------------------------------------------------

PASSWORDS = {"alice@example.test": "correct horse battery staple", "bob@example.test": "bob's long password 42"}

CASES = [  # (listener, client, login, sender, recipients)
    ("mx", "127.1.0.20", None, "a@remote.example", ["alice@example.test", "nobody@example.test", "x@remote.example"]),
    ("mx", "127.0.0.20", None, "pc@example.test", ["x@remote.example", "alice@example.test"]),  # the LAN
    ("mx", "127.1.0.21", None, "alice@example.test", ["alice@example.test"]),  # a stranger as our domain
    ("mx", "127.1.0.22", None, "", ["postmaster@example.test"]),  # bounce to postmaster
    ("mx", "127.1.0.99", None, "a@remote.example", ["alice@example.test"]),  # listed on a DNSBL
    ("submission", "127.0.0.30", None, "alice@example.test", ["x@remote.example"]),  # no login
    ("submission", "127.0.0.31", "alice@example.test", "alice@example.test",
     ["x@remote.example", "bob@example.test", "nobody@example.test"]),
    ("submission", "127.0.0.32", "alice@example.test", "bob@example.test", ["x@remote.example"]),  # not hers
    ("submission", "127.1.0.33", "alice@example.test", "alice@example.test", ["x@remote.example"]),  # not allowed
]


def _session_codes(srv, client_tls, listener: str, client: str, login: str | None, sender: str,
                   recipients: list[str]) -> list[tuple[str, int]]:
    """The reply codes a real client gets, stage by stage, as explain lists them."""
    import smtplib
    out: list[tuple[str, int]] = []
    try:
        s = smtplib.SMTP("127.0.0.1", srv.port(listener), timeout=10, source_address=(client, 0))
    except smtplib.SMTPConnectError as e:  # the greeting was a refusal
        return [("connect", e.smtp_code)]
    out.append(("connect", 220))
    try:
        code, _ = s.ehlo("client.invalid")
        out.append(("helo", code))
        if login:
            s.starttls(context=client_tls)
            s.ehlo("client.invalid")
            try:
                s.login(login, PASSWORDS[login])
                out.append(("auth", 235))
            except smtplib.SMTPAuthenticationError as e:
                out.append(("auth", e.smtp_code))
        code, _ = s.mail(f"<{sender}>")
        out.append(("mail", code))
        if code >= 400:
            return out
        for r in recipients:
            out.append(("rcpt", s.rcpt(f"<{r}>")[0]))
        s.rset()
    finally:
        try:
            s.quit()
        except smtplib.SMTPException:
            s.close()
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[3] or 'null'}" for c in CASES])
def test_explain_agrees_with_a_real_session(make_server, dns_server, client_tls, case):
    listener, client, login, sender, recipients = case
    dns_server.add("99.0.1.127.zen.dnsbl.test", "A", "127.0.0.2")
    srv = make_server(accounts=PASSWORDS,
                      listener=[{"kind": "mx", "address": "127.0.0.1:0"},
                                {"kind": "submission", "address": "127.0.0.1:0", "allow": ["127.0.0.0/16"]}])
    path = srv.server_config.write()
    args = ["--listener", listener, "--client", client, "--from", sender]
    for r in recipients:
        args += ["--to", r]
    if login:
        args += ["--auth", login]
    out = explain(path, *args)
    explained = [(s["stage"], int(s["reply"][:3])) for s in out["steps"]]
    real = _session_codes(srv, client_tls, listener, client, login, sender, recipients)
    assert explained == real

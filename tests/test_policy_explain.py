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

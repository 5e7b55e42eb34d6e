"""Everything that happens is in the server's log: every reply of 400 or more with its reason
(including those the SMTP core answers itself), admin actions with who did them, start and stop,
session ids that stay unique across restarts, and a resolver that does not answer.

Servers run in-process (make_server, caplog) or as `yuubin serve` (serve_process, its stderr);
clients talk over real sockets.
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import time

import pytest

from tests.smtpclient import RawSMTP

UNTRUSTED = "127.1.0.1"
ALICE, ALICE_PW = "alice@example.test", "correct horse battery staple"


def log_lines(caplog, logger: str = "yuubin") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(logger)]


def session_of(lines: list[str], client: str) -> str:
    """The session id of the last connection from `client`."""
    sessions = [m.group(1) for line in lines
                if (m := re.search(rf"event=connect session=(\S+) .*client={re.escape(client)} ", line))]
    assert sessions, lines
    return sessions[-1]


def session_log(caplog, client: str, timeout: float = 5.0) -> list[str]:
    """The lines of the last session from `client`, once its disconnect line is there."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log_lines(caplog)
        sid = session_of(lines, client)
        mine = [line for line in lines if f"session={sid} " in line]
        if any(line.startswith("event=disconnect ") for line in mine):
            return mine
        assert time.monotonic() < deadline, mine
        time.sleep(0.02)


def rejects(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("event=reject ")]


def field(line: str, key: str) -> str:
    m = re.search(rf' {key}=("(?:[^"\\]|\\.)*"|\S+)', line)
    assert m, (key, line)
    return m.group(1).strip('"')


def greet(srv, source: str = UNTRUSTED) -> RawSMTP:
    c = RawSMTP(srv.port("mx"), source=source)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.remote.example")[0] == 250
    return c


# ---- the replies the SMTP core gives itself ----------------------------------------------------


def test_bare_lf_in_data_is_logged_with_its_reason(make_server, caplog):
    caplog.set_level(logging.INFO, logger="yuubin")
    srv = make_server()
    c = greet(srv)
    assert c.cmd("MAIL FROM:<sender@remote.example>")[0] == 250
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    code, text = c.cmd(b"Subject: smuggled\r\n\r\nline one\nline two\r\n.")
    assert (code, text[0][:5]) == (550, "5.5.2"), text
    c.cmd("QUIT")
    [line] = rejects(session_log(caplog, UNTRUSTED))
    assert field(line, "stage") == "data" and field(line, "check") == "protocol", line
    assert "bare LF" in field(line, "reason"), line
    assert field(line, "reply").startswith("550 5.5.2 "), line


def test_announced_size_over_the_limit_is_logged_with_both_numbers(make_server, caplog):
    caplog.set_level(logging.INFO, logger="yuubin")
    srv = make_server(limits={"message_size": 10000})
    c = greet(srv)
    code, _ = c.cmd("MAIL FROM:<sender@remote.example> SIZE=20000")
    assert code == 552
    c.cmd("QUIT")
    [line] = rejects(session_log(caplog, UNTRUSTED))
    assert field(line, "stage") == "mail" and field(line, "check") == "protocol", line
    reason = field(line, "reason")
    assert "SIZE=20000" in reason and "limits.message_size" in reason and "10000" in reason, line
    assert field(line, "reply").startswith("552 5.3.4 "), line


def test_message_over_the_size_limit_is_logged(make_server, caplog):
    caplog.set_level(logging.INFO, logger="yuubin")
    srv = make_server(limits={"message_size": 1000})
    c = greet(srv)
    assert c.cmd("MAIL FROM:<sender@remote.example>")[0] == 250
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 30 + b".")[0] == 552
    c.cmd("QUIT")
    [line] = rejects(session_log(caplog, UNTRUSTED))
    assert field(line, "stage") == "data" and "limits.message_size (1000 octets)" in field(line, "reason"), line


def test_a_line_too_long_is_logged_with_the_limit(make_server, caplog):
    caplog.set_level(logging.INFO, logger="yuubin")
    srv = make_server()
    c = greet(srv)
    code, _ = c.cmd("NOOP " + "x" * 600)
    assert code == 500
    c.cmd("QUIT")
    [line] = rejects(session_log(caplog, UNTRUSTED))
    assert field(line, "stage") == "command" and field(line, "check") == "protocol", line
    assert "limits.line_length (512 octets)" in field(line, "reason"), line
    assert field(line, "reply") == "500 5.5.2 line too long", line


@pytest.mark.parametrize(("commands", "verb", "when"), [
    (["MAIL FROM:<sender@remote.example>"], "MAIL", "before EHLO/HELO"),
    (["EHLO c.example", "RCPT TO:<alice@example.test>"], "RCPT", "before MAIL"),
    (["EHLO c.example", "MAIL FROM:<sender@remote.example>", "DATA"], "DATA", "no recipient accepted"),
])
def test_a_bad_sequence_is_logged_naming_the_command(make_server, caplog, commands, verb, when):
    caplog.set_level(logging.INFO, logger="yuubin")
    srv = make_server()
    c = RawSMTP(srv.port("mx"), source=UNTRUSTED)
    assert c.reply()[0] == 220
    codes = [c.cmd(cmd)[0] for cmd in commands]
    assert codes[-1] in (503, 554), codes
    c.cmd("QUIT")
    [line] = rejects(session_log(caplog, UNTRUSTED))
    assert field(line, "stage") == verb.lower() and field(line, "check") == "protocol", line
    assert field(line, "reason").startswith(f"bad sequence: {verb} ") and when in field(line, "reason"), line


def test_a_failed_login_is_logged_as_a_rejection(make_server, caplog, client_tls):
    caplog.set_level(logging.INFO, logger="yuubin")
    srv = make_server(listener=[{"kind": "submissions", "address": "127.0.0.1:0"}],
                      accounts={ALICE: ALICE_PW})
    with smtplib.SMTP_SSL("127.0.0.1", srv.port("submissions"), source_address=(UNTRUSTED, 0), timeout=10,
                          context=client_tls) as s:
        s.ehlo("client.test")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login(ALICE, "not the password")  # smtplib tries each mechanism: one 535 each
    lines = rejects(session_log(caplog, UNTRUSTED))
    assert lines
    for line in lines:
        assert field(line, "stage") == "auth" and field(line, "check") == "login", line
        assert field(line, "reason") == "invalid credentials" and field(line, "reply").startswith("535 5.7.8 "), line


def test_every_error_reply_has_its_log_line(make_server, caplog):
    """Whatever the client does wrong, the count of replies >= 400 and of reject lines agree."""
    caplog.set_level(logging.INFO, logger="yuubin")
    srv = make_server(limits={"max_errors": 30, "recipients": 2})
    c = RawSMTP(srv.port("mx"), source=UNTRUSTED)
    replies = [c.reply()]
    for cmd in [b"DATA", b"HELO", b"EHLO c.example", b"FROB", b"MAIL FROM:<x>", b"MAIL FROM:<a@b.example> BODY=9",
                b"RCPT TO:<alice@example.test>", b"MAIL FROM:<s@remote.example>", b"MAIL FROM:<s@remote.example>",
                b"RCPT TO:<nobody@example.test>", b"RCPT TO:<carol@remote.example>", b"RCPT TO:<alice@example.test>",
                b"RCPT TO:<bob@example.test>", b"RCPT TO:<alice+x@example.test>", b"STARTTLS x", b"AUTH PLAIN",
                b"VRFY", b"EXPN x", b"NOOP \x00", b"NOOP \xff", b"BDAT x"]:
        replies.append(c.cmd(cmd))
    errors = [r for r in replies if r[0] >= 400]
    assert len(errors) >= 15, replies
    lines = rejects(session_log(caplog, UNTRUSTED))
    assert [field(line, "reply")[:3] for line in lines] == [str(code) for code, _ in errors], (replies, lines)
    assert all(field(line, "reason") for line in lines)


# ---- start and stop, session ids across restarts ----------------------------------------------


def connect_and_quit(port: int) -> None:
    c = RawSMTP(port)
    assert c.reply()[0] == 220
    assert c.cmd("QUIT")[0] == 221


@pytest.mark.slow
def test_start_and_stop_are_logged_and_session_ids_never_repeat(make_config, serve_process):
    from yuubin import __version__
    config = make_config(limits={"shutdown_grace": "2s"})
    runs = []
    for _ in range(2):
        srv = serve_process(config)
        connect_and_quit(srv.port())
        connect_and_quit(srv.port())
        assert srv.stop() == 0
        runs.append(srv.log_text())
    first = runs[0]
    [start] = [line for line in first.splitlines() if "event=starting " in line]
    assert f"version={__version__} " in start and f"config={config.path} " in start, start
    assert "hostname=mx.test.example " in start and f"data_dir={srv.config.data_dir} " in start, start
    assert 'listeners="mx 127.0.0.1:0"' in start, start
    [stop] = [line for line in first.splitlines() if "event=stopped " in line]
    assert "commit_batches" not in stop, stop
    summary = field(stop, "summary")
    assert summary.startswith("stopped after ") and "2 sessions, 0 messages received" in summary, stop
    assert "the spool is empty" in summary, stop
    assert "cause=SIGTERM " in next(line for line in first.splitlines() if "event=stopping " in line)
    ids = [re.findall(r"event=connect session=(\S+) ", text) for text in runs]
    assert len(ids[0]) == len(ids[1]) == 2, runs
    assert not set(ids[0]) & set(ids[1]), ids  # a log spanning the restart can still be followed


# ---- admin actions ---------------------------------------------------------------------------


def admin_actions(caplog) -> list[str]:
    return [line for line in log_lines(caplog, "yuubin.admin") if line.startswith("event=admin_action ")]


def wait_for(pred, timeout: float = 10.0, what: str = "it"):
    deadline = time.monotonic() + timeout
    while not (found := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


@pytest.mark.slow
def test_admin_actions_land_in_the_running_servers_log_with_who_did_them(make_server, dns_server, caplog):
    from tests.harness import free_port, run_yuubin
    from yuubin.store import Store
    caplog.set_level(logging.INFO, logger="yuubin")
    dns_server.add("remote.test", "MX", "10 mx.remote.test.")
    dns_server.add("mx.remote.test", "A", "127.1.0.1")  # nothing listens there: the entries stay queued
    srv = make_server(accounts={ALICE: ALICE_PW},
                      outbound={"port": free_port("127.1.0.1"), "retry_first": "1h", "retry_max": "2h"})
    cfg = srv.config_file()
    for i in range(2):
        with smtplib.SMTP("127.0.0.1", srv.port(), timeout=10) as s:
            s.sendmail(ALICE, [f"carol{i}@remote.test"], f"Subject: {i}\r\n\r\nbody\r\n")
    first, second = [p.name for p in wait_for(lambda: len(srv.queue_entries()) == 2 and srv.queue_entries())]
    store = Store(srv.config.state_db)
    store.set_auth_lockout("127.1.2.3", time.time() + 3600, 1, time.time())
    store.close()

    def admin(*args: str, stdin: str = "") -> None:
        r = run_yuubin(list(args), config=cfg, stdin=stdin, env={"SUDO_USER": "hana"})
        assert r.returncode == 0, (args, r.stdout, r.stderr)

    admin("account", "add", "bob@example.test", stdin="Tangerine-orbit-71-quasar\n")
    admin("account", "suspend", "bob@example.test")
    admin("account", "enable", "bob@example.test")
    admin("account", "passwd", "bob@example.test", stdin="Quiet-harbour-58-lantern\n")
    admin("account", "remove", "bob@example.test")
    admin("alias", "add", "sales@example.test", ALICE)
    admin("alias", "remove", "sales@example.test")
    admin("auth", "unlock", "127.1.2.3")
    admin("queue", "hold", first)
    admin("queue", "release", first)
    admin("queue", "delete", second)
    expected = [("account_add", "bob@example.test"), ("account_suspend", "bob@example.test"),
                ("account_enable", "bob@example.test"), ("account_passwd", "bob@example.test"),
                ("account_remove", "bob@example.test"), ("alias_add", "sales@example.test"),
                ("alias_remove", "sales@example.test"), ("auth_unlock", "127.1.2.3"), ("queue_hold", first),
                ("queue_release", first), ("queue_delete", second)]
    lines = wait_for(lambda: len(admin_actions(caplog)) >= len(expected) and admin_actions(caplog),
                     what="the admin actions in the server's log")
    assert [(field(line, "action"), field(line, "target")) for line in lines] == expected, lines
    assert all(field(line, "by") == "hana" for line in lines), lines
    assert "carol1@remote.test" in field(lines[-1], "detail"), lines[-1]


@pytest.mark.slow
def test_admin_actions_taken_while_the_server_is_down_are_logged_at_its_next_start(make_config, serve_process):
    from tests.harness import run_yuubin
    config = make_config().add_accounts(cached=True)
    config.write()
    r = run_yuubin(["alias", "add", "sales@example.test", "alice@example.test"], config=config.path,
                   env={"SUDO_USER": "kenji"})
    assert r.returncode == 0, r.stderr
    srv = serve_process(config)
    assert srv.stop() == 0
    [line] = [line for line in srv.log_text().splitlines() if "event=admin_action " in line]
    assert "action=alias_add target=sales@example.test by=kenji " in line, line
    assert "alice@example.test" in field(line, "detail"), line
    again = serve_process(config)
    assert again.stop() == 0
    assert "event=admin_action " not in again.log_text()  # logged once, not at every start


# ---- a resolver that does not answer -------------------------------------------------------------


@pytest.mark.slow
def test_a_silent_resolver_is_one_warning_naming_it_and_queue_show_names_it_too(make_server, caplog):
    from tests.harness import run_yuubin
    caplog.set_level(logging.INFO, logger="yuubin")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never answers: a resolver that hangs
        nameserver = f"127.0.0.1:{silent.getsockname()[1]}"
        srv = make_server(dns={"nameservers": ["127.0.0.1"], "port": silent.getsockname()[1], "timeout": 0.5},
                          outbound={"retry_first": "1h", "retry_max": "2h"})
        for i in range(3):  # every client from outside is looked up on the DNSBL zones
            c = RawSMTP(srv.port(), source=f"127.1.0.{i + 1}")
            assert c.reply()[0] == 220
            assert c.cmd("QUIT")[0] == 221
        with smtplib.SMTP("127.0.0.1", srv.port(), timeout=10) as s:  # the LAN relays: an MX lookup
            s.sendmail(ALICE, ["carol@remote.test"], "Subject: out\r\n\r\nbody\r\n")
        [entry] = srv.queue_entries()

        def shown() -> str | None:
            r = run_yuubin(["queue", "show", entry.name], config=srv.config_file())
            assert r.returncode == 0, r.stderr
            return r.stdout if "tries=1" in r.stdout else None

        out = wait_for(shown, what="the first delivery attempt")
        assert f"MX lookup for remote.test failed: timeout (no answer from nameserver {nameserver})" in out, out
    warnings = [line for line in log_lines(caplog, "yuubin.dns") if line.startswith("event=dns_timeout ")]
    assert len(warnings) == 1, warnings
    assert f"nameserver={nameserver} " in warnings[0] and "[dns].nameservers" in warnings[0], warnings

"""The SASL exchange and the authenticated state in the sans-IO core (no sockets)."""

from __future__ import annotations

import base64

import pytest

from yuubin.smtp.protocol import (
    NEED_DATA,
    PAUSED,
    AuthRequested,
    AuthResponse,
    Hello,
    MailFrom,
    SMTPServerConnection,
)
from yuubin.smtp.replies import Reply


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def session(tls_active: bool = True, required: bool = True) -> SMTPServerConnection:
    c = SMTPServerConnection("mx.test", tls_available=True, tls_active=tls_active,
                             auth_mechanisms=("PLAIN", "LOGIN"), auth_required=required)
    c.start()
    c.data_to_send()
    c.receive_data(b"EHLO client\r\n")
    ev = c.next_event()
    assert isinstance(ev, Hello)
    c.accept()
    c.data_to_send()
    return c


def send(c: SMTPServerConnection, line: bytes):
    c.receive_data(line)
    return c.next_event()


def test_ehlo_advertises_auth_only_with_tls():
    c = session(tls_active=False)
    c.receive_data(b"EHLO again\r\n")
    c.next_event()
    c.accept()
    assert b"AUTH" not in c.data_to_send()
    c = session(tls_active=True)
    c.receive_data(b"EHLO again\r\n")
    c.next_event()
    c.accept()
    out = c.data_to_send()
    assert b"250-AUTH PLAIN LOGIN\r\n" in out or b"250 AUTH PLAIN LOGIN\r\n" in out


def test_auth_before_tls_is_538():
    c = session(tls_active=False)
    assert send(c, b"AUTH PLAIN " + b64(b"\0a@x\0pw").encode() + b"\r\n") is NEED_DATA
    assert c.data_to_send().startswith(b"538 5.7.11 ")


def test_mail_before_auth_is_530_and_after_auth_is_asked():
    c = session()
    assert send(c, b"MAIL FROM:<a@x.test>\r\n") is NEED_DATA
    assert c.data_to_send().startswith(b"530 5.7.0 ")
    ev = send(c, b"AUTH PLAIN " + b64(b"\0a@x.test\0pw").encode() + b"\r\n")
    assert ev == AuthRequested("PLAIN", b64(b"\0a@x.test\0pw"))
    c.accept()
    assert c.data_to_send() == b"235 2.7.0 authentication succeeded\r\n"
    assert c.authenticated
    assert isinstance(send(c, b"MAIL FROM:<a@x.test>\r\n"), MailFrom)


def test_mail_without_auth_required_is_not_gated():
    c = session(required=False)
    assert isinstance(send(c, b"MAIL FROM:<a@x.test>\r\n"), MailFrom)


def test_login_challenges_and_responses():
    c = session()
    assert send(c, b"AUTH LOGIN\r\n") == AuthRequested("LOGIN", None)
    c.challenge(b"Username:")
    assert c.data_to_send() == b"334 VXNlcm5hbWU6\r\n"
    assert send(c, b64(b"alice@x.test").encode() + b"\r\n") == AuthResponse(b"alice@x.test")
    c.challenge(b"Password:")
    assert c.data_to_send() == b"334 UGFzc3dvcmQ6\r\n"
    assert send(c, b64(b"secret").encode() + b"\r\n") == AuthResponse(b"secret")
    c.reject(Reply(535, "5.7.8", "authentication credentials invalid"))
    assert c.data_to_send() == b"535 5.7.8 authentication credentials invalid\r\n"
    assert not c.authenticated
    # still usable: the next command is a command again
    assert send(c, b"MAIL FROM:<a@x.test>\r\n") is NEED_DATA
    assert c.data_to_send().startswith(b"530 ")


def test_empty_challenge_and_empty_response():
    c = session()
    send(c, b"AUTH PLAIN\r\n")
    c.challenge(b"")
    assert c.data_to_send() == b"334 \r\n"
    assert send(c, b"\r\n") == AuthResponse(b"")


def test_star_cancels_with_501():
    c = session()
    send(c, b"AUTH LOGIN\r\n")
    c.challenge(b"Username:")
    c.data_to_send()
    assert send(c, b"*\r\n") is NEED_DATA
    assert c.data_to_send().startswith(b"501 ")
    assert not c.authenticated
    assert send(c, b"NOOP\r\n") is NEED_DATA
    assert c.data_to_send().startswith(b"250 ")


def test_bad_base64_response_is_501_and_not_an_event():
    c = session()
    send(c, b"AUTH LOGIN\r\n")
    c.challenge(b"Username:")
    c.data_to_send()
    assert send(c, b"not base64!!\r\n") is NEED_DATA
    assert c.data_to_send().startswith(b"501 5.5.2 ")


def test_response_is_not_parsed_as_a_command():
    c = session()
    send(c, b"AUTH LOGIN\r\n")
    c.challenge(b"Username:")
    c.data_to_send()
    # "QUIT" is valid base64 (decodes to 3 bytes): in the exchange it is data, not a command
    assert send(c, b"QUIT\r\n") == AuthResponse(base64.b64decode(b"QUIT"))


def test_pipelined_lines_wait_for_the_answer():
    c = session()
    c.receive_data(b"AUTH LOGIN\r\n" + b64(b"u@x.test").encode() + b"\r\n")
    assert c.next_event() == AuthRequested("LOGIN", None)
    assert c.next_event() is PAUSED
    c.challenge(b"Username:")
    assert c.next_event() == AuthResponse(b"u@x.test")


def test_second_auth_after_success_is_503():
    c = session()
    send(c, b"AUTH PLAIN " + b64(b"\0a@x\0pw").encode() + b"\r\n")
    c.accept()
    c.data_to_send()
    assert send(c, b"AUTH PLAIN " + b64(b"\0a@x\0pw").encode() + b"\r\n") is NEED_DATA
    assert c.data_to_send().startswith(b"503 ")


def test_unknown_mechanism_is_504():
    c = session()
    assert send(c, b"AUTH CRAM-MD5\r\n") is NEED_DATA
    assert c.data_to_send().startswith(b"504 ")


def test_challenge_without_pending_auth_is_an_error():
    c = session()
    with pytest.raises(RuntimeError):
        c.challenge(b"x")


def test_overlong_response_line_is_refused():
    c = session()
    send(c, b"AUTH LOGIN\r\n")
    c.challenge(b"Username:")
    c.data_to_send()
    assert send(c, b"A" * 13000) is NEED_DATA
    assert c.data_to_send().startswith(b"500 5.5.6 ")


def test_failed_auths_count_as_errors_and_end_the_session():
    c = SMTPServerConnection("mx.test", tls_active=True, auth_mechanisms=("PLAIN",), auth_required=True)
    c.limits = type(c.limits)(max_errors=3)
    c.start()
    c.receive_data(b"EHLO c\r\n")
    c.next_event()
    c.accept()
    for _ in range(3):
        send(c, b"AUTH PLAIN " + b64(b"\0a@x\0bad").encode() + b"\r\n")
        c.reject(Reply(535, "5.7.8", "no"))
    assert c.closed
    assert b"421 " in c.data_to_send()

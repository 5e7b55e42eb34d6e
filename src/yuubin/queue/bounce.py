"""Delivery status notifications (RFC 3464): who gets one, and its bytes.

Only mail our own users gave us (authenticated submission, or relayed for a trusted LAN client)
is bounced. Mail from outside on port 25 was judged in-session; bouncing it later would send
backscatter to forged senders, so its failures are logged and dropped. Never to the null sender.
"""

from __future__ import annotations

import email.utils
import re
import secrets
import time
from collections.abc import Iterable

from yuubin.queue.spool import Envelope, RemoteRecipient

FAILED = "failed"
DELAYED = "delayed"


def may_bounce(env: Envelope) -> tuple[bool, str]:
    """Whether this entry's sender may get a DSN, and why not when it may not."""
    if not env.sender:
        return False, "null sender"
    if env.listener == "bounce":
        return False, "a DSN is never bounced"
    if not (env.auth or env.trusted):
        return False, "mail from outside: no backscatter"
    return True, ""


def wants_notice(rcpt: RemoteRecipient, action: str) -> bool:
    """RFC 3461 NOTIFY: absent means failures (and delays, at our discretion) are reported."""
    notify = rcpt.params.get("NOTIFY", "").upper()
    if not notify:
        return True
    if "NEVER" in notify:
        return False
    return ("FAILURE" if action == FAILED else "DELAY") in notify.split(",")


def _xtext_decode(value: str) -> str:
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _header_safe(value: str) -> str:
    return " ".join(str(value).replace("\r", " ").replace("\n", " ").split())


def original_headers(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[: end + 2]


def build_dsn(env: Envelope, data: bytes, rcpts: Iterable[RemoteRecipient], action: str, hostname: str,
              retry_until: float | None = None, now: float | None = None) -> bytes:
    """A multipart/report; report-type=delivery-status message to the entry's sender."""
    now = time.time() if now is None else now
    boundary = f"=_yuubin_{secrets.token_hex(12)}"
    rcpts = list(rcpts)
    date = email.utils.formatdate(now, localtime=True)
    ret_full = str(env.mail_params.get("RET", "")).upper() == "FULL"
    if action == FAILED:
        subject = "Undelivered Mail Returned to Sender"
        intro = (f"This is the mail system at host {hostname}.\r\n\r\nYour message could not be delivered to one "
                 "or more recipients. It is attached below.\r\n")
    else:
        subject = "Delayed Mail (still being retried)"
        intro = (f"This is the mail system at host {hostname}.\r\n\r\nYour message has not been delivered yet to "
                 "one or more recipients. Delivery will be retried; you do not need to resend it.\r\n"
                 )
    human = [intro]
    for r in rcpts:
        human.append(f"\r\n<{_header_safe(r.to)}>: {_header_safe(r.error)}\r\n")
    status_fields = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Yuubin-Queue-ID: {env.id}",
        f"Arrival-Date: {email.utils.formatdate(env.received, localtime=True)}",
    ]
    if env.mail_params.get("ENVID"):
        status_fields.insert(0, f"Original-Envelope-Id: {_header_safe(_xtext_decode(env.mail_params['ENVID']))}")
    blocks = ["\r\n".join(status_fields)]
    for r in rcpts:
        fields = [f"Final-Recipient: rfc822; {_header_safe(r.to)}"]
        orcpt = r.params.get("ORCPT", "")
        if orcpt and ";" in orcpt:
            kind, _, addr = orcpt.partition(";")
            fields.append(f"Original-Recipient: {_header_safe(kind)}; {_header_safe(_xtext_decode(addr))}")
        default_status = "5.0.0" if action == FAILED else "4.0.0"
        fields += [f"Action: {action}", f"Status: {r.status or default_status}"]
        if r.host:
            fields.append(f"Remote-MTA: dns; {_header_safe(r.host)}")
        if r.error:
            fields.append(f"Diagnostic-Code: smtp; {_header_safe(r.error)}")
        fields.append(f"Last-Attempt-Date: {date}")
        if action == DELAYED and retry_until:
            fields.append(f"Will-Retry-Until: {email.utils.formatdate(retry_until, localtime=True)}")
        blocks.append("\r\n".join(fields))
    delivery_status = ("\r\n\r\n".join(blocks) + "\r\n").encode("utf-8")
    if ret_full:
        attached_type, attached = "message/rfc822", data
    else:
        attached_type, attached = "text/rfc822-headers", original_headers(data)
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
        f"To: <{_header_safe(env.sender)}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{env.id}.{secrets.token_hex(6)}.dsn@{hostname}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f"Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
        "\r\n"
        "This is a MIME-encapsulated message.\r\n\r\n"
    ).encode()
    parts = [
        head,
        f"--{boundary}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        .encode(), "".join(human).encode("utf-8"), b"\r\n",
        f"--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
        .encode(), delivery_status, b"\r\n",
        f"--{boundary}\r\nContent-Description: Undelivered message\r\nContent-Type: {attached_type}\r\n\r\n"
        .encode(), attached, b"" if attached.endswith(b"\r\n") else b"\r\n",
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)

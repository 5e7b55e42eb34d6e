"""The one door through which every new message enters the system.

SMTP DATA/BDAT, postmaster notices and DSNs all come in here (IMAP APPEND into Sent and DMARC
report capture will too), so what must happen to a new message happens once: the message stage
of the listener's policy, the incoming header fields the checks drop (a forged
Authentication-Results), trace headers (Received:, and Message-ID/Date for a submission that
lacks them), the headers the checks added, routes split into local and remote, holds of a
suspended account, the durable spool write (fsynced, file and directory, before anyone is told
"accepted"), local delivery (riding the same group commit when the message is local-only),
waking the outbound queue, and telling the `StoredHook`s (DMARC report capture) what was stored.
"""

from __future__ import annotations

import email.utils
import errno
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Protocol

from yuubin.auth.accounts import Directory
from yuubin.delivery.local import LocalDelivery
from yuubin.policy.holds import AccountHolds
from yuubin.policy.pipeline import Decision, HeaderDrop, Pipeline, StageResult, Transaction, reject
from yuubin.queue.spool import Envelope, RemoteRecipient, Spool, new_id
from yuubin.smtp.address import AddressError, parse_path

log = logging.getLogger("yuubin.intake")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Trace:
    """Who handed the message over, for its Received: header (RFC 5321 4.4)."""

    protocol: str  # "ESMTP", "ESMTPSA", "UTF8SMTPS", ... (RFC 3848)
    client: IPAddress
    helo: str | None
    tls: str | None
    auth_user: str | None
    recipients: tuple[str, ...]


@dataclass(slots=True)
class NewMessage:
    """A message and its envelope, routes already decided."""

    sender: str  # "" for the null sender
    data: bytes
    origin: str  # the listener kind, "bounce" or "internal"
    local: list[tuple[str, str]] = field(default_factory=list)  # (mailbox, recipient as given)
    remote: list[RemoteRecipient] = field(default_factory=list)
    mail_params: dict[str, str] = field(default_factory=dict)
    client: str = "127.0.0.1"
    helo: str = ""
    auth: str | None = None
    trusted: bool = False
    junk: bool = False  # quarantined by policy: local copies go to the Junk folder


@dataclass(frozen=True, slots=True)
class Accepted:
    qid: str
    size: int
    result: StageResult | None = None  # the message stage, when a policy ran


@dataclass(frozen=True, slots=True)
class Refused:
    decision: Decision  # the check that refused (policy, or "spool" when storing failed)


class StoredHook(Protocol):
    def stored(self, qid: str, recipients: Sequence[str], data: bytes, results: Mapping[str, str]) -> None:
        """A message from a client is stored (its 250 not sent yet): the recipients as given, the
        data as stored, the results of the policy checks. Must return at once (work goes to a task)."""


def missing_headers(data: bytes, qid: str, hostname: str, now: float) -> bytes:
    """Message-ID and Date lines to prepend when a submitted message lacks them (RFC 5322 3.6)."""
    end = data.find(b"\r\n\r\n")
    headers = BytesHeaderParser(policy=compat32).parsebytes(data[: end + 2] if end >= 0 else data)
    out = b""
    if headers.get("Message-ID") is None:
        out += f"Message-ID: <{qid}@{hostname}>\r\n".encode()
    if headers.get("Date") is None:
        out += f"Date: {email.utils.formatdate(now, localtime=True)}\r\n".encode()
    return out


def drop_header_fields(data: bytes, drops: Sequence[HeaderDrop]) -> bytes:
    """``data`` without the header fields any of ``drops`` asks to remove (the body untouched).

    Fields are split by hand on the raw bytes so that everything kept stays byte-for-byte as
    it came (a DKIM signature over it must still verify)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        head, rest = data, b""
    else:
        head, rest = data[: end + 2], data[end + 2:]
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    kept = []
    for f in fields:
        name = f.split(b":", 1)[0].strip().decode("ascii", errors="replace").lower() if b":" in f else ""
        if name and any(drop(name, f) for drop in drops):
            continue
        kept.append(f)
    return b"".join(kept) + rest


def received_header(trace: Trace, hostname: str, qid: str, now: float, show_submitter: bool) -> bytes:
    tls = f"\r\n\t(using {trace.tls})" if trace.tls else ""
    for_ = f"\r\n\tfor <{trace.recipients[0]}>" if len(trace.recipients) == 1 else ""
    date = email.utils.formatdate(now, localtime=True)
    if trace.auth_user and not show_submitter:
        # A submitting client is a user's device: its (often private) address and its EHLO
        # name (often an address literal) stay out of the headers, as Gmail does.
        return (f"Received: by {hostname} (yuubin) with {trace.protocol} id {qid}{tls}{for_};"
                f"\r\n\t{date}\r\n").encode()
    helo = (trace.helo or "unknown").replace("\r", "").replace("\n", "")[:255]
    return (f"Received: from {helo} ([{trace.client}])\r\n\tby {hostname} "
            f"(yuubin) with {trace.protocol} id {qid}{tls}{for_};\r\n\t{date}\r\n").encode()


class Intake:
    def __init__(self, hostname: str, spool: Spool, delivery: LocalDelivery, holds: AccountHolds,
                 directory: Directory, wake: Callable[[str], None], show_submitter: bool = False,
                 clock: Callable[[], float] = time.time, after_stored: Sequence[StoredHook] = ()):
        self.hostname = hostname
        self.spool = spool
        self.delivery = delivery
        self.holds = holds
        self.directory = directory
        self.wake = wake  # the outbound queue: an entry with remote recipients is ready
        self.show_submitter = show_submitter  # [submission] received_client_ip
        self.clock = clock
        self.after_stored = tuple(after_stored)  # e.g. the DMARC report capture
        self.received = 0  # messages accepted from clients since the start, for the stop line

    async def receive(self, txn: Transaction, data: bytes, pipeline: Pipeline, trace: Trace) -> Accepted | Refused:
        """A message at the end of DATA/BDAT: the message stage, then stored and on its way."""
        result = await pipeline.message(txn, data)
        if not result.accepted:
            return Refused(result.decision)
        if result.drop_headers:
            data = drop_header_fields(data, result.drop_headers)
        s = txn.session
        qid = new_id()
        now = self.clock()
        head = received_header(trace, self.hostname, qid, now, self.show_submitter) + b"".join(result.headers)
        if s.auth_user:
            head += missing_headers(data, qid, self.hostname, now)
        msg = NewMessage(
            sender=txn.sender.text if txn.sender else "", data=head + data, origin=s.listener,
            mail_params=txn.mail_params, client=str(s.client), helo=s.helo or "", auth=s.auth_user,
            trusted=s.trusted, junk=result.quarantine,
        )
        for r in txn.recipients:
            msg.local.extend((mb, r.address.text) for mb in r.route.mailboxes)
            msg.remote.extend(RemoteRecipient(to=fw, params=r.params, rcpt=r.address.text) for fw in r.route.forwards)
        try:
            await self.store(msg, qid)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                refusal = reject("spool", e.strerror or str(e), 452, "4.3.1",
                                 "insufficient system storage; try again later")
            else:
                refusal = reject("spool", e.strerror or str(e), 451, "4.3.0",
                                 "local error storing the message; try again later")
            log.error('event=spool_failed session=%s error=%r reply="%s"', s.session, e.strerror or str(e),
                      refusal.reply)
            return Refused(refusal)
        pipeline.accepted(txn)
        self._tell_stored(qid, txn, msg.data, result)
        self.received += 1
        log.info("event=accepted session=%s id=%s from=<%s> rcpts=%d size=%d%s", s.session, qid, msg.sender,
                 len(txn.recipients), len(msg.data), " quarantine=yes" if msg.junk else "")
        return Accepted(qid, len(msg.data), result)

    def _tell_stored(self, qid: str, txn: Transaction, data: bytes, result: StageResult) -> None:
        if not self.after_stored:
            return
        recipients = [r.address.text for r in txn.recipients]
        results = {**txn.results, **result.results}
        for hook in self.after_stored:
            try:
                hook.stored(qid, recipients, data, results)
            except Exception:  # the message is stored: a hook's bug must not turn its 250 into an error
                log.exception("event=stored_hook_failed session=%s id=%s hook=%s", txn.session.session, qid,
                              type(hook).__name__)

    async def store(self, msg: NewMessage, qid: str | None = None) -> str:
        """Durable on return (raises OSError if not): spool entry written and fsynced; local-only
        copies queued behind it in the same group commit; the outbound queue told."""
        env = Envelope(
            id=qid or new_id(), sender=msg.sender, mail_params=msg.mail_params, local=msg.local,
            remote=msg.remote, received=self.clock(), client=msg.client, helo=msg.helo, listener=msg.origin,
            auth=msg.auth, trusted=msg.trusted,
        )
        env.junk = msg.junk
        if msg.auth and await self.holds.is_held_now(env):
            env.held = True  # suspended while this message was in DATA
        stored = self.spool.enqueue_store(env, msg.data)
        if not env.remote:
            # Local-only: the Maildir copies ride the same group commit as the spool entry.
            self.delivery.submit(env, msg.data, stored=stored)
        await stored
        if msg.auth and not env.held and await self.holds.is_held_now(env):
            await self.holds.hold(msg.auth)  # suspended while it was being written
            env.held = True
        if env.local and env.remote:
            self.delivery.submit(env, msg.data)  # local copies first; it hands the rest to the queue
        elif env.remote:
            self.wake(env.id)
        return env.id

    async def inject(self, to: str, data: bytes, origin: str = "bounce") -> str | None:
        """A message yuubin itself writes (DSN, notice to postmaster), from the null sender to `to`,
        routed like any other mail; None when `to` is a local address nobody receives."""
        try:
            addr = parse_path(f"<{to}>", smtputf8=True)
        except AddressError:
            return None
        if addr is None:
            return None
        msg = NewMessage(sender="", data=data, origin=origin, helo=self.hostname, trusted=origin == "internal")
        if not self.directory.is_local(addr.domain):
            msg.remote.append(RemoteRecipient(to=to, params={}, rcpt=to))
        else:
            res = await self.directory.lookup(addr)
            if res is None:
                return None
            msg.local.extend((mb, to) for mb in res.mailboxes)
            msg.remote.extend(RemoteRecipient(to=fw, params={}, rcpt=to) for fw in res.forwards)
        return await self.store(msg)

"""The asyncio shell around the SMTP core: moves bytes, applies policy, stores messages.

A Protocol (not streams) so that STARTTLS is exact: while the core waits for the handshake it
drops every byte, and nothing buffered in plaintext can be read back as if it came over TLS.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import ipaddress
import itertools
import logging
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from yuubin import tls as tlsmod
from yuubin.auth import sasl
from yuubin.auth.accounts import Resolution
from yuubin.policy.decision import Decision, ListenerPolicy, SessionFacts
from yuubin.policy.submission import missing_headers
from yuubin.queue.spool import Envelope, RemoteRecipient, new_id
from yuubin.smtp import replies as R
from yuubin.smtp.protocol import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    AuthRequested,
    AuthResponse,
    Hello,
    Limits,
    MailFrom,
    MessageReceived,
    Quit,
    RcptTo,
    SMTPServerConnection,
    StartTLS,
)
from yuubin.smtp.replies import Reply

if TYPE_CHECKING:
    from yuubin.server import Server

log = logging.getLogger("yuubin.smtp")

READ_PAUSE_BYTES = 1 << 20
WRITE_HIGH_BYTES = 1 << 20
_session_ids = itertools.count(1)
SESSION_PREFIX = ""  # "N-" in worker process N when there are several, so ids stay unique
AUTH_FAILED = Reply(535, "5.7.8", "authentication credentials invalid")
# The same for every account, existing or not: a lockout must not reveal who exists.
AUTH_LOCKED = Reply(454, "4.7.0", "too many failed logins from your address; try again later")


def client_address(peer: tuple) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(peer[0].split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


@dataclass
class ListenerContext:
    kind: str
    server: Server
    tls_context: ssl.SSLContext | None
    implicit_tls: bool
    limits: Limits
    policy: ListenerPolicy  # port 25's, or a submission listener's own (with its allow list)
    auth_mechanisms: tuple[str, ...] = ()  # non-empty: AUTH is offered (after TLS) and required before MAIL


class SMTPSession(asyncio.Protocol):
    """One connection: the Protocol half collects bytes, `run()` drives the core."""

    def __init__(self, ctx: ListenerContext):
        self.ctx = ctx
        self.server = ctx.server
        self.transport: asyncio.Transport | None = None
        self.conn: SMTPServerConnection | None = None
        self.facts: SessionFacts | None = None
        self.task: asyncio.Task | None = None
        self.idle = False
        self._waiter: asyncio.Future | None = None
        self._drain: asyncio.Future | None = None
        self._lost = False
        self._paused = False
        self._ip = None
        self._sasl = None
        self._tls_early: bytearray | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # ---- Protocol callbacks ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self._ip = client_address(peer)
        sid = f"{SESSION_PREFIX}{next(_session_ids):x}"
        if not self.server.admit(self._ip):
            log.info("event=refused session=%s client=%s reason=%s", sid, self._ip, "too many connections")
            transport.write(Reply(421, "4.7.0", "too many connections from your address; try later").encode())
            transport.close()
            self._lost = True
            return
        srv = self.server
        self.facts = SessionFacts(sid, self.ctx.kind, self._ip, srv.is_trusted(self._ip))
        if self.ctx.implicit_tls:
            self.facts.tls = tlsmod.describe(transport.get_extra_info("ssl_object"))
        self.conn = SMTPServerConnection(
            srv.config.hostname, self.ctx.limits,
            tls_available=self.ctx.tls_context is not None,
            tls_active=self.ctx.implicit_tls,
            auth_mechanisms=self.ctx.auth_mechanisms,
            auth_required=bool(self.ctx.auth_mechanisms),
        )
        self.task = asyncio.get_running_loop().create_task(self.run())
        srv.sessions.add(self)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        if self._tls_early is not None:
            # Decrypted bytes that arrived with the end of the STARTTLS handshake (GnuTLS clients
            # such as msmtp send EHLO at once): kept for the core until tls_started().
            self._tls_early += data
            return
        conn.receive_data(data)
        if conn.unprocessed > READ_PAUSE_BYTES and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def eof_received(self) -> bool:
        self._wake_lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._wake_lost()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ip is not None and self.facts is not None:
            self.server.release(self._ip)
            self.server.sessions.discard(self)
            self._ip = None

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def _wake_lost(self) -> None:
        self._lost = True
        for f in (self._waiter, self._drain):
            if f is not None and not f.done():
                f.set_result(None)

    # ---- the session ----

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self._lost:
            self.transport.write(data)
            if self._drain is not None:
                await self._drain

    async def _wait_for_data(self) -> bool:
        """Wait for bytes; False when the client went away."""
        if self._lost:
            return False
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        conn = self.conn
        timeout = self.server.config.limits.data_timeout if conn.receiving_content else \
            self.server.config.limits.idle_timeout
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._deadline = loop.time() + timeout
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(self._deadline, self._check_deadline)
        self.idle = not conn.in_transaction and not conn.receiving_content
        try:
            await self._waiter
        finally:
            self.idle = False
            self._waiter = None
        return not self._lost or conn.unprocessed > 0

    def _check_deadline(self) -> None:
        """One lazily re-armed timer per session instead of a new timeout for every read."""
        loop = asyncio.get_running_loop()
        w = self._waiter
        if w is not None and not w.done() and loop.time() >= self._deadline:
            self._timer = None
            w.set_exception(TimeoutError())
            return
        if self._lost:
            self._timer = None
            return
        when = self._deadline if w is not None else loop.time() + 1.0
        self._timer = loop.call_at(max(when, loop.time() + 0.01), self._check_deadline)

    async def run(self) -> None:
        conn, facts = self.conn, self.facts
        log.info("event=connect session=%s listener=%s client=%s trusted=%s tls=%s", facts.session,
                 self.ctx.kind, facts.client, facts.trusted, facts.tls is not None)
        try:
            decision = await self.ctx.policy.connect(facts)
            if not decision.accepted:
                self._log_reject("connect", decision)
            if not decision.accepted and decision.close:
                conn.close(decision.reply)
            else:
                conn.start(decision.reply if not decision.accepted else None)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    await self._flush()
                    if self.server.stopping and not conn.in_transaction:
                        conn.close(R.SHUTTING_DOWN)
                        continue
                    if not await self._wait_for_data():
                        break
                    continue
                if ev is CLOSED:
                    break
                if ev is PAUSED:  # pragma: no cover - every event is answered below
                    raise RuntimeError("core paused without a pending event")
                await self._handle(ev)
        except TimeoutError:
            conn.close(R.IDLE_TIMEOUT)
            log.info("event=timeout session=%s", facts.session)
        except asyncio.CancelledError:
            conn.close(R.SHUTTING_DOWN)
        except Exception:
            log.exception("event=session_error session=%s", facts.session)
            conn.close(Reply(421, "4.3.0", "internal error; closing connection"))
        finally:
            try:
                if not self._lost:
                    self.transport.write(conn.data_to_send())
            finally:
                self.transport.close()
                log.info("event=disconnect session=%s messages=%d errors=%d", facts.session,
                         conn.messages, conn.errors)

    def _log_reject(self, stage: str, d: Decision) -> None:
        log.info('event=reject session=%s client=%s stage=%s check=%s reason="%s" reply="%s"',
                 self.facts.session, self.facts.client, stage, d.check, d.reason, d.reply)

    async def _handle(self, ev) -> None:
        conn, facts = self.conn, self.facts
        policy = self.ctx.policy
        if isinstance(ev, Hello):
            facts.helo = ev.name
            conn.accept()
        elif isinstance(ev, MailFrom):
            d = policy.mail(facts, ev.sender)
            if d.accepted:
                conn.accept()
            else:
                self._log_reject("mail", d)
                conn.reject(d.reply)
        elif isinstance(ev, RcptTo):
            route = policy.rcpt(facts, ev.recipient)
            if route.decision.accepted:
                conn.accept(context=route.resolution)
            else:
                self._log_reject("rcpt", route.decision)
                conn.reject(route.decision.reply)
        elif isinstance(ev, MessageReceived):
            d = policy.message(facts, ev.data)
            if not d.accepted:
                self._log_reject("data", d)
                conn.reject(d.reply)
            else:
                await self._store(ev)
        elif isinstance(ev, StartTLS):
            await self._start_tls()
        elif isinstance(ev, AuthRequested | AuthResponse):
            if self.ctx.auth_mechanisms:
                await self._auth(ev)
            else:
                conn.reject(R.AUTH_NOT_HERE)
        elif isinstance(ev, Quit):
            conn.accept()

    async def _auth(self, ev: AuthRequested | AuthResponse) -> None:
        """One step of a SASL exchange; the password check and its bookkeeping are the guard's."""
        conn, facts = self.conn, self.facts
        try:
            if isinstance(ev, AuthRequested):
                self._sasl = sasl.server_for(ev.mechanism)
                step = self._sasl.step(sasl.decode_initial(ev.initial))
            else:
                step = self._sasl.step(ev.data)
        except sasl.SaslError as e:
            self._sasl = None
            log.info('event=auth_malformed session=%s client=%s reason="%s"', facts.session, facts.client, e)
            conn.reject(Reply(501, "5.5.2", f"malformed authentication exchange: {e}"))
            return
        if isinstance(step, sasl.Challenge):
            conn.challenge(step.data)
            return
        self._sasl = None
        result = await self.server.auth_guard.login(facts.client, step.username, step.password,
                                                    facts.session, step.authzid)
        if result.ok:
            facts.auth_user = result.account
            conn.accept()
        elif result.locked is not None:
            conn.reject(AUTH_LOCKED)
        else:
            conn.reject(AUTH_FAILED)

    async def _start_tls(self) -> None:
        await self._flush()
        loop = asyncio.get_running_loop()
        # From here on (no await in between) data_received only ever sees decrypted bytes: the
        # plaintext stream now feeds the TLS layer. Keep them until the core leaves its TLS state.
        self._tls_early = bytearray()
        try:
            new = await loop.start_tls(self.transport, self, self.ctx.tls_context, server_side=True,
                                       ssl_handshake_timeout=30.0)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            self._tls_early = None
            log.info("event=tls_failed session=%s error=%r", self.facts.session, str(e))
            self._lost = True
            self.conn.close(Reply(421, "4.7.0", "TLS handshake failed"))
            return
        if new is None:
            self._tls_early = None
            self._lost = True
            self.conn.close(Reply(421, "4.7.0", "TLS handshake failed"))
            return
        self.transport = new
        self.facts.tls = tlsmod.describe(new.get_extra_info("ssl_object"))
        self.facts.helo = None
        self.conn.tls_started()
        early, self._tls_early = self._tls_early, None
        if early:
            self.conn.receive_data(bytes(early))
        log.info("event=starttls session=%s tls=%r", self.facts.session, self.facts.tls)

    def _received_header(self, ev: MessageReceived, qid: str) -> bytes:
        facts = self.facts
        with_ = "ESMTP" if self.conn.esmtp else "SMTP"
        if facts.tls:
            with_ += "S"
        if facts.auth_user:
            with_ += "A"
        if "SMTPUTF8" in ev.mail_params:
            with_ = "UTF8" + with_
        tls = f"\r\n\t(using {facts.tls})" if facts.tls else ""
        for_ = f"\r\n\tfor <{ev.recipients[0].address.text}>" if len(ev.recipients) == 1 else ""
        helo = (facts.helo or "unknown").replace("\r", "").replace("\n", "")[:255]
        date = email.utils.formatdate(time.time(), localtime=True)
        if facts.auth_user and not self.server.config.submission.received_client_ip:
            # A submitting client is a user's device: its (often private) address and its EHLO
            # name (often an address literal) stay out of the headers, as Gmail does.
            return (f"Received: by {self.server.config.hostname} (yuubin) with {with_} id {qid}{tls}{for_};"
                    f"\r\n\t{date}\r\n").encode()
        return (f"Received: from {helo} ([{facts.client}])\r\n\tby {self.server.config.hostname} "
                f"(yuubin) with {with_} id {qid}{tls}{for_};\r\n\t{date}\r\n").encode()

    async def _store(self, ev: MessageReceived) -> None:
        conn, facts = self.conn, self.facts
        qid = new_id()
        local: list[tuple[str, str]] = []
        remote: list[RemoteRecipient] = []
        for r in ev.recipients:
            res: Resolution = r.context or Resolution()
            local.extend((mb, r.address.text) for mb in res.mailboxes)
            remote.extend(RemoteRecipient(fw, params=r.params, rcpt=r.address.text) for fw in res.forwards)
        if facts.auth_user:
            data = self._received_header(ev, qid) + missing_headers(ev.data, qid, self.server.config.hostname) \
                + ev.data
        else:
            data = self._received_header(ev, qid) + ev.data
        env = Envelope(
            id=qid, sender=ev.sender.text if ev.sender else "", mail_params=ev.mail_params,
            local=local, remote=remote, received=time.time(), client=str(facts.client),
            helo=facts.helo or "", listener=self.ctx.kind, auth=facts.auth_user, trusted=facts.trusted,
        )
        if facts.auth_user and self.server.containment.is_held(env):
            env.held = True  # suspended while this message was in DATA
        delivery = self.server.delivery
        try:
            stored = self.server.spool.enqueue_store(env, data)
            if not env.remote:
                # Local-only: the Maildir copies ride the same group commit as the spool entry.
                delivery.submit(env, data, stored=stored)
            await stored
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                reply = Reply(452, "4.3.1", "insufficient system storage; try again later")
            else:
                reply = Reply(451, "4.3.0", "local error storing the message; try again later")
            log.error("event=spool_failed session=%s error=%r reply=\"%s\"", facts.session,
                      e.strerror or str(e), reply)
            conn.reject(reply)
            return
        if facts.auth_user and not env.held and self.server.containment.is_held(env):
            await self.server.containment.hold(facts.auth_user)  # suspended while it was being written
            env.held = True
        conn.accept(Reply(250, "2.0.0", f"OK queued as {qid}"))
        self.ctx.policy.stored(facts, [r.address.key for r in ev.recipients])
        log.info("event=accepted session=%s id=%s from=<%s> rcpts=%d size=%d", facts.session, qid,
                 env.sender, len(ev.recipients), len(data))
        if env.remote:
            delivery.submit(env, data)

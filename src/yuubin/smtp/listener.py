"""The SMTP session: the shared stream shell driving the sans-IO SMTP core.

Each event the core surfaces goes to the listener's policy pipeline (or the login exchange, or
the intake at the end of a message) and its answer goes back to the core. Every reply of 400 or
more is one `event=reject` line naming its stage, check and reason: the pipeline's refusals, the
core's own (`check=protocol`: syntax, sequence, limits, bare line endings), failed logins,
timeouts and shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from yuubin.auth.guard import LoginResult
from yuubin.auth.login import LoginExchange, Malformed
from yuubin.auth.sasl import Challenge
from yuubin.intake import Intake, Refused, Trace
from yuubin.net.connections import Connections
from yuubin.net.shell import Evicted, IPAddress, SendTimeout, ShellSettings, StreamSession
from yuubin.policy.pipeline import AcceptedRecipient, Decision, Pipeline, SessionFacts, Transaction
from yuubin.smtp import replies as R
from yuubin.smtp.protocol import (
    CLOSED,
    FLUSH,
    NEED_DATA,
    PAUSED,
    AuthRequested,
    AuthResponse,
    Event,
    Hello,
    Limits,
    MailFrom,
    MessageReceived,
    ProtocolError,
    Quit,
    RcptTo,
    SMTPServerConnection,
    StartTLS,
)
from yuubin.smtp.replies import Reply
from yuubin.store import StoreBusy

log = logging.getLogger("yuubin.smtp")

AUTH_FAILED = Reply(535, "5.7.8", "authentication credentials invalid")
# The same for every account, existing or not: a lockout must not reveal who exists.
AUTH_LOCKED = Reply(454, "4.7.0", "too many failed logins from your address; try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "too many connections from your address; try later")
INTERNAL_ERROR = Reply(421, "4.3.0", "internal error; closing connection")
TLS_FAILED = Reply(421, "4.7.0", "TLS handshake failed")
MEMORY_FULL = Reply(421, "4.3.0", "too much mail in transit; try again later")
TOO_SLOW = Reply(421, "4.4.2", "transfer too slow; closing connection")
STATE_BUSY = Reply(451, "4.3.0", "temporary local problem; try again later")
AUTH_TEMPORARY = Reply(454, "4.7.0", "temporary authentication failure; try again later")
_STAGES: dict[type, str] = {Hello: "helo", MailFrom: "mail", RcptTo: "rcpt", MessageReceived: "data",
                            AuthRequested: "auth", AuthResponse: "auth"}


def _quoted(text: object) -> str:
    """`text` made safe inside a "..." log value (it may carry what a client sent)."""
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


@dataclass(frozen=True)
class SmtpListener:
    """What every session of one SMTP listener shares."""

    shell: ShellSettings
    hostname: str
    limits: Limits
    idle_timeout: float  # a whole command line must arrive within this (Postfix's per-record deadline)
    data_timeout: float  # silence inside DATA/BDAT
    pipeline: Pipeline  # the listener's policy (policy/listeners.py)
    intake: Intake
    login: Callable[[IPAddress, str], LoginExchange] | None  # None: no AUTH here (port 25)
    auth_mechanisms: tuple[str, ...] = ()  # offered (after TLS) and required before MAIL
    data_min_rate: int = 1024  # bytes/s a DATA/BDAT transfer must average after an idle_timeout grace


class SMTPSession(StreamSession):
    def __init__(self, listener: SmtpListener, connections: Connections):
        super().__init__(listener.shell, connections)
        self.listener = listener
        self.conn: SMTPServerConnection | None = None
        self.facts: SessionFacts | None = None
        self.txn: Transaction | None = None
        self._login: LoginExchange | None = None
        self._why_deadline = "idle"  # which deadline a TimeoutError means: idle, line, silence or rate

    def refusal(self) -> bytes:
        return TOO_MANY_CONNECTIONS.encode()

    def feed(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.receive_data(data)

    def backlog(self) -> int:
        return self.conn.unprocessed if self.conn is not None else 0

    def holding(self) -> int:
        return self.conn.holding if self.conn is not None else 0

    def eviction(self) -> bytes:
        return MEMORY_FULL.encode()

    def evict(self) -> None:
        super().evict()
        if self.conn is not None:
            self.conn.close(MEMORY_FULL)  # the buffered message goes at once, not when the task ends
            self.conn.data_to_send()  # already written by the shell
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        lst = self.listener
        self.conn = SMTPServerConnection(
            lst.hostname, lst.limits, tls_available=lst.shell.tls_context is not None,
            tls_active=lst.shell.implicit_tls, auth_mechanisms=lst.auth_mechanisms,
            auth_required=bool(lst.auth_mechanisms),
        )
        super().connection_made(transport)

    async def run(self) -> None:
        conn = self.conn
        assert conn is not None and self.client is not None
        facts = self.facts = SessionFacts(self.session_id, self.listener.shell.kind, self.client, self.trusted,
                                          tls=self.tls)
        log.info("event=connect session=%s listener=%s client=%s trusted=%s tls=%s", facts.session,
                 facts.listener, facts.client, facts.trusted, facts.tls is not None)
        try:
            result = await self.listener.pipeline.connect(facts)
            d = result.decision
            if not d.accepted:
                self._log_reject("connect", d)
                assert d.reply is not None
                if d.close:
                    conn.close(d.reply)
                else:
                    conn.start(d.reply)
            else:
                conn.start(None)
            await self._serve_commands(conn)
        except TimeoutError:
            lst = self.listener
            if conn.receiving_content:
                if self._why_deadline == "rate":
                    self._close("data", "timeout", f"slower than {lst.data_min_rate} bytes/s "
                                "(limits.data_min_rate)", TOO_SLOW)
                else:
                    self._close("data", "timeout", f"no data for {lst.data_timeout:g}s (limits.data_timeout)",
                                R.IDLE_TIMEOUT)
            elif self._why_deadline == "line":
                self._close("command", "timeout", f"command line not complete within {lst.idle_timeout:g}s "
                            "(limits.idle_timeout)", R.IDLE_TIMEOUT)
            else:
                self._close("command", "timeout",
                            f"no command for {lst.idle_timeout:g}s (limits.idle_timeout)", R.IDLE_TIMEOUT)
        except SendTimeout:
            self._close("command", "timeout", f"client not reading our replies for {self.listener.idle_timeout:g}s",
                        R.IDLE_TIMEOUT)
        except Evicted:
            conn.close(MEMORY_FULL)  # said and logged by the shell already
            conn.data_to_send()
        except asyncio.CancelledError:
            self._close("command", "shutdown", "server stopping", R.SHUTTING_DOWN)
        except Exception:
            log.exception("event=session_error session=%s", facts.session)
            conn.close(INTERNAL_ERROR)
        finally:
            try:
                self._log_protocol_errors(conn.take_errors())
                self.send_final(conn.data_to_send())
            finally:
                self.close()
                log.info("event=disconnect session=%s messages=%d errors=%d duration=%.3fs", facts.session,
                         conn.messages, conn.errors, time.monotonic() - self.started)

    async def _serve_commands(self, conn: SMTPServerConnection) -> None:
        """The command loop. Each command line has one deadline (idle_timeout from the last reply,
        not restarted per byte); a DATA/BDAT transfer must keep data_min_rate after an idle_timeout
        grace; replies are sent (waiting while the client does not read) and the loop yields
        between pipelined commands, so one flooding client never stalls the others."""
        lst = self.listener
        loop = asyncio.get_running_loop()
        line_deadline: float | None = None
        content_start: tuple[float, int] | None = None
        while True:
            ev = conn.next_event()
            self._log_protocol_errors(conn.take_errors())
            if ev is FLUSH:
                await self.send(conn.data_to_send(), lst.idle_timeout)
                line_deadline = None
                await asyncio.sleep(0)
                continue
            if ev is NEED_DATA:
                out = conn.data_to_send()
                if out:
                    line_deadline = None  # a command was answered: the next line's clock starts now
                await self.send(out, lst.idle_timeout)
                if self.connections.stopping and not conn.in_transaction:
                    self._close("command", "shutdown", "server stopping", R.SHUTTING_DOWN)
                    continue
                now = loop.time()
                if conn.receiving_content:
                    if content_start is None:
                        content_start = (now, self.received)
                    started, base = content_start
                    rate_deadline = started + lst.idle_timeout + (self.received - base) / lst.data_min_rate
                    silence = now + lst.data_timeout
                    self._why_deadline = "rate" if rate_deadline < silence else "silence"
                    until = min(rate_deadline, silence)
                else:
                    content_start = None
                    if line_deadline is None:
                        line_deadline = now + lst.idle_timeout
                    self._why_deadline = "line" if conn.unprocessed else "idle"
                    until = line_deadline
                idle = not conn.in_transaction and not conn.receiving_content
                if not await self.wait_for_data(lst.idle_timeout, idle, until=until):
                    break
                continue
            if ev is CLOSED:
                break
            if ev is PAUSED:  # pragma: no cover - every event is answered below
                raise RuntimeError("core paused without a pending event")
            assert not isinstance(ev, type(NEED_DATA))
            try:
                await self._handle(ev)
            except StoreBusy as e:
                # state.db is locked by another process: this command alone waits for a retry.
                self._login = None
                stage = _STAGES.get(type(ev), "command")
                self._refuse(stage, "state_db", f"state.db busy: {e}",
                             AUTH_TEMPORARY if stage == "auth" else STATE_BUSY)
            line_deadline = None
            await self.send(conn.data_to_send(), lst.idle_timeout)
            await asyncio.sleep(0)  # pipelined commands: let the other sessions run between them

    def _log_refusal(self, stage: str, check: str, reason: str, reply: Reply) -> None:
        assert self.facts is not None
        log.info('event=reject session=%s client=%s stage=%s check=%s reason="%s" reply="%s"',
                 self.facts.session, self.facts.client, stage, check, _quoted(reason), _quoted(reply))

    def _log_reject(self, stage: str, d: Decision) -> None:
        assert d.reply is not None
        self._log_refusal(stage, d.check, d.reason, d.reply)

    def _log_protocol_errors(self, errors: tuple[ProtocolError, ...]) -> None:
        """The core's own error replies (syntax, sequence, limits), logged like any refusal."""
        for e in errors:
            self._log_refusal(e.stage, "protocol", e.reason, e.reply)

    def _close(self, stage: str, check: str, reason: str, reply: Reply) -> None:
        """End the session with a 421 from outside the core (timeout, shutdown, failed TLS), logged."""
        assert self.conn is not None
        if not self.conn.closed:
            self._log_refusal(stage, check, reason, reply)
        self.conn.close(reply)

    def _answer(self, stage: str, d: Decision, context: object = None) -> bool:
        """Give the core the pipeline's answer; True when accepted."""
        assert self.conn is not None
        if d.accepted:
            self.conn.accept(context=context)
            return True
        assert d.reply is not None
        self._refuse(stage, d.check, d.reason, d.reply)
        return False

    def _refuse(self, stage: str, check: str, reason: str, reply: Reply) -> None:
        """Answer the pending event with an error reply of the session's own, logged."""
        assert self.conn is not None
        self._log_refusal(stage, check, reason, reply)
        self.conn.reject(reply)

    async def _handle(self, ev: Event) -> None:
        conn, facts = self.conn, self.facts
        assert conn is not None and facts is not None
        pipeline = self.listener.pipeline
        if isinstance(ev, Hello):
            facts.helo = ev.name
            self.txn = None
            self._answer("helo", (await pipeline.helo(facts)).decision)
        elif isinstance(ev, MailFrom):
            txn = Transaction(facts, ev.sender, ev.params)
            if self._answer("mail", (await pipeline.mail(txn, ev.sender)).decision):
                self.txn = txn
        elif isinstance(ev, RcptTo):
            current = self.txn
            assert current is not None
            result = await pipeline.rcpt(current, ev.recipient)
            if self._answer("rcpt", result.decision) and result.route is not None:
                current.recipients.append(AcceptedRecipient(ev.recipient, ev.params, result.route))
        elif isinstance(ev, MessageReceived):
            await self._message(ev)
        elif isinstance(ev, StartTLS):
            await self._start_tls()
        elif isinstance(ev, AuthRequested | AuthResponse):
            await self._auth(ev)
        elif isinstance(ev, Quit):
            conn.accept()

    async def _message(self, ev: MessageReceived) -> None:
        conn, facts, txn = self.conn, self.facts, self.txn
        assert conn is not None and facts is not None and txn is not None
        self.txn = None
        protocol = "ESMTP" if conn.esmtp else "SMTP"
        if facts.tls:
            protocol += "S"
        if facts.auth_user:
            protocol += "A"
        if "SMTPUTF8" in ev.mail_params:
            protocol = "UTF8" + protocol
        trace = Trace(protocol, facts.client, facts.helo, facts.tls, facts.auth_user,
                      tuple(r.address.text for r in txn.recipients))
        outcome = await self.listener.intake.receive(txn, ev.data, self.listener.pipeline, trace)
        if isinstance(outcome, Refused):
            d = outcome.decision
            assert d.reply is not None
            if d.check != "spool":  # a storage failure was logged by the intake, with its error
                self._log_reject("data", d)
            conn.reject(d.reply)
            return
        conn.accept(Reply(250, "2.0.0", f"OK queued as {outcome.qid}"))

    async def _auth(self, ev: AuthRequested | AuthResponse) -> None:
        """One step of a SASL exchange; the password check and its bookkeeping are the guard's."""
        conn, facts = self.conn, self.facts
        assert conn is not None and facts is not None
        if self.listener.login is None:
            self._refuse("auth", "protocol", "AUTH on a listener without logins", R.AUTH_NOT_HERE)
            return
        if isinstance(ev, AuthRequested):
            self._login = self.listener.login(facts.client, facts.session)
            step = await self._login.start(ev.mechanism, ev.initial)
        else:
            assert self._login is not None
            step = await self._login.respond(ev.data)
        if isinstance(step, Challenge):
            conn.challenge(step.data)
            return
        self._login = None
        if isinstance(step, Malformed):
            self._refuse("auth", "sasl", f"malformed authentication exchange: {step.reason}",
                         Reply(501, "5.5.2", f"malformed authentication exchange: {step.reason}"))
            return
        assert isinstance(step, LoginResult)
        if step.ok:
            facts.auth_user = step.account
            result = await self.listener.pipeline.auth(facts)
            if not self._answer("auth", result.decision):
                facts.auth_user = None
        elif step.locked is not None:
            self._refuse("auth", "auth_guard", f"source {step.locked.source} locked out after failed logins",
                         AUTH_LOCKED)
        else:
            self._refuse("auth", "login", "invalid credentials", AUTH_FAILED)

    async def _start_tls(self) -> None:
        conn, facts = self.conn, self.facts
        assert conn is not None and facts is not None
        await self.send(conn.data_to_send())
        early = await self.start_tls()
        if early is None:
            self._close("starttls", "tls", "TLS handshake failed", TLS_FAILED)
            return
        facts.tls = self.tls
        facts.helo = None
        facts.auth_user = None
        self.txn = None
        conn.tls_started()
        if early:
            conn.receive_data(early)

"""The IMAP session: the shared stream shell driving the sans-IO IMAP core.

The core (imap/protocol.py) frames and parses; this executes each command against the account's
mailbox store (imap/store.py) and renders messages with imap/mime.py. Logins go through
auth/login.py, so the brute-force guard counts IMAP failures with submission's. A suspended
account can still log in here and read its mail: suspension stops sending, not reading.

Every error reply is one `event=reject` line (stage = the command, check, reason), as in SMTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from yuubin.auth.guard import LoginResult
from yuubin.auth.login import LoginExchange, Malformed
from yuubin.auth.sasl import Challenge
from yuubin.imap import protocol as P
from yuubin.imap.protocol import CLOSED, NEED_DATA, IMAPServerConnection, State
from yuubin.net.connections import Connections
from yuubin.net.shell import IPAddress, ShellSettings, StreamSession

log = logging.getLogger("yuubin.imap")


def _quoted(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


class SessionCounts:
    """Open IMAP sessions per account and per client address (both limits are per process)."""

    def __init__(self, per_account: int, per_ip: int):
        self.per_account = per_account
        self.per_ip = per_ip
        self.accounts: Counter[str] = Counter()
        self.ips: Counter[IPAddress] = Counter()

    def enter_ip(self, ip: IPAddress) -> bool:
        if self.ips[ip] >= self.per_ip:
            return False
        self.ips[ip] += 1
        return True

    def leave_ip(self, ip: IPAddress) -> None:
        self.ips[ip] -= 1
        if self.ips[ip] <= 0:
            del self.ips[ip]

    def enter_account(self, account: str) -> bool:
        if self.accounts[account] >= self.per_account:
            return False
        self.accounts[account] += 1
        return True

    def leave_account(self, account: str) -> None:
        self.accounts[account] -= 1
        if self.accounts[account] <= 0:
            del self.accounts[account]


@dataclass(frozen=True)
class ImapListener:
    """What every session of one IMAP listener shares."""

    shell: ShellSettings
    hostname: str
    limits: P.Limits
    idle_timeout: float
    login: Callable[[IPAddress, str], LoginExchange]
    mailstore: Any  # imap.store.MailStore: account(mailbox) -> AccountStore
    counts: SessionCounts
    extensions: tuple[str, ...] = ()  # advertised after login: only what the session implements
    clock: Callable[[], float] = field(default=time.time)


class IMAPSession(StreamSession):
    def __init__(self, listener: ImapListener, connections: Connections):
        super().__init__(listener.shell, connections)
        self.listener = listener
        self.conn: IMAPServerConnection | None = None
        self.account: str | None = None
        self.store: Any = None
        self._login: LoginExchange | None = None
        self._auth_tag = ""
        self._counted_ip = False
        self._deflate: Any = None
        self._inflate: Any = None
        self.commands = 0

    def refusal(self) -> bytes:
        return b"* BYE too many connections from your address; try again later\r\n"

    def feed(self, data: bytes) -> None:
        assert self.conn is not None
        if self._inflate is not None:
            try:
                data = self._inflate.decompress(data)
            except zlib.error:
                self.conn.bye("bad compressed data")
                return
        self.conn.receive_data(data)

    def backlog(self) -> int:
        return self.conn.unprocessed if self.conn is not None else 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        lst = self.listener
        self.conn = IMAPServerConnection(
            lst.limits, tls_available=lst.shell.tls_context is not None, tls_active=lst.shell.implicit_tls,
            auth_mechanisms=("PLAIN",), extensions=lst.extensions)
        super().connection_made(transport)

    async def send(self, data: bytes) -> None:
        if self._deflate is not None and data:
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        await super().send(data)

    def send_final(self, data: bytes) -> None:
        if self._deflate is not None and data:
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_FINISH)
        super().send_final(data)

    # ---- the loop ----

    async def run(self) -> None:
        conn = self.conn
        assert conn is not None and self.client is not None
        log.info("event=connect session=%s listener=%s client=%s tls=%s", self.session_id, self.settings.kind,
                 self.client, self.tls is not None)
        try:
            if not self.listener.counts.enter_ip(self.client):
                self._reject("connect", "limit", "too many IMAP sessions from this address (imap.sessions_per_ip)")
                conn.bye("too many IMAP sessions from your address")
                return
            self._counted_ip = True
            conn.greeting(f"{self.listener.hostname} IMAP ready")
            while True:
                ev = conn.next_command(self.listener.clock())
                self._log_errors()
                if ev is NEED_DATA:
                    await self.send(conn.data_to_send())
                    if self.connections.stopping:
                        conn.bye("server shutting down")
                        continue
                    if conn.idling and self.store is not None:
                        if not await self._idle_wait():
                            break
                        continue
                    if not await self.wait_for_data(self.listener.idle_timeout, idle=True):
                        break
                    continue
                if ev is CLOSED:
                    break
                assert not isinstance(ev, type(NEED_DATA))
                self.commands += 1
                await self._handle(ev)
        except TimeoutError:
            self._reject("command", "timeout", f"no command for {self.listener.idle_timeout:g}s (imap.idle_timeout)")
            conn.bye("autologout; idle for too long")
        except asyncio.CancelledError:
            conn.bye("server shutting down")
        except Exception:
            log.exception("event=session_error session=%s", self.session_id)
            conn.bye("internal error; closing connection")
        finally:
            try:
                self._log_errors()
                self.send_final(conn.data_to_send())
            finally:
                self.close()
                self._release()
                log.info("event=disconnect session=%s account=%s commands=%d errors=%d", self.session_id,
                         self.account or "-", self.commands, conn.errors)

    def _release(self) -> None:
        if self._counted_ip and self.client is not None:
            self._counted_ip = False
            self.listener.counts.leave_ip(self.client)
        if self.account is not None and self.store is not None:
            self.listener.counts.leave_account(self.account)
            self.store = None
        self._close_folder()

    def _close_folder(self) -> None:
        """Hook for the selected-state part (no folder before login)."""

    async def _idle_wait(self) -> bool:
        """Between IDLE and DONE: what the client sends, or a change to the mailbox."""
        return await self.wait_for_data(self.listener.idle_timeout, idle=True)

    def _log_errors(self) -> None:
        assert self.conn is not None
        for e in self.conn.take_errors():
            self._reject(e.tag, "protocol" if e.response != b"NO" else "refused", e.reason)

    def _reject(self, stage: str, check: str, reason: str) -> None:
        log.info('event=reject session=%s client=%s stage=%s check=%s reason="%s"', self.session_id, self.client,
                 stage, check, _quoted(reason))

    def _no(self, tag: str, stage: str, check: str, reason: str, code: str | None = None) -> None:
        """A NO of the session's own, logged."""
        assert self.conn is not None
        self._reject(stage, check, reason)
        self.conn.tagged(tag, "NO", reason, code)

    # ---- commands ----

    async def _handle(self, ev: P.Event) -> None:
        conn = self.conn
        assert conn is not None
        if isinstance(ev, P.AuthResponse):
            await self._auth_step(ev)
            return
        if isinstance(ev, P.IdleDone):
            await self._idle_done(ev)
            return
        name = ev.name
        if name == "LOGOUT":
            conn.untagged(b"BYE logging out")
            conn.tagged(ev.tag, "OK", "LOGOUT completed")
            conn.close()
        elif name == "NOOP":
            await self._noop(ev)
        elif name == "STARTTLS":
            await self._starttls(ev)
        elif isinstance(ev, P.Login):
            await self._login_password(ev)
        elif isinstance(ev, P.Authenticate):
            await self._authenticate(ev)
        elif isinstance(ev, P.Id):
            conn.untagged(b'ID ("name" "yuubin")')
            conn.tagged(ev.tag, "OK", "ID completed")
        else:
            await self._authenticated(ev)

    async def _noop(self, ev: P.Command) -> None:
        assert self.conn is not None
        self.conn.tagged(ev.tag, "OK", "NOOP completed")

    async def _authenticated(self, ev: P.Event) -> None:
        """Commands after login: the mailbox part (see the store-backed session below)."""
        assert self.conn is not None and isinstance(ev, P.Command)
        self.conn.bad(ev.tag, f"{ev.name} is not implemented")

    async def _idle_done(self, ev: P.IdleDone) -> None:
        assert self.conn is not None
        self.conn.tagged(ev.tag, "OK", "IDLE terminated")

    async def _starttls(self, ev: P.Command) -> None:
        conn = self.conn
        assert conn is not None
        conn.tagged(ev.tag, "OK", "begin TLS negotiation now")
        await self.send(conn.data_to_send())
        early = await self.start_tls()
        if early is None:
            self._reject("starttls", "tls", "TLS handshake failed")
            conn.close()
            return
        conn.tls_started()
        if early:
            conn.receive_data(early)

    async def _login_password(self, ev: P.Login) -> None:
        assert self.client is not None
        exchange = self.listener.login(self.client, self.session_id)
        result = await exchange.guard.login(self.client, ev.username, ev.password, self.session_id)
        self._logged_in(ev.tag, result)

    async def _authenticate(self, ev: P.Authenticate) -> None:
        assert self.client is not None
        self._login = self.listener.login(self.client, self.session_id)
        self._auth_tag = ev.tag
        step = await self._login.start(ev.mechanism, ev.initial)
        self._auth_result(step)

    async def _auth_step(self, ev: P.AuthResponse) -> None:
        assert self.conn is not None
        if self._login is None:  # pragma: no cover - the core expects a response only after a challenge
            self.conn.bad(ev.tag, "no authentication in progress")
            return
        if ev.line.strip() == "*":
            self._login = None
            self.conn.bad(ev.tag, "AUTHENTICATE cancelled")
            return
        import binascii
        try:
            data = binascii.a2b_base64(ev.line.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError):
            self._login = None
            self.conn.bad(ev.tag, "AUTHENTICATE response is not base64")
            return
        self._auth_result(await self._login.respond(data))

    def _auth_result(self, step: Any) -> None:
        assert self.conn is not None
        tag = self._auth_tag
        if isinstance(step, Challenge):
            self.conn.expect_auth_response(tag, step.data)
            return
        self._login = None
        if isinstance(step, Malformed):
            self.conn.bad(tag, f"malformed authentication exchange: {step.reason}")
            return
        self._logged_in(tag, step)

    def _logged_in(self, tag: str, result: LoginResult) -> None:
        conn = self.conn
        assert conn is not None
        if result.locked is not None:
            self._no(tag, "login", "auth_guard", f"source {result.locked.source} locked out after failed logins",
                     "UNAVAILABLE")
            return
        if not result.ok or result.account is None:
            self._no(tag, "login", "login", "invalid credentials", "AUTHENTICATIONFAILED")
            return
        account = result.account
        if not self.listener.counts.enter_account(account):
            self._no(tag, "login", "limit", f"too many IMAP sessions of {account} (imap.sessions_per_account)",
                     "LIMIT")
            return
        self.account = account
        self.store = self.listener.mailstore.account(account)
        conn.set_state(State.AUTHENTICATED)
        log.info("event=login session=%s client=%s account=%s", self.session_id, self.client, account)
        conn.tagged(tag, "OK", "logged in", "CAPABILITY " + " ".join(conn.capabilities()))

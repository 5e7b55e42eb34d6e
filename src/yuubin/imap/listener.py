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
import re
import sqlite3
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from yuubin.auth.guard import LoginResult
from yuubin.auth.login import LoginExchange, Malformed
from yuubin.auth.sasl import Challenge
from yuubin.geo import AccessList
from yuubin.imap import mime
from yuubin.imap import protocol as P
from yuubin.imap.protocol import CLOSED, NEED_DATA, IMAPServerConnection, State
from yuubin.imap.search import Matcher, sort_messages, thread_messages, thread_text
from yuubin.imap.store import (
    AccountStore,
    Changes,
    Expunged,
    FolderExists,
    FolderView,
    HasChildren,
    InvalidName,
    MailStore,
    MessageInfo,
    NoSuchFolder,
    ReadOnly,
    StoreError,
)
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
    mailstore: MailStore
    counts: SessionCounts
    extensions: tuple[str, ...] = ()  # advertised after login: only what the session implements
    access: AccessList | None = None  # the listener's `allow` list (None: everyone)
    clock: Callable[[], float] = field(default=time.time)


class IMAPSession(StreamSession):
    def __init__(self, listener: ImapListener, connections: Connections):
        super().__init__(listener.shell, connections)
        self.listener = listener
        self.conn: IMAPServerConnection | None = None
        self.account: str | None = None
        self.store: AccountStore | None = None
        self.view: FolderView | None = None
        self.saved: list[int] = []  # SEARCH RETURN (SAVE) result, as UIDs ($)
        self.condstore = False
        self.qresync = False
        self.utf8 = False
        self.rev2 = False  # ENABLE IMAP4rev2: no \Recent, SEARCH answers ESEARCH, UTF-8 names
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

    async def send(self, data: bytes, timeout: float | None = None) -> None:
        if self._deflate is not None and data:
            data = self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        await super().send(data, timeout)

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
            if self.listener.access is not None:
                allowed, why = self.listener.access.allows(self.client)
                if not allowed:
                    self._reject("connect", "allow_list", why)
                    conn.bye("access from your address is not allowed")
                    return
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
                try:
                    await self._handle(ev)
                except Exception:  # a bug in one command: that command fails, the session goes on
                    log.exception("event=session_error session=%s command=%s", self.session_id,
                                  getattr(ev, "name", type(ev).__name__))
                    conn.tagged(getattr(ev, "tag", "*"), "NO", "internal error; the command was not completed",
                                "SERVERBUG")
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

    # ---- after login: folders ----

    def _close_folder(self) -> None:
        if self.view is not None:
            self.view.close()
            self.view = None
        if self.conn is not None and self.conn.state is State.SELECTED:
            self.conn.set_state(State.AUTHENTICATED)

    async def _authenticated(self, ev: P.Event) -> None:
        conn = self.conn
        assert conn is not None and isinstance(ev, P.Command)
        handler = getattr(self, "_cmd_" + ev.name.replace(" ", "_").lower(), None)
        if handler is None:  # pragma: no cover - the core only passes commands of its table
            conn.bad(ev.tag, f"{ev.name} is not implemented")
            return
        try:
            await handler(ev)
        except StoreError as e:
            code = {NoSuchFolder: "NONEXISTENT", FolderExists: "ALREADYEXISTS", InvalidName: "CANNOT",
                    HasChildren: "HASCHILDREN", ReadOnly: "READ-ONLY", Expunged: "EXPUNGEISSUED"}.get(type(e))
            if isinstance(e, NoSuchFolder) and ev.name in ("APPEND", "COPY", "MOVE"):
                code = "TRYCREATE"
            self._no(ev.tag, ev.name.lower(), "store", str(e), code)
        except mime.UnknownTransferEncoding as e:
            self._no(ev.tag, ev.name.lower(), "mime", f"unknown content-transfer-encoding {e}", "UNKNOWN-CTE")
        except sqlite3.OperationalError as e:  # the index stayed locked (another process) for too long
            log.warning("event=imap_store_busy session=%s error=%r", self.session_id, str(e))
            self._no(ev.tag, ev.name.lower(), "store", "the mailbox index is busy; try again", "UNAVAILABLE")
        except OSError as e:  # e.g. disk full: nothing was stored
            log.error("event=imap_store_error session=%s error=%r", self.session_id, str(e))
            self._no(ev.tag, ev.name.lower(), "store", f"could not store: {e.strerror or e}", "SERVERBUG")

    def _name(self, name: str) -> bytes:
        return P.mailbox_name(name, utf8=self.utf8)

    async def _cmd_enable(self, ev: P.Enable) -> None:
        assert self.conn is not None
        done = []
        for cap in ev.capabilities:
            if cap == "CONDSTORE" and "CONDSTORE" in self.listener.extensions:
                self.condstore = True
            elif cap == "QRESYNC" and "QRESYNC" in self.listener.extensions:
                self.condstore = self.qresync = True
            elif cap == "UTF8=ACCEPT" and "UTF8=ACCEPT" in self.listener.extensions:
                self.utf8 = self.conn.utf8 = True
            elif cap == "IMAP4REV2" and "IMAP4rev2" in self.conn.capabilities():
                self.rev2 = self.utf8 = self.conn.utf8 = True  # RFC 9051 includes UTF8=ACCEPT
                cap = "IMAP4rev2"
            else:
                continue
            done.append(cap)
        self.conn.untagged(b"ENABLED" + b"".join(b" " + c.encode() for c in done))
        self.conn.tagged(ev.tag, "OK", "ENABLE completed")

    async def _cmd_namespace(self, ev: P.Command) -> None:
        assert self.conn is not None
        self.conn.untagged(b'NAMESPACE (("" "/")) NIL NIL')
        self.conn.tagged(ev.tag, "OK", "NAMESPACE completed")

    async def _cmd_create(self, ev: P.MailboxCommand) -> None:
        assert self.conn is not None
        name = ev.mailbox.rstrip("/")
        use = None
        for u in ev.special_use:
            canonical = "\\" + u[1:].capitalize()
            if canonical not in SPECIAL_USES:
                self._no(ev.tag, "create", "special_use", f"unknown special use {u}", "USEATTR")
                return
            use = canonical
        self.account_store.create(name, use)
        self.conn.tagged(ev.tag, "OK", "CREATE completed")

    async def _cmd_delete(self, ev: P.MailboxCommand) -> None:
        assert self.conn is not None
        if self.view is not None and self.view.name == ev.mailbox:
            self._no(ev.tag, "delete", "store", "the folder is selected: select another first", "INUSE")
            return
        self.account_store.delete(ev.mailbox)
        self.conn.tagged(ev.tag, "OK", "DELETE completed")

    async def _cmd_rename(self, ev: P.MailboxCommand) -> None:
        assert self.conn is not None
        self.account_store.rename(ev.mailbox, ev.new)
        self.conn.tagged(ev.tag, "OK", "RENAME completed")

    async def _cmd_subscribe(self, ev: P.MailboxCommand) -> None:
        assert self.conn is not None
        self.account_store.subscribe(ev.mailbox, True)
        self.conn.tagged(ev.tag, "OK", "SUBSCRIBE completed")

    async def _cmd_unsubscribe(self, ev: P.MailboxCommand) -> None:
        assert self.conn is not None
        self.account_store.subscribe(ev.mailbox, False)
        self.conn.tagged(ev.tag, "OK", "UNSUBSCRIBE completed")

    async def _cmd_list(self, ev: P.ListCommand) -> None:
        conn = self.conn
        assert conn is not None
        if ev.patterns == ("",):
            conn.untagged(b'LIST (\\Noselect) "/" ""' if not ev.lsub else b'LSUB (\\Noselect) "/" ""')
            conn.tagged(ev.tag, "OK", f"{ev.name} completed")
            return
        regexes = [_pattern_regex(ev.reference + p) for p in ev.patterns]
        subscribed_only = ev.lsub or "SUBSCRIBED" in ev.selection
        show_subscribed = "SUBSCRIBED" in ev.returns or "SUBSCRIBED" in ev.selection
        for f in self.account_store.folders():
            if not any(r.fullmatch(f.name) for r in regexes):
                continue
            if subscribed_only and not f.subscribed:
                continue
            if "SPECIAL-USE" in ev.selection and not f.special_use:
                continue
            attrs = []
            if not f.exists:
                attrs.append("\\NonExistent" if not f.children else "\\Noselect")
            if not ev.lsub:
                attrs.append("\\HasChildren" if f.children else "\\HasNoChildren")
                if f.special_use:
                    attrs.append(f.special_use)
                if show_subscribed and f.subscribed:
                    attrs.append("\\Subscribed")
            verb = b"LSUB" if ev.lsub else b"LIST"
            conn.untagged(verb + b" (" + " ".join(attrs).encode() + b') "/" ' + self._name(f.name))
            if ev.status and f.exists:
                conn.untagged(self._status_line(f.name, ev.status))
        conn.tagged(ev.tag, "OK", f"{ev.name} completed")

    async def _cmd_lsub(self, ev: P.ListCommand) -> None:
        await self._cmd_list(ev)

    def _status_line(self, name: str, items: tuple[str, ...]) -> bytes:
        st = self.account_store.status(name)
        values = {"MESSAGES": st.messages, "RECENT": st.recent, "UIDNEXT": st.uidnext,
                  "UIDVALIDITY": st.uidvalidity, "UNSEEN": st.unseen, "SIZE": st.size,
                  "HIGHESTMODSEQ": st.highestmodseq, "DELETED": st.deleted,
                  "APPENDLIMIT": self.listener.limits.literal_size}
        body = " ".join(f"{i} {values[i]}" for i in items)
        return b"STATUS " + self._name(name) + b" (" + body.encode() + b")"

    async def _cmd_status(self, ev: P.Status) -> None:
        assert self.conn is not None
        if "HIGHESTMODSEQ" in ev.items:
            self.condstore = True
        self.conn.untagged(self._status_line(ev.mailbox, ev.items))
        self.conn.tagged(ev.tag, "OK", "STATUS completed")

    async def _cmd_append(self, ev: P.Append) -> None:
        conn = self.conn
        assert conn is not None
        ready: list[tuple[bytes, P.AppendMessage]] = []
        for m in ev.messages:  # every message is checked before any is stored (MULTIAPPEND is all or none)
            data = m.data
            if m.catenate:
                pieces = []
                for kind, value in m.catenate:
                    if kind == "TEXT":
                        assert isinstance(value, bytes)
                        pieces.append(value)
                    else:
                        got = self._catenate_url(str(value))
                        if got is None:
                            self._no(ev.tag, "append", "catenate", f"cannot resolve URL {str(value)[:100]}",
                                     "BADURL " + str(value)[:100])
                            return
                        pieces.append(got)
                data = b"".join(pieces)
            if not data:
                self._no(ev.tag, "append", "append", "empty message")
                return
            if len(data) > self.listener.limits.literal_size:
                self._no(ev.tag, "append", "limit", "message over the size limit (imap.literal_size)", "TOOBIG")
                return
            if b"\0" in data and not m.binary:
                conn.bad(ev.tag, "NUL in a message: send it as a literal8 (BINARY)")
                return
            ready.append((data, m))
        uids = []
        uidvalidity = 0
        for data, m in ready:
            uidvalidity, uid = await self.account_store.append(ev.mailbox, data, frozenset(m.flags), m.internaldate)
            uids.append(uid)
        if self.view is not None:
            self._report(self.view.sync())
        conn.tagged(ev.tag, "OK", "APPEND completed", f"APPENDUID {uidvalidity} {_compress(uids, sort=False)}")

    def _catenate_url(self, url: str) -> bytes | None:
        """A CATENATE URL of this account (RFC 4469 / 5092 relative form: /folder;UIDVALIDITY=n/;UID=n[/;SECTION=s])."""
        import re
        from urllib.parse import unquote
        m = re.fullmatch(r"/([^;]+)(?:;UIDVALIDITY=(\d+))?/;UID=(\d+)(?:/;SECTION=(.*))?", url, re.IGNORECASE)
        if not m:
            return None
        folder = unquote(m.group(1))
        try:
            view = self.account_store.open(folder, readonly=True)
        except StoreError:
            return None
        try:
            if m.group(2) and int(m.group(2)) != view.uidvalidity:
                return None
            raw = view.read(int(m.group(3)))
        except StoreError:
            return None
        finally:
            view.close()
        if m.group(4):
            return mime.section(mime.parse(raw), unquote(m.group(4)).upper())
        return raw

    async def _cmd_compress(self, ev: P.Compress) -> None:
        conn = self.conn
        assert conn is not None
        if ev.mechanism != "DEFLATE":
            conn.bad(ev.tag, f"unknown compression {ev.mechanism[:20]}")
            return
        if self._deflate is not None:
            self._no(ev.tag, "compress", "compress", "compression is already active", "COMPRESSIONACTIVE")
            return
        conn.tagged(ev.tag, "OK", "DEFLATE active")
        await self.send(conn.data_to_send())
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._inflate = zlib.decompressobj(-15)
        pending = conn.take_input()
        if pending:
            self.feed(pending)

    # ---- selecting ----

    async def _cmd_select(self, ev: P.Select) -> None:
        conn = self.conn
        assert conn is not None
        if self.view is not None:
            self._close_folder()
            if self.qresync or self.rev2:
                conn.untagged(b"OK [CLOSED] previous folder closed")
        if ev.condstore:
            self.condstore = True
        if ev.qresync is not None and not self.qresync:
            conn.bad(ev.tag, "QRESYNC needs ENABLE QRESYNC first")
            return
        view = self.account_store.open(ev.mailbox, readonly=ev.name == "EXAMINE")
        self.view = view
        self.saved = []
        conn.set_state(State.SELECTED)
        keywords = sorted({f for m in view.messages for f in m.flags if not f.startswith("\\")})
        flags = " ".join([*SYSTEM_FLAGS, *keywords])
        conn.untagged(f"FLAGS ({flags})".encode())
        if view.readonly:
            conn.untagged(b"OK [PERMANENTFLAGS ()] read-only")
        else:
            conn.untagged(f"OK [PERMANENTFLAGS ({flags} \\*)] flags permitted".encode())
        conn.untagged(b"%d EXISTS" % len(view.messages))
        if self.rev2:  # RFC 9051 6.3.2: the mailbox's LIST line instead of RECENT and [UNSEEN]
            conn.untagged(b'LIST () "/" ' + self._name(view.name))
        else:
            conn.untagged(b"%d RECENT" % len(view.recent))
            first_unseen = next((i + 1 for i, m in enumerate(view.messages) if "\\Seen" not in m.flags), None)
            if first_unseen:
                conn.untagged(b"OK [UNSEEN %d] first unseen" % first_unseen)
        conn.untagged(b"OK [UIDVALIDITY %d] UIDs valid" % view.uidvalidity)
        conn.untagged(b"OK [UIDNEXT %d] predicted next UID" % view.uidnext)
        conn.untagged(b"OK [HIGHESTMODSEQ %d] highest" % view.highestmodseq)
        if ev.qresync is not None and ev.qresync[0] == view.uidvalidity:
            _uv, modseq, known, _pairs = ev.qresync
            largest = view.uidnext
            gone = [u for u in view.vanished_since(modseq) if known is None or known.contains(u, largest)]
            if gone:
                conn.untagged(b"VANISHED (EARLIER) " + _compress(gone).encode())
            for uid in view.changed_since(modseq):
                if known is not None and not known.contains(uid, largest):
                    continue
                seq = view.seq(uid)
                assert seq is not None
                info = view.messages[seq - 1]
                conn.untagged(b"%d FETCH (UID %d FLAGS %s MODSEQ (%d))" % (seq, uid, self._flags(info), info.modseq))
        conn.tagged(ev.tag, "OK", f"{ev.name} completed", "READ-ONLY" if view.readonly else "READ-WRITE")

    async def _cmd_examine(self, ev: P.Select) -> None:
        await self._cmd_select(ev)

    async def _cmd_close(self, ev: P.Command) -> None:
        assert self.conn is not None and self.view is not None
        if not self.view.readonly:
            self.view.expunge()
        self._close_folder()
        self.conn.tagged(ev.tag, "OK", "CLOSE completed")

    async def _cmd_unselect(self, ev: P.Command) -> None:
        assert self.conn is not None
        self._close_folder()
        self.conn.tagged(ev.tag, "OK", "UNSELECT completed")

    def _flags(self, info: MessageInfo) -> bytes:
        flags = sorted(info.flags)
        if self.view is not None and info.uid in self.view.recent and not self.rev2:
            flags.append("\\Recent")
        return P.flag_list(flags)

    def _report(self, ch: Changes) -> None:
        """Untagged responses for what changed in the selected folder (expunges, new mail, flags)."""
        conn, view = self.conn, self.view
        assert conn is not None and view is not None
        if ch.expunged:
            if self.qresync:
                conn.untagged(b"VANISHED " + _compress(ch.expunged).encode())
            else:
                for gone in ch.expunged_seqs:
                    conn.untagged(b"%d EXPUNGE" % gone)
        if ch.added:
            conn.untagged(b"%d EXISTS" % len(view.messages))
            if not self.rev2:
                conn.untagged(b"%d RECENT" % len(view.recent))
        for info in ch.flags:
            seq = view.seq(info.uid)
            if seq is None:
                continue
            extra = b" UID %d" % info.uid if self.qresync or self.condstore else b""
            if self.condstore:
                extra += b" MODSEQ (%d)" % info.modseq
            conn.untagged(b"%d FETCH (FLAGS %s%s)" % (seq, self._flags(info), extra))

    @property
    def account_store(self) -> AccountStore:
        assert self.store is not None
        return self.store

    async def _noop(self, ev: P.Command) -> None:
        assert self.conn is not None
        if self.view is not None:
            self._report(self.view.sync())
        self.conn.tagged(ev.tag, "OK", f"{ev.name} completed")

    async def _cmd_check(self, ev: P.Command) -> None:
        await self._noop(ev)

    # ---- IDLE ----

    async def _cmd_idle(self, ev: P.Command) -> None:
        assert self.conn is not None
        if self.view is not None:
            self._report(self.view.sync())
        self.conn.start_idle(ev.tag)

    async def _idle_wait(self) -> bool:
        """Between IDLE and DONE: what the client sends, or a change to the folder (sent at once)."""
        conn = self.conn
        assert conn is not None
        if self.view is None:
            return await self.wait_for_data(self.listener.idle_timeout, idle=True)
        reading = asyncio.ensure_future(self.wait_for_data(self.listener.idle_timeout, idle=True))
        try:
            while True:
                change = asyncio.ensure_future(self.view.wait_change(IDLE_POLL))
                done, _ = await asyncio.wait({reading, change}, return_when=asyncio.FIRST_COMPLETED)
                if change in done:
                    if isinstance(change.exception(), StoreError):  # e.g. the folder is gone: sync() says so
                        await asyncio.sleep(IDLE_RETRY)
                    elif change.exception() is not None:
                        raise change.exception()  # type: ignore[misc]
                    if self.view is not None:
                        self._report(self.view.sync())
                        await self.send(conn.data_to_send())
                else:
                    change.cancel()
                if reading in done:
                    return reading.result()
        finally:
            if not reading.done():
                reading.cancel()

    async def _idle_done(self, ev: P.IdleDone) -> None:
        assert self.conn is not None
        self.conn.tagged(ev.tag, "OK", "IDLE terminated")

    # ---- messages: which ones ----

    def _targets(self, ev: P.Command, seqset: P.SeqSet) -> list[tuple[int, MessageInfo]] | None:
        """(seq, info) of the messages a set names; None (after BAD) for a sequence number that does not exist."""
        view, conn = self.view, self.conn
        assert view is not None and conn is not None
        msgs = view.messages
        if seqset.saved:
            saved = set(self.saved)
            return [(i + 1, m) for i, m in enumerate(msgs) if m.uid in saved]
        if ev.uid:
            largest = msgs[-1].uid if msgs else 0
            return [(i + 1, m) for i, m in enumerate(msgs) if seqset.contains(m.uid, largest)]
        n = len(msgs)
        for a, b in seqset.ranges:
            if P.STAR in (a, b):
                continue  # "5:*" with 3 messages is 3:5, which names message 3
            if a > n or b > n:
                conn.bad(ev.tag, "invalid sequence number (no such message)")
                return None
        return [(s, msgs[s - 1]) for s in seqset.iterate(n)]

    # ---- FETCH ----

    async def _cmd_fetch(self, ev: P.Fetch) -> None:
        conn, view = self.conn, self.view
        assert conn is not None and view is not None
        targets = self._targets(ev, ev.sequence)
        if targets is None:
            return
        if ev.changedsince is not None:
            self.condstore = True
            targets = [(s, m) for s, m in targets if m.modseq > ev.changedsince]
        if ev.vanished:
            if not ev.uid or not self.qresync:
                conn.bad(ev.tag, "VANISHED needs UID FETCH and ENABLE QRESYNC")
                return
            assert ev.changedsince is not None
            largest = view.uidnext
            gone = [u for u in view.vanished_since(ev.changedsince) if ev.sequence.contains(u, largest)]
            if gone:
                conn.untagged(b"VANISHED (EARLIER) " + _compress(gone).encode())
        items = list(ev.items)
        if (ev.uid or self.qresync) and not any(i.name == "UID" for i in items):
            items.insert(0, P.FetchItem("UID"))
        sets_seen = not view.readonly and any(
            (i.name in ("BODY", "BINARY") and i.section is not None and not i.peek)
            or i.name in ("RFC822", "RFC822.TEXT") for i in items)
        missing = False
        cache: dict[str, dict[int, bytes]] = {}
        for name in ("ENVELOPE", "BODYSTRUCTURE", "BODY"):
            if any(i.name == name and i.section is None for i in items):
                cache[name] = view.cached([m.uid for _s, m in targets], self._cache_item(name))
        for seq, info in targets:
            try:
                out = self._fetch_one(seq, info, items, sets_seen, cache)
            except Expunged:
                missing = True
                continue
            conn.untagged(out)
            if conn.pending_output > 1 << 20:
                await self.send(conn.data_to_send())
        if missing:
            conn.tagged(ev.tag, "NO", "some of the messages were expunged meanwhile", "EXPUNGEISSUED")
        else:
            conn.tagged(ev.tag, "OK", f"{'UID ' if ev.uid else ''}FETCH completed")
        if ev.uid:
            self._report(view.sync())

    def _cache_item(self, name: str) -> str:
        """The store's FETCH cache key: versioned, so a change in how mime renders is never served stale."""
        return f"{name}{'.UTF8' if self.utf8 else ''}/{CACHE_VERSION}"

    def _fetch_one(self, seq: int, info: MessageInfo, items: list[P.FetchItem], sets_seen: bool,
                   cache: dict[str, dict[int, bytes]]) -> bytes:
        view = self.view
        assert view is not None
        msg: mime.ParsedMessage | None = None

        def parsed() -> mime.ParsedMessage:
            nonlocal msg
            if msg is None:
                msg = mime.parse(view.read(info.uid))
            return msg

        def computed(name: str, render: Callable[[], bytes]) -> bytes:
            got = cache.get(name, {}).get(info.uid)
            if got is None:
                got = render()
                view.remember(info.uid, self._cache_item(name), got)
            return got

        parts: list[bytes] = []
        flags_changed = False
        if sets_seen and "\\Seen" not in info.flags:
            parsed()  # an expunged message raises before its flag is changed
            res = view.store([info.uid], "+", frozenset({"\\Seen"}))
            if res.updated:
                info = res.updated[0]
                flags_changed = True
        for it in items:
            name = it.name
            if name == "UID":
                parts.append(b"UID %d" % info.uid)
            elif name == "FLAGS":
                parts.append(b"FLAGS " + self._flags(info))
            elif name == "INTERNALDATE":
                parts.append(b"INTERNALDATE " + P.date_time(info.internaldate))
            elif name == "RFC822.SIZE":
                parts.append(b"RFC822.SIZE %d" % info.size)
            elif name == "MODSEQ":
                parts.append(b"MODSEQ (%d)" % info.modseq)
            elif name == "ENVELOPE":
                parts.append(b"ENVELOPE " + computed("ENVELOPE", lambda: mime.envelope(parsed(), utf8=self.utf8)))
            elif name == "BODYSTRUCTURE":
                parts.append(b"BODYSTRUCTURE " + computed(
                    "BODYSTRUCTURE", lambda: mime.bodystructure(parsed(), extended=True, utf8=self.utf8)))
            elif name == "BODY" and it.section is None:
                parts.append(b"BODY " + computed(
                    "BODY", lambda: mime.bodystructure(parsed(), extended=False, utf8=self.utf8)))
            elif name in ("RFC822", "RFC822.HEADER", "RFC822.TEXT"):
                spec = {"RFC822": "", "RFC822.HEADER": "HEADER", "RFC822.TEXT": "TEXT"}[name]
                whole = mime.section(parsed(), spec) or b""
                parts.append(name.encode() + b" " + _literal(whole))
            elif name == "BODY":
                assert it.section is not None
                sec = mime.section(parsed(), it.section)
                parts.append(it.label().encode() + b" " + (_literal(_partial(sec, it.partial))
                                                           if sec is not None else b'""'))
            elif name == "BINARY":
                assert it.section is not None
                decoded = mime.binary(parsed(), it.section)
                if decoded is None:
                    parts.append(it.label().encode() + b" NIL")
                else:
                    data = _partial(decoded, it.partial)
                    lit = b"~{%d}\r\n" % len(data) + data if b"\0" in data else _literal(data)
                    parts.append(f"BINARY[{it.section}]".encode()
                                 + (b"<%d>" % it.partial[0] if it.partial else b"") + b" " + lit)
            elif name == "BINARY.SIZE":
                assert it.section is not None
                size = mime.binary_size(parsed(), it.section)
                parts.append(f"BINARY.SIZE[{it.section}] ".encode() + (b"NIL" if size is None else b"%d" % size))
        if flags_changed and not any(i.name == "FLAGS" for i in items):
            parts.append(b"FLAGS " + self._flags(info))
            if self.condstore and not any(i.name == "MODSEQ" for i in items):
                parts.append(b"MODSEQ (%d)" % info.modseq)
        return b"%d FETCH (" % seq + b" ".join(parts) + b")"

    # ---- STORE ----

    async def _cmd_store(self, ev: P.Store) -> None:
        conn, view = self.conn, self.view
        assert conn is not None and view is not None
        targets = self._targets(ev, ev.sequence)
        if targets is None:
            return
        if view.readonly:
            self._no(ev.tag, "store", "store", "the folder is read-only (EXAMINE)", "READ-ONLY")
            return
        if ev.unchangedsince is not None:
            self.condstore = True
        res = view.store([m.uid for _s, m in targets], ev.mode, frozenset(ev.flags), ev.unchangedsince)
        for info in res.updated:
            seq = view.seq(info.uid)
            if seq is None:
                continue
            if ev.silent:
                if self.condstore:
                    uid = b"UID %d " % info.uid if ev.uid or self.qresync else b""
                    conn.untagged(b"%d FETCH (%sMODSEQ (%d))" % (seq, uid, info.modseq))
                continue
            extra = b" UID %d" % info.uid if ev.uid or self.qresync else b""
            if self.condstore:
                extra += b" MODSEQ (%d)" % info.modseq
            conn.untagged(b"%d FETCH (FLAGS %s%s)" % (seq, self._flags(info), extra))
        if ev.uid:
            self._report(view.sync())
        if res.modified:
            nums = res.modified if ev.uid else [s for u in res.modified if (s := view.seq(u)) is not None]
            conn.tagged(ev.tag, "OK", "conditional STORE failed for some messages", f"MODIFIED {_compress(nums)}")
        else:
            conn.tagged(ev.tag, "OK", f"{'UID ' if ev.uid else ''}STORE completed")

    # ---- COPY, MOVE, EXPUNGE ----

    async def _cmd_copy(self, ev: P.CopyMove) -> None:
        conn, view = self.conn, self.view
        assert conn is not None and view is not None
        targets = self._targets(ev, ev.sequence)
        if targets is None:
            return
        if not targets:
            conn.tagged(ev.tag, "OK", f"{ev.name} completed: no messages")
            return
        uids = [m.uid for _s, m in targets]
        if ev.name == "MOVE":
            res = await view.move(uids, ev.mailbox)
            conn.untagged(f"OK [COPYUID {res.uidvalidity} {_compress(res.source, sort=False)} "
                          f"{_compress(res.dest, sort=False)}] moved".encode())
            self._report(view.sync())
            conn.tagged(ev.tag, "OK", "MOVE completed")
            return
        res = await view.copy(uids, ev.mailbox)
        if ev.uid:
            self._report(view.sync())
        conn.tagged(ev.tag, "OK", "COPY completed",
                    f"COPYUID {res.uidvalidity} {_compress(res.source, sort=False)} {_compress(res.dest, sort=False)}")

    async def _cmd_move(self, ev: P.CopyMove) -> None:
        await self._cmd_copy(ev)

    async def _cmd_expunge(self, ev: P.Expunge) -> None:
        conn, view = self.conn, self.view
        assert conn is not None and view is not None
        if view.readonly:
            self._no(ev.tag, "expunge", "store", "the folder is read-only (EXAMINE)", "READ-ONLY")
            return
        uids = None
        if ev.sequence is not None:
            targets = self._targets(ev, ev.sequence)
            assert targets is not None  # UID sets never refer to missing numbers
            uids = [m.uid for _s, m in targets]
        view.expunge(uids)
        self._report(view.sync())
        conn.tagged(ev.tag, "OK", f"{'UID ' if ev.uid else ''}EXPUNGE completed")

    # ---- SEARCH, SORT, THREAD ----

    async def _cmd_search(self, ev: P.Search) -> None:
        conn, view = self.conn, self.view
        assert conn is not None and view is not None
        matcher = Matcher(view, self.saved, self.listener.clock())
        try:
            found = [(i + 1, m) for i, m in enumerate(view.messages) if matcher.match(ev.key, i + 1, m)]
        except Expunged:
            conn.tagged(ev.tag, "NO", "some of the messages were expunged meanwhile", "EXPUNGEISSUED")
            return
        if matcher.used_modseq:
            self.condstore = True
        nums = [m.uid if ev.uid else s for s, m in found]
        if ev.name == "SORT":
            nums = [m.uid if ev.uid else s for s, m in sort_messages(found, ev.sort, matcher)]
            conn.untagged(b"SORT" + b"".join(b" %d" % n for n in nums))
        elif ev.name == "THREAD":
            threads = thread_messages(found, ev.thread, matcher)
            conn.untagged(b"THREAD " + thread_text(threads, lambda sm: sm[1].uid if ev.uid else sm[0]).encode())
        elif ev.returns is None and not self.rev2:
            line = b"SEARCH" + b"".join(b" %d" % n for n in nums)
            if matcher.used_modseq and found:
                line += b" (MODSEQ %d)" % max(m.modseq for _s, m in found)
            conn.untagged(line)
        else:
            ret = set(ev.returns or ("ALL",))  # IMAP4rev2 answers every SEARCH with ESEARCH
            if "SAVE" in ret:
                self.saved = [m.uid for _s, m in found]
                ret.discard("SAVE")
                if not ret and ev.returns != ("SAVE",):
                    ret = {"ALL"}
            if ret:
                out = f'ESEARCH (TAG "{ev.tag}")' + (" UID" if ev.uid else "")
                if nums and "MIN" in ret:
                    out += f" MIN {min(nums)}"
                if nums and "MAX" in ret:
                    out += f" MAX {max(nums)}"
                if "COUNT" in ret:
                    out += f" COUNT {len(nums)}"
                if nums and "ALL" in ret:
                    out += f" ALL {_compress(nums)}"
                if matcher.used_modseq and found:
                    out += f" MODSEQ {max(m.modseq for _s, m in found)}"
                conn.untagged(out.encode())
        if ev.uid:
            self._report(view.sync())
        conn.tagged(ev.tag, "OK", f"{'UID ' if ev.uid else ''}{ev.name} completed")

    async def _cmd_sort(self, ev: P.Search) -> None:
        await self._cmd_search(ev)

    async def _cmd_thread(self, ev: P.Search) -> None:
        await self._cmd_search(ev)


# Advertised after login (with APPENDLIMIT=<imap.literal_size>): each is implemented here and tested.
EXTENSIONS = ("UIDPLUS", "MOVE", "UNSELECT", "NAMESPACE", "SPECIAL-USE", "CREATE-SPECIAL-USE", "LIST-EXTENDED",
              "LIST-STATUS", "CONDSTORE", "QRESYNC", "ESEARCH", "SEARCHRES", "STATUS=SIZE", "SORT", "SORT=DISPLAY",
              "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES", "COMPRESS=DEFLATE", "MULTIAPPEND", "CATENATE",
              "UTF8=ACCEPT", "BINARY")
CACHE_VERSION = 1  # of what ENVELOPE/BODYSTRUCTURE look like: raise it when mime's rendering changes
IDLE_POLL = 30.0  # wait_change returns at once on a change; this only bounds one wait
IDLE_RETRY = 1.0  # after a failed wait for changes: at most one sync a second
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
SPECIAL_USES = ("\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")


def _literal(data: bytes) -> bytes:
    return b"{%d}\r\n" % len(data) + data


def _partial(data: bytes, partial: tuple[int, int] | None) -> bytes:
    if partial is None:
        return data
    return data[partial[0]:partial[0] + partial[1]]


def _compress(nums: list[int], *, sort: bool = True) -> str:
    """A sequence set for numbers: runs become a:b (in the given order when not sorting)."""
    seq = sorted(set(nums)) if sort else list(nums)
    out: list[str] = []
    i = 0
    while i < len(seq):
        j = i
        while j + 1 < len(seq) and seq[j + 1] == seq[j] + 1:
            j += 1
        out.append(str(seq[i]) if i == j else f"{seq[i]}:{seq[j]}")
        i = j + 1
    return ",".join(out)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A LIST pattern: * matches anything, % anything but the hierarchy delimiter; INBOX in any case."""
    out = []
    for ch in pattern:
        out.append(".*" if ch == "*" else "[^/]*" if ch == "%" else re.escape(ch))
    rx = "".join(out)
    if pattern[:5].upper() == "INBOX":
        rx = "(?i:INBOX)" + "".join(out[5:])
    return re.compile(rx, re.DOTALL)

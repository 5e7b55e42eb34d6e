"""The asyncio shell every protocol listener shares: bytes in and out, TLS, deadlines, admission.

A Protocol (not streams) so that STARTTLS is exact: from the moment the handshake starts every
byte seen is decrypted, and nothing a client pipelined in plaintext can be read back as if it
came over TLS. A subclass feeds the bytes to its sans-IO core (`feed`), says how much the core
holds unparsed (`backlog`, so reading pauses when a client floods) and in all (`holding`, for the
server's budget of message bytes in memory), and drives the session in `run()` with
`wait_for_data`, `send` and `start_tls`.

Admission is at the TCP accept, before any TLS: implicit TLS (465, 993) is accepted plain, counted
against the limits at once, and its handshake runs here under `limits.handshake_timeout` and the
bound on handshakes in progress — a flood of half-open handshakes costs a few slots, not the fds.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from yuubin import tls as tlsmod
from yuubin.net.connections import Connections

log = logging.getLogger("yuubin.net")

READ_PAUSE_BYTES = 1 << 16
PRE_TLS_BYTES = 1 << 16  # what a client may send before its implicit TLS handshake began (a ClientHello)
HANDSHAKE_TIMEOUT = 10.0  # the default of limits.handshake_timeout


class SendTimeout(Exception):
    """The client did not read our replies for the whole deadline (flow control gave up)."""


class Evicted(Exception):
    """The session held the most message bytes when the server's budget ran out (it is closed)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(peer: tuple) -> IPAddress:
    ip = ipaddress.ip_address(peer[0].split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class ShellSettings:
    """What a listener's sessions share, whatever the protocol."""

    kind: str
    tls_context: ssl.SSLContext | None
    implicit_tls: bool
    is_trusted: Callable[[IPAddress], bool]
    pool: str = ""  # the listener's own pool of connections (Connections.pools)
    handshake_timeout: float = HANDSHAKE_TIMEOUT


class StreamSession(asyncio.Protocol):
    """One connection. Subclasses implement `refusal`, `feed`, `backlog` and `run`."""

    def __init__(self, settings: ShellSettings, connections: Connections):
        self.settings = settings
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.client: IPAddress | None = None
        self.session_id = ""
        self.trusted = False
        self.tls: str | None = None  # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384" once TLS is up
        self.task: asyncio.Task | None = None
        self.idle = False  # between transactions: shutdown may close it at once
        self.lost = False
        self.started = time.monotonic()  # for the session's duration in its last log line
        self._admitted = False
        self._waiter: asyncio.Future | None = None
        self._drain: asyncio.Future | None = None
        self._paused = False
        self._tls_early: bytearray | None = None
        self._pre_tls: bytearray | None = None  # raw bytes before the implicit TLS handshake began
        self._handshake_aborted = False
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.received = 0  # bytes read (decrypted) since the connection was made
        self.held = 0  # message bytes counted against Connections.data_in_memory
        self.evicted = False

    # ---- what a protocol provides ----

    def refusal(self) -> bytes:
        """The bytes that tell a client over the connection limits to come back later."""
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def backlog(self) -> int:
        """Bytes the core holds unparsed."""
        raise NotImplementedError

    def holding(self) -> int:
        """Bytes the core holds in all (unparsed and a message being received): the memory budget's."""
        return self.backlog()

    def eviction(self) -> bytes:
        """The last words to a session evicted for holding the most message bytes."""
        return self.refusal()

    async def run(self) -> None:
        raise NotImplementedError

    # ---- Protocol callbacks ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport, hence no isinstance).
        self.transport = cast(asyncio.Transport, transport)
        self.client = client_address(self.transport.get_extra_info("peername"))
        self.session_id = self.connections.next_id()
        why = self.connections.admit(self.client, self.settings.pool)
        if why is None and self.settings.implicit_tls:
            why = self.connections.open_handshake(self.client, self)
            if why is not None:
                self.connections.release(self.client, self.settings.pool)
        if why is not None:
            log.info('event=refused session=%s listener=%s client=%s reason="%s"', self.session_id,
                     self.settings.kind, self.client, why)
            if not self.settings.implicit_tls:  # a TLS client could not read a plain 421
                self.transport.write(self.refusal())
            self.transport.close()
            self.lost = True
            return
        self._admitted = True
        self.trusted = self.settings.is_trusted(self.client)
        if self.settings.implicit_tls:
            # The ClientHello must reach the TLS layer, not the core. Pausing here is not enough
            # (uvloop starts reading after connection_made whatever it did), so what arrives before
            # start_tls() takes the transport over is kept and handed to the TLS layer.
            self._pre_tls = bytearray()
            self.transport.pause_reading()
        self.connections.sessions.add(self)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        """The implicit TLS handshake (counted, with its deadline), then the protocol."""
        if self.settings.implicit_tls:
            assert self.client is not None
            self.idle = True  # a stop closes a handshake at once
            try:
                early = await self.start_tls(starttls=False)
            except BaseException:
                self.close()
                raise
            finally:
                self.idle = False
                self.connections.close_handshake(self.client, self)
            if early is None:
                self.close()
                return
            if early:
                self.feed(early)
        await self.run()

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._pre_tls is not None:
            self._pre_tls += data
            if self.transport is not None:
                self.transport.pause_reading()
                if len(self._pre_tls) > PRE_TLS_BYTES:
                    self.transport.close()
            return
        self.received += len(data)
        if self._tls_early is not None:
            # Decrypted bytes that arrived with the end of the STARTTLS handshake (GnuTLS clients
            # such as msmtp send EHLO at once): kept for the core until start_tls() returns.
            self._tls_early += data
            return
        self.feed(data)
        if self.backlog() > READ_PAUSE_BYTES and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        self.connections.hold(self, self.holding())
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
        if self._admitted and self.client is not None:
            self._admitted = False
            self.connections.hold(self, 0)
            self.connections.release(self.client, self.settings.pool)
            self.connections.sessions.discard(self)

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    @property
    def pool(self) -> str:
        return self.settings.pool

    def make_room(self) -> None:
        """Called by Connections: the listener is full and this idle session's address holds the
        most places; it gives one up (a 421, and its place is free at once)."""
        assert self.client is not None
        log.info('event=reject session=%s client=%s stage=command check=connections reason="listener full; '
                 'this address holds the most of its places" reply="%s"', self.session_id, self.client,
                 self.refusal().decode(errors="replace").strip())
        if self._admitted:
            self._admitted = False
            self.connections.hold(self, 0)
            self.connections.release(self.client, self.settings.pool)
            self.connections.sessions.discard(self)
        if self.transport is not None and not self.lost:
            self.transport.write(self.refusal())
            self.transport.close()
        self._wake_lost()

    def abort_handshake(self, why: str) -> None:
        """Called by Connections: this pending handshake makes room for another address's."""
        assert self.client is not None
        self.connections.close_handshake(self.client, self)
        log.info('event=tls_failed session=%s client=%s error="%s"', self.session_id, self.client, why)
        self._handshake_aborted = True
        if self.transport is not None:
            self.transport.abort()

    def evict(self) -> None:
        """Called by Connections.hold: the budget of message bytes ran out and this session holds the
        most. Its last words are written, the connection closed; run() sees Evicted."""
        if self.evicted or self.transport is None:
            return
        self.evicted = True
        log.info('event=reject session=%s client=%s stage=data check=memory reason="holds the most message bytes '
                 'when limits.data_in_memory ran out" reply="%s"', self.session_id, self.client,
                 self.eviction().decode(errors="replace").strip())
        if not self.lost:
            self.transport.write(self.eviction())
        self.transport.close()
        self.lost = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(Evicted())
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake_lost(self) -> None:
        self.lost = True
        for f in (self._waiter, self._drain):
            if f is not None and not f.done():
                f.set_result(None)

    # ---- what run() uses ----

    async def send(self, data: bytes, timeout: float | None = None) -> None:
        """Write, and wait while the client is not reading (flow control); SendTimeout when it
        still is not after `timeout` seconds."""
        if data and not self.lost and self.transport is not None:
            self.transport.write(data)
            if self._drain is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._drain), timeout)
                except TimeoutError:
                    raise SendTimeout() from None

    def send_final(self, data: bytes) -> None:
        """Last words before closing: written without waiting."""
        if data and not self.lost and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_for_data(self, timeout: float, idle: bool, until: float | None = None) -> bool:
        """Wait for bytes; False when the client went away. TimeoutError after `timeout` seconds, or
        at loop time `until` when given (a deadline for a whole command, not reset per byte)."""
        if self.evicted:
            raise Evicted()
        self.connections.hold(self, self.holding())
        if self.lost:
            return False
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._deadline = loop.time() + timeout if until is None else until
        if self._timer is None or self._timer.when() > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(self._deadline, self._check_deadline)
        self.idle = idle
        try:
            await self._waiter
        finally:
            self.idle = False
            self._waiter = None
        return not self.lost or self.backlog() > 0

    def _check_deadline(self) -> None:
        """One lazily re-armed timer per session instead of a new timeout for every read."""
        loop = asyncio.get_running_loop()
        w = self._waiter
        if w is not None and not w.done() and loop.time() >= self._deadline:
            self._timer = None
            w.set_exception(TimeoutError())
            return
        if self.lost:
            self._timer = None
            return
        when = self._deadline if w is not None else loop.time() + 1.0
        self._timer = loop.call_at(max(when, loop.time() + 0.01), self._check_deadline)

    async def start_tls(self, starttls: bool = True) -> bytes | None:
        """Upgrade the connection (STARTTLS, or implicit TLS at connect); returns the decrypted bytes
        that came with the handshake's end (for the core, after it has been told), or None when the
        handshake failed or missed limits.handshake_timeout (connection lost)."""
        assert self.transport is not None and self.settings.tls_context is not None
        loop = asyncio.get_running_loop()
        # From here on (no await in between) data_received only ever sees decrypted bytes: the
        # plaintext stream now feeds the TLS layer.
        self._tls_early = bytearray()
        raw = self.transport
        handshake = loop.start_tls(raw, self, self.settings.tls_context, server_side=True,
                                   ssl_handshake_timeout=self.settings.handshake_timeout)
        try:
            if self._pre_tls is None:  # STARTTLS: awaited at once, its first step swaps the protocol now
                new = await handshake
            else:
                upgrade = asyncio.ensure_future(handshake)
                try:
                    # One turn: start_tls has swapped the protocol and queued its connection_made and
                    # resume_reading; the bytes kept so far go to the TLS layer right after those, in
                    # the same turn, so before anything read later.
                    await asyncio.sleep(0)
                    pre, self._pre_tls = bytes(self._pre_tls), None
                    if pre:
                        loop.call_soon(_replay, raw, pre)
                    new = await upgrade
                except asyncio.CancelledError:
                    upgrade.cancel()
                    raise
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            error = str(e) or type(e).__name__
            if isinstance(e, TimeoutError) or "taking longer than" in error:  # asyncio's and uvloop's words
                error = f"no handshake within {self.settings.handshake_timeout:g}s (limits.handshake_timeout)"
            if not self._handshake_aborted:  # else said by abort_handshake()
                log.info("event=tls_failed session=%s client=%s error=%r", self.session_id, self.client, error)
            new = None
        early, self._tls_early = self._tls_early, None
        if new is None:
            self.lost = True
            return None
        self.transport = new
        self.tls = tlsmod.describe(new.get_extra_info("ssl_object"))
        if starttls:
            log.info("event=starttls session=%s tls=%r", self.session_id, self.tls)
        return bytes(early)


def _replay(transport: asyncio.Transport, data: bytes) -> None:
    """Hand bytes read before start_tls() to the TLS layer now behind `transport`."""
    proto = transport.get_protocol()
    if transport.is_closing():
        return
    if hasattr(proto, "get_buffer"):  # asyncio's and uvloop's TLS layers are buffered protocols
        buffered = cast(asyncio.BufferedProtocol, proto)
        view = memoryview(data)
        while view:
            buf = memoryview(buffered.get_buffer(len(view)))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            buffered.buffer_updated(n)
            view = view[n:]
    else:
        cast(asyncio.Protocol, proto).data_received(data)

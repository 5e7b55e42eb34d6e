"""The asyncio shell every protocol listener shares: bytes in and out, TLS, deadlines, admission.

A Protocol (not streams) so that STARTTLS is exact: from the moment the handshake starts every
byte seen is decrypted, and nothing a client pipelined in plaintext can be read back as if it
came over TLS. A subclass feeds the bytes to its sans-IO core (`feed`), says how much the core
holds unparsed (`backlog`, so reading pauses when a client floods), and drives the session in
`run()` with `wait_for_data`, `send` and `start_tls`.
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

READ_PAUSE_BYTES = 1 << 20
HANDSHAKE_TIMEOUT = 30.0

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
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # ---- what a protocol provides ----

    def refusal(self) -> bytes:
        """The bytes that tell a client over the connection limits to come back later."""
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def backlog(self) -> int:
        """Bytes the core holds unparsed."""
        raise NotImplementedError

    async def run(self) -> None:
        raise NotImplementedError

    # ---- Protocol callbacks ----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport, hence no isinstance).
        self.transport = cast(asyncio.Transport, transport)
        self.client = client_address(self.transport.get_extra_info("peername"))
        self.session_id = self.connections.next_id()
        if not self.connections.admit(self.client):
            log.info("event=refused session=%s listener=%s client=%s reason=%s", self.session_id,
                     self.settings.kind, self.client, "too many connections")
            self.transport.write(self.refusal())
            self.transport.close()
            self.lost = True
            return
        self._admitted = True
        self.trusted = self.settings.is_trusted(self.client)
        if self.settings.implicit_tls:
            self.tls = tlsmod.describe(self.transport.get_extra_info("ssl_object"))
        self.connections.sessions.add(self)
        self.task = asyncio.get_running_loop().create_task(self.run())

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._tls_early is not None:
            # Decrypted bytes that arrived with the end of the STARTTLS handshake (GnuTLS clients
            # such as msmtp send EHLO at once): kept for the core until start_tls() returns.
            self._tls_early += data
            return
        self.feed(data)
        if self.backlog() > READ_PAUSE_BYTES and not self._paused and self.transport:
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
        if self._admitted and self.client is not None:
            self._admitted = False
            self.connections.release(self.client)
            self.connections.sessions.discard(self)

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def _wake_lost(self) -> None:
        self.lost = True
        for f in (self._waiter, self._drain):
            if f is not None and not f.done():
                f.set_result(None)

    # ---- what run() uses ----

    async def send(self, data: bytes) -> None:
        """Write, and wait while the client is not reading (flow control)."""
        if data and not self.lost and self.transport is not None:
            self.transport.write(data)
            if self._drain is not None:
                await self._drain

    def send_final(self, data: bytes) -> None:
        """Last words before closing: written without waiting."""
        if data and not self.lost and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_for_data(self, timeout: float, idle: bool) -> bool:
        """Wait for bytes; False when the client went away. TimeoutError after `timeout` seconds."""
        if self.lost:
            return False
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._deadline = loop.time() + timeout
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

    async def start_tls(self) -> bytes | None:
        """Upgrade the connection; returns the decrypted bytes that came with the handshake's end
        (for the core, after it has been told), or None when the handshake failed (connection lost)."""
        assert self.transport is not None and self.settings.tls_context is not None
        loop = asyncio.get_running_loop()
        # From here on (no await in between) data_received only ever sees decrypted bytes: the
        # plaintext stream now feeds the TLS layer.
        self._tls_early = bytearray()
        try:
            new = await loop.start_tls(self.transport, self, self.settings.tls_context, server_side=True,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            log.info("event=tls_failed session=%s error=%r", self.session_id, str(e))
            new = None
        early, self._tls_early = self._tls_early, None
        if new is None:
            self.lost = True
            return None
        self.transport = new
        self.tls = tlsmod.describe(new.get_extra_info("ssl_object"))
        log.info("event=starttls session=%s tls=%r", self.session_id, self.tls)
        return bytes(early)

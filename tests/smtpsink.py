"""A scriptable SMTP receiver for outbound tests: a remote MX or a relayhost on a loopback address.

Hand-written (asyncio streams, a thread of its own) because the tests need to script replies per
recipient and attempt, offer STARTTLS / implicit TLS / AUTH PLAIN, and record the raw bytes on
the wire to check line endings and dot-stuffing; aiosmtpd is not a dependency.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["SinkMessage", "SmtpSink"]


@dataclass
class SinkMessage:
    sender: str
    recipients: list[str]
    data: bytes  # dot-unstuffed content, CRLF line endings as received
    raw: bytes  # the DATA section exactly as it came over the wire
    mail_line: str
    rcpt_lines: list[str]
    tls: str | None
    auth: str | None


@dataclass
class SmtpSink:
    host: str = "127.0.0.1"
    port: int = 0
    tls_context: ssl.SSLContext | None = None  # offer STARTTLS with it
    implicit_tls: bool = False  # TLS from the first byte (port 465 style)
    auth: tuple[str, str] | None = None  # require AUTH PLAIN with these credentials (only after TLS)
    greeting: str = "220 sink.test ESMTP"
    rcpt_reply: Callable[[str, int], str] | None = None  # (recipient, attempt n for it) → reply line
    data_reply: str = "250 2.0.0 OK queued"
    messages: list[SinkMessage] = field(default_factory=list)
    connections: int = 0
    bare_line_endings: int = 0  # bare CR or LF seen anywhere from the client
    commands: list[str] = field(default_factory=list)
    size_limit: int = 10_000_000  # advertised with SIZE
    smtputf8: bool = True  # advertise SMTPUTF8
    data_delay: float = 0.0  # seconds to sit on the end of DATA (to observe concurrency)
    pipelining: bool = False  # advertise PIPELINING (RFC 2920)
    hold_mail_reply: bool = False  # wait 0.5 s before answering MAIL, to see if RCPT comes anyway
    pipelined: list[bool] = field(default_factory=list)  # per held MAIL: did RCPT come before our reply?
    active: int = 0  # sessions open now
    max_active: int = 0  # most sessions ever open at once

    def __post_init__(self) -> None:
        self._attempts: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.lock = threading.Lock()

    def start(self) -> SmtpSink:
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"sink-{self.host}")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("sink did not start")
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._server = await asyncio.start_server(
                self._session, self.host, self.port, reuse_address=True,
                ssl=self.tls_context if self.implicit_tls else None)
            self.port = self._server.sockets[0].getsockname()[1]
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            self._server.close()

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_messages(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.02)
        raise AssertionError(f"sink {self.host}: {len(self.messages)} messages, expected {count}")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        tls = None
        if self.implicit_tls:
            tls = writer.get_extra_info("ssl_object").version()
        authed: str | None = None

        async def send(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        early: list[bytes] = []  # a line read ahead while holding back the MAIL reply

        async def readline() -> bytes:
            if early:
                return early.pop()
            line = await reader.readuntil(b"\n")
            body = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            if not line.endswith(b"\r\n") or b"\r" in body:
                self.bare_line_endings += 1
            return line

        try:
            await send(self.greeting)
            if not self.greeting.startswith("220"):
                return
            sender, rcpts, rcpt_lines, mail_line = None, [], [], ""
            while True:
                line = (await readline()).decode("utf-8", "replace").rstrip("\r\n")
                self.commands.append(line)
                verb = line.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    ext = ["250-sink.test", f"250-SIZE {self.size_limit}", "250-8BITMIME", "250-DSN"]
                    if self.smtputf8:
                        ext.append("250-SMTPUTF8")
                    if self.pipelining:
                        ext.append("250-PIPELINING")
                    if self.tls_context is not None and tls is None:
                        ext.append("250-STARTTLS")
                    if self.auth and tls:
                        ext.append("250-AUTH PLAIN")
                    ext.append("250 HELP")
                    for e in ext:
                        writer.write(e.encode() + b"\r\n")
                    await writer.drain()
                elif verb == "STARTTLS" and self.tls_context is not None and tls is None:
                    await send("220 2.0.0 go ahead")
                    await writer.start_tls(self.tls_context)
                    tls = writer.get_extra_info("ssl_object").version()
                elif verb == "AUTH":
                    parts = line.split()
                    if not tls or not self.auth or len(parts) != 3 or parts[1].upper() != "PLAIN":
                        await send("504 5.5.4 AUTH PLAIN over TLS only")
                        continue
                    _, user, pw = base64.b64decode(parts[2]).decode().split("\0")
                    if (user, pw) == self.auth:
                        authed = user
                        await send("235 2.7.0 authenticated")
                    else:
                        await send("535 5.7.8 bad credentials")
                elif verb == "MAIL":
                    if self.auth and not authed:
                        await send("530 5.7.0 authentication required")
                        continue
                    mail_line = line
                    sender = line[line.index("<") + 1: line.index(">")]
                    rcpts, rcpt_lines = [], []
                    if self.hold_mail_reply:
                        # Hold the reply back a moment: a pipelining client has already sent RCPT.
                        try:
                            early.append(await asyncio.wait_for(readline(), 0.5))
                            self.pipelined.append(True)
                        except TimeoutError:
                            self.pipelined.append(False)
                    await send("250 2.1.0 OK")
                elif verb == "RCPT":
                    rcpt = line[line.index("<") + 1: line.index(">")]
                    n = self._attempts[rcpt] = self._attempts.get(rcpt, 0) + 1
                    reply = self.rcpt_reply(rcpt, n) if self.rcpt_reply else "250 2.1.5 OK"
                    if reply.startswith("2"):
                        rcpts.append(rcpt)
                        rcpt_lines.append(line)
                    await send(reply)
                elif verb == "DATA":
                    if not rcpts:
                        await send("554 5.5.1 no valid recipients")
                        continue
                    await send("354 go ahead")
                    raw = bytearray()
                    while True:
                        chunk = await readline()
                        if chunk == b".\r\n":
                            break
                        raw += chunk
                    data = b"".join(ln[1:] if ln.startswith(b".") else ln
                                    for ln in bytes(raw).splitlines(keepends=True))
                    if self.data_delay:
                        await asyncio.sleep(self.data_delay)
                    with self.lock:
                        self.messages.append(SinkMessage(sender or "", rcpts, data, bytes(raw), mail_line,
                                                         rcpt_lines, tls, authed))
                    await send(self.data_reply)
                elif verb == "RSET":
                    sender, rcpts, rcpt_lines = None, [], []
                    await send("250 2.0.0 OK")
                elif verb == "QUIT":
                    await send("221 2.0.0 bye")
                    return
                elif verb == "NOOP":
                    await send("250 2.0.0 OK")
                else:
                    await send("502 5.5.2 not implemented")
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError):
            pass
        finally:
            self.active -= 1
            writer.close()

"""A raw SMTP client for end-to-end tests, for what smtplib would hide or refuse to send.

It sends exactly the bytes given (pipelining, bare LFs, injected commands) and reads replies
line by line, so a test can assert on every reply the server sent and on what it did not send.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl

__all__ = ["RawSMTP", "Reply"]

Reply = tuple[int, list[str]]  # (code, text of each line without the code)


class RawSMTP:
    def __init__(self, port: int, source: str = "127.0.0.1", host: str = "127.0.0.1", timeout: float = 5.0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock: socket.socket = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; partial data {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> Reply:
        """One (possibly multi-line) reply."""
        lines: list[str] = []
        while True:
            line = self._line().decode("utf-8", "replace")
            if len(line) < 4 or not line[:3].isdigit() or line[3] not in " -":
                raise AssertionError(f"not an SMTP reply line: {line!r}")
            lines.append(line[4:])
            if line[3] == " ":
                return int(line[:3]), lines

    def cmd(self, line: str | bytes) -> Reply:
        data = line if isinstance(line, bytes) else line.encode("utf-8")
        self.send(data + b"\r\n")
        return self.reply()

    def pending(self, wait: float = 0.3) -> bytes:
        """Whatever else arrives within `wait` seconds (b"" if nothing), without blocking longer."""
        out = self.buf
        self.buf = b""
        ready, _, _ = select.select([self.sock], [], [], wait)
        if ready:
            with contextlib.suppress(ConnectionError, OSError):
                out += self.sock.recv(65536)
        return out

    def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True when the server closed the connection (EOF or reset) within `timeout`."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def starttls(self, ctx: ssl.SSLContext, server_hostname: str = "mx.test.example") -> None:
        assert self.buf == b"", f"plaintext bytes left before the handshake: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

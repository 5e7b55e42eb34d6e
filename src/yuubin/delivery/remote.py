"""Remote delivery: recipient domain → MX hosts → one SMTP transaction, with per-recipient results.

The SMTP client is aiosmtplib; everything it is handed is checked here first (no CR/LF/NUL in
an address, parameter or name; message lines CRLF only), because a client that forwards a
smuggled line break turns this server into a spam source. aiosmtplib itself dot-stuffs the body.
The relayhost (smarthost) path lives here too: it is the same transaction over a required,
verified TLS channel with AUTH, instead of MX lookup and opportunistic STARTTLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

import aiosmtplib

from yuubin import tls as tlsmod
from yuubin.dns import DnsLookup

log = logging.getLogger("yuubin.outbound")

_UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")  # no controls, spaces or brackets in an address
_CONTROL = re.compile(r"[\x00-\x1f\x7f<>]")  # not even inside a quoted local part
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(=[\x21-\x3c\x3e-\x7e]+)?")  # esmtp-keyword[=esmtp-value]
_BARE_EOL = re.compile(rb"\r\n|\r|\n")


class UnsafeInput(ValueError):
    """Something that would let a CR/LF or other control reach the wire; never sent."""


def wire_message(data: bytes) -> bytes:
    """The message with every line ending as CRLF (bare CR and bare LF become CRLF).

    Why here: the spooled bytes come from our own SMTP server (which already refuses bare LF)
    and from DSNs we build; normalising once more before the wire makes the guarantee local.
    """
    out = _BARE_EOL.sub(b"\r\n", data)
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out


def check_address(addr: str, smtputf8: bool) -> str:
    """An envelope address safe to put in MAIL FROM/RCPT TO, or UnsafeInput."""
    if addr == "":
        return addr
    if _CONTROL.search(addr) or (_UNSAFE.search(addr) and not addr.startswith('"')):
        raise UnsafeInput(f"address {addr!r} contains a control character, space or bracket")
    if not smtputf8 and not addr.isascii():
        raise UnsafeInput(f"address {addr!r} needs SMTPUTF8")
    if "@" not in addr or len(addr) > 256:
        raise UnsafeInput(f"address {addr!r} is not a user@domain mailbox")
    return addr


def check_param(param: str) -> str:
    """An ESMTP parameter (`KEY` or `KEY=value`, RFC 5321 4.1.2), or UnsafeInput."""
    if not _PARAM.fullmatch(param):
        raise UnsafeInput(f"parameter {param!r} is not a valid esmtp-param")
    return param


OutcomeKind = Literal["delivered", "deferred", "failed"]  # 2xx; 4xx: retry; 5xx: bounce


@dataclass(slots=True)
class Outcome:
    """What happened to one recipient in one attempt."""

    kind: OutcomeKind
    code: int
    status: str  # RFC 3463 enhanced status code
    text: str
    host: str = ""

    @property
    def diagnostic(self) -> str:
        return f"{self.code} {self.status} {self.text}".strip()


def _outcome(code: int, text: str, host: str) -> Outcome:
    text = " ".join(text.split())[:400]
    m = re.match(r"([245])\.\d{1,3}\.\d{1,3}\b", text)
    status = m.group(0) if m else f"{str(code)[0]}.0.0"
    if m:
        text = text[m.end():].strip()
    kind: OutcomeKind = "delivered" if 200 <= code < 300 else "failed" if 500 <= code < 600 else "deferred"
    return Outcome(kind, code, status, text, host)


def deferred(status: str, text: str, host: str = "") -> Outcome:
    return Outcome("deferred", 451, status, text, host)


def failed(status: str, text: str, host: str = "", code: int = 550) -> Outcome:
    return Outcome("failed", code, status, text, host)


@dataclass(slots=True)
class Route:
    """Where a domain's mail goes: hosts in order, each with its addresses; or an error for all."""

    hosts: list[tuple[str, list[str]]] = field(default_factory=list)
    error: Outcome | None = None


def _parse_mx(records: tuple[str, ...]) -> list[tuple[int, str]]:
    out = []
    for rec in records:
        parts = rec.split()
        if len(parts) == 2 and parts[0].isdigit():
            out.append((int(parts[0]), parts[1].rstrip(".").lower() or "."))
    return out


def _ordered(mx: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """By preference, random among equal preferences (RFC 5321 5.1)."""
    shuffled = list(mx)
    random.shuffle(shuffled)
    return sorted(shuffled, key=lambda x: x[0])


def _silent(nameservers: tuple[str, ...]) -> str:
    """What a DNS deferral adds so that `queue show` names the nameserver to look at."""
    return f" (no answer from nameserver {', '.join(nameservers)})" if nameservers else ""


class MxRouter:
    """RFC 5321 5.1 routing through yuubin's resolver, with null MX and loop detection."""

    def __init__(self, resolver: DnsLookup, hostname: str, is_self: Callable[[str], bool]):
        self.resolver = resolver
        self.hostname = hostname.lower()
        self.is_self = is_self  # (ip) → True when connecting there would reach this server

    async def route(self, domain: str) -> Route:
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1].removeprefix("IPv6:")
            try:
                ip = str(ipaddress.ip_address(literal))
            except ValueError:
                return Route(error=failed("5.1.2", f"bad address literal {domain}", code=553))
            if self.is_self(ip):
                return Route(error=failed("5.4.6", f"mail for {domain} loops back to myself", code=554))
            return Route(hosts=[(domain, [ip])])
        try:
            qname = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return Route(error=failed("5.1.2", f"domain {domain} is not a valid name", code=553))
        res = await self.resolver.lookup(qname, "MX")
        if res.status == "ok":
            mx = _parse_mx(res.records)
            if any(host == "." for _, host in mx):
                if len(mx) == 1:
                    return Route(error=failed("5.1.10", f"domain {domain} accepts no mail (null MX)", code=556))
                mx = [m for m in mx if m[1] != "."]
            if not mx:
                mx = [(0, qname)]
        elif res.status == "nodata":
            mx = [(0, qname)]  # implicit MX: the domain's own address records
        elif res.status == "nxdomain":
            return Route(error=failed("5.1.2", f"domain {domain} does not exist (NXDOMAIN)"))
        else:
            return Route(error=deferred("4.4.3", f"MX lookup for {domain} failed: {res.status}{_silent(res.silent)}"))
        hosts: list[tuple[int, str, list[str]]] = []
        dns_trouble = False
        silent: list[str] = []
        for pref, host in _ordered(mx):
            addrs: list[str] = []
            for rdtype in ("A", "AAAA"):
                r = await self.resolver.lookup(host, rdtype)
                if r.status == "ok":
                    addrs.extend(r.records)
                elif r.status in ("timeout", "servfail"):
                    dns_trouble = True
                    silent.extend(ns for ns in r.silent if ns not in silent)
            hosts.append((pref, host, addrs))
        ours = [pref for pref, host, addrs in hosts
                if host == self.hostname or any(self.is_self(a) for a in addrs)]
        if ours:
            # RFC 5321 5.1: we are an MX for it, so only hosts more preferred than us may be used.
            cut = min(ours)
            hosts = [h for h in hosts if h[0] < cut]
            if not hosts:
                return Route(error=failed("5.4.6", f"mail for {domain} loops back to myself "
                                                   "(an MX host of the domain is this server)", code=554))
        usable = [(host, addrs) for _, host, addrs in hosts if addrs]
        if not usable:
            if dns_trouble:
                return Route(error=deferred("4.4.3", f"address lookup for the MX hosts of {domain} failed"
                                                     f"{_silent(tuple(silent))}"))
            return Route(error=failed("5.4.4", f"no address for any MX host of {domain}", code=550))
        return Route(hosts=usable)


def self_address_check(listening: Callable[[], list[tuple[str, int]]], port: int) -> Callable[[str], bool]:
    """Build `is_self(ip)`: True when ip:`port` is one of our own listening sockets.

    A wildcard listener (0.0.0.0, ::) counts for every address of this host, found by trying to
    bind to it (no interface enumeration library needed).
    """
    def is_self(ip: str) -> bool:
        for host, lport in listening():
            if lport != port:
                continue
            if host == ip:
                return True
            if host in ("0.0.0.0", "::") and _is_local_address(ip):
                return True
        return False
    return is_self


def _is_local_address(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    """One host to talk to, and how."""

    host: str  # name for logs, TLS SNI and verification
    address: str  # what to connect to
    port: int
    tls: str  # "opportunistic", "starttls" (required, verified) or "implicit" (verified)
    username: str = ""
    password: str = ""


class HostUnusable(Exception):
    """This host could not take the transaction (connect, greeting, EHLO, TLS): try the next one."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.diagnostic)
        self.outcome = outcome


class SmtpClient:
    """One SMTP transaction per call, over aiosmtplib (a maintained client with TLS and AUTH)."""

    def __init__(self, hostname: str, connect_timeout: float, command_timeout: float,
                 verify_context: ssl.SSLContext | None = None):
        self.hostname = hostname
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.verify_context = verify_context or ssl.create_default_context()
        self.opportunistic_context = ssl.create_default_context()
        self.opportunistic_context.check_hostname = False
        self.opportunistic_context.verify_mode = ssl.CERT_NONE  # RFC 7435: any TLS beats none

    async def send(self, target: SmtpTarget, sender: str, recipients: list[tuple[str, list[str]]],
                   data: bytes, mail_params: dict[str, str], qid: str) -> list[Outcome]:
        """Send to one host; one Outcome per recipient. Raises HostUnusable before MAIL FROM."""
        try:
            return await self._send(target, sender, recipients, data, mail_params, qid, tls_ok=True)
        except _TlsBroken as e:
            if target.tls != "opportunistic":
                raise HostUnusable(deferred("4.7.5", f"TLS with {target.host} failed: {e}", target.host)) from None
            log.info("event=tls_fallback id=%s host=%s error=%r", qid, target.host, str(e))
            return await self._send(target, sender, recipients, data, mail_params, qid, tls_ok=False)

    async def _send(self, target: SmtpTarget, sender: str, recipients: list[tuple[str, list[str]]],
                    data: bytes, mail_params: dict[str, str], qid: str, tls_ok: bool) -> list[Outcome]:
        implicit = target.tls == "implicit"
        smtp = aiosmtplib.SMTP(
            hostname=target.address, port=target.port, local_hostname=self.hostname,
            timeout=self.command_timeout, use_tls=implicit, start_tls=False,
            tls_context=self.verify_context if implicit else None,
        )
        where = f"{target.host}[{target.address}]:{target.port}"
        try:
            try:
                await smtp.connect(timeout=self.connect_timeout)  # implicit TLS verifies `address`
            except aiosmtplib.SMTPConnectResponseError as e:
                raise HostUnusable(_as_host_error(e.code, e.message, where)) from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
                if implicit and isinstance(getattr(e, "__cause__", None), ssl.SSLError):
                    raise HostUnusable(deferred("4.7.5", f"TLS with {where} failed: {e}", where)) from None
                raise HostUnusable(deferred("4.4.1", f"connect to {where} failed: {e}", where)) from None
            try:
                await self._hello(smtp, where)
                tls_info = tlsmod.describe(smtp.get_transport_info("ssl_object")) if implicit else None
                if not implicit and tls_ok and (smtp.supports_extension("starttls") or target.tls == "starttls"):
                    if not smtp.supports_extension("starttls"):
                        raise HostUnusable(deferred("4.7.4", f"{where} does not offer STARTTLS", where))
                    ctx = self.verify_context if target.tls == "starttls" else self.opportunistic_context
                    try:
                        await smtp.starttls(tls_context=ctx, server_hostname=target.host)
                    except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as e:
                        raise _TlsBroken(str(e)) from None
                    tls_info = tlsmod.describe(smtp.get_transport_info("ssl_object"))
                    await self._hello(smtp, where)
                log.info("event=outbound_connected id=%s host=%s tls=%r", qid, where, tls_info or "none")
                if target.username:
                    if tls_info is None:
                        raise HostUnusable(deferred("4.7.4", f"refusing AUTH to {where} without TLS", where))
                    try:
                        await smtp.login(target.username, target.password)
                    except aiosmtplib.SMTPException as e:
                        raise HostUnusable(deferred("4.7.8", f"AUTH at {where} failed: {e}", where)) from None
            except aiosmtplib.SMTPServerDisconnected as e:
                raise HostUnusable(deferred("4.4.2", f"{where} closed the connection: {e}", where)) from None
            except TimeoutError as e:
                raise HostUnusable(deferred("4.4.2", f"{where} timed out: {e}", where)) from None
            return await self._transaction(smtp, where, sender, recipients, data, mail_params)
        finally:
            if smtp.is_connected:
                try:
                    await smtp.quit(timeout=5)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    smtp.close()

    async def _hello(self, smtp: aiosmtplib.SMTP, where: str) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError as e:
            if 400 <= e.code < 500:
                raise HostUnusable(_as_host_error(e.code, e.message, where)) from None
            try:
                await smtp.helo()
            except aiosmtplib.SMTPHeloError as e2:
                raise HostUnusable(_as_host_error(e2.code, e2.message, where)) from None

    async def _transaction(self, smtp: aiosmtplib.SMTP, where: str, sender: str,
                           recipients: list[tuple[str, list[str]]], data: bytes,
                           mail_params: dict[str, str]) -> list[Outcome]:
        n = len(recipients)
        utf8 = "SMTPUTF8" in mail_params or not sender.isascii() or any(not r.isascii() for r, _ in recipients)
        if utf8 and not smtp.supports_extension("smtputf8"):
            return [failed("5.6.7", f"{where} does not support SMTPUTF8, needed for this message", where,
                           code=553)] * n
        try:
            check_address(sender, utf8)
            safe_rcpts = [(check_address(r, utf8), [check_param(p) for p in params]) for r, params in recipients]
        except UnsafeInput as e:
            return [failed("5.6.0", f"not sent: {e}", where, code=554)] * n
        wire = wire_message(data)
        options: list[str] = []
        if smtp.supports_extension("size"):
            limit = smtp.esmtp_extensions.get("size", "")
            if limit.isdigit() and int(limit) and len(wire) > int(limit):
                return [failed("5.3.4", f"message size {len(wire)} exceeds the limit {limit} of {where}",
                               where, code=552)] * n
            options.append(f"SIZE={len(wire)}")
        body = mail_params.get("BODY", "").upper()
        if body == "8BITMIME" and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if utf8:
            options.append("SMTPUTF8")
        dsn = smtp.supports_extension("dsn")
        if dsn:
            for key in ("RET", "ENVID"):
                if key in mail_params:
                    options.append(check_param(f"{key}={mail_params[key]}"))
        encoding = "utf-8" if utf8 else "ascii"
        results: list[Outcome | None] = [None] * n
        try:
            accepted: list[int] = []
            if smtp.supports_extension("pipelining"):
                commands = [_command("MAIL FROM", sender, options)] + [
                    _command("RCPT TO", rcpt, params if dsn else []) for rcpt, params in safe_rcpts]
                replies = await pipelined(smtp, commands, encoding, self.command_timeout)
                if replies[0][0] >= 400:
                    return [_outcome(*replies[0], where)] * n
                for i, (code, text) in enumerate(replies[1:]):
                    if code < 400:
                        accepted.append(i)
                    else:
                        results[i] = _outcome(code, text, where)
            else:
                try:
                    await smtp.mail(sender, options=options, encoding=encoding)
                except aiosmtplib.SMTPResponseException as e:
                    return [_outcome(e.code, e.message, where)] * n
                for i, (rcpt, params) in enumerate(safe_rcpts):
                    try:
                        await smtp.rcpt(rcpt, options=params if dsn else [], encoding=encoding)
                        accepted.append(i)
                    except aiosmtplib.SMTPResponseException as e:
                        results[i] = _outcome(e.code, e.message, where)
            if not accepted:
                with contextlib.suppress(aiosmtplib.SMTPResponseException):
                    await smtp.rset()  # a refused RSET changes nothing: the results stand, QUIT follows
                return [r for r in results if r is not None]
            try:
                resp = await smtp.data(wire)
                done = _outcome(resp.code, resp.message, where)
            except aiosmtplib.SMTPResponseException as e:
                done = _outcome(e.code, e.message, where)
            for i in accepted:
                results[i] = done
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError, TimeoutError) as e:
            lost = deferred("4.4.2", f"connection to {where} lost: {e}", where)
            return [r or lost for r in results]
        return [r or deferred("4.4.2", "no answer", where) for r in results]


class _TlsBroken(Exception):
    pass


def _command(verb: str, address: str, params: list[str]) -> str:
    """`MAIL FROM:<a> P=V...` from parts already checked by check_address/check_param."""
    return f"{verb}:<{address}>" + "".join(f" {p}" for p in params) + "\r\n"


class _Replies(asyncio.Protocol):
    """Collects the replies to commands written at once (RFC 2920 PIPELINING).

    Hand-written because aiosmtplib 5.1 reads one reply per arrival of data and loses replies
    that arrive together, which a pipelining peer does by design. The connection is lent to this
    reader for the MAIL/RCPT batch only and handed back to aiosmtplib before DATA.
    """

    def __init__(self, count: int, owner: asyncio.BaseProtocol):
        self.count = count
        self.owner = owner
        self.buffer = bytearray()
        self.replies: list[tuple[int, str]] = []
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > 1 << 20:
            self._fail(aiosmtplib.SMTPResponseException(-1, "reply too long"))
            return
        while len(self.replies) < self.count and (reply := self._next_reply()) is not None:
            self.replies.append(reply)
        if len(self.replies) >= self.count and not self.done.done():
            self.done.set_result(self.replies)

    def _next_reply(self) -> tuple[int, str] | None:
        lines: list[bytes] = []
        pos = 0
        while True:
            nl = self.buffer.find(b"\n", pos)
            if nl < 0:
                return None
            line = bytes(self.buffer[pos:nl]).rstrip(b"\r")
            pos = nl + 1
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._fail(aiosmtplib.SMTPResponseException(-1, f"malformed reply {line[:80]!r}"))
                return None
            lines.append(line)
            if line[3:4] != b"-":
                break
        del self.buffer[:pos]
        return int(lines[0][:3]), "\n".join(ln[4:].decode("utf-8", "replace") for ln in lines)

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def eof_received(self) -> bool | None:
        self._fail(aiosmtplib.SMTPServerDisconnected("connection closed during pipelined commands"))
        return self.owner.eof_received() if hasattr(self.owner, "eof_received") else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("connection lost during pipelined commands"))
        self.owner.connection_lost(exc)


async def pipelined(smtp: aiosmtplib.SMTP, commands: list[str], encoding: str,
                    timeout: float) -> list[tuple[int, str]]:
    """Write `commands` in one go and return their (code, text) replies in order."""
    transport = cast(asyncio.Transport | None, smtp.transport)  # aiosmtplib types it as BaseTransport
    if transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("not connected")
    owner = transport.get_protocol()
    reader = _Replies(len(commands), owner)
    transport.set_protocol(reader)
    try:
        transport.write("".join(commands).encode(encoding))
        return await asyncio.wait_for(reader.done, timeout)
    finally:
        if not transport.is_closing():
            transport.set_protocol(owner)


def _as_host_error(code: int, message: str, where: str) -> Outcome:
    o = _outcome(code, message, where)
    if o.kind != "deferred":
        o = Outcome("deferred", o.code, o.status if o.status[0] == "4" else "4.4.1",
                    f"{where} refused the session: {o.code} {o.text}", where)
    return o


def verify_context(ca_file: str = "") -> ssl.SSLContext:
    """Certificate-verifying client context (system CAs, plus `ca_file` when given)."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def parse_relayhost(value: str, default_port: int = 25) -> tuple[str, int]:
    """`smtp.isp.example:587`, `[smtp.isp.example]:587`, `[2001:db8::1]:465` → (host, port)."""
    v = value.strip()
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", v)
    if not m:
        raise ValueError(f"relayhost {value!r} is not HOST:PORT")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4) or default_port)
    if _UNSAFE.search(host):
        raise ValueError(f"relayhost {value!r} has a bad host name")
    return host, port

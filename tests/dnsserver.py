"""A real DNS server on loopback for tests, so resolver code is exercised over UDP, not mocked.

Built on dnslib's socketserver-based ``DNSServer``; one UDP and one TCP server share a port
and run in daemon threads. Zones are plain dicts filled by ``add``; failure modes are set
per name with ``set_behaviour``.
"""

from __future__ import annotations

import errno
import threading
import time

from dnslib import (
    AAAA,
    CNAME,
    MX,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SOA,
    TXT,
    A,
    DNSError,
    DNSLabel,
    DNSRecord,
)
from dnslib.server import DNSHandler, DNSServer

__all__ = ["TestDNSServer"]

NEGATIVE_TTL = 60
_RDATA = {
    "A": A,
    "AAAA": AAAA,
    "CNAME": CNAME,
    "PTR": PTR,
    "TXT": lambda value: TXT([value[i : i + 255] for i in range(0, len(value), 255)] or [""]),
    "MX": lambda value: MX(value.split()[1], int(value.split()[0])),
}


def _norm(name: str) -> str:
    """Names are compared lowercase and without the trailing dot."""
    return name.strip().rstrip(".").lower()


class _QuietLogger:
    """dnslib prints every request to stdout by default; tests assert on ``queries`` instead."""

    def __getattr__(self, name: str):
        return lambda *args: None


class _Drop(DNSError):
    """Raised by the resolver to send no reply at all; dnslib's handler swallows DNSError."""


class _ZoneResolver:
    """dnslib resolver over the server's record dict; runs in the server threads."""

    def __init__(self, server: TestDNSServer):
        self.server = server

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        return self.server._answer(request)


class TestDNSServer:
    """Serves test zones on 127.0.0.1:<free port> over UDP and TCP, in a thread.

    Behaviours per name: "timeout" (never answer), "servfail", "refused", and "delay:<seconds>"
    (answer normally, late). Unknown names get NXDOMAIN with an SOA (minimum 60) in the
    authority section so negative caching works; known names without the type get NODATA.
    ``queries`` lists every (name, rdtype) received, name lowercase without trailing dot.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, address: str = "127.0.0.1", port: int = 0):
        self.address = address
        self.port = port
        self.queries: list[tuple[str, str]] = []
        self._records: dict[str, list[tuple[str, object, int]]] = {}
        self._behaviours: dict[str, str] = {}
        self._lock = threading.Lock()
        self._servers: list[DNSServer] = []
        self._threads: list[threading.Thread] = []

    def add(self, name: str, rdtype: str, value: str, ttl: int = 300) -> None:
        """Add one record; MX values are "10 mx.example.", TXT values the plain string."""
        rdtype = rdtype.upper()
        if rdtype not in _RDATA:
            raise ValueError(f"unsupported record type {rdtype!r}")
        rdata = _RDATA[rdtype](value)
        with self._lock:
            self._records.setdefault(_norm(name), []).append((rdtype, rdata, ttl))

    def set_behaviour(self, name: str, behaviour: str) -> None:
        """Make queries for ``name`` fail: "timeout", "servfail", "refused" or "delay:<s>"."""
        if behaviour not in ("timeout", "servfail", "refused") and not behaviour.startswith(
            "delay:"
        ):
            raise ValueError(f"unknown behaviour {behaviour!r}")
        with self._lock:
            self._behaviours[_norm(name)] = behaviour

    def clear(self) -> None:
        """Forget all records, behaviours and received queries."""
        with self._lock:
            self._records.clear()
            self._behaviours.clear()
            self.queries.clear()

    def start(self) -> TestDNSServer:
        """Bind UDP (port 0 picks a free one), then TCP on the same port, and serve."""
        for _attempt in range(20):
            udp = DNSServer(_ZoneResolver(self), self.address, self.port, logger=_QuietLogger())
            port = udp.server.server_address[1]
            try:
                tcp = DNSServer(
                    _ZoneResolver(self), self.address, port, tcp=True, logger=_QuietLogger()
                )
            except OSError as exc:
                udp.server.server_close()
                if exc.errno != errno.EADDRINUSE or self.port:
                    raise
                continue
            break
        else:
            raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")
        self.port = port
        self._servers = [udp, tcp]
        for server in self._servers:
            thread = threading.Thread(
                target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving and close the sockets."""
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()
        for thread in self._threads:
            thread.join(timeout=2)
        self._servers, self._threads = [], []

    def __enter__(self) -> TestDNSServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _answer(self, request: DNSRecord) -> DNSRecord:
        """Build the reply, or raise _Drop to stay silent."""
        qname = _norm(str(request.q.qname))
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        with self._lock:
            self.queries.append((qname, qtype))
            behaviour = self._behaviours.get(qname)
            records = {name: list(rrs) for name, rrs in self._records.items()}
        reply = request.reply()
        if behaviour == "timeout":
            raise _Drop("timeout behaviour")
        if behaviour == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if behaviour == "refused":
            reply.header.rcode = RCODE.REFUSED
            return reply
        if behaviour is not None and behaviour.startswith("delay:"):
            time.sleep(float(behaviour.split(":", 1)[1]))

        name = qname
        found = False
        for _hop in range(8):  # follow CNAMEs inside our own data, like an authoritative server
            rrs = records.get(name, [])
            matching = [(t, rd, ttl) for t, rd, ttl in rrs if t == qtype]
            cnames = [(rd, ttl) for t, rd, ttl in rrs if t == "CNAME"]
            if not matching and cnames and qtype != "CNAME":
                rd, ttl = cnames[0]
                reply.add_answer(RR(name + ".", QTYPE.CNAME, rdata=rd, ttl=ttl))
                name = _norm(str(rd.label))
                continue
            for t, rd, ttl in matching:
                reply.add_answer(RR(name + ".", getattr(QTYPE, t), rdata=rd, ttl=ttl))
            found = bool(matching)
            break

        if not found:
            exists = name in records or any(n.endswith("." + name) for n in records)
            if not exists:
                reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa(name))
        return reply

    @staticmethod
    def _soa(name: str) -> RR:
        """SOA at the name's last label, so dnspython finds it above the name and caches."""
        apex = name.rsplit(".", 1)[-1] + "." if name else "."
        soa = SOA(
            DNSLabel("ns." + apex),
            DNSLabel("hostmaster." + apex),
            (1, 3600, 600, 86400, NEGATIVE_TTL),
        )
        return RR(apex, QTYPE.SOA, rdata=soa, ttl=NEGATIVE_TTL)

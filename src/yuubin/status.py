"""What the running server tells its admin: `yuubin status` over a control socket, and /metrics.

The control socket is a Unix socket in `data_dir/run/` (mode 0600: whoever may read the data
directory may ask; no TCP port, no password). It answers one line — `status` — with one JSON
document. The Prometheus endpoint (`[metrics] address`, off unless set) serves the same numbers
in the text format, built with prometheus-client. Both are read from the parts of the running
server — the event tally (tally.py), the sessions now, the queue files, the lockouts and
suspensions in state.db — and, with several workers, from the tallies the other workers write
to `run/worker-N.json` every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from yuubin import __version__, tally
from yuubin.auth.guard import AuthGuard
from yuubin.config import Config
from yuubin.net.connections import Connections
from yuubin.queue.control import entry_state
from yuubin.queue.spool import Envelope, Spool, SpoolCorrupt
from yuubin.store import Store

log = logging.getLogger("yuubin.status")

PUBLISH_EVERY = 2.0  # seconds between a worker's tally files
CONTROL_SOCKET = "control.sock"
REQUEST_LIMIT = 1024  # bytes of a control request


def run_dir(cfg: Config) -> Path:
    return cfg.data_dir / "run"


def control_path(cfg: Config) -> Path:
    return run_dir(cfg) / CONTROL_SOCKET


def sessions_by_listener(connections: Connections) -> dict[str, int]:
    out: Counter[str] = Counter()
    for s in connections.sessions:
        settings = getattr(s, "settings", None)  # every session is a StreamSession; Stoppable does not say so
        out[getattr(settings, "kind", "?")] += 1
    return dict(out)


def _queue_summary(spool: Spool) -> dict[str, int]:
    """Entries by state, read from the spool files (in a thread: a big queue is many files)."""
    states: Counter[str] = Counter()
    for qid in spool.ids():
        try:
            with open(spool.path(qid), "rb") as f:
                env = Envelope.decode(f.readline(1 << 20))
        except (OSError, SpoolCorrupt, ValueError, TypeError, KeyError):
            continue
        states[entry_state(env)] += 1
    return dict(states)


def _certificate(path: Path | None, now: float) -> dict[str, Any] | None:
    if path is None:
        return None
    from cryptography import x509
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as e:
        return {"file": str(path), "error": str(e)}
    not_after = cert.not_valid_after_utc.timestamp()
    return {"file": str(path), "not_after": not_after, "days_left": int((not_after - now) // 86400)}


class ServerStatus:
    """Builds the status document and the metrics from the running parts (the primary's view)."""

    def __init__(self, cfg: Config, tally_: tally.EventTally, connections: Connections, store: Store,
                 spool: Spool, guard: AuthGuard, listening: Callable[[], list[tuple[str, str]]],
                 started: float, clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.tally = tally_
        self.connections = connections
        self.store = store
        self.spool = spool
        self.guard = guard
        self.listening = listening  # (kind, address) of each bound listener
        self.started = started
        self.clock = clock

    def _workers(self) -> list[dict[str, Any]]:
        """The other workers' last published tallies and sessions."""
        out = []
        for p in sorted(run_dir(self.cfg).glob("worker-*.json")):
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads(p.read_text()))
        return out

    async def document(self, *, with_tally: bool = False) -> dict[str, Any]:
        """What `yuubin status` shows; `with_tally` adds the raw counts the metrics are made of."""
        now = self.clock()
        others = self._workers()
        merged = tally.merge([self.tally.snapshot(), *(w.get("tally", {}) for w in others)])
        sessions: Counter[str] = Counter(sessions_by_listener(self.connections))
        for w in others:
            sessions.update(w.get("sessions", {}))
        queue = await asyncio.to_thread(_queue_summary, self.spool)
        locked, attacked = await self.store.run(self.guard.lockouts)
        accounts = await self.store.run(self.store.accounts)
        suspended = [{"account": a.address, "by": a.suspended_by} for a in accounts if a.suspended]
        listeners = [{"kind": kind, "address": address, "sessions": sessions.get(kind, 0)}
                     for kind, address in self.listening()]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime_seconds": round(now - self.started, 1),
            "workers": self.cfg.workers,
            "listeners": listeners,
            "sessions": dict(sessions),
            "last_hour": tally.last_hour(merged, now),
            "queue": queue,
            "lockouts": [{"source": lo.source, "until": lo.until, "offences": lo.offences} for lo in locked],
            "accounts_under_attack": [{"account": a, "failures": f, "sources": n} for a, f, n in attacked],
            "suspended": suspended,
            "dnsbl_hits": merged["hits"],
            "certificate": _certificate(self.cfg.tls.cert, now),
            **({"tally": merged} if with_tally else {}),
        }

    async def metrics(self) -> bytes:
        doc = await self.document(with_tally=True)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(doc))
        return generate_latest(registry)


class _Families:
    """A prometheus-client collector over one status document."""

    def __init__(self, doc: dict[str, Any]):
        self.doc = doc

    def collect(self) -> Iterator[Metric]:
        doc = self.doc
        t = doc["tally"]
        events: dict[str, int] = t["events"]
        labelled: list[tuple[str, list[str], int]] = t["labelled"]

        def by(name: str) -> Iterable[tuple[list[str], int]]:
            return ((k, c) for n, k, c in labelled if n == name)

        g = GaugeMetricFamily("yuubin_start_time_seconds", "When the server started (Unix time).")
        g.add_metric([], doc["started"])
        yield g
        g = GaugeMetricFamily("yuubin_sessions", "Sessions open now, by listener kind.", labels=["listener"])
        for lc in {lc["kind"] for lc in doc["listeners"]} | set(doc["sessions"]):
            g.add_metric([lc], doc["sessions"].get(lc, 0))
        yield g
        c = CounterMetricFamily("yuubin_connections", "Connections accepted, by listener kind.", labels=["listener"])
        for (kind,), n in by("connect"):
            c.add_metric([kind], n)
        yield c
        c = CounterMetricFamily("yuubin_connections_refused", "Connections refused before the session began.",
                                labels=["listener", "reason"])
        for (kind, reason), n in by("refused"):
            c.add_metric([kind, reason], n)
        yield c
        c = CounterMetricFamily("yuubin_messages_accepted", "Messages accepted (250 after DATA/BDAT).")
        c.add_metric([], events.get("accepted", 0))
        yield c
        c = CounterMetricFamily("yuubin_rejections", "Commands refused, by stage and check.", labels=["stage", "check"])
        for (stage, check), n in by("reject"):
            c.add_metric([stage, check], n)
        yield c
        c = CounterMetricFamily("yuubin_dnsbl_hits", "Clients refused as listed, by zone.", labels=["zone"])
        for (zone,), n in by("dnsbl_hit"):
            c.add_metric([zone], n)
        yield c
        c = CounterMetricFamily("yuubin_auth_failures", "Failed logins.")
        c.add_metric([], events.get("auth_failed", 0))
        yield c
        c = CounterMetricFamily("yuubin_auth_lockouts", "Sources locked out after failed logins.")
        c.add_metric([], events.get("auth_lockout", 0))
        yield c
        g = GaugeMetricFamily("yuubin_auth_locked_sources", "Sources locked out now.")
        g.add_metric([], len(doc["lockouts"]))
        yield g
        g = GaugeMetricFamily("yuubin_accounts_suspended", "Accounts suspended now.")
        g.add_metric([], len(doc["suspended"]))
        yield g
        g = GaugeMetricFamily("yuubin_queue_entries", "Spool entries by state.", labels=["state"])
        for state in ("queued", "deferred", "held", "local"):
            g.add_metric([state], doc["queue"].get(state, 0))
        yield g
        c = CounterMetricFamily("yuubin_deliveries", "Delivery results per recipient.", labels=["result"])
        for result in ("delivered", "sent", "deferred", "failed", "expired"):
            c.add_metric([result], events.get(result, 0))
        yield c
        for metric, help_ in (("session_seconds", "Session length."),
                              ("delivery_seconds", "Time from acceptance to delivery (local or remote).")):
            h = t["durations"].get(metric)
            if h is None:
                continue
            fam = HistogramMetricFamily(f"yuubin_{metric}", help_)
            buckets, cumulative = [], 0.0
            for bound, count in zip(tally.BUCKETS, h, strict=False):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            cumulative += h[len(tally.BUCKETS)]
            buckets.append(("+Inf", cumulative))
            fam.add_metric([], buckets, h[-1])
            yield fam
        cert = doc.get("certificate")
        if cert and "not_after" in cert:
            g = GaugeMetricFamily("yuubin_certificate_expiry_seconds", "When the TLS certificate expires.")
            g.add_metric([], cert["not_after"])
            yield g
        c = CounterMetricFamily("yuubin_events", "Log events by name.", labels=["event"])
        for name, n in sorted(events.items()):
            c.add_metric([name], n)
        yield c


class ControlServer:
    """The Unix socket `yuubin status` asks (the primary's)."""

    def __init__(self, path: Path, status: ServerStatus):
        self.path = path
        self.status = status
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a server that was killed
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            request = line[:REQUEST_LIMIT].decode("utf-8", "replace").strip()
            if request == "status":
                body = json.dumps(await self.status.document())
            else:
                body = json.dumps({"error": f"unknown request {request!r}; known: status"})
            writer.write(body.encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("event=control_error")
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class MetricsServer:
    """GET /metrics in the Prometheus text format, on `[metrics] address` (HTTP/1.0, one request)."""

    def __init__(self, host: str, port: int, status: ServerStatus):
        self.host = host
        self.port = port
        self.status = status
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sock = self._server.sockets[0].getsockname()
        log.info("event=metrics_listening address=%s port=%d path=/metrics", sock[0], sock[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            parts = head.split(b" ", 2)
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if parts[0] != b"GET" or path != b"/metrics":
                writer.write(b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n\r\nonly GET /metrics\n")
            else:
                body = await self.status.metrics()
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            log.exception("event=metrics_error")
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def publish_worker(path: Path, tally_: tally.EventTally, connections: Connections) -> None:
    """A worker's loop: its tally and sessions to `path` every PUBLISH_EVERY seconds, for the primary."""
    while True:
        try:
            data = {"pid": os.getpid(), "time": time.time(), "sessions": sessions_by_listener(connections),
                    "tally": tally_.snapshot()}
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
        except OSError as e:
            log.warning("event=status_publish_failed path=%s error=%r", path, e.strerror or str(e))
        await asyncio.sleep(PUBLISH_EVERY)

"""The running server: builds every part from the config, starts listeners, stops cleanly.

Shutdown order matters for "nothing accepted is ever lost": stop accepting, close idle
sessions with 421, let transactions in flight finish within `limits.shutdown_grace`, then wait
for the group commit. Local deliveries not finished stay in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass

from yuubin.auth.accounts import Directory
from yuubin.auth.sasl import MECHANISMS
from yuubin.config import Config, ConfigError, ListenerConfig
from yuubin.delivery.local import LocalDelivery
from yuubin.delivery.maildir import Maildirs
from yuubin.dns import Resolver
from yuubin.durable import GroupCommitter
from yuubin.geo import AccessList, GeoDatabase, GeoError
from yuubin.policy.authguard import AuthGuard
from yuubin.policy.containment import AccountContainment
from yuubin.policy.dnsbl import DnsblChecker
from yuubin.policy.mx import MxPolicy
from yuubin.policy.submission import SubmissionPolicy
from yuubin.queue.edit import SpoolEditor
from yuubin.queue.entrylock import EntryLocks
from yuubin.queue.scheduler import build_outbound
from yuubin.queue.signal import QueueSignal, RemoteWake
from yuubin.queue.spool import Envelope, RemoteRecipient, Spool, new_id
from yuubin.smtp import listener as listener_module
from yuubin.smtp.address import AddressError, parse_path
from yuubin.smtp.listener import ListenerContext, SMTPSession
from yuubin.smtp.protocol import Limits
from yuubin.store import Store
from yuubin.tls import server_context

log = logging.getLogger("yuubin.server")

SMTP_KINDS = ("mx", "submission", "submissions")
SUBMISSION_KINDS = ("submission", "submissions")  # AUTH mandatory; 465 is TLS from the first byte


@dataclass
class BoundListener:
    config: ListenerConfig
    server: asyncio.base_events.Server

    @property
    def sockname(self) -> tuple:
        return self.server.sockets[0].getsockname()


class Server:
    def __init__(self, config: Config, worker: int = 0):
        self.config = config
        # Worker 0 is the primary: it alone recovers the spool and runs the outbound queue.
        self.worker = worker
        self.primary = worker == 0
        self.store = Store(config.state_db)
        self.directory = Directory(self.store, config.local_domains, config.postmaster)
        self.committer = GroupCommitter()
        self.spool = Spool(config.spool_dir, self.committer)
        self.maildirs = Maildirs(config.mail_dir, config.hostname)
        self.delivery = LocalDelivery(self.spool, self.maildirs, self.committer)
        self.resolver = Resolver(list(config.dns.nameservers), config.dns.port, config.dns.timeout)
        dnsbl = DnsblChecker(self.resolver, list(config.dnsbl_zones)) if config.dnsbl_zones else None
        self.mx_policy = MxPolicy(self.directory, dnsbl)
        self.auth_guard = AuthGuard(self.store, config.auth_guard, self.is_trusted)
        # Every edit of a spool entry (scheduler, containment) goes through one editor and its locks.
        self.editor = SpoolEditor(self.spool, EntryLocks(self.spool.root))
        self.containment = AccountContainment(self.store, self.spool, self.editor, self.delivery,
                                              self.directory, config.hostname)
        self.delivery.hold_check = self.containment.is_held
        self.signal = QueueSignal()
        self.outbound = build_outbound(  # remote delivery, retries, DSNs (queue/scheduler.py)
            config, self.spool, self.editor, self.resolver, self._listening, self.signal, self._inject_dsn,
            self.containment.is_held)
        self.delivery.outbound = self.signal if self.primary else RemoteWake(self.spool.root)
        self.geo: GeoDatabase | None = None
        if any(lc.allow_countries for lc in config.listeners if lc.kind in SUBMISSION_KINDS):
            try:  # a country in `allow` without its data would be an open door: refuse to start
                self.geo = GeoDatabase.load(config.geo_source)
            except GeoError as e:
                raise ConfigError(str(e)) from None
        self.tls_context = server_context(config.tls.cert, config.tls.key) if config.tls.cert else None
        self.sessions: set[SMTPSession] = set()
        self.listeners: list[BoundListener] = []
        self.stopping = False
        self._per_ip: Counter = Counter()
        self._total = 0
        self._stopped = asyncio.Event()

    # ---- facts used by sessions ----

    def is_trusted(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip in net for net in self.config.trusted)

    def admit(self, ip) -> bool:
        """Count a new connection; False when its address or the server is at the limit."""
        lim = self.config.limits
        n = self.config.workers  # each worker process counts its own share of the limits
        if (self._per_ip[ip] >= -(-lim.connections_per_ip // n) or self._total >= -(-lim.max_connections // n)
                or self.stopping):
            return False
        self._per_ip[ip] += 1
        self._total += 1
        return True

    def release(self, ip) -> None:
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
        self._total -= 1

    def _listening(self) -> list[tuple[str, int]]:
        return [(bl.sockname[0], bl.sockname[1]) for bl in self.listeners]

    async def _inject_dsn(self, to: str, data: bytes) -> str | None:
        """Store a DSN from the scheduler and hand it on: to the sender's local mailboxes (aliases
        followed) or out again. A stand-in until intake offers this; None when `to` has no route."""
        try:
            addr = parse_path(f"<{to}>", smtputf8=True)
        except AddressError:
            return None
        if addr is None:
            return None
        local: list[tuple[str, str]] = []
        forwards = [to]
        if self.directory.is_local(addr.domain):
            res = self.directory.resolve(addr)
            if res is None:
                return None
            local, forwards = [(mb, to) for mb in res.mailboxes], list(res.forwards)
        env = Envelope(id=new_id(), sender="", mail_params={}, local=local,
                       remote=[RemoteRecipient(fw, rcpt=to) for fw in forwards], received=time.time(),
                       client="127.0.0.1", helo=self.config.hostname, listener="bounce")
        await self.spool.store(env, data)
        if env.local:
            self.delivery.submit(env, data)
        else:
            self.signal.wake(env.id)
        return env.id

    # ---- life cycle ----

    async def start(self, sockets: dict[int, socket.socket] | None = None) -> None:
        """Listen (on `sockets`, by listener index, when a parent process bound them) and serve."""
        if self.primary:
            recovered = await self.delivery.recover()
            if recovered:
                log.info("event=spool_recovered entries=%d", recovered)
        loop = asyncio.get_running_loop()
        lim = self.config.limits
        for index, lc in enumerate(self.config.listeners):
            if lc.kind not in SMTP_KINDS:
                log.warning("event=listener_skipped kind=%s address=%s reason=\"not implemented yet\"",
                            lc.kind, lc.address)
                continue
            submission = lc.kind in SUBMISSION_KINDS
            ctx = ListenerContext(
                kind=lc.kind, server=self, tls_context=self.tls_context, implicit_tls=lc.kind == "submissions",
                limits=Limits(lim.line_length, lim.message_size, lim.recipients, lim.max_errors),
                policy=SubmissionPolicy(
                    self.directory, self.store, self.config.outbound,
                    AccessList(lc.allow_networks, lc.allow_countries, self.geo), self.containment.limit_broken,
                ) if submission else self.mx_policy,
                auth_mechanisms=MECHANISMS if submission else (),
            )
            tls = {"ssl": self.tls_context, "ssl_handshake_timeout": 30.0} if ctx.implicit_tls else {}
            if sockets is not None:
                srv = await loop.create_server(lambda ctx=ctx: SMTPSession(ctx), sock=sockets[index],
                                               backlog=1024, **tls)
            else:
                srv = await loop.create_server(lambda ctx=ctx: SMTPSession(ctx), lc.host, lc.port,
                                               reuse_address=True, backlog=1024, **tls)
            bl = BoundListener(lc, srv)
            self.listeners.append(bl)
            host, port = bl.sockname[:2]
            log.info("event=listening kind=%s address=%s worker=%d", lc.kind,
                     f"[{host}]:{port}" if ":" in host else f"{host}:{port}", self.worker)
        if self.primary:
            self.outbound.start()

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("event=stopping sessions=%d", len(self.sessions))
        for bl in self.listeners:
            bl.server.close()
        for s in list(self.sessions):
            if s.idle and s.task is not None:
                s.task.cancel()
        tasks = [s.task for s in self.sessions if s.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.config.limits.shutdown_grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self.outbound.stop(grace=self.config.limits.shutdown_grace)
        await self.containment.drain(timeout=self.config.limits.shutdown_grace)
        await self.delivery.drain(timeout=self.config.limits.shutdown_grace)
        self.editor.close()
        self.committer.shutdown()
        self.store.close()
        log.info("event=stopped commit_batches=%d commit_jobs=%d", self.committer.batches, self.committer.jobs)
        self._stopped.set()


def _serve(config: Config, on_ready=None, worker: int = 0,
           sockets: dict[int, socket.socket] | None = None) -> None:
    """One event loop serving until SIGTERM/SIGINT; uvloop when available (measurably faster)."""
    async def main() -> None:
        server = Server(config, worker)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        await server.start(sockets)
        if on_ready:
            on_ready(server)
        await server._stopped.wait()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def run(config: Config, on_ready=None) -> int:
    """Run the server; with `[server] workers` > 1, as that many processes sharing the listeners."""
    if config.workers <= 1:
        _serve(config, on_ready)
        return 0
    return _run_workers(config)


def _listening_socket(lc: ListenerConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in lc.host else socket.AF_INET
    sock = socket.create_server((lc.host, lc.port), family=family, backlog=1024)
    sock.setblocking(False)
    return sock


def _run_workers(config: Config) -> int:
    """Bind the listeners once, fork the workers, pass signals on, and stop all if one dies.

    Every worker accepts from the same sockets (the kernel hands each connection to one), so
    parsing and policy use every core; the spool, Maildirs and state.db are shared on disk.
    """
    from yuubin import logs

    sockets = {i: _listening_socket(lc) for i, lc in enumerate(config.listeners) if lc.kind in SMTP_KINDS}
    logs.shutdown()  # the writer thread does not survive fork: no thread may hold a lock then
    children: dict[int, int] = {}
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, _frame=None) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for worker in range(config.workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                logs.setup(config.log_level)
                listener_module.SESSION_PREFIX = f"{worker}-"
                _serve(config, worker=worker, sockets=sockets)
                code = 0
            except BaseException:
                log.exception("event=worker_failed worker=%d", worker)
            finally:
                logs.shutdown()
                os._exit(code)
        children[pid] = worker
    for sock in sockets.values():
        sock.close()
    logs.setup(config.log_level)
    log.info("event=workers_started workers=%d pids=%s", config.workers, ",".join(map(str, children)))
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        worker = children.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0:
            status = 1
        if not stopping:  # a worker died on its own: the service manager restarts the whole
            log.error("event=worker_exited worker=%d code=%d action=stopping_all", worker, code)
            status = 1
            stop_all()
    log.info("event=workers_stopped status=%d", status)
    return status

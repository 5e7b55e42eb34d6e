"""The composition root: builds every part from the config, starts the listeners, stops cleanly.

Nothing else constructs parts or wires them together; each part gets what it needs through its
constructor, so the module graph stays a DAG and a test can build any part alone.

Shutdown order matters for "nothing accepted is ever lost": stop accepting, close idle
sessions with 421, let transactions in flight finish within `limits.shutdown_grace`, then wait
for the outbound queue, background deliveries and the group commit. Local deliveries not
finished stay in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from yuubin import __version__, heap
from yuubin.adminlog import AdminActionLog
from yuubin.auth.accounts import Directory
from yuubin.auth.guard import AuthGuard
from yuubin.auth.login import LoginExchange
from yuubin.auth.sasl import MECHANISMS
from yuubin.config import SUBMISSION_KINDS, Config, ConfigError, ListenerConfig, check_mail_access, check_tls_files
from yuubin.delivery.local import LocalDelivery
from yuubin.delivery.maildir import Maildirs
from yuubin.dns import Resolver
from yuubin.durable import FileAccess, GroupCommitter
from yuubin.geo import AccessList
from yuubin.imap import protocol as imap_protocol
from yuubin.imap.listener import EXTENSIONS, ImapListener, IMAPSession, SessionCounts
from yuubin.imap.store import MailStore
from yuubin.intake import Intake
from yuubin.mailauth.capture import ReportCapture
from yuubin.mailauth.dkimsign import DkimSigner
from yuubin.mailauth.reports import ReportLimits
from yuubin.net.connections import Connections, listener_pools, session_id_prefix
from yuubin.net.shell import IPAddress, ShellSettings
from yuubin.policy.containment import AccountContainment
from yuubin.policy.holds import AccountHolds
from yuubin.policy.listeners import ListenerPolicies, load_geo
from yuubin.privilege import check_identity, drop_privileges, must_drop, prepare_data_dir, warn_open_files
from yuubin.queue.edit import SpoolEditor
from yuubin.queue.entrylock import EntryLocks
from yuubin.queue.scheduler import OutboundScheduler, build_outbound, relay_context, relay_target
from yuubin.queue.signal import QueueSignal, RemoteWake, Waker
from yuubin.queue.spool import Spool
from yuubin.sdnotify import ServiceNotifier
from yuubin.smtp.listener import SmtpListener, SMTPSession
from yuubin.smtp.protocol import Limits
from yuubin.status import ControlServer, MetricsServer, ServerStatus, control_path, publish_worker, run_dir
from yuubin.store import SCHEMA_VERSION, Store
from yuubin.tally import EventTally
from yuubin.tls import server_context

log = logging.getLogger("yuubin.server")

SMTP_KINDS = ("mx", "submission", "submissions")
IMAP_KINDS = ("imap", "imaps")  # 143 with STARTTLS (no login before TLS), 993 TLS from the first byte
BACKLOG = 1024


def check(config: Config) -> None:
    """Everything serve refuses at start, short of binding the ports, so that `config check` says
    what `serve` will say (both call this). Raises ConfigError naming the file and the key."""
    try:
        _check_listeners(config)
        check_tls_files(config)
        load_geo(config)  # a country allow list needs its database
        if relay_target(config.outbound) is not None:  # reads relayhost_password_file
            relay_context(config.outbound)
        _check_data_dir(config.data_dir)
        if config.dkim.sign:
            _dkim_signer(config, quiet=True)
    except ConfigError as e:
        raise ConfigError(f"{config.source}: {e}" if config.source != "<memory>" else str(e)) from None


def _dkim_signer(config: Config, quiet: bool = False) -> DkimSigner:
    """The outbound signer with every local domain's keys; an unreadable key stops the start."""
    try:
        return DkimSigner.load(config.data_dir, config.local_domains, config.dkim.selectors, quiet=quiet)
    except (OSError, ValueError) as e:
        raise ConfigError(f"dkim: cannot read a signing key: {e} (see yuubin dkim list)") from None


def _check_listeners(config: Config) -> None:
    if not config.listeners:
        raise ConfigError('listener: none configured, serve would listen on nothing: add a [[listener]] '
                          '(e.g. kind = "mx", address = "0.0.0.0:25")')
    for i, lc in enumerate(config.listeners):
        if lc.kind not in SMTP_KINDS + IMAP_KINDS:
            raise ConfigError(f'listener[{i}].kind: "{lc.kind}" is not implemented yet (serve runs '
                              f'{", ".join(SMTP_KINDS + IMAP_KINDS)}): remove this listener for now')


def _check_data_dir(path: Path) -> None:
    """data_dir must be a writable directory, or creatable in its nearest existing parent."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"data_dir: {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created ({existing} is not writable)"
        raise ConfigError(f"data_dir: {path} {what} by this user (uid {os.getuid()})")


class ListenerBindError(ConfigError):
    """A listener's address could not be bound: the message names the listener and says why."""

    def __init__(self, index: int, listener: ListenerConfig, error: OSError, source: str):
        self.index = index
        self.listener = listener
        self.reason = _bind_reason(error)
        where = f"{source}: " if source != "<memory>" else ""
        super().__init__(f"{where}listener[{index}].address: cannot listen on {listener.address} "
                         f"({listener.kind}): {self.reason}")


def _bind_reason(error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return "address already in use (another program listens there)"
    if error.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if error.errno == errno.EADDRNOTAVAIL:
        return "not an address of this machine"
    return error.strerror or str(error)


@dataclass
class BoundListener:
    config: ListenerConfig
    server: asyncio.base_events.Server

    @property
    def sockname(self) -> tuple:
        return self.server.sockets[0].getsockname()


class App:
    """One event loop's worth of yuubin. Worker 0 (the primary) alone recovers the spool and runs
    the outbound queue; other workers hand it their relayed mail by flush request."""

    def __init__(self, config: Config, worker: int = 0):
        self.config = config
        self.worker = worker
        self.primary = worker == 0
        self.started = time.time()
        cfg = config
        _check_listeners(cfg)  # an unimplemented kind is an error, never a listener quietly missing
        heap.return_large_blocks()
        self.store = Store(cfg.state_db, server_busy_timeout=cfg.limits.state_db_timeout)
        if self.store.schema_from != SCHEMA_VERSION and self.primary:
            log.info("event=state_migrated path=%s from=%d to=%d", cfg.state_db, self.store.schema_from,
                     SCHEMA_VERSION)
        # data_dir: 0700, or 0750 with the [mail] group, whose reader must pass through to mail/.
        FileAccess(0o600 if cfg.mail.gid == -1 else 0o640, gid=cfg.mail.gid).set_dir(cfg.data_dir)
        mail_access = FileAccess(cfg.mail.mode, cfg.mail.uid, cfg.mail.gid)
        self.directory = Directory(self.store, cfg.local_domains, cfg.postmaster, cfg.mailauth.report_address)
        self.committer = GroupCommitter()
        self.spool = Spool(cfg.spool_dir, self.committer)
        self.editor = SpoolEditor(self.spool, EntryLocks(self.spool.root))
        self.signal = QueueSignal()
        waker: Waker = self.signal if self.primary else RemoteWake(self.spool.root)
        self.holds = AccountHolds(self.store, self.editor)
        maildirs = Maildirs(cfg.mail_dir, cfg.hostname, mail_access)
        self.mailstore = MailStore(maildirs, self.committer)  # IMAP's view of the Maildirs
        self.delivery = LocalDelivery(self.spool, maildirs, self.committer, self.editor, self.holds.is_held, waker,
                                      delivered=self.mailstore.delivered)
        ma = cfg.mailauth
        self.reports = ReportCapture(
            self.store, cfg.local_domains, ma.report_address,
            ReportLimits(ma.report_max_attachment, ma.report_max_xml, ma.report_max_ratio, ma.report_max_records),
            parsers=ma.report_parsers, queue=ma.report_queue)
        self.intake = Intake(cfg.hostname, self.spool, self.delivery, self.holds, self.directory, waker.wake,
                             show_submitter=cfg.submission.received_client_ip, after_stored=[self.reports])
        self.containment = AccountContainment(self.store, self.holds, self.intake.inject, cfg.postmaster,
                                              cfg.hostname)
        self.resolver = Resolver(list(cfg.dns.nameservers), cfg.dns.port, cfg.dns.timeout)
        self.outbound: OutboundScheduler | None = None
        if self.primary:  # remote delivery, retries, DSNs; DKIM-signed as each attempt sends
            signer = _dkim_signer(cfg) if cfg.dkim.sign else None
            self.outbound = build_outbound(cfg, self.spool, self.editor, self.resolver, self.listening,
                                           self.signal, self.intake.inject, self.holds.is_held,
                                           sign=signer.sign_entry if signer is not None else None)
        # What admins did with the CLI, into this log (the primary alone: one line per action).
        self.admin_log = AdminActionLog(self.store) if self.primary else None
        self.guard = AuthGuard(self.store, cfg.auth_guard, self.is_trusted)
        pools = listener_pools(cfg.limits.max_connections, [lc.max_connections for lc in cfg.listeners])
        self.connections = Connections(cfg.limits.connections_per_ip, cfg.limits.max_connections,
                                       workers=cfg.workers,
                                       id_prefix=session_id_prefix(self.started, worker if cfg.workers > 1 else None),
                                       pools={_pool(i): n for i, n in enumerate(pools)},
                                       handshakes_per_ip=cfg.limits.handshakes_per_ip,
                                       max_handshakes=cfg.limits.max_handshakes,
                                       data_in_memory=cfg.limits.data_in_memory, give_back=heap.give_back)
        geo = load_geo(cfg)
        policies = ListenerPolicies(cfg, self.directory, self.store, self.resolver, geo,
                                    self.containment.limit_broken)
        tls_context = server_context(cfg.tls.cert, cfg.tls.key) if cfg.tls.cert and cfg.tls.key else None
        limits = Limits.from_config(cfg.limits)
        self.smtp_listeners: list[tuple[int, SmtpListener]] = []
        self.imap_listeners: list[tuple[int, ImapListener]] = []
        imap_counts = SessionCounts(-(-cfg.imap.sessions_per_account // cfg.workers),
                                    -(-cfg.imap.sessions_per_ip // cfg.workers))
        imap_limits = imap_protocol.Limits(cfg.imap.line_length, cfg.imap.literal_size,
                                           cfg.imap.commands_per_second, cfg.imap.max_errors)
        for index, lc in enumerate(cfg.listeners):
            if lc.kind in IMAP_KINDS:
                shell = ShellSettings(lc.kind, tls_context, lc.kind == "imaps", self.is_trusted, pool=_pool(index),
                                      handshake_timeout=cfg.limits.handshake_timeout)
                self.imap_listeners.append((index, ImapListener(
                    shell, cfg.hostname, imap_limits, cfg.imap.idle_timeout, self.login, self.mailstore, imap_counts,
                    (*EXTENSIONS, f"APPENDLIMIT={cfg.imap.literal_size}"),
                    AccessList(lc.allow_networks, lc.allow_countries, geo))))
                continue
            submission = lc.kind in SUBMISSION_KINDS
            pipeline = policies.pipeline(lc)
            shell = ShellSettings(lc.kind, tls_context, lc.kind == "submissions", self.is_trusted, pool=_pool(index),
                                  handshake_timeout=cfg.limits.handshake_timeout)
            self.smtp_listeners.append((index, SmtpListener(
                shell, cfg.hostname, limits, cfg.limits.idle_timeout, cfg.limits.data_timeout, pipeline, self.intake,
                self.login if submission else None, MECHANISMS if submission else (),
                data_min_rate=cfg.limits.data_min_rate)))
        # What the server did, counted from its own log events, for `yuubin status` and /metrics.
        self.tally = EventTally()
        self.status = ServerStatus(cfg, self.tally, self.connections, self.store, self.spool, self.guard,
                                   self.bound_listeners, self.started)
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self._publisher: asyncio.Task | None = None
        self.listeners: list[BoundListener] = []
        self.stopping = False
        self.stopped = asyncio.Event()

    # ---- what the parts are given ----

    def is_trusted(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self.config.trusted)

    def login(self, client: IPAddress, session: str) -> LoginExchange:
        return LoginExchange(self.guard, client, session)

    def bound_listeners(self) -> list[tuple[str, str]]:
        """(kind, address) of every bound listener, for `status`."""
        out = []
        for bl in self.listeners:
            host, port = bl.sockname[:2]
            out.append((bl.config.kind, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
        return out

    def listening(self) -> list[tuple[str, int]]:
        """Our own listening addresses: an MX host that is one of them is a mail loop."""
        return [(bl.sockname[0], bl.sockname[1]) for bl in self.listeners]

    # ---- life cycle ----

    async def start(self, sockets: dict[int, socket.socket] | None = None) -> None:
        """Listen (on `sockets`, by listener index, when a parent process bound them) and serve.

        Every listener is bound before anything else happens, so an address in use stops the start
        with ListenerBindError and nothing half-run; the spool is recovered before any serves."""
        loop = asyncio.get_running_loop()
        bound: list[tuple[int, asyncio.base_events.Server]] = []
        every: list[tuple[int, SmtpListener | ImapListener]] = [*self.smtp_listeners, *self.imap_listeners]
        for index, listener in sorted(every, key=lambda il: il[0]):
            lc = self.config.listeners[index]
            # Implicit TLS too is accepted plain: the session counts it, then runs the handshake.
            factory = self._session_factory(listener)
            try:
                if sockets is not None:
                    srv = await loop.create_server(factory, sock=sockets[index], backlog=BACKLOG, start_serving=False)
                else:
                    srv = await loop.create_server(factory, lc.host, lc.port, reuse_address=True, backlog=BACKLOG,
                                                   start_serving=False)
            except OSError as e:
                for _index, other in bound:
                    other.close()
                raise ListenerBindError(index, lc, e, self.config.source) from None
            bound.append((index, srv))
        if self.primary:
            recovered = await self.delivery.recover()
            if recovered:
                log.info("event=spool_recovered entries=%d", recovered)
        for index, srv in bound:
            lc = self.config.listeners[index]
            try:
                await srv.start_serving()  # listen(): can still find the address taken
            except OSError as e:
                for _index, other in bound:
                    other.close()
                raise ListenerBindError(index, lc, e, self.config.source) from None
            bl = BoundListener(lc, srv)
            self.listeners.append(bl)
            host, port = bl.sockname[:2]
            log.info("event=listening kind=%s address=%s worker=%d", lc.kind,
                     f"[{host}]:{port}" if ":" in host else f"{host}:{port}", self.worker)
        logging.getLogger("yuubin").addHandler(self.tally)
        await self._start_status()
        if self.outbound is not None:
            self.outbound.start()
        if self.admin_log is not None:
            self.admin_log.start()
        await self.holds.refresh()
        self.holds.start()

    async def _start_status(self) -> None:
        """The primary answers `yuubin status` (and serves /metrics); other workers publish their tallies."""
        run = run_dir(self.config)
        run.mkdir(mode=0o700, exist_ok=True)
        if not self.primary:
            path = run / f"worker-{self.worker}.json"
            self._publisher = asyncio.get_running_loop().create_task(
                publish_worker(path, self.tally, self.connections))
            return
        for old in run.glob("worker-*.json"):  # an earlier start's workers
            old.unlink(missing_ok=True)
        self.control = ControlServer(control_path(self.config), self.status)
        await self.control.start()
        if self.config.metrics is not None:
            self.metrics = MetricsServer(*self.config.metrics, self.status)
            try:
                await self.metrics.start()
            except OSError as e:
                raise ConfigError(f"{self.config.source}: metrics.address: cannot listen on "
                                  f"{self.config.metrics[0]}:{self.config.metrics[1]}: {_bind_reason(e)}") from None

    def _session_factory(self, listener: SmtpListener | ImapListener) -> Callable[[], SMTPSession | IMAPSession]:
        connections = self.connections
        if isinstance(listener, ImapListener):
            imap = listener
            return lambda: IMAPSession(imap, connections)
        smtp = listener
        return lambda: SMTPSession(smtp, connections)

    async def stop(self, cause: str = "requested") -> None:
        if self.stopping:
            return
        self.stopping = True
        grace = self.config.limits.shutdown_grace
        log.info('event=stopping worker=%d cause=%s sessions_open=%d detail="no new connections; idle sessions '
                 'closed now, transactions in flight get up to %gs (limits.shutdown_grace)"', self.worker, cause,
                 len(self.connections.sessions), grace)
        for bl in self.listeners:
            bl.server.close()
        if self._publisher is not None:
            self._publisher.cancel()
        for server in (self.control, self.metrics):
            if server is not None:
                await server.stop()
        cut = await self.connections.stop(grace)
        if self.outbound is not None:
            await self.outbound.stop(grace=grace)
        await self.containment.drain(timeout=grace)
        await self.delivery.drain(timeout=grace)
        await self.reports.drain(timeout=grace)
        if self.admin_log is not None:
            await self.admin_log.stop()
        await self.holds.stop()
        await self.store.flush(timeout=grace)  # failures, lockouts, counters queued while state.db was locked
        self.editor.close()
        self.committer.shutdown()
        self.mailstore.close()
        self.store.close()
        uptime = _duration(time.time() - self.started)
        sessions, messages = self.connections.admitted, self.intake.received
        words = [f"stopped after {uptime}: {sessions} sessions, {messages} messages received"]
        if cut:
            words.append(f"{cut} sessions still busy after the grace time were cut off (what they were "
                         "sending was never acknowledged)")
        left = len(self.spool.ids()) if self.primary else None  # one spool: the primary counts it
        if left:
            words.append(f"{left} messages wait in the spool for the next start")
        elif left == 0:
            words.append("the spool is empty")
        log.info('event=stopped worker=%d uptime=%s sessions=%d messages=%d summary="%s"', self.worker, uptime,
                 sessions, messages, "; ".join(words))
        logging.getLogger("yuubin").removeHandler(self.tally)
        self.stopped.set()


def _pool(index: int) -> str:
    """The name of listener `index`'s pool of connections."""
    return f"listener{index}"


def _serve(config: Config, on_ready: Callable[[App], None] | None = None, worker: int = 0,
           sockets: dict[int, socket.socket] | None = None) -> None:
    """One event loop serving until SIGTERM/SIGINT; uvloop when available (measurably faster).

    Under systemd (Type=notify) the primary says READY=1 once every listener serves, STOPPING=1
    on the signal, and pings the watchdog from this loop: a loop that blocks gets restarted."""
    async def main() -> None:
        app = App(config, worker)
        notifier = ServiceNotifier.from_environ()
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Task] = []  # a reference, so the stop task is not collected

        def on_signal(name: str) -> None:
            if app.primary:
                notifier.stopping()
            stopping.append(loop.create_task(app.stop(name)))

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        await app.start(sockets)
        if app.primary:
            notifier.ready(f"serving {len(config.listeners)} listeners")
            notifier.start_watchdog()
        if on_ready:
            on_ready(app)
        await app.stopped.wait()
        await notifier.stop_watchdog()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def _duration(seconds: float) -> str:
    """`2d3h`, `3h12m`, `4m10s` or `12s`: an uptime as an admin reads it."""
    s = int(seconds)
    d, h, m = s // 86400, s // 3600 % 24, s // 60 % 60
    if d:
        return f"{d}d{h}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s % 60:02d}s" if m else f"{s}s"


def run(config: Config, on_ready: Callable[[App], None] | None = None, allow_root: bool = False) -> int:
    """Run the server; with `[server] workers` > 1, as that many processes sharing the listeners.

    Started as root with `[server] user`, every listener is bound first, then the process becomes
    that user (privilege.py), and only then are the parts built and the workers forked: nothing
    is created as root under data_dir and no client byte is read with root's rights.
    `allow_root` is localserve's: a demo on loopback ports."""
    _check_listeners(config)
    listeners = ", ".join(f"{lc.kind} {lc.address}" for lc in config.listeners)
    log.info('event=starting version=%s config=%s hostname=%s data_dir=%s listeners="%s" workers=%d pid=%d',
             __version__, config.source, config.hostname, config.data_dir, listeners, config.workers, os.getpid())
    dropping = False if allow_root and not config.run_as.user else must_drop(config.run_as)
    check_identity(config.run_as)
    sockets: dict[int, socket.socket] | None = None
    if dropping or config.workers > 1:
        sockets = _bind_all(config)
    if dropping:
        try:
            prepare_data_dir(config.data_dir, config.run_as)
            drop_privileges(config.run_as)
            check_mail_access(config)  # [mail] owner/group: ours to give as this user, not as root
        except BaseException:
            for sock in (sockets or {}).values():
                sock.close()
            raise
    files = [Path(config.source)] if config.source != "<memory>" else []
    warn_open_files([*files, config.state_db])
    if config.workers <= 1:
        _serve(config, on_ready, sockets=sockets)
        return 0
    assert sockets is not None
    return _run_workers(config, sockets)


def _bind_all(config: Config) -> dict[int, socket.socket]:
    """Every listener's socket, bound and listening; ListenerBindError (nothing left open) if one fails."""
    sockets: dict[int, socket.socket] = {}
    for i, lc in enumerate(config.listeners):
        try:
            sockets[i] = _listening_socket(lc)
        except OSError as e:
            for sock in sockets.values():
                sock.close()
            raise ListenerBindError(i, lc, e, config.source) from None
    return sockets


def _listening_socket(lc: ListenerConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in lc.host else socket.AF_INET
    sock = socket.create_server((lc.host, lc.port), family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


def _run_workers(config: Config, sockets: dict[int, socket.socket]) -> int:
    """Bind the listeners once, fork the workers, pass signals on, and stop all if one dies.

    Every worker accepts from the same sockets (the kernel hands each connection to one), so
    parsing and policy use every core; the spool, Maildirs and state.db are shared on disk.
    """
    from yuubin import logs

    logs.shutdown()  # the writer thread does not survive fork: no thread may hold a lock then
    children: dict[int, int] = {}
    stopping = False

    def stop_all(signum: int = signal.SIGTERM, _frame: object = None) -> None:
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
                logs.setup(config.log_level, fmt=config.log_format)
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
    logs.setup(config.log_level, fmt=config.log_format)
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

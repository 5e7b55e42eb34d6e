"""The outbound queue runner: which spool entry goes out when, and the I/O around the retry rule.

State lives only in the spool entry: one RemoteRecipient record per remote recipient
(spool.py). What an attempt's results change is decided by queue/retry.py; this module makes
the attempts, hands the DSNs it asks for to `inject` (the intake path, which stores them), and
writes the new entry through the SpoolEditor (atomic, fsynced, under the entry's locks), always
in that order. So kill -9 at any moment loses nothing: at worst a recipient gets a message
twice, or a sender a DSN twice.

The `yuubin queue` tools run in another process and edit entries under the same locks; this
runner rereads an entry before each attempt and each rewrite, rescans the spool every
`queue_scan`, and reads flush requests (files in spool/requests/) every second.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from yuubin.config import Config, ConfigError, OutboundConfig
from yuubin.delivery.remote import (
    HostUnusable,
    MxRouter,
    Outcome,
    SmtpClient,
    SmtpTarget,
    deferred,
    parse_relayhost,
    self_address_check,
    verify_context,
)
from yuubin.dns import DnsLookup
from yuubin.queue.bounce import DELAYED, FAILED, build_dsn, may_bounce, wants_notice
from yuubin.queue.edit import REMOVE, Edit, Remove, Rewrite, SpoolEditor
from yuubin.queue.retry import Applied, apply_outcomes, next_due
from yuubin.queue.signal import QueueSignal, RunningLock, requests_dir
from yuubin.queue.spool import QUEUED, Envelope, RemoteRecipient, Spool, SpoolCorrupt

log = logging.getLogger("yuubin.outbound")

TICK = 1.0  # how often flush requests and due entries are looked at
RELAY = "[relayhost]"  # the destination key of everything when a relayhost is set

# inject(to_address, dsn_bytes): a DSN (null sender) handed to intake, which routes it and stores it
# durably before returning its queue id; None when the address has no route.
Inject = Callable[[str, bytes], Awaitable[str | None]]

# sign(entry, data): the message as it goes out this attempt (DKIM signatures on top, or as it
# is); made once per attempt, in memory only, never written back to the spool entry.
Sign = Callable[[Envelope, bytes], Awaitable[bytes]]


def rcpt_domain(rcpt: RemoteRecipient) -> str:
    return rcpt.to.rpartition("@")[2].lower()


class OutboundScheduler:
    def __init__(self, spool: Spool, editor: SpoolEditor, cfg: OutboundConfig, hostname: str, router: MxRouter,
                 client: SmtpClient, relay: SmtpTarget | None, signal: QueueSignal, inject: Inject,
                 is_held: Callable[[Envelope], bool], clock: Callable[[], float] = time.time,
                 sign: Sign | None = None):
        self.spool = spool
        self.editor = editor
        self.cfg = cfg
        self.hostname = hostname
        self.router = router
        self.client = client
        self.relay = relay
        self.signal = signal
        self.inject = inject
        self.is_held = is_held  # beyond env.held: e.g. the submitting account is suspended
        self.clock = clock
        self.sign = sign
        self.requests = requests_dir(spool.root)
        self.requests.mkdir(mode=0o700, exist_ok=True)
        self._due: dict[str, float] = {}
        self._flush: set[str] = set()
        self._flush_all = False
        self._busy: set[tuple[str, str]] = set()
        self._per_domain: Counter[str] = Counter()
        self._jobs: set[asyncio.Task] = set()
        self._rescan = True
        self._last_scan = 0.0
        self._task: asyncio.Task | None = None
        self._running: RunningLock | None = None  # held while running: `queue flush` checks it
        self.sent = 0

    # ---- life cycle ----

    def start(self) -> None:
        self._running = RunningLock(self.spool.root)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, grace: float) -> None:
        """Stop dispatching; give attempts in flight `grace` seconds, then cancel them (they retry)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._jobs:
            _done, pending = await asyncio.wait(list(self._jobs), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._running is not None:
            self._running.close()
            self._running = None

    def _peek(self, qid: str) -> Envelope | None:
        """The envelope line only: scans and dispatch decisions need no message bytes."""
        try:
            with open(self.spool.path(qid), "rb") as f:
                return Envelope.decode(f.readline(1 << 20))
        except (FileNotFoundError, SpoolCorrupt, ValueError, TypeError, KeyError):
            return None

    def _held(self, env: Envelope) -> bool:
        return env.held or self.is_held(env)

    def _consider(self, qid: str) -> None:
        env = self._peek(qid)
        if env is None or self._held(env) or env.local:
            self._due.pop(qid, None)
            return
        when = next_due(env)
        if when is not None:
            self._due[qid] = when

    async def _run(self) -> None:
        while True:
            woken = await self.signal.wait(TICK)
            try:
                self._read_requests()
                now = self.clock()
                if woken.rescan or self._rescan or now - self._last_scan >= self.cfg.queue_scan:
                    self._scan()
                    self._last_scan = now
                    self._rescan = False
                else:
                    for qid in woken.ids:
                        self._consider(qid)
                self._dispatch(now)
            except Exception:
                log.exception("event=scheduler_error")

    # ---- finding work ----

    def _read_requests(self) -> None:
        try:
            names = [p.name for p in self.requests.iterdir()]
        except FileNotFoundError:
            return
        for name in names:
            (self.requests / name).unlink(missing_ok=True)
            if not name.startswith("flush-"):
                continue
            target = name.removeprefix("flush-").split(".", 1)[0]
            if target == "all":
                self._flush_all = True
            else:
                self._flush.add(target)
            self._rescan = True
            log.info("event=flush_requested target=%s", target)

    def _scan(self) -> None:
        due: dict[str, float] = {}
        for qid in self.spool.ids():
            env = self._peek(qid)  # None: gone, or torn (set aside by LocalDelivery.recover at start)
            if env is None or self._held(env) or env.local:
                continue  # held: never sent; local part pending: LocalDelivery hands it on
            when = next_due(env)
            if when is not None:
                due[qid] = when
        if self._flush_all:
            self._flush |= set(due)
            self._flush_all = False
        self._flush &= set(due)  # a flush of a held or finished entry is void
        for qid in self._flush:
            due[qid] = 0.0
        self._due = due

    def _dispatch(self, now: float) -> None:
        for qid, when in sorted(self._due.items(), key=lambda x: x[1]):
            if when > now and qid not in self._flush:
                continue
            if len(self._jobs) >= self.cfg.max_concurrency:
                return
            force = qid in self._flush
            env = self._peek(qid)
            if env is None or self._held(env) or env.local:
                self._due.pop(qid, None)
                continue
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(env.remote):
                if r.state == QUEUED and (force or r.next <= now):
                    groups.setdefault(RELAY if self.relay else rcpt_domain(r), []).append(i)
            started_all = True
            for dest, idx in groups.items():
                if (qid, dest) in self._busy:
                    continue
                if len(self._jobs) >= self.cfg.max_concurrency or self._per_domain[dest] >= self.cfg.max_per_domain:
                    started_all = False
                    continue
                self._busy.add((qid, dest))
                self._per_domain[dest] += 1
                task = asyncio.get_running_loop().create_task(self._job(qid, dest, idx))
                self._jobs.add(task)
                task.add_done_callback(self._jobs.discard)
            if started_all:
                self._flush.discard(qid)
                self._due[qid] = float("inf")  # recomputed by the job's result

    # ---- one attempt ----

    async def _job(self, qid: str, dest: str, idx: list[int]) -> None:
        try:
            try:
                env, data = self.spool.load(qid)
            except (FileNotFoundError, SpoolCorrupt):
                return
            if self._held(env):
                log.info("event=outbound_skipped id=%s reason=held", qid)
                return
            todo = [i for i in idx if i < len(env.remote) and env.remote[i].state == QUEUED]
            if not todo:
                return
            if self.sign is not None:  # after the last change to the message: every host of this attempt gets it
                data = await self.sign(env, data)
            outcomes = await self._attempt(env, data, dest, todo)
            await self._record(qid, dict(zip(todo, outcomes, strict=True)))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=outbound_error id=%s dest=%s", qid, dest)
            self._due[qid] = self.clock() + self.cfg.retry_first
        finally:
            self._busy.discard((qid, dest))
            self._per_domain[dest] -= 1
            if self._per_domain[dest] <= 0:
                del self._per_domain[dest]
            self.signal.recheck()

    async def _attempt(self, env: Envelope, data: bytes, dest: str, todo: list[int]) -> list[Outcome]:
        rcpts = [(env.remote[i].to, _rcpt_params(env.remote[i])) for i in todo]
        if self.relay is not None:
            targets = [self.relay]
        else:
            route = await self.router.route(dest)
            if route.error is not None:
                return [route.error] * len(todo)
            targets = [SmtpTarget(host, addr, self.cfg.port, "opportunistic")
                       for host, addrs in route.hosts for addr in addrs]
        last = deferred("4.4.1", f"no host for {dest} could be reached")
        for target in targets:
            try:
                return await self.client.send(target, env.sender, rcpts, data, env.mail_params, env.id)
            except HostUnusable as e:
                last = e.outcome
                log.info('event=outbound_host_failed id=%s host=%s error="%s"', env.id, target.host,
                         e.outcome.diagnostic)
        return [last] * len(todo)

    # ---- recording the result ----

    async def _record(self, qid: str, outcomes: dict[int, Outcome]) -> None:
        """Apply the rule to the entry as it is now (the CLI may have held it meanwhile) and write it."""
        applied: Applied | None = None

        async def change(env: Envelope, data: bytes) -> Edit:
            nonlocal applied
            applied = apply_outcomes(env, outcomes, self.clock(), self.cfg)
            self._log_results(qid, applied)
            await self._notify(applied, data)
            if applied.finished:
                return REMOVE
            if not applied.env.held and self.is_held(applied.env):
                applied.env.held = True  # the account was suspended meanwhile: never undo its hold
            return Rewrite(applied.env)

        edit = await self.editor.edit(qid, change)
        if edit is None or applied is None:
            log.info("event=outbound_entry_gone id=%s reason=\"deleted during the attempt\"", qid)
            self._due.pop(qid, None)
        elif isinstance(edit, Remove):
            self._due.pop(qid, None)
            log.info("event=outbound_done id=%s attempts=%d", qid, applied.env.attempts)
        elif applied.next_due is not None and not applied.env.held:
            self._due[qid] = applied.next_due

    def _log_results(self, qid: str, applied: Applied) -> None:
        for res in applied.results:
            to, o = res.rcpt.to, res.outcome
            if res.verdict == "sent":
                self.sent += 1
                log.info('event=sent id=%s to=<%s> host=%s reply="%s"', qid, to, o.host, o.diagnostic)
            elif res.verdict == "failed":
                log.info('event=failed id=%s to=<%s> host=%s reply="%s"', qid, to, o.host, o.diagnostic)
            elif res.verdict == "expired":
                log.info('event=expired id=%s to=<%s> last="%s"', qid, to, o.diagnostic)
            else:
                log.info('event=deferred id=%s to=<%s> host=%s reply="%s" retry_in=%.0fs', qid, to, o.host,
                         o.diagnostic, res.retry_in)

    async def _notify(self, applied: Applied, data: bytes) -> None:
        """DSNs for newly failed recipients, and the one delay warning; NOTIFY and backscatter per bounce.py."""
        env = applied.env
        if not applied.newly_failed and not applied.delayed:
            return
        ok, why = may_bounce(env)
        for action, rcpts in ((FAILED, applied.newly_failed), (DELAYED, applied.delayed)):
            if not rcpts:
                continue
            wanted = [r for r in rcpts if wants_notice(r, action)]
            if not ok or not wanted:
                if action == FAILED:
                    log.info('event=bounce_suppressed id=%s from=<%s> rcpts=%d reason="%s"', env.id, env.sender,
                             len(rcpts), why or "NOTIFY")
                continue
            until = env.received + self.cfg.queue_lifetime if action == DELAYED else None
            await self._send_dsn(env, data, wanted, action, until)

    async def _send_dsn(self, env: Envelope, data: bytes, rcpts: list[RemoteRecipient], action: str,
                        until: float | None) -> None:
        dsn = build_dsn(env, data, rcpts, action, self.hostname, retry_until=until, now=self.clock())
        qid = await self.inject(env.sender, dsn)
        if qid is None:
            log.info('event=bounce_undeliverable id=%s from=<%s> reason="sender is a local address that '
                     'does not exist"', env.id, env.sender)
            return
        log.info("event=dsn id=%s original=%s action=%s to=<%s> rcpts=%d", qid, env.id, action,
                 env.sender, len(rcpts))


def _rcpt_params(rcpt: RemoteRecipient) -> list[str]:
    """The DSN parameters worth passing on (RFC 3461); everything else stays here."""
    return [f"{k}={v}" for k, v in rcpt.params.items() if k in ("NOTIFY", "ORCPT") and v]


def relay_target(ob: OutboundConfig) -> SmtpTarget | None:
    """The relayhost to hand every message to (its password read from its file), or None to route
    by MX. Raises ConfigError naming the key; `config check` calls it too, so it says what serve will."""
    if not ob.relayhost:
        return None
    try:
        host, port = parse_relayhost(ob.relayhost, 587)
    except ValueError as e:
        raise ConfigError(f"outbound.relayhost: {e}") from None
    password = ""
    if ob.relayhost_password_file:
        try:
            password = Path(ob.relayhost_password_file).read_text(encoding="utf-8").strip("\r\n")
        except OSError as e:
            raise ConfigError(f"outbound.relayhost_password_file: {ob.relayhost_password_file}: "
                              f"cannot read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"outbound.relayhost_password_file: {ob.relayhost_password_file}: "
                              "not UTF-8 text") from None
    mode = ob.relayhost_tls or ("implicit" if port == 465 else "starttls")
    return SmtpTarget(host, host, port, mode, ob.relayhost_username, password)


def relay_context(ob: OutboundConfig) -> ssl.SSLContext:
    """The context that verifies the relayhost (system CAs plus `relayhost_ca_file`)."""
    try:
        return verify_context(ob.relayhost_ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"outbound.relayhost_ca_file: {ob.relayhost_ca_file}: not a readable PEM CA file "
                          f"({getattr(e, 'strerror', None) or getattr(e, 'reason', None) or e})") from None


def build_outbound(cfg: Config, spool: Spool, editor: SpoolEditor, resolver: DnsLookup,
                   listening: Callable[[], list[tuple[str, int]]], signal: QueueSignal, inject: Inject,
                   is_held: Callable[[Envelope], bool], clock: Callable[[], float] = time.time,
                   sign: Sign | None = None) -> OutboundScheduler:
    """The scheduler with its SMTP client and MX router (or relayhost) built from the config.

    `listening()` gives our own listening sockets, so an MX host that is us counts as a loop.
    """
    ob = cfg.outbound
    relay = relay_target(ob)
    client = SmtpClient(cfg.hostname, ob.connect_timeout, ob.command_timeout)
    if relay is not None:
        client = SmtpClient(cfg.hostname, ob.connect_timeout, ob.command_timeout, relay_context(ob))
    router = MxRouter(resolver, cfg.hostname, self_address_check(listening, ob.port))
    return OutboundScheduler(spool, editor, ob, cfg.hostname, router, client, relay, signal, inject, is_held,
                             clock, sign)

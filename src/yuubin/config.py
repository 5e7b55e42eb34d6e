"""TOML configuration → typed, validated settings.

Every error names the key and the file, so `yuubin config check` and start-up can say exactly
what to fix. Unknown keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import os
import pwd
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LISTENER_KINDS = ("mx", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")
SUBMISSION_KINDS = ("submission", "submissions")  # AUTH mandatory; 465 is TLS from the first byte

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A config problem, worded for the admin: `file: key: what is wrong`."""


@dataclass(frozen=True)
class ListenerConfig:
    kind: str
    host: str
    port: int
    allow_networks: tuple[IPNetwork, ...] = ()
    allow_countries: tuple[str, ...] = ()
    max_connections: int = 0  # its own share of limits.max_connections (0: an even share of what is left)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0


@dataclass(frozen=True)
class GreylistConfig:
    """[greylist]: mode "off", "all" (every untrusted mx client) or "s25r" (only S25R suspects)."""

    mode: str = "off"
    delay: float = 300.0
    expire: float = 4 * 3600.0
    ttl: float = 36 * 86400.0


@dataclass(frozen=True)
class S25rConfig:
    """[s25r]: suspects (no or dynamic-looking reverse DNS) get `action`: greylist or reject (450)."""

    enabled: bool = False
    action: str = "greylist"
    allow: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class LimitsConfig:
    """[limits]. The SMTP core's `Limits` is built from this (`Limits.from_config`), defaults included."""

    message_size: int = 26_214_400
    recipients: int = 100
    idle_timeout: float = 300.0
    connections_per_ip: int = 20
    max_connections: int = 1000
    line_length: int = 512
    max_errors: int = 20
    data_timeout: float = 600.0
    shutdown_grace: float = 30.0
    data_min_rate: int = 1024  # bytes/s a DATA/BDAT transfer must average (after an idle_timeout grace)
    data_in_memory: int = 67_108_864  # message bytes held by all sessions while they arrive (2 × message_size + room)
    handshake_timeout: float = 10.0  # a TLS handshake (465's, or STARTTLS) must finish within this
    handshakes_per_ip: int = 5  # TLS handshakes in progress from one address
    max_handshakes: int = 100  # ... and in total
    state_db_timeout: float = 2.0  # how long a command waits for a locked state.db before its 4xx


@dataclass(frozen=True)
class AuthGuardConfig:
    max_failures: int = 5
    window: float = 900.0
    lockout: float = 3600.0
    max_lockout: float = 86400.0  # doubling stops here
    forget_after: float = 604800.0  # a source clean this long starts again at `lockout`
    account_max_failures: int = 20  # failures on one account (from 2+ sources) that start the slow-down
    account_delay: float = 3.0  # seconds added for sources that never logged in to that account
    concurrent_checks: int = 4  # password hashes verified at once (each Argon2id check uses ~64 MiB)


@dataclass(frozen=True)
class SubmissionConfig:
    received_client_ip: bool = False  # show the submitting client's address in Received:


@dataclass(frozen=True)
class MailauthConfig:
    """[mailauth]: what the mx does with SPF/DKIM/DMARC/ARC results (mail from strangers only)."""

    dmarc_reject: str = "reject"  # DMARC fail under p=reject: "reject" (550 5.7.1), "quarantine", "deliver"
    dmarc_quarantine: str = "quarantine"  # under p=quarantine: "quarantine" (Junk folder), "deliver"
    spf_temperror: str = "deliver"  # an SPF DNS error: "deliver" or "defer" (451 at MAIL)
    trusted_arc_sealers: tuple[str, ...] = ()  # their passing ARC chain overrides a DMARC fail
    # DMARC aggregate reports: where they arrive, and the caps parsing them runs into (a report
    # is a stranger's compressed XML).
    report_address: str = "dmarc-reports"  # local part, at each local domain (delivered to postmaster)
    report_max_attachment: int = 10 * 1024 * 1024  # bytes of one report attachment
    report_max_xml: int = 50 * 1024 * 1024  # bytes of XML after decompression
    report_max_ratio: int = 100  # decompressed / compressed
    report_max_records: int = 20_000  # <record> elements in one report
    report_parsers: int = 2  # reports parsed at once, each in a thread
    report_queue: int = 50  # report mail waiting to be parsed; more is only delivered
    check_timeout: float = 20.0  # SPF at MAIL, and DKIM+ARC+DMARC at DATA, each at most this long (then temperror)


@dataclass(frozen=True)
class ImapConfig:
    """[imap]: the limits of the IMAP listeners (the core's `imap.protocol.Limits` and the session's)."""

    line_length: int = 65536  # one command line, octets incl. CRLF
    literal_size: int = 26_214_400  # one literal, i.e. one APPENDed message (APPENDLIMIT)
    commands_per_second: float = 200.0  # one client, sustained; more gets BYE
    max_errors: int = 50  # BAD replies in one session before BYE
    sessions_per_account: int = 20  # clients keep several open per device
    sessions_per_ip: int = 50  # IMAP sessions from one address (on top of limits.connections_per_ip)
    idle_timeout: float = 1800.0  # RFC 9051 5.4: at least 30 minutes (IDLE included)


@dataclass(frozen=True)
class MailConfig:
    """[mail]: who besides yuubin may read the Maildirs (Dovecot, a backup job). Names are
    resolved when the config is loaded, so a typo is an error naming the key."""

    owner: str = ""  # "" = the user yuubin runs as
    group: str = ""  # "" = none (with an owner: the owner's group)
    mode: int = 0o600  # mail files; directories get x wherever r is set
    uid: int = -1  # resolved owner, -1 = no chown
    gid: int = -1  # resolved group, -1 = no chgrp


@dataclass(frozen=True)
class RunAs:
    """[server] user and group: who `serve` becomes when started as root (privilege.py)."""

    user: str = ""  # "" = not configured: serve refuses to run as root
    group: str = ""  # "" = the user's own group
    uid: int = -1
    gid: int = -1


@dataclass(frozen=True)
class OutboundConfig:
    relayhost: str = ""
    relayhost_username: str = ""
    relayhost_password_file: str = ""
    max_per_hour: int = 100
    max_recipients_per_day: int = 500
    # Outbound delivery and the queue: every limit of the scheduler and the client.
    relayhost_ca_file: str = ""  # extra CA bundle to verify the relayhost with (private CA)
    relayhost_tls: str = ""  # "starttls" or "implicit"; "" = implicit on port 465, else starttls
    port: int = 25  # the port of remote MX hosts (tests point it at an unprivileged port)
    retry_first: float = 300.0
    retry_max: float = 3600.0
    queue_lifetime: float = 432_000.0
    delay_warning: float = 14_400.0  # 0 = no delay warnings
    max_concurrency: int = 20
    max_per_domain: int = 4
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    queue_scan: float = 60.0  # full spool rescan (picks up CLI changes); flush requests are seen within 1s


@dataclass(frozen=True)
class DkimConfig:
    """[dkim]: outbound signing and the limits of verification."""

    sign: bool = True  # sign mail from our local domains that leaves through the queue
    selectors: tuple[str, ...] = ()  # key sets to sign with, first found per domain; () = each domain's newest
    max_signatures: int = 5  # DKIM signatures checked per incoming message; the rest are reported unchecked
    arc_max_sets: int = 10  # ARC sets accepted per incoming message (RFC 8617 allows 50)


@dataclass(frozen=True)
class Config:
    hostname: str
    data_dir: Path
    local_domains: tuple[str, ...]
    postmaster: str
    trusted: tuple[IPNetwork, ...]
    dns: DnsConfig
    tls: TlsConfig
    listeners: tuple[ListenerConfig, ...]
    dnsbl_zones: tuple[str, ...]
    geo_source: str
    limits: LimitsConfig
    auth_guard: AuthGuardConfig
    outbound: OutboundConfig
    submission: SubmissionConfig = SubmissionConfig()
    imap: ImapConfig = ImapConfig()
    mail: MailConfig = MailConfig()
    greylist: GreylistConfig = GreylistConfig()
    s25r: S25rConfig = S25rConfig()
    mailauth: MailauthConfig = MailauthConfig()
    dkim: DkimConfig = DkimConfig()
    log_level: str = "info"
    log_format: str = "text"  # or "json"
    metrics: tuple[str, int] | None = None  # [metrics] address: Prometheus /metrics; None = off
    workers: int = 1
    run_as: RunAs = RunAs()  # [server] user and group: who serve becomes when started as root
    public_ips: tuple[str, ...] = ()  # [server] public_ip: the address(es) the world sees us send from
    source: str = "<memory>"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def state_db(self) -> Path:
        return self.data_dir / "state.db"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def parse_duration(value: Any, key: str) -> float:
    """Seconds from `30`, `"30s"`, `"5m"`, `"1h"`, `"2d"`."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like \"5m\", got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(f"{key}: expected a duration like \"5m\", \"30s\" or \"1h\", got {value!r}")
    if seconds <= 0:
        raise ConfigError(f"{key}: must be greater than zero")
    return seconds


def parse_hostport(value: Any, key: str) -> tuple[str, int]:
    """`0.0.0.0:25`, `[::]:25`, `[::1]:2525` → (host, port)."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected \"HOST:PORT\", got {value!r}")
    m = re.fullmatch(r"\[([0-9a-fA-F:.%a-z0-9]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not m:
        raise ConfigError(f"{key}: expected \"HOST:PORT\" or \"[IPV6]:PORT\", got {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port < 65536:  # 0: any free port (tests, benchmarks)
        raise ConfigError(f"{key}: port {port} is out of range 0-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"{key}: {host!r} is not an IP address") from None
    return host, port


def _network(value: Any, key: str) -> IPNetwork:
    """A network as written; host bits are refused, never silently cleared (`10.0.0.7/24` may have
    been meant as one host)."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except (ValueError, TypeError):
        pass
    try:
        wide = ipaddress.ip_network(value, strict=False)
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: {value!r} is not an IP network like \"192.168.1.0/24\"") from None
    host = str(value).partition("/")[0]
    raise ConfigError(f"{key}: {value!r} has host bits set: write \"{wide}\" for the network "
                      f"or \"{host}/{wide.max_prefixlen}\" for the one host")


def _bind_addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a listener on `host` binds (`localhost` binds both loopbacks)."""
    if host == "localhost":
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    return [ipaddress.ip_address(host.split("%")[0])]


def _overlap(a: ListenerConfig, b: ListenerConfig) -> bool:
    """Whether two listeners cannot both be bound: the same port on the same address, or on a
    wildcard (0.0.0.0, ::) and any address of its family. Port 0 always gets a free port."""
    if a.port != b.port or a.port == 0:
        return False
    return any(x.version == y.version and (x == y or x.is_unspecified or y.is_unspecified)
               for x in _bind_addresses(a.host) for y in _bind_addresses(b.host))


class _Table:
    """Reads one TOML table, tracking which keys were used so leftovers can be reported."""

    def __init__(self, data: Any, name: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: expected a table")
        self.data = data
        self.name = name
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.name}.{k}" if self.name else k

    def get(self, k: str, default: Any, kind: type | tuple[type, ...]) -> Any:
        self.used.add(k)
        if k not in self.data:
            return default
        v = self.data[k]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(v, bool) and bool not in kinds:
            raise ConfigError(f"{self.key(k)}: expected {kinds[0].__name__}, got {v!r}")
        if not isinstance(v, kinds):
            raise ConfigError(f"{self.key(k)}: expected {kinds[0].__name__}, got {v!r}")
        return v

    def positive_int(self, k: str, default: int) -> int:
        v = self.get(k, default, int)
        if v <= 0:
            raise ConfigError(f"{self.key(k)}: must be a positive integer, got {v}")
        return v

    def str_list(self, k: str, default: list[str]) -> list[str]:
        v = self.get(k, default, list)
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise ConfigError(f"{self.key(k)}[{i}]: expected a string, got {item!r}")
        return v

    def table(self, k: str) -> _Table:
        return _Table(self.get(k, {}, dict), self.key(k))

    def finish(self) -> None:
        """Refuse keys nobody asked for, suggesting the nearest known one (a typo of a required
        key is reported as the typo, not as the key missing)."""
        extra = sorted(set(self.data) - self.used)
        if extra:
            near = difflib.get_close_matches(extra[0], sorted(self.used), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{self.key(extra[0])}: unknown key{hint}")


def _domain(value: str, key: str) -> str:
    d = value.strip().lower().rstrip(".")
    try:
        ascii_form = d.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_form = ""
    if not _HOSTNAME.match(ascii_form):
        raise ConfigError(f"{key}: {value!r} is not a valid domain name")
    return d


def _outbound_delivery(ob: _Table) -> dict[str, Any]:
    """The [outbound] keys of the delivery scheduler and SMTP client."""
    def dur(k: str, default: str) -> float:
        return parse_duration(ob.get(k, default, (int, float, str)), ob.key(k))

    warn = ob.get("delay_warning", "4h", (int, float, str))
    out: dict[str, Any] = {
        "relayhost_ca_file": ob.get("relayhost_ca_file", "", str),
        "relayhost_tls": ob.get("relayhost_tls", "", str),
        "port": ob.positive_int("port", 25),
        "retry_first": dur("retry_first", "5m"),
        "retry_max": dur("retry_max", "1h"),
        "queue_lifetime": dur("queue_lifetime", "5d"),
        "delay_warning": 0.0 if warn in (0, "0", "off") else parse_duration(warn, ob.key("delay_warning")),
        "max_concurrency": ob.positive_int("max_concurrency", 20),
        "max_per_domain": ob.positive_int("max_per_domain", 4),
        "connect_timeout": dur("connect_timeout", "30s"),
        "command_timeout": dur("command_timeout", "5m"),
        "queue_scan": dur("queue_scan", "1m"),
    }
    if out["relayhost_tls"] not in ("", "starttls", "implicit"):
        raise ConfigError(f"{ob.key('relayhost_tls')}: expected \"starttls\" or \"implicit\", "
                          f"got {out['relayhost_tls']!r}")
    if out["port"] > 65535:
        raise ConfigError(f"{ob.key('port')}: port {out['port']} is out of range 1-65535")
    if out["retry_max"] < out["retry_first"]:
        raise ConfigError(f"{ob.key('retry_max')}: must not be shorter than outbound.retry_first")
    return out


def _mailauth(t: _Table) -> MailauthConfig:
    """[mailauth], each choice checked against its allowed words."""
    d = MailauthConfig()

    def choice(k: str, default: str, allowed: tuple[str, ...]) -> str:
        v = t.get(k, default, str).strip().lower()
        if v not in allowed:
            raise ConfigError(f"{t.key(k)}: expected {' or '.join(repr(a) for a in allowed)}, got {v!r}")
        return v

    cfg = MailauthConfig(
        dmarc_reject=choice("dmarc_reject", "reject", ("reject", "quarantine", "deliver")),
        dmarc_quarantine=choice("dmarc_quarantine", "quarantine", ("quarantine", "deliver")),
        spf_temperror=choice("spf_temperror", "deliver", ("deliver", "defer")),
        trusted_arc_sealers=tuple(_domain(d, f"{t.key('trusted_arc_sealers')}[{i}]")
                                  for i, d in enumerate(t.str_list("trusted_arc_sealers", []))),
        report_address=_report_address(t),
        report_max_attachment=t.positive_int("report_max_attachment", d.report_max_attachment),
        report_max_xml=t.positive_int("report_max_xml", d.report_max_xml),
        report_max_ratio=t.positive_int("report_max_ratio", d.report_max_ratio),
        report_max_records=t.positive_int("report_max_records", d.report_max_records),
        report_parsers=t.positive_int("report_parsers", d.report_parsers),
        report_queue=t.positive_int("report_queue", d.report_queue),
        check_timeout=parse_duration(t.get("check_timeout", "20s", (int, float, str)), t.key("check_timeout")),
    )
    t.finish()
    return cfg


def _report_address(t: _Table) -> str:
    """A local part: the Directory makes it exist at every local domain (no @, + or /)."""
    address = t.get("report_address", "dmarc-reports", str).strip().lower()
    if not re.fullmatch(r"[a-z0-9!#$%&'*=?^_`{|}~-]+(\.[a-z0-9!#$%&'*=?^_`{|}~-]+)*", address):
        raise ConfigError(f"{t.key('report_address')}: expected a local part like \"dmarc-reports\" "
                          f"(no @, + or /: it exists at each local domain), got {address!r}")
    return address


def _mail(t: _Table) -> MailConfig:
    """[mail] owner, group and mode, with the names resolved to ids."""
    owner = t.get("owner", "", str).strip()
    group = t.get("group", "", str).strip()
    mode_text = t.get("mode", "", str).strip()
    shared = bool(group)  # a group named for readers: its default is read access
    uid = gid = -1
    if owner:
        try:
            user = pwd.getpwnam(owner)
        except KeyError:
            raise ConfigError(f"{t.key('owner')}: no user named {owner!r} on this host") from None
        uid = user.pw_uid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"{t.key('group')}: no group named {group!r} on this host") from None
    elif owner:  # the owner's own group, so that it can pass through data_dir to mail/
        gid = user.pw_gid
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            raise ConfigError(f"{t.key('owner')}: the group {gid} of user {owner!r} has no name; "
                              f"set {t.key('group')}") from None
    if not mode_text:
        mode = 0o640 if shared else 0o600
    elif not re.fullmatch(r"0?[0-7]{3}", mode_text):
        raise ConfigError(f"{t.key('mode')}: expected an octal file mode like \"0640\", got {mode_text!r}")
    else:
        mode = int(mode_text, 8)
        if mode & 0o600 != 0o600:
            raise ConfigError(f"{t.key('mode')}: the owner must be able to read and write (0600), got {mode_text!r}")
        if mode & 0o007:
            raise ConfigError(f"{t.key('mode')}: other users must get no access (give a reader "
                              f"{t.key('group')} instead), got {mode_text!r}")
        if mode & 0o070 and gid == -1:
            raise ConfigError(f"{t.key('mode')}: {mode_text!r} gives the group access, but {t.key('group')} "
                              "is not set")
    return MailConfig(owner, group, mode, uid, gid)


def _run_as(t: _Table) -> RunAs:
    """[server] user and group, resolved to ids (a typo is an error naming the key)."""
    user = t.get("user", "", str).strip()
    group = t.get("group", "", str).strip()
    if not user:
        if group:
            raise ConfigError(f"{t.key('group')}: set {t.key('user')} too (the group alone changes nothing)")
        return RunAs()
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"{t.key('user')}: no user named {user!r} on this host (create it: "
                          f"useradd --system --home-dir /var/lib/yuubin --shell /usr/sbin/nologin {user})") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"{t.key('group')}: no group named {group!r} on this host") from None
    else:
        try:
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(gid)
    return RunAs(user, group, pw.pw_uid, gid)


def load(path: str | Path) -> Config:
    """Load and validate a config file; raises ConfigError naming file and key."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    try:
        return from_dict(raw, source=str(p), base=p.parent)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def from_dict(raw: dict[str, Any], source: str = "<memory>", base: Path | None = None) -> Config:
    """Build a Config from parsed TOML; relative paths are resolved against `base`."""
    base = base or Path.cwd()
    top = _Table(raw, "")

    hostname_raw = top.get("hostname", None, str)  # required: checked after the unknown keys

    data_dir = Path(top.get("data_dir", "/var/lib/yuubin", str))
    if not data_dir.is_absolute():
        data_dir = (base / data_dir).resolve()

    domains = top.table("domains")
    local = [_domain(d, f"domains.local[{i}]") for i, d in enumerate(domains.str_list("local", []))]
    postmaster_raw = domains.get("postmaster", None, str)
    domains.finish()
    if not local:
        raise ConfigError("domains.local: required: at least one domain to receive mail for")
    postmaster = (f"postmaster@{local[0]}" if postmaster_raw is None else postmaster_raw).strip().lower()
    if "@" not in postmaster:
        raise ConfigError(f"domains.postmaster: {postmaster!r} is not an address")

    network = top.table("network")
    trusted_raw = network.get("trusted", ["127.0.0.0/8", "::1/128"], list)
    trusted = tuple(_network(n, f"network.trusted[{i}]") for i, n in enumerate(trusted_raw))
    network.finish()

    dns_t = top.table("dns")
    nameservers = dns_t.str_list("nameservers", [])
    for i, ns in enumerate(nameservers):
        try:
            ipaddress.ip_address(ns)
        except ValueError:
            raise ConfigError(f"dns.nameservers[{i}]: {ns!r} is not an IP address") from None
    dns_port = dns_t.positive_int("port", 53)
    dns_timeout = parse_duration(dns_t.get("timeout", 5.0, (int, float, str)), "dns.timeout")
    dns_t.finish()

    tls_t = top.table("tls")
    cert = tls_t.get("cert", None, str)
    key = tls_t.get("key", None, str)
    tls_t.finish()
    if (cert is None) != (key is None):
        raise ConfigError("tls: set both cert and key, or neither")

    def _path(v: str | None) -> Path | None:
        if v is None:
            return None
        q = Path(v)
        return q if q.is_absolute() else (base / q).resolve()

    listeners = []
    raw_listeners = top.get("listener", [], list)
    for i, item in enumerate(raw_listeners):
        lt = _Table(item, f"listener[{i}]")
        kind = lt.get("kind", None, str)
        address = lt.get("address", None, str)
        allow = lt.str_list("allow", [])
        max_conn = lt.positive_int("max_connections", 1) if "max_connections" in item else 0
        lt.finish()
        if kind is None:
            raise ConfigError(f"listener[{i}].kind: required: one of {', '.join(LISTENER_KINDS)}")
        if kind not in LISTENER_KINDS:
            raise ConfigError(f"listener[{i}].kind: expected one of {', '.join(LISTENER_KINDS)}, got {kind!r}")
        if address is None:
            raise ConfigError(f"listener[{i}].address: required, e.g. \"0.0.0.0:25\"")
        host, port = parse_hostport(address, f"listener[{i}].address")
        nets, countries = [], []
        for j, a in enumerate(allow):
            if re.fullmatch(r"[A-Za-z]{2}", a):
                countries.append(a.upper())
            else:
                nets.append(_network(a, f"listener[{i}].allow[{j}]"))
        if kind == "mx" and (nets or countries):
            raise ConfigError(f"listener[{i}].allow: not for kind \"mx\" (an MX must be reachable by all)")
        listeners.append(ListenerConfig(kind, host, port, tuple(nets), tuple(countries), max_conn))
    for i, lc in enumerate(listeners):
        for j, other in enumerate(listeners[:i]):
            if (lc.host, lc.port) == (other.host, other.port) and lc.port:
                raise ConfigError(f"listener[{i}].address: {lc.address} is used twice (also listener[{j}])")
            if _overlap(lc, other):
                wide = [x for x in (other, lc) if x.host in ("0.0.0.0", "::")]
                why = (f"{wide[0].address} takes port {lc.port} on every IPv{'6' if ':' in wide[0].host else '4'} "
                       "address" if wide else f"both bind port {lc.port} on the same address")
                raise ConfigError(f"listener[{i}].address: {lc.address} overlaps listener[{j}] {other.address} "
                                  f"({why}): only one of them can listen")

    dnsbl = top.table("dnsbl")
    zones = [_domain(z, f"dnsbl.zones[{i}]") for i, z in
             enumerate(dnsbl.str_list("zones", ["zen.spamhaus.org", "bl.spamcop.net"]))]
    dnsbl.finish()

    geo = top.table("geo")
    geo_source = geo.get("source", "", str)
    geo.finish()
    if geo_source and not Path(geo_source).is_absolute():
        geo_source = str((base / geo_source).resolve())
    with_country = [(i, lc) for i, lc in enumerate(listeners) if lc.allow_countries]
    if with_country and not geo_source:
        i, lc = with_country[0]
        raise ConfigError(f"listener[{i}].allow: country {lc.allow_countries[0]} needs geo.source "
                          "(an RIR delegated-stats file or a .mmdb country database)")

    mailauth = _mailauth(top.table("mailauth"))

    sub_t = top.table("submission")
    submission = SubmissionConfig(received_client_ip=sub_t.get("received_client_ip", False, bool))
    sub_t.finish()

    lim = top.table("limits")
    defaults = LimitsConfig()
    limits = LimitsConfig(
        message_size=lim.positive_int("message_size", defaults.message_size),
        recipients=lim.positive_int("recipients", defaults.recipients),
        idle_timeout=parse_duration(lim.get("idle_timeout", "5m", (int, float, str)), "limits.idle_timeout"),
        connections_per_ip=lim.positive_int("connections_per_ip", defaults.connections_per_ip),
        max_connections=lim.positive_int("max_connections", defaults.max_connections),
        line_length=lim.positive_int("line_length", defaults.line_length),
        max_errors=lim.positive_int("max_errors", defaults.max_errors),
        data_timeout=parse_duration(lim.get("data_timeout", "10m", (int, float, str)), "limits.data_timeout"),
        shutdown_grace=parse_duration(lim.get("shutdown_grace", "30s", (int, float, str)),
                                      "limits.shutdown_grace"),
        data_min_rate=lim.positive_int("data_min_rate", defaults.data_min_rate),
        data_in_memory=lim.positive_int("data_in_memory", defaults.data_in_memory),
        handshake_timeout=parse_duration(lim.get("handshake_timeout", "10s", (int, float, str)),
                                         "limits.handshake_timeout"),
        handshakes_per_ip=lim.positive_int("handshakes_per_ip", defaults.handshakes_per_ip),
        max_handshakes=lim.positive_int("max_handshakes", defaults.max_handshakes),
        state_db_timeout=parse_duration(lim.get("state_db_timeout", "2s", (int, float, str)),
                                        "limits.state_db_timeout"),
    )
    lim.finish()
    explicit = sum(lc.max_connections for lc in listeners)
    if explicit > limits.max_connections:
        raise ConfigError(f"listener[].max_connections: together {explicit}, more than limits.max_connections "
                          f"({limits.max_connections}), the total they share")
    if limits.line_length < 512:
        raise ConfigError("limits.line_length: RFC 5321 requires at least 512 octets")

    ag = top.table("auth_guard")
    auth_guard = AuthGuardConfig(
        max_failures=ag.positive_int("max_failures", 5),
        window=parse_duration(ag.get("window", "15m", (int, float, str)), "auth_guard.window"),
        lockout=parse_duration(ag.get("lockout", "1h", (int, float, str)), "auth_guard.lockout"),
        max_lockout=parse_duration(ag.get("max_lockout", "1d", (int, float, str)), "auth_guard.max_lockout"),
        forget_after=parse_duration(ag.get("forget_after", "7d", (int, float, str)), "auth_guard.forget_after"),
        account_max_failures=ag.positive_int("account_max_failures", 20),
        account_delay=parse_duration(ag.get("account_delay", "3s", (int, float, str)), "auth_guard.account_delay"),
        concurrent_checks=ag.positive_int("concurrent_checks", 4),
    )
    if auth_guard.max_lockout < auth_guard.lockout:
        raise ConfigError("auth_guard.max_lockout: must not be shorter than auth_guard.lockout")
    ag.finish()

    imap_t = top.table("imap")
    idefaults = ImapConfig()
    imap = ImapConfig(
        line_length=imap_t.positive_int("line_length", idefaults.line_length),
        literal_size=imap_t.positive_int("literal_size", idefaults.literal_size),
        commands_per_second=float(imap_t.positive_int("commands_per_second", int(idefaults.commands_per_second))),
        max_errors=imap_t.positive_int("max_errors", idefaults.max_errors),
        sessions_per_account=imap_t.positive_int("sessions_per_account", idefaults.sessions_per_account),
        sessions_per_ip=imap_t.positive_int("sessions_per_ip", idefaults.sessions_per_ip),
        idle_timeout=parse_duration(imap_t.get("idle_timeout", "30m", (int, float, str)), "imap.idle_timeout"),
    )
    imap_t.finish()
    if imap.line_length < 8192:
        raise ConfigError("imap.line_length: RFC 7162 asks for at least 8192 octets")
    if imap.idle_timeout < 1800:
        raise ConfigError("imap.idle_timeout: RFC 9051 requires at least 30 minutes")

    mail_t = top.table("mail")
    mail = _mail(mail_t)
    mail_t.finish()

    def _file(v: str) -> str:  # relative to the config file, as for serve whatever its working directory
        return str(_path(v)) if v else ""

    ob = top.table("outbound")
    delivery = _outbound_delivery(ob)
    delivery["relayhost_ca_file"] = _file(delivery["relayhost_ca_file"])
    outbound = OutboundConfig(
        relayhost=ob.get("relayhost", "", str),
        relayhost_username=ob.get("relayhost_username", "", str),
        relayhost_password_file=_file(ob.get("relayhost_password_file", "", str)),
        max_per_hour=ob.positive_int("max_per_hour", 100),
        max_recipients_per_day=ob.positive_int("max_recipients_per_day", 500),
        **delivery,
    )
    ob.finish()

    srv = top.table("server")
    workers = srv.positive_int("workers", 1)
    if workers > 64:
        raise ConfigError(f"server.workers: at most 64, got {workers}")
    run_as = _run_as(srv)
    public_raw = srv.get("public_ip", [], (str, list))
    public_ips = []
    for i, ip in enumerate([public_raw] if isinstance(public_raw, str) else public_raw):
        where = "server.public_ip" if isinstance(public_raw, str) else f"server.public_ip[{i}]"
        try:
            public_ips.append(str(ipaddress.ip_address(str(ip).strip())))
        except ValueError:
            raise ConfigError(f"{where}: {ip!r} is not an IP address") from None
    srv.finish()

    dk = top.table("dkim")
    selectors = dk.str_list("selectors", [])
    for i, sel in enumerate(selectors):
        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,40}[a-z0-9])?", sel):
            raise ConfigError(f"dkim.selectors[{i}]: {sel!r} is not a key set name (see yuubin dkim list)")
    dkim = DkimConfig(sign=dk.get("sign", True, bool), selectors=tuple(selectors),
                      max_signatures=dk.positive_int("max_signatures", 5),
                      arc_max_sets=dk.positive_int("arc_max_sets", 10))
    dk.finish()
    if dkim.arc_max_sets > 50:
        raise ConfigError(f"dkim.arc_max_sets: at most 50 (RFC 8617), got {dkim.arc_max_sets}")

    log = top.table("log")
    log_level = log.get("level", "info", str).lower()
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log.level: expected debug, info, warning or error, got {log_level!r}")
    log_format = log.get("format", "text", str).lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"log.format: expected text or json, got {log_format!r}")
    log.finish()

    gl = top.table("greylist")
    enabled = gl.get("enabled", False, (bool, str))
    mode = {False: "off", True: "all"}.get(enabled, enabled) if isinstance(enabled, bool) else enabled.lower()
    if mode not in ("off", "all", "s25r"):
        raise ConfigError(f'greylist.enabled: expected false, true, "all" or "s25r", got {enabled!r}')
    greylist = GreylistConfig(
        mode,
        parse_duration(gl.get("delay", "5m", (int, float, str)), "greylist.delay"),
        parse_duration(gl.get("expire", "4h", (int, float, str)), "greylist.expire"),
        parse_duration(gl.get("ttl", "36d", (int, float, str)), "greylist.ttl"),
    )
    if not greylist.delay < greylist.expire <= greylist.ttl:
        raise ConfigError("greylist: expected delay < expire <= ttl")
    gl.finish()
    sr = top.table("s25r")
    s25r_allow = sr.get("allow", [], list)
    for i, a in enumerate(s25r_allow):
        if not isinstance(a, str) or not a.strip():
            raise ConfigError(f"s25r.allow[{i}]: expected a host name, .domain or CIDR, got {a!r}")
    s25r = S25rConfig(sr.get("enabled", False, bool), sr.get("action", "greylist", str).lower(),
                      tuple(a.strip() for a in s25r_allow))
    if s25r.action not in ("greylist", "reject"):
        raise ConfigError(f'[s25r] action: expected "greylist" or "reject" (450, never 5xx), got {s25r.action!r}')
    sr.finish()
    if greylist.mode == "s25r" and not s25r.enabled:
        raise ConfigError('greylist.enabled = "s25r" needs [s25r] enabled = true (it greylists S25R suspects)')

    met = top.table("metrics")
    metrics_address = met.get("address", "", str).strip()
    metrics = parse_hostport(metrics_address, "metrics.address") if metrics_address else None
    met.finish()

    top.finish()
    if hostname_raw is None:
        raise ConfigError("hostname: required (the name in the banner and Received: headers)")
    hostname = _domain(hostname_raw, "hostname")

    tls = TlsConfig(_path(cert), _path(key))
    needs_tls = [lc for lc in listeners if lc.kind in ("submissions", "imaps", "pop3s", "submission", "imap", "pop3")]
    if needs_tls and tls.cert is None:
        raise ConfigError(f"tls.cert: required for listener kind \"{needs_tls[0].kind}\"")

    return Config(
        hostname=hostname,
        data_dir=data_dir,
        local_domains=tuple(local),
        postmaster=postmaster,
        trusted=trusted,
        dns=DnsConfig(tuple(nameservers), dns_port, dns_timeout),
        tls=tls,
        listeners=tuple(listeners),
        dnsbl_zones=tuple(zones),
        geo_source=geo_source,
        limits=limits,
        auth_guard=auth_guard,
        outbound=outbound,
        submission=submission,
        imap=imap,
        mail=mail,
        greylist=greylist,
        s25r=s25r,
        mailauth=mailauth,
        dkim=dkim,
        log_level=log_level,
        log_format=log_format,
        metrics=metrics,
        workers=workers,
        run_as=run_as,
        public_ips=tuple(public_ips),
        source=source,
    )


def _hostport_text(hp: tuple[str, int]) -> str:
    return f"[{hp[0]}]:{hp[1]}" if ":" in hp[0] else f"{hp[0]}:{hp[1]}"


def check_tls_files(cfg: Config) -> None:
    """Load the certificate and key once, so a bad path fails at `config check` and start-up
    with the key's name instead of later in a TLS handshake."""
    import ssl

    if cfg.tls.cert is None:
        return
    for key, path in (("tls.cert", cfg.tls.cert), ("tls.key", cfg.tls.key)):
        if path is None or not path.is_file():
            raise ConfigError(f"{key}: {path}: no such file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    except PermissionError as e:
        raise ConfigError(f"tls.cert: {e.filename or cfg.tls.cert}: permission denied") from None
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"tls.cert: {cfg.tls.cert} / tls.key: {cfg.tls.key}: not a matching PEM "
                          f"certificate and key ({getattr(e, 'reason', None) or e})") from None


def check_mail_access(cfg: Config) -> None:
    """Raise ConfigError when this process could not give mail files the [mail] owner or group:
    giving a file away needs root, setting its group needs root or membership of the group."""
    euid = os.geteuid()
    if euid == 0:
        return
    try:
        me = pwd.getpwuid(euid).pw_name
    except KeyError:
        me = f"uid {euid}"
    if cfg.mail.uid not in (-1, euid):
        raise ConfigError(f"mail.owner: giving mail files to {cfg.mail.owner!r} needs root "
                          f"(yuubin runs as {me})")
    if cfg.mail.gid not in (-1, os.getegid(), *os.getgroups()):
        raise ConfigError(f"mail.group: yuubin runs as {me}, who is not in group {cfg.mail.group!r} "
                          "(add the user to it, or run yuubin as root)")


def describe(cfg: Config) -> str:
    """The effective settings as TOML-like text, for `yuubin config check`."""
    def q(v: Any) -> str:
        if isinstance(v, str | Path):
            return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(q(x) for x in v) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v)

    lines = [
        f"hostname = {q(cfg.hostname)}",
        f"data_dir = {q(cfg.data_dir)}",
        "",
        "[domains]",
        f"local = {q(cfg.local_domains)}",
        f"postmaster = {q(cfg.postmaster)}",
        "",
        "[network]",
        f"trusted = {q([str(n) for n in cfg.trusted])}",
        "",
        "[dns]",
        f"nameservers = {q(cfg.dns.nameservers)}",
        f"port = {cfg.dns.port}",
        f"timeout = {cfg.dns.timeout}",
        "",
        "[tls]",
        f"cert = {q(cfg.tls.cert or '')}",
        f"key = {q(cfg.tls.key or '')}",
    ]
    for lc in cfg.listeners:
        lines += ["", "[[listener]]", f"kind = {q(lc.kind)}", f"address = {q(lc.address)}"]
        allow = [str(n) for n in lc.allow_networks] + list(lc.allow_countries)
        if allow:
            lines.append(f"allow = {q(allow)}")
        if lc.max_connections:
            lines.append(f"max_connections = {lc.max_connections}")
    lim = cfg.limits
    lines += [
        "",
        "[dnsbl]",
        f"zones = {q(cfg.dnsbl_zones)}",
        "",
        "[geo]",
        f"source = {q(cfg.geo_source)}",
        "",
        "[limits]",
        f"message_size = {lim.message_size}",
        f"recipients = {lim.recipients}",
        f"idle_timeout = {q(f'{lim.idle_timeout:g}s')}",
        f"connections_per_ip = {lim.connections_per_ip}",
        f"max_connections = {lim.max_connections}",
        f"line_length = {lim.line_length}",
        f"max_errors = {lim.max_errors}",
        f"data_timeout = {q(f'{lim.data_timeout:g}s')}",
        f"shutdown_grace = {q(f'{lim.shutdown_grace:g}s')}",
        f"data_min_rate = {lim.data_min_rate}",
        f"data_in_memory = {lim.data_in_memory}",
        f"handshake_timeout = {q(f'{lim.handshake_timeout:g}s')}",
        f"handshakes_per_ip = {lim.handshakes_per_ip}",
        f"max_handshakes = {lim.max_handshakes}",
        f"state_db_timeout = {q(f'{lim.state_db_timeout:g}s')}",
        "",
        "[auth_guard]",
        f"max_failures = {cfg.auth_guard.max_failures}",
        f"window = {q(f'{cfg.auth_guard.window:g}s')}",
        f"lockout = {q(f'{cfg.auth_guard.lockout:g}s')}",
        f"max_lockout = {q(f'{cfg.auth_guard.max_lockout:g}s')}",
        f"forget_after = {q(f'{cfg.auth_guard.forget_after:g}s')}",
        f"account_max_failures = {cfg.auth_guard.account_max_failures}",
        f"account_delay = {q(f'{cfg.auth_guard.account_delay:g}s')}",
        f"concurrent_checks = {cfg.auth_guard.concurrent_checks}",
        "",
        "[submission]",
        f"received_client_ip = {q(cfg.submission.received_client_ip)}",
        "",
        "[mailauth]",
        f"dmarc_reject = {q(cfg.mailauth.dmarc_reject)}",
        f"dmarc_quarantine = {q(cfg.mailauth.dmarc_quarantine)}",
        f"spf_temperror = {q(cfg.mailauth.spf_temperror)}",
        f"trusted_arc_sealers = {q(cfg.mailauth.trusted_arc_sealers)}",
        f"report_address = {q(cfg.mailauth.report_address)}",
        f"report_max_attachment = {cfg.mailauth.report_max_attachment}",
        f"report_max_xml = {cfg.mailauth.report_max_xml}",
        f"report_max_ratio = {cfg.mailauth.report_max_ratio}",
        f"report_max_records = {cfg.mailauth.report_max_records}",
        f"report_parsers = {cfg.mailauth.report_parsers}",
        f"report_queue = {cfg.mailauth.report_queue}",
        f"check_timeout = {q(f'{cfg.mailauth.check_timeout:g}s')}",
        "",
        "[imap]",
        f"line_length = {cfg.imap.line_length}",
        f"literal_size = {cfg.imap.literal_size}",
        f"commands_per_second = {cfg.imap.commands_per_second:g}",
        f"max_errors = {cfg.imap.max_errors}",
        f"sessions_per_account = {cfg.imap.sessions_per_account}",
        f"sessions_per_ip = {cfg.imap.sessions_per_ip}",
        f"idle_timeout = {q(f'{cfg.imap.idle_timeout:g}s')}",
        "",
        "[mail]",
        f"owner = {q(cfg.mail.owner)}",
        f"group = {q(cfg.mail.group)}",
        f"mode = {q(f'{cfg.mail.mode:04o}')}",
        "",
        "[outbound]",
        f"relayhost = {q(cfg.outbound.relayhost)}",
        f"relayhost_username = {q(cfg.outbound.relayhost_username)}",
        f"relayhost_password_file = {q(cfg.outbound.relayhost_password_file)}",
        f"max_per_hour = {cfg.outbound.max_per_hour}",
        f"max_recipients_per_day = {cfg.outbound.max_recipients_per_day}",
        f"relayhost_ca_file = {q(cfg.outbound.relayhost_ca_file)}",
        f"relayhost_tls = {q(cfg.outbound.relayhost_tls)}",
        f"port = {cfg.outbound.port}",
        f"retry_first = {q(f'{cfg.outbound.retry_first:g}s')}",
        f"retry_max = {q(f'{cfg.outbound.retry_max:g}s')}",
        f"queue_lifetime = {q(f'{cfg.outbound.queue_lifetime:g}s')}",
        f"delay_warning = {q(f'{cfg.outbound.delay_warning:g}s' if cfg.outbound.delay_warning else 'off')}",
        f"max_concurrency = {cfg.outbound.max_concurrency}",
        f"max_per_domain = {cfg.outbound.max_per_domain}",
        f"connect_timeout = {q(f'{cfg.outbound.connect_timeout:g}s')}",
        f"command_timeout = {q(f'{cfg.outbound.command_timeout:g}s')}",
        f"queue_scan = {q(f'{cfg.outbound.queue_scan:g}s')}",
        "",
        "",
        "[server]",
        f"workers = {cfg.workers}",
        f"user = {q(cfg.run_as.user)}",
        f"group = {q(cfg.run_as.group)}",
        f"public_ip = {q(cfg.public_ips)}",
        "",
        "[dkim]",
        f"sign = {q(cfg.dkim.sign)}",
        f"selectors = {q(cfg.dkim.selectors)}",
        f"max_signatures = {cfg.dkim.max_signatures}",
        f"arc_max_sets = {cfg.dkim.arc_max_sets}",
        "",
        "[log]",
        f"level = {q(cfg.log_level)}",
        f"format = {q(cfg.log_format)}",
        "",
        "[greylist]",
        f"enabled = {q(cfg.greylist.mode) if cfg.greylist.mode != 'off' else 'false'}",
        f"delay = {q(f'{cfg.greylist.delay:.10g}s')}",
        f"expire = {q(f'{cfg.greylist.expire:.10g}s')}",
        f"ttl = {q(f'{cfg.greylist.ttl:.10g}s')}",
        "",
        "[s25r]",
        f"enabled = {'true' if cfg.s25r.enabled else 'false'}",
        f"action = {q(cfg.s25r.action)}",
        f"allow = {q(list(cfg.s25r.allow))}",
        "",
        "[metrics]",
        f"address = {q(_hostport_text(cfg.metrics) if cfg.metrics else '')}",
    ]
    return "\n".join(lines) + "\n"

"""`yuubin init`: from nothing to a server that can receive mail, on a fresh box.

Writes the commented config (the example's keys, this domain's values), data_dir with its owner
and modes, a self-signed certificate until a real one is configured, the postmaster account,
the domain's first DKIM key set,
and with --systemd the service unit; then prints the DNS records to publish and what is left.
Re-running never overwrites a config, a key or an account: each step says it kept what it found.

Ownership: started as root, init creates the `--user` (default yuubin, a system user with no
login) if it does not exist, gives it data_dir, and lets it read the config and the TLS key
(root:USER 0640); everything else stays root's. Started as another user, everything is that
user's and no `[server] user` is written.
"""

from __future__ import annotations

import argparse
import grp
import ipaddress
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from yuubin.cli.common import CliError, SubParsers, read_password
from yuubin.config import _domain

DEFAULT_CONFIG_DIR = Path("/etc/yuubin")
DEFAULT_DATA_DIR = Path("/var/lib/yuubin")
SYSTEMD_UNIT_PATH = Path("/etc/systemd/system/yuubin.service")

# The config `init` writes: yuubin.example.toml's keys (tests/test_init.py checks none is missing)
# with this installation's values; what needs the admin's knowledge is commented out.
CONFIG_TEMPLATE = """\
# yuubin configuration, written by `yuubin init` for {domain}.
# Every key is here with its value; yuubin.example.toml in the source explains the same keys.
# Check after editing: yuubin -c {config} config check

hostname = "{hostname}"              # the name in the banner, EHLO reply, Received: headers
data_dir = "{data_dir}"   # spool/, mail/, state.db live here (owned by the [server] user)

[domains]
local = ["{domain}"]                  # mail for these is delivered here; everything else is relay
postmaster = "postmaster@{domain}"    # where postmaster@ every local domain goes

[network]
trusted = ["127.0.0.0/8", "::1/128"]  # may relay through port 25 without AUTH; add your LAN, e.g. "192.168.1.0/24"

[dns]
nameservers = []                      # empty: the system resolver; else e.g. ["127.0.0.1"] (a local unbound)
port = 53
timeout = 5.0                         # seconds for one lookup

[tls]
# Self-signed by `yuubin init`: senders still encrypt, mail clients warn. Replace with a real
# certificate (e.g. certbot: /etc/letsencrypt/live/{hostname}/fullchain.pem and privkey.pem),
# readable by the [server] user.
cert = "{cert}"
key = "{key}"

[[listener]]
kind = "mx"                           # port 25: mail from the internet; relay only for [network].trusted
address = "0.0.0.0:25"

[[listener]]
kind = "submission"                   # port 587: STARTTLS, then AUTH required (your mail clients)
address = "0.0.0.0:587"
# allow = ["JP", "192.168.1.0/24"]    # optional: countries (needs [geo] source) and/or networks

[[listener]]
kind = "submissions"                  # port 465: implicit TLS, AUTH required
address = "0.0.0.0:465"
max_connections = 100                 # its own pool out of limits.max_connections: a flood on 25 never locks out 465

[[listener]]
kind = "imaps"                        # port 993: IMAP over TLS, for your mail clients to read mail
address = "0.0.0.0:993"
# POP3 listeners ("pop3s", "pop3") come with the release that serves them.

[dnsbl]
zones = ["zen.spamhaus.org", "bl.spamcop.net"]   # applied on mx listeners only

[geo]
source = "{data_dir}/delegated-apnic-latest"   # RIR delegated-stats file or .mmdb, for `allow` countries

[limits]
message_size = 26214400               # bytes, advertised with SIZE
recipients = 100                      # per message
idle_timeout = "5m"                   # each whole command line must arrive within this (not reset per byte), else 421
connections_per_ip = 20               # more from one address get 421
max_connections = 1000                # in total, all listeners (each its own pool: [[listener]] max_connections)
line_length = 512                     # command line, octets incl. CRLF (RFC 5321 minimum: 512) -> 500 5.5.2
max_errors = 20                       # errors in one session before 421
data_timeout = "10m"                  # silence inside DATA/BDAT
shutdown_grace = "30s"                # on SIGTERM: how long transactions in flight may take to finish
data_min_rate = 1024                  # bytes/s a DATA/BDAT transfer must average after an idle_timeout grace, else 421
data_in_memory = 67108864             # message bytes all sessions may hold while receiving; beyond it the session
                                      # holding the most is closed with 421 4.3.0 (RAM stays bounded)
handshake_timeout = "10s"             # a TLS handshake (465's at connect, or STARTTLS) must finish within this
handshakes_per_ip = 5                 # TLS handshakes in progress from one address (more are closed at once)
max_handshakes = 100                  # ... and in total
state_db_timeout = "2s"               # a command waits this long for a locked state.db, then gets a 4xx

[auth_guard]
max_failures = 5                      # per source IP within `window`, then lockout
window = "15m"
lockout = "1h"                        # grows for repeat offenders
max_lockout = "1d"                    # ... doubling up to this
forget_after = "7d"                   # a source clean this long starts again at `lockout`
account_max_failures = 20             # failures on one account from 2+ sources within `window` ...
account_delay = "3s"                  # ... slow tries from sources that never logged in to it
concurrent_checks = 4                 # Argon2id checks at once

[submission]
received_client_ip = false            # true: put the submitting client's IP and EHLO name in Received:

[mailauth]                            # SPF, DKIM, DMARC and ARC on mx listeners (not for trusted networks or logins)
dmarc_reject = "reject"               # DMARC fail under p=reject: "reject" (550 5.7.1), "quarantine", "deliver"
dmarc_quarantine = "quarantine"       # DMARC fail under p=quarantine: "quarantine" (the Junk folder) or "deliver"
spf_temperror = "deliver"             # SPF could not be checked (DNS error): "deliver" or "defer" (451, sender retries)
trusted_arc_sealers = []              # lists whose passing ARC chain overrides a DMARC fail, e.g. ["lists.example.org"]
report_address = "dmarc-reports"      # DMARC aggregate reports arrive at this local part of each local domain
                                      # (publish rua=mailto:dmarc-reports@{domain}); delivered to postmaster
                                      # unless an account or alias has that name; parsed into state.db when
                                      # the report mail itself passes DMARC (see `yuubin dmarc report`)
report_max_attachment = 10485760      # bytes of one report attachment (gzip, zip or XML); larger ones are not parsed
report_max_xml = 52428800             # bytes of XML after decompression (stopped while decompressing)
report_max_ratio = 100                # decompressed:compressed; more is a decompression bomb
report_max_records = 20000            # <record> elements in one report
report_parsers = 2                    # reports parsed at once (each in a thread, never in the event loop)
report_queue = 50                     # report mails waiting to be parsed; past this they are only delivered
check_timeout = "20s"                 # SPF (at MAIL) and DKIM+ARC+DMARC (at DATA) each take at most this, DNS
                                      # included; past it the result is temperror (RFC 7208 asks for >= 20s)

[mail]                                # the Maildirs under data_dir/mail/, for another program to read too
owner = ""                            # e.g. "vmail" for Dovecot (needs root); "" = the [server] user
group = ""                            # e.g. "dovecot": data_dir and Maildirs 0750, mail files 0640
mode = ""                             # mail files, e.g. "0660"; "" = "0640" with a group, else "0600"

[outbound]
relayhost = ""                        # e.g. "smtp.isp.example:587" when the ISP blocks port 25 (OP25B)
relayhost_username = ""
relayhost_password_file = ""
max_per_hour = 100                    # per account; breaking it suspends the account and holds its queue
max_recipients_per_day = 500
relayhost_ca_file = ""
relayhost_tls = ""                    # "starttls" or "implicit"; default: implicit on 465, else starttls
port = 25                             # port of remote MX hosts
retry_first = "5m"
retry_max = "1h"
queue_lifetime = "5d"
delay_warning = "4h"
max_concurrency = 20
max_per_domain = 4
connect_timeout = "30s"
command_timeout = "5m"
queue_scan = "1m"

[server]
workers = 1                           # event-loop processes sharing the listeners
{user_line}
{group_line}
# the address(es) mail leaves from, as the world sees it, for `yuubin dns records` and `yuubin check`
public_ip = [{public_ip}]

[dkim]
sign = true                           # DKIM-sign mail from our local domains (keys: `yuubin dkim list`)
selectors = []                        # key sets to sign with; [] = each domain's newest
max_signatures = 5                    # DKIM signatures checked per incoming message
arc_max_sets = 10                     # ARC sets accepted per incoming message (at most 50)

[imap]                                # limits of the imap/imaps listeners
line_length = 65536                   # one command line, octets incl. CRLF (at least 8192)
literal_size = 26214400               # one literal, i.e. one APPENDed message (advertised as APPENDLIMIT)
commands_per_second = 200             # one client, sustained; more gets BYE
max_errors = 50                       # BAD replies in one session before BYE
sessions_per_account = 20             # open IMAP sessions of one account (clients keep several)
sessions_per_ip = 50                  # open IMAP sessions from one address
idle_timeout = "30m"                  # a silent client (IDLE included) is dropped after this; RFC 9051: >= 30m

[log]
level = "info"                        # debug, info, warning, error
format = "text"                       # key=value lines; "json": one object per line

[greylist]                            # off by default; the post's defence against bots that never retry
enabled = false                       # true/"all": every untrusted mx client; "s25r": only S25R suspects
delay = "5m"                          # a retry is accepted after this ...
expire = "4h"                         # ... and before this (later: the clock starts again)
ttl = "36d"                           # a passed triplet, and the client's /24 (/64), stay known this long

[s25r]                                # off by default: clients without (or with dynamic-looking) reverse DNS
enabled = false
action = "greylist"                   # or "reject": 450 4.7.1 at RCPT (never 5xx: a misjudged server retries)
allow = []                            # names (".google.com" = that domain's hosts) or CIDRs never suspected

[metrics]
address = ""                          # e.g. "127.0.0.1:9325": Prometheus text at /metrics; empty = off
"""

# contrib/yuubin.service is this text with the default paths (tests/test_init.py checks it).
SYSTEMD_UNIT = """\
# yuubin as a systemd service: its own unprivileged user, the right to bind ports below 1024 and
# nothing else. Install:
#   useradd --system --home-dir /var/lib/yuubin --shell /usr/sbin/nologin yuubin
#   cp contrib/yuubin.service /etc/systemd/system/ && systemctl daemon-reload
#   systemctl enable --now yuubin
# `yuubin init --systemd` does all of this with its own paths. Change ExecStart if yuubin is
# installed elsewhere, and ReadWritePaths if data_dir is not /var/lib/yuubin.
[Unit]
Description=yuubin mail server (SMTP)
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
# READY=1 comes from the serving process (a forked worker when [server] workers > 1).
NotifyAccess=all
ExecStart={yuubin} -c {config} serve
# The event loop pings the watchdog; a loop blocked this long gets the service restarted.
WatchdogSec=30s
Restart=on-failure
RestartSec=5s
# SIGTERM: stop accepting, let transactions finish within [limits] shutdown_grace (30s by default).
TimeoutStopSec=60s
KillMode=mixed

User={user}
Group={group}
# Started as this user, not as root: [server] user in the config is then this user or unset.
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
UMask=0077

ProtectSystem=strict
ReadWritePaths={data_dir}
{state_directory}ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
DevicePolicy=closed

[Install]
WantedBy=multi-user.target
"""


def systemd_unit(yuubin: str = "/usr/local/bin/yuubin", config: Path = DEFAULT_CONFIG_DIR / "yuubin.toml",
                 data_dir: Path = DEFAULT_DATA_DIR, user: str = "yuubin", group: str = "yuubin") -> str:
    # StateDirectory= makes /var/lib/NAME owned by the user at each start; elsewhere the admin does.
    state = ("StateDirectory=yuubin\nStateDirectoryMode=0700\n" if data_dir == DEFAULT_DATA_DIR else "")
    return SYSTEMD_UNIT.format(yuubin=yuubin, config=config, data_dir=data_dir, user=user, group=group,
                               state_directory=state)


@dataclass
class Layout:
    config: Path
    tls_dir: Path
    data_dir: Path

    @classmethod
    def of(cls, base: str | None) -> Layout:
        if base is None:
            return cls(DEFAULT_CONFIG_DIR / "yuubin.toml", DEFAULT_CONFIG_DIR / "tls", DEFAULT_DATA_DIR)
        root = Path(base).resolve()
        return cls(root / "yuubin.toml", root / "tls", root / "data")


@dataclass
class Owner:
    """Who the server runs as: uid/gid -1 when init is not root (then it is whoever runs it)."""

    name: str
    group: str
    uid: int = -1
    gid: int = -1

    @property
    def switching(self) -> bool:
        return self.uid != -1


def _owner(name: str | None, out: list[str]) -> Owner:
    if os.geteuid() != 0:
        if name:
            raise CliError("--user: only root can give files to another user; run init as root, or without --user")
        me = pwd.getpwuid(os.getuid())
        return Owner(me.pw_name, grp.getgrgid(os.getgid()).gr_name)
    name = name or "yuubin"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise CliError(f"--user: no user {name!r} and no useradd to create it: create a system user "
                           f"{name!r} and run init again") from None
        subprocess.run([useradd, "--system", "--user-group", "--home-dir", str(DEFAULT_DATA_DIR), "--no-create-home",
                        "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
        pw = pwd.getpwnam(name)
        out.append(f"created system user {name} (uid {pw.pw_uid}, no login)")
    if pw.pw_uid == 0:
        raise CliError("--user: root cannot be the server's user; name an unprivileged user")
    return Owner(name, grp.getgrgid(pw.pw_gid).gr_name, pw.pw_uid, pw.pw_gid)


def _write_new(path: Path, text: str | bytes, mode: int, owner: Owner, readable_by_owner: bool) -> bool:
    """Create `path` with `text` unless it exists (False then: never overwritten)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)
    if owner.switching and readable_by_owner:
        os.chown(path, 0, owner.gid)  # root's file the server's group may read
    return True


def _self_signed(layout: Layout, hostname: str, owner: Owner, out: list[str]) -> tuple[Path, Path]:
    from yuubin.tls import make_self_signed
    cert, key = layout.tls_dir / "cert.pem", layout.tls_dir / "key.pem"
    if cert.exists() or key.exists():
        out.append(f"kept the certificate in {layout.tls_dir} (already there)")
        return cert, key
    layout.tls_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp_cert, tmp_key = layout.tls_dir / ".cert.pem.new", layout.tls_dir / ".key.pem.new"
    make_self_signed(tmp_cert, tmp_key, hostname)
    os.chmod(tmp_key, 0o640 if owner.switching else 0o600)
    os.chmod(tmp_cert, 0o644)
    if owner.switching:
        os.chown(tmp_key, 0, owner.gid)
    os.link(tmp_key, key)  # fails rather than replace a key someone put there meanwhile
    os.link(tmp_cert, cert)
    tmp_key.unlink()
    tmp_cert.unlink()
    out.append(f"wrote a self-signed certificate for {hostname}: {cert} (key {key})")
    return cert, key


def _data_dir(layout: Layout, owner: Owner, out: list[str]) -> None:
    d = layout.data_dir
    if not d.exists():
        d.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(d, 0o700)
        out.append(f"made {d} (0700, {owner.name}'s)")
    mode = d.stat().st_mode & 0o7777
    if mode & 0o007 or mode & 0o700 != 0o700:  # never open to others; a group the admin gave stays
        os.chmod(d, (mode | 0o700) & ~0o007)
    if owner.switching:
        st = d.stat()
        if st.st_uid != owner.uid:
            os.chown(d, owner.uid, owner.gid)


def _postmaster(layout: Layout, address: str, owner: Owner, generate: bool, out: list[str]) -> str | None:
    """The postmaster account, unless it exists; its password when generated (shown once)."""
    from yuubin.auth.passwords import hash_password
    from yuubin.auth.strength import weakness
    from yuubin.store import Store
    state_db = layout.data_dir / "state.db"
    store = Store(state_db)
    try:
        if store.account_exists(address):
            out.append(f"kept the account {address} (already there; `yuubin account passwd` changes its password)")
            return None
        shown = None
        if generate or not sys.stdin.isatty():
            password = shown = secrets.token_urlsafe(15)
        else:
            print(f"password for {address}:", flush=True)
            password = read_password()
            why = weakness(password, address)
            if why:
                raise CliError(f"password: refused for {address}: {why}")
        store.add_account(address, hash_password(password))
        out.append(f"added the account {address}")
        return shown
    finally:
        store.close()
        if owner.switching:
            for suffix in ("", "-wal", "-shm"):
                p = Path(f"{state_db}{suffix}")
                if p.exists():
                    os.chown(p, owner.uid, owner.gid)


def _dkim_keys(data_dir: Path, domain: str, owner: Owner, out: list[str]) -> list[str]:
    """The domain's first DKIM key set (rsa + ed25519), unless it has one; its TXT records."""
    from yuubin.mailauth.dkimkeys import dkim_dir, generate, key_sets, next_set_name
    from yuubin.mailauth.dnsrecords import Record, zone_line
    sets = key_sets(data_dir, domain)
    if sets:
        out.append(f"kept the DKIM key sets of {domain} ({', '.join(s.name for s in sets)}; `yuubin dkim list`)")
        made = sets[-1]
    else:
        made = generate(data_dir, domain, next_set_name(data_dir, domain))
        out.append(f"made the DKIM key set {made.name} for {domain} in {dkim_dir(data_dir) / domain}")
        if owner.switching:
            top = dkim_dir(data_dir)
            for path in (top, top / domain, *(k.path for k in made.keys)):
                os.chown(path, owner.uid, owner.gid)
    return [zone_line(Record(k.dns_name, "TXT", k.txt_record())).replace("\t", "  ") for k in made.keys]


def dns_records(domain: str, hostname: str, ip: str | None) -> list[str]:
    """The records a domain needs to receive mail here and to have its mail accepted elsewhere."""
    addr = ip or "<this server's public IP address>"
    kind = "AAAA" if ip and ipaddress.ip_address(ip).version == 6 else "A"
    return [
        f"{domain}.  MX   10 {hostname}.",
        f"{hostname}.  {kind}  {addr}",
        f'{domain}.  TXT  "v=spf1 mx -all"',
        f'_dmarc.{domain}.  TXT  "v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"',
        f"PTR (reverse DNS) of {addr}: {hostname}.  (set by whoever gives you the address: ISP or VPS provider)",
    ]


def cmd_init(args: argparse.Namespace) -> int:
    domain = _domain(args.domain, "--domain")  # ConfigError: one line naming the option
    hostname = _domain(args.hostname, "--hostname")
    if args.ip:
        try:
            ipaddress.ip_address(args.ip)
        except ValueError:
            raise CliError(f"--ip: {args.ip!r} is not an IP address") from None
    layout = Layout.of(args.dir)
    out: list[str] = []
    owner = _owner(args.user, out)
    _data_dir(layout, owner, out)
    cert, key = _self_signed(layout, hostname, owner, out)
    text = CONFIG_TEMPLATE.format(
        domain=domain, hostname=hostname, data_dir=layout.data_dir, cert=cert, key=key, config=layout.config,
        user_line=(f'user = "{owner.name}"                       # serve started as root binds the ports, '
                   'then runs as this user' if owner.switching else
                   'user = ""                             # e.g. "yuubin": needed when serve is started as root'),
        group_line=(f'group = "{owner.group}"' if owner.switching else 'group = ""'),
        public_ip=f'"{args.ip}"' if args.ip else "")
    if _write_new(layout.config, text, 0o640 if owner.switching else 0o600, owner, True):
        out.append(f"wrote {layout.config}")
    else:
        out.append(f"kept {layout.config} (already there: init never overwrites it)")

    from yuubin.config import load
    cfg = load(layout.config)  # what is there now, written by us or kept
    password = _postmaster(layout, cfg.postmaster, owner, args.generate_password, out)
    dkim_records = _dkim_keys(cfg.data_dir, domain, owner, out)
    if args.systemd:
        yuubin = shutil.which("yuubin") or str(Path(sys.argv[0]).resolve())
        unit = systemd_unit(yuubin, layout.config, cfg.data_dir, owner.name, owner.group)
        if _write_new(Path(args.unit_path), unit, 0o644, owner, False):
            out.append(f"wrote {args.unit_path} (then: systemctl daemon-reload; systemctl enable --now yuubin)")
        else:
            out.append(f"kept {args.unit_path} (already there)")

    print(f"yuubin init for {domain} (host {hostname}):")
    for line in out:
        print(f"  {line}")
    if password:
        print(f"  postmaster account {cfg.postmaster}  password: {password}  (shown once: note it now)")
    print("\nPublish these DNS records:")
    for record in dns_records(domain, hostname, args.ip):
        print(f"  {record}")
    for record in dkim_records:
        print(f"  {record}")
    print("\nNext steps:")
    steps = [f"yuubin -c {layout.config} config check"]
    if args.systemd:
        steps.append("systemctl daemon-reload && systemctl enable --now yuubin")
    else:
        steps.append(f"yuubin -c {layout.config} serve   (or install contrib/yuubin.service: init --systemd)")
    steps += [f"yuubin -c {layout.config} check {domain}   (once the records are published: DNS, PTR, DKIM)",
              "replace the self-signed certificate with a real one ([tls] in the config)",
              "open ports 25, 587 and 465 in the firewall (yuubin firewall nftables helps)"]
    for i, step in enumerate(steps, 1):
        print(f"  {i}. {step}")
    return 0


def register(sub: SubParsers) -> None:
    """Add init."""
    p = sub.add_parser("init", help="set up a new server: config, data directory, certificate, postmaster account",
                       takes_config=False)
    p.add_argument("--domain", required=True, help="the mail domain, e.g. example.jp")
    p.add_argument("--hostname", required=True, help="this server's name, e.g. mx.example.jp (the MX target)")
    p.add_argument("--dir", metavar="DIR", help="put config, tls/ and data/ under DIR "
                   f"(default: {DEFAULT_CONFIG_DIR} and {DEFAULT_DATA_DIR})")
    p.add_argument("--ip", metavar="ADDR", help="this server's public IP address, for the DNS records")
    p.add_argument("--user", metavar="USER", help="run as root: the user the server runs as (default yuubin, "
                   "created if missing)")
    p.add_argument("--generate-password", action="store_true",
                   help="generate the postmaster password and show it once (the default without a terminal)")
    p.add_argument("--systemd", action="store_true", help="also write the systemd unit")
    p.add_argument("--unit-path", default=str(SYSTEMD_UNIT_PATH), help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_init)

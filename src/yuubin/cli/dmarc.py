"""`yuubin dmarc report`: who sends mail as our domains, from the DMARC aggregate reports in state.db.

Per reporting organisation and per source IP: messages, the SPF/DKIM/DMARC results, what the
receiver did with them, and the IP's reverse DNS (asked through the configured resolver with a
short timeout, each IP once per run). A source that fails DMARC as one of our domains is
flagged as likely spoofing; our own server's addresses (the listeners', `[server] public_ip`,
and the A/AAAA records of our MX hosts and hostname) are shown as "this server".
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from yuubin.cli.common import CliError, SubParsers, add_group, load_config, open_store, plural
from yuubin.config import Config

if TYPE_CHECKING:
    from yuubin.dns import DnsLookup
    from yuubin.store import DmarcRow

RDNS_TIMEOUT = 2.0  # seconds for one reverse lookup (at most dns.timeout)
RDNS_CONCURRENCY = 16


@dataclass
class Source:
    """One source IP as one organisation reported it, summed over its reports."""

    ip: str
    messages: int = 0
    spf: Counter[str] = field(default_factory=Counter)
    dkim: Counter[str] = field(default_factory=Counter)
    dmarc: Counter[str] = field(default_factory=Counter)
    disposition: Counter[str] = field(default_factory=Counter)
    header_from: Counter[str] = field(default_factory=Counter)
    ours_failing: int = 0  # messages that failed DMARC with one of our domains in From:
    reverse_dns: str | None = ""  # None: DNS did not answer
    this_server: bool = False

    @property
    def likely_spoofing(self) -> bool:
        return self.ours_failing > 0 and not self.this_server


@dataclass
class Organisation:
    name: str
    reports: set[tuple[str, str]] = field(default_factory=set)  # (report id, policy domain)
    begin: int = 0
    end: int = 0
    sources: dict[str, Source] = field(default_factory=dict)


def _ours(domain: str, local: Iterable[str]) -> bool:
    return any(domain == d or domain.endswith("." + d) for d in local)


def summarize(rows: Sequence[DmarcRow], local_domains: Iterable[str]) -> list[Organisation]:
    """Rows → per organisation, per source IP (organisations and sources in a stable order)."""
    local = tuple(local_domains)
    orgs: dict[str, Organisation] = {}
    for r in rows:
        org = orgs.setdefault(r.org_name, Organisation(r.org_name, begin=r.date_begin, end=r.date_end))
        org.reports.add((r.report_id, r.policy_domain))
        org.begin, org.end = min(org.begin, r.date_begin), max(org.end, r.date_end)
        src = org.sources.setdefault(r.source_ip, Source(r.source_ip))
        dmarc = "pass" if "pass" in (r.dkim, r.spf) else "fail"
        src.messages += r.count
        src.spf[r.spf] += r.count
        src.dkim[r.dkim] += r.count
        src.dmarc[dmarc] += r.count
        src.disposition[r.disposition] += r.count
        src.header_from[r.header_from] += r.count
        if dmarc == "fail" and _ours(r.header_from, local):
            src.ours_failing += r.count
    out = sorted(orgs.values(), key=lambda o: o.name.lower())
    for org in out:
        org.sources = dict(sorted(org.sources.items(), key=lambda kv: (-kv[1].messages, kv[0])))
    return out


# ---- DNS: reverse names and our own addresses ----


def _configured_ips(cfg: Config) -> set[str]:
    """The listeners' own addresses and `[server] public_ip`."""
    ips: set[str] = set()
    for lc in cfg.listeners:
        try:
            ip = ipaddress.ip_address(lc.host.split("%")[0])
        except ValueError:
            continue
        if not ip.is_unspecified:
            ips.add(str(ip))
    ips.update(cfg.public_ips)  # [server] public_ip, checked when the config was loaded
    return ips


async def _addresses(resolver: DnsLookup, names: Iterable[str]) -> set[str]:
    found: set[str] = set()
    names = list(dict.fromkeys(names))
    answers = await asyncio.gather(*(resolver.lookup(n, t) for n in names for t in ("A", "AAAA")))
    for a in answers:
        if a.status == "ok":
            found.update(str(ipaddress.ip_address(r)) for r in a.records)
    return found


async def own_addresses(resolver: DnsLookup, cfg: Config) -> set[str]:
    """This server's addresses: configured ones, and those of our MX hosts and hostname in DNS."""
    mx = await asyncio.gather(*(resolver.lookup(d, "MX") for d in cfg.local_domains))
    hosts = [cfg.hostname]
    for answer in mx:
        if answer.status == "ok":
            hosts += [r.split()[-1].rstrip(".").lower() for r in answer.records]
    return _configured_ips(cfg) | await _addresses(resolver, hosts)


async def reverse_names(resolver: DnsLookup, ips: Iterable[str]) -> dict[str, str | None]:
    """IP → its PTR name ("" when it has none, None when DNS did not answer); each IP asked once."""
    limit = asyncio.Semaphore(RDNS_CONCURRENCY)

    async def one(ip: str) -> tuple[str, str | None]:
        async with limit:
            answer = await resolver.lookup(ipaddress.ip_address(ip).reverse_pointer, "PTR")
        if answer.status == "ok":
            return ip, answer.records[0].rstrip(".").lower()
        return ip, None if answer.status in ("timeout", "servfail") else ""

    return dict(await asyncio.gather(*(one(ip) for ip in dict.fromkeys(ips))))


async def _look_up(cfg: Config, ips: list[str]) -> tuple[dict[str, str | None], set[str]]:
    from yuubin.dns import Resolver
    # A silent nameserver is said once below, in the command's words, not as the server's warning.
    logging.getLogger("yuubin.dns").setLevel(logging.ERROR)
    resolver = Resolver(list(cfg.dns.nameservers), cfg.dns.port, min(cfg.dns.timeout, RDNS_TIMEOUT))
    names, own = await asyncio.gather(reverse_names(resolver, ips), own_addresses(resolver, cfg))
    return names, own


# ---- output ----


def _results(c: Counter[str]) -> str:
    """`pass`, or `pass 120, fail 30` when the messages differ."""
    if len(c) == 1:
        return next(iter(c))
    return ", ".join(f"{k} {n}" for k, n in c.most_common())


def _day(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M")


def _rdns(name: str | None) -> str:
    return "(no answer)" if name is None else name or "-"


def _note(src: Source) -> str:
    froms = ", ".join(d for d, _ in src.header_from.most_common(3))
    if src.this_server:
        if src.dmarc.get("fail"):
            return f"this server: {src.dmarc['fail']} failed DMARC (check SPF and DKIM signing)"
        return "this server"
    if src.likely_spoofing:
        return f"LIKELY SPOOFING: {src.ours_failing} failed DMARC as {froms}"
    return ""


def render_text(orgs: list[Organisation], days: int, domain: str | None) -> str:
    total = sum(s.messages for o in orgs for s in o.sources.values())
    failed = sum(s.dmarc.get("fail", 0) for o in orgs for s in o.sources.values())
    reports = sum(len(o.reports) for o in orgs)
    about = f" about {domain}" if domain else ""
    lines = [f"DMARC aggregate reports{about}, last {plural(days, 'day')}: {plural(reports, 'report')} from "
             f"{plural(len(orgs), 'organisation')}, {plural(total, 'message')} ({failed} failed DMARC)"]
    header = ("SOURCE IP", "MESSAGES", "SPF", "DKIM", "DMARC", "DISPOSITION", "REVERSE DNS", "")
    for org in orgs:
        lines += ["", f"{org.name}  ({plural(len(org.reports), 'report')}, {_day(org.begin)} – {_day(org.end)} UTC)"]
        table = [header] + [(s.ip, str(s.messages), _results(s.spf), _results(s.dkim), _results(s.dmarc),
                             _results(s.disposition), _rdns(s.reverse_dns), _note(s)) for s in org.sources.values()]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            cells = [row[i].rjust(widths[i]) if i == 1 else row[i].ljust(widths[i]) for i in range(len(row))]
            lines.append(("  " + "  ".join(cells)).rstrip())
    spoofed = [(o.name, s) for o in orgs for s in o.sources.values() if s.likely_spoofing]
    if spoofed:
        ips = sorted({s.ip for _, s in spoofed})
        lines += ["", f"{plural(len(ips), 'source')} sent mail as your domain without passing SPF or DKIM: "
                      f"{', '.join(ips[:10])}{' ...' if len(ips) > 10 else ''}. If they are not yours, they are "
                      "spoofing it; a DMARC policy of p=quarantine or p=reject tells receivers to refuse them."]
    return "\n".join(lines) + "\n"


def render_json(orgs: list[Organisation], days: int, domain: str | None, since: float) -> str:
    out: dict[str, Any] = {
        "days": days, "domain": domain, "since": datetime.fromtimestamp(since, UTC).isoformat(),
        "organisations": [{
            "org_name": o.name,
            "reports": sorted(f"{rid}" for rid, _ in o.reports),
            "begin": o.begin, "end": o.end,
            "sources": [{
                "source_ip": s.ip, "messages": s.messages, "reverse_dns": s.reverse_dns or None,
                "spf": dict(s.spf), "dkim": dict(s.dkim), "dmarc": dict(s.dmarc), "disposition": dict(s.disposition),
                "header_from": dict(s.header_from), "this_server": s.this_server,
                "likely_spoofing": s.likely_spoofing,
            } for s in o.sources.values()],
        } for o in orgs],
    }
    return json.dumps(out, indent=2, sort_keys=False) + "\n"


def cmd_dmarc_report(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.days <= 0:
        raise CliError(f"--days: must be a positive number of days, got {args.days}")
    domain = args.domain.strip().lower().rstrip(".") if args.domain else None
    if domain is not None and (not domain or any(c in domain for c in " @/%\\")):
        raise CliError(f"--domain: {args.domain!r} is not a domain name")
    since = time.time() - args.days * 86400
    store = open_store(cfg)
    try:
        rows = store.dmarc_rows(since, domain)
    finally:
        store.close()
    orgs = summarize(rows, cfg.local_domains)
    if not orgs:
        if args.json:
            print(render_json(orgs, args.days, domain, since), end="")
        else:
            about = f" about {domain}" if domain else ""
            print(f"no DMARC aggregate reports{about} in the last {plural(args.days, 'day')} (reports sent to "
                  f"{cfg.mailauth.report_address}@<each local domain> are stored when their mail passes DMARC; "
                  "publish rua=mailto: that address in your DMARC record)")
        return 0
    ips = [ip for o in orgs for ip in o.sources]
    names, own = asyncio.run(_look_up(cfg, ips))
    for o in orgs:
        for s in o.sources.values():
            s.reverse_dns = names.get(s.ip, "")
            s.this_server = s.ip in own
    unanswered = sum(1 for n in names.values() if n is None)
    if unanswered:
        print(f"yuubin: warning: reverse DNS: no answer for {plural(unanswered, 'address', 'addresses')} within "
              f"{min(cfg.dns.timeout, RDNS_TIMEOUT):g}s (check [dns] nameservers)", file=sys.stderr)
    print(render_json(orgs, args.days, domain, since) if args.json else render_text(orgs, args.days, domain), end="")
    return 0


def register(sub: SubParsers) -> None:
    """Add the dmarc group: report."""
    dm = add_group(sub, "dmarc", "DMARC: who sends mail as your domains (aggregate reports)")
    x = dm.add_parser("report", help="who sends as your domains, per reporting organisation and source IP")
    x.add_argument("--days", type=int, default=7, metavar="N", help="reports of the last N days (default 7)")
    x.add_argument("--domain", metavar="D", help="only reports about domain D (and its subdomains)")
    x.add_argument("--json", action="store_true", help="machine-readable output")
    x.set_defaults(func=cmd_dmarc_report)

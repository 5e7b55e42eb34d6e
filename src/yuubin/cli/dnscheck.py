"""`yuubin dns records` and `yuubin check`: what to publish in DNS, and whether live DNS says it."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress

from yuubin.cli.common import CliError, SubParsers, add_group, load_config
from yuubin.config import Config


def _domains(cfg: Config, given: str | None) -> list[str]:
    if not given:
        return list(cfg.local_domains)
    domain = given.strip().rstrip(".").lower()
    if domain not in cfg.local_domains:
        raise CliError(f"DOMAIN: {domain} is not one of domains.local ({', '.join(cfg.local_domains)})")
    return [domain]


def _ips(cfg: Config, given: list[str] | None) -> list[str]:
    out = []
    for ip in given or cfg.public_ips:
        try:
            out.append(str(ipaddress.ip_address(ip.strip())))
        except ValueError:
            raise CliError(f"--ip: {ip!r} is not an IP address") from None
    return out


def cmd_dns_records(args: argparse.Namespace) -> int:
    from yuubin.mailauth.dnsrecords import domain_records, host_records, zone_line
    cfg = load_config(args)
    ips = _ips(cfg, args.ip)
    for domain in _domains(cfg, args.domain):
        print(f"; {domain}")
        records = domain_records(domain, cfg.hostname, cfg.data_dir, cfg.dkim.selectors)
        for record in records:
            print(zone_line(record))
        if not any(r.name.endswith("._domainkey." + domain) for r in records):
            print(f"; no DKIM keys for {domain}: run yuubin dkim keygen {domain}")
        print()
    print(f"; {cfg.hostname} (the server)")
    for record in host_records(cfg.hostname, ips):
        print(zone_line(record))
    if not ips:
        print("; no public IP known: set [server] public_ip or give --ip to get the A/AAAA and PTR records")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from yuubin.dns import Resolver
    from yuubin.mailauth.dkimkeys import active_set
    from yuubin.mailauth.dnsrecords import check_dnsbl, check_domain, check_host
    cfg = load_config(args)
    ips = _ips(cfg, args.ip)
    domains = _domains(cfg, args.domain)

    async def run() -> list[tuple[str, list]]:
        resolver = Resolver(list(cfg.dns.nameservers), cfg.dns.port, cfg.dns.timeout)
        sections: list[tuple[str, list]] = []
        for domain in domains:
            signing = active_set(cfg.data_dir, domain, cfg.dkim.selectors)
            keys = list(signing.keys) if signing is not None else []
            sections.append((domain, await check_domain(resolver, domain, cfg.hostname, ips, keys)))
        sections.append((cfg.hostname, await check_host(resolver, cfg.hostname, ips)))
        if ips and cfg.dnsbl_zones:
            sections.append(("DNSBL", await check_dnsbl(resolver, ips, cfg.dnsbl_zones)))
        return sections

    sections = asyncio.run(run())
    bad = 0
    for title, findings in sections:
        print(title)
        for f in findings:
            print(f"  {f.status.upper() if f.bad else f.status:<8} {f.what:<6} {f.detail}")
            bad += f.bad
    print(f"\n{bad} problem{'s' if bad != 1 else ''} found" if bad else "\nall records are as they should be")
    return 1 if bad else 0


def register(sub: SubParsers) -> None:
    """Add `dns records` and `check`."""
    dn = add_group(sub, "dns", "DNS records to publish: records")
    x = dn.add_parser("records", help="print every DNS record to publish (zone-file form)")
    x.add_argument("domain", metavar="DOMAIN", nargs="?")
    x.add_argument("--ip", action="append", metavar="IP", help="public IP (default: [server] public_ip); repeatable")
    x.set_defaults(func=cmd_dns_records)
    x = sub.add_parser("check", help="ask live DNS whether every record is right and whether our IP is on a DNSBL")
    x.add_argument("domain", metavar="DOMAIN", nargs="?")
    x.add_argument("--ip", action="append", metavar="IP", help="public IP (default: [server] public_ip); repeatable")
    x.set_defaults(func=cmd_check)

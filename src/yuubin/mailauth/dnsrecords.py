"""The DNS records a local domain needs (`yuubin dns records`) and the live check of them (`yuubin check`).

What to publish follows from the config and the DKIM keys on disk: MX at our hostname, SPF
``v=spf1 mx -all``, the DKIM keys of the signing set (and of a newer set waiting to be used),
DMARC ``p=quarantine`` with reports to ``dmarc-reports@``, and A/AAAA and PTR of the public IPs.
The check asks live DNS through yuubin's resolver, record by record, and whether a public IP is
on one of the configured DNSBLs.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from yuubin.dns import DnsLookup, LookupResult
from yuubin.mailauth.dkimkeys import DkimKey, KeySet, active_set, key_sets

__all__ = ["Finding", "Record", "check_dnsbl", "check_domain", "check_host", "dkim_keys_to_publish", "domain_records",
           "host_records", "spf_authorises", "zone_line"]

TTL = 3600
SPF_RECORD = "v=spf1 mx -all"
SPF_MAX_LOOKUPS = 10  # RFC 7208 4.6.4, also the bound of this check's own walk


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record to publish, with a comment for the admin."""

    name: str
    rtype: str
    value: str
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of `yuubin check`: ok, missing, wrong or unknown (could not tell), and why."""

    status: str
    what: str
    detail: str

    @property
    def bad(self) -> bool:
        return self.status in ("missing", "wrong")


def dmarc_record(domain: str) -> str:
    return f"v=DMARC1; p=quarantine; rua=mailto:dmarc-reports@{domain}"


def dkim_keys_to_publish(data_dir: Path, domain: str, selectors: tuple[str, ...]) -> list[tuple[KeySet, str]]:
    """The signing set, then every newer complete set (published ahead of use), with a note for each."""
    current = active_set(data_dir, domain, selectors)
    if current is None:
        return []
    out = [(current, "signs now")]
    for s in key_sets(data_dir, domain):
        if s.complete and s.name != current.name and s.created >= current.created:
            out.append((s, "newer set: publish now, sign with it later"))
    return out


def domain_records(domain: str, hostname: str, data_dir: Path, selectors: tuple[str, ...]) -> list[Record]:
    """MX, SPF, DKIM and DMARC of one local domain."""
    records = [
        Record(domain, "MX", f"10 {hostname}.", "mail for the domain comes to this server"),
        Record(domain, "TXT", SPF_RECORD, "SPF: only the MX hosts send for the domain"),
    ]
    for key_set, note in dkim_keys_to_publish(data_dir, domain, selectors):
        for key in key_set.keys:
            records.append(Record(key.dns_name, "TXT", key.txt_record(), f"DKIM {key.algorithm}, key set "
                                                                          f"{key_set.name}: {note}"))
    records.append(Record(f"_dmarc.{domain}", "TXT", dmarc_record(domain),
                          "DMARC: start with quarantine; reports go to dmarc-reports@"))
    return records


def host_records(hostname: str, ips: Sequence[str]) -> list[Record]:
    """A/AAAA of our hostname and the PTR each public IP should have (set by whoever owns the IP)."""
    records = []
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        records.append(Record(hostname, "A" if addr.version == 4 else "AAAA", str(addr), "the server's name"))
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        records.append(Record(addr.reverse_pointer, "PTR", f"{hostname}.",
                              "reverse DNS: ask the owner of the IP (ISP, hosting provider) to set it"))
    return records


def zone_line(record: Record) -> str:
    """The record in zone-file form; TXT split into 255-byte strings (RFC 1035), as DKIM keys need."""
    value = record.value
    if record.rtype == "TXT":
        chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
        value = " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)
    line = f"{record.name}.\t{TTL}\tIN\t{record.rtype}\t{value}"
    return f"{line}\t; {record.comment}" if record.comment else line


# ---- the live check ----

async def check_domain(lookup: DnsLookup, domain: str, hostname: str, ips: Sequence[str], keys: Sequence[DkimKey],
                       ) -> list[Finding]:
    """Record by record: MX, SPF (and whether it lets our IPs send), DKIM keys, DMARC."""
    mx, spf_txt, dmarc_txt = await asyncio.gather(lookup.lookup(domain, "MX"), lookup.lookup(domain, "TXT"),
                                                  lookup.lookup(f"_dmarc.{domain}", "TXT"))
    findings = [_mx_finding(domain, hostname, mx)]
    findings += await _spf_findings(lookup, domain, spf_txt, ips)
    key_answers = await asyncio.gather(*(lookup.lookup(k.dns_name, "TXT") for k in keys))
    if not keys:
        findings.append(Finding("missing", "DKIM", f"no signing keys for {domain}: run yuubin dkim keygen {domain}"))
    for key, found in zip(keys, key_answers, strict=True):
        findings.append(_dkim_finding(key, found))
    findings.append(_dmarc_finding(domain, dmarc_txt))
    return findings


async def check_host(lookup: DnsLookup, hostname: str, ips: Sequence[str]) -> list[Finding]:
    """Our hostname's A/AAAA carry each public IP, and each IP's PTR names the hostname."""
    if not ips:
        return [Finding("unknown", "IP", "no public IP known: set [server] public_ip or give --ip; "
                                         "A/AAAA, PTR, SPF and DNSBL checks need it")]
    a, aaaa = await asyncio.gather(lookup.lookup(hostname, "A"), lookup.lookup(hostname, "AAAA"))
    findings = []
    for ip in ips:
        addr = ipaddress.ip_address(ip)
        found = a if addr.version == 4 else aaaa
        rtype = "A" if addr.version == 4 else "AAAA"
        have = {str(ipaddress.ip_address(r)) for r in found.records} if found.status == "ok" else set()
        if str(addr) in have:
            findings.append(Finding("ok", rtype, f"{hostname} {rtype} {addr}"))
        elif found.status in ("timeout", "servfail"):
            findings.append(Finding("unknown", rtype, f"{hostname}: lookup failed ({found.status})"))
        elif have:
            findings.append(Finding("wrong", rtype, f"{hostname} {rtype} is {', '.join(sorted(have))}, not {addr}"))
        else:
            findings.append(Finding("missing", rtype, f"{hostname} has no {rtype} record; publish {addr}"))
    ptrs = await asyncio.gather(*(lookup.lookup(ipaddress.ip_address(ip).reverse_pointer, "PTR") for ip in ips))
    for ip, found in zip(ips, ptrs, strict=True):
        names = {r.rstrip(".").lower() for r in found.records} if found.status == "ok" else set()
        if hostname.lower() in names:
            findings.append(Finding("ok", "PTR", f"{ip} PTR {hostname}"))
        elif found.status in ("timeout", "servfail"):
            findings.append(Finding("unknown", "PTR", f"{ip}: lookup failed ({found.status})"))
        elif names:
            findings.append(Finding("wrong", "PTR", f"{ip} PTR is {', '.join(sorted(names))}, not {hostname} "
                                                    "(ask the owner of the IP to change it)"))
        else:
            findings.append(Finding("missing", "PTR", f"{ip} has no PTR; ask the owner of the IP to set {hostname}"))
    return findings


async def check_dnsbl(lookup: DnsLookup, ips: Sequence[str], zones: Sequence[str]) -> list[Finding]:
    """Whether each public IP is listed on each configured DNSBL zone."""
    pairs = [(ip, zone) for ip in ips for zone in zones]
    answers = await asyncio.gather(*(lookup.lookup(reverse_name(ip, zone), "A") for ip, zone in pairs))
    findings = []
    for (ip, zone), found in zip(pairs, answers, strict=True):
        if found.status in ("nxdomain", "nodata"):
            findings.append(Finding("ok", "DNSBL", f"{ip} is not listed on {zone}"))
        elif found.status != "ok":
            findings.append(Finding("unknown", "DNSBL", f"{ip} on {zone}: lookup failed ({found.status})"))
        elif any(r.startswith("127.255.255.") for r in found.records):
            findings.append(Finding("unknown", "DNSBL", f"{ip} on {zone}: the list refused the query "
                                                        f"({', '.join(found.records)}; use a local resolver)"))
        else:
            findings.append(Finding("wrong", "DNSBL", f"{ip} is LISTED on {zone} ({', '.join(found.records)}): "
                                                      "see the list's lookup page for the reason and delisting"))
    return findings


def reverse_name(ip: str, zone: str) -> str:
    """The DNSBL query name: reversed octets or nibbles under ``zone`` (as in-addr.arpa / ip6.arpa)."""
    return ipaddress.ip_address(ip).reverse_pointer.rsplit(".", 2)[0] + "." + zone.strip(".")


def _mx_finding(domain: str, hostname: str, mx: LookupResult) -> Finding:
    if mx.status in ("timeout", "servfail"):
        return Finding("unknown", "MX", f"{domain}: lookup failed ({mx.status})")
    hosts = [r.split()[-1].rstrip(".").lower() for r in mx.records] if mx.status == "ok" else []
    if hostname.lower() in hosts:
        return Finding("ok", "MX", f"{domain} MX {hostname}")
    if hosts:
        return Finding("wrong", "MX", f"{domain} MX points at {', '.join(hosts)}, not {hostname}")
    return Finding("missing", "MX", f"{domain} has no MX record; publish: {domain}. MX 10 {hostname}.")


async def _spf_findings(lookup: DnsLookup, domain: str, txt: LookupResult, ips: Sequence[str]) -> list[Finding]:
    if txt.status in ("timeout", "servfail"):
        return [Finding("unknown", "SPF", f"{domain}: lookup failed ({txt.status})")]
    spf = [r for r in txt.records if r.lower().startswith("v=spf1")] if txt.status == "ok" else []
    if not spf:
        return [Finding("missing", "SPF", f"{domain} has no SPF record; publish: \"{SPF_RECORD}\"")]
    if len(spf) > 1:
        return [Finding("wrong", "SPF", f"{domain} has {len(spf)} SPF records (one is allowed): a permerror")]
    findings = []
    for ip in ips:
        verdict = await spf_authorises(lookup, domain, ipaddress.ip_address(ip))
        if verdict is True:
            findings.append(Finding("ok", "SPF", f"\"{spf[0]}\" lets {ip} send for {domain}"))
        elif verdict is False:
            findings.append(Finding("wrong", "SPF", f"\"{spf[0]}\" does not let {ip} send for {domain}"))
        else:
            findings.append(Finding("unknown", "SPF", f"\"{spf[0]}\": cannot tell whether {ip} may send "
                                                      "(too many lookups, macros or failed lookups)"))
    if not ips:
        findings.append(Finding("ok", "SPF", f"{domain}: \"{spf[0]}\" (no public IP to test it with)"))
    return findings


async def spf_authorises(lookup: DnsLookup, domain: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                         ) -> bool | None:
    """Does the SPF record of ``domain`` pass ``ip``? None when this check cannot tell.

    A reduced walk for the admin's check (ip4, ip6, a, mx, include, redirect, all; no macros,
    no exists/ptr): hand-written because it only needs to answer "is our own IP authorised",
    on yuubin's resolver; inbound mail is judged by the full evaluator of the SPF check.
    """
    budget = [SPF_MAX_LOOKUPS]
    return await _spf_walk(lookup, domain, ip, budget)


async def _spf_walk(lookup: DnsLookup, domain: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                    budget: list[int]) -> bool | None:
    txt = await lookup.lookup(domain, "TXT")
    if txt.status in ("nxdomain", "nodata"):
        return False
    if txt.status != "ok":
        return None
    spf = [r for r in txt.records if r.lower().split(" ", 1)[0] == "v=spf1"]
    if len(spf) != 1:
        return None
    redirect = None
    for term in spf[0].split()[1:]:
        term = term.lower()
        if term.startswith("redirect="):
            redirect = term.split("=", 1)[1]
            continue
        if "=" in term.split(":", 1)[0] or "%" in term:
            if "%" in term:
                return None
            continue  # exp= and unknown modifiers
        qualifier = term[0] if term[0] in "+-~?" else "+"
        mech = term.lstrip("+-~?")
        name, _, arg = mech.partition(":")
        arg, _, cidr = arg.partition("/")
        matched: bool | None
        if name == "all":
            matched = True
        elif name in ("ip4", "ip6"):
            try:
                matched = ip in ipaddress.ip_network(mech.split(":", 1)[1], strict=False)
            except ValueError:
                return None
        elif name in ("a", "mx"):
            budget[0] -= 1
            if budget[0] < 0:
                return None
            matched = await _spf_hosts(lookup, name, arg or domain, cidr, ip)
        elif name == "include":
            budget[0] -= 1
            if budget[0] < 0 or not arg:
                return None
            inner = await _spf_walk(lookup, arg, ip, budget)
            if inner is None:
                return None
            matched = inner
        else:
            return None  # exists, ptr: not followed here
        if matched is None:
            return None
        if matched:
            return qualifier == "+"
    if redirect:
        budget[0] -= 1
        return None if budget[0] < 0 else await _spf_walk(lookup, redirect, ip, budget)
    return False


async def _spf_hosts(lookup: DnsLookup, kind: str, target: str, cidr: str,
                     ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool | None:
    hosts = [target]
    if kind == "mx":
        mx = await lookup.lookup(target, "MX")
        if mx.status in ("timeout", "servfail"):
            return None
        hosts = [r.split()[-1].rstrip(".") for r in mx.records][:10]
    rtype = "A" if ip.version == 4 else "AAAA"
    answers = await asyncio.gather(*(lookup.lookup(h, rtype) for h in hosts))
    prefix = cidr or ("32" if ip.version == 4 else "128")
    for found in answers:
        if found.status in ("timeout", "servfail"):
            return None
        for r in found.records:
            try:
                if ip in ipaddress.ip_network(f"{r}/{prefix}", strict=False):
                    return True
            except ValueError:
                continue
    return False


def _dkim_finding(key: DkimKey, found: LookupResult) -> Finding:
    if found.status in ("timeout", "servfail"):
        return Finding("unknown", "DKIM", f"{key.dns_name}: lookup failed ({found.status})")
    if found.status != "ok":
        return Finding("missing", "DKIM", f"{key.dns_name} has no TXT record; publish the one from "
                                          "`yuubin dns records`")
    want = key.public_value()
    for record in found.records:
        tags = dict(t.strip().partition("=")[::2] for t in record.split(";") if "=" in t)
        if "".join(tags.get("p", "").split()) == want:
            return Finding("ok", "DKIM", f"{key.dns_name} matches our {key.algorithm} key")
    return Finding("wrong", "DKIM", f"{key.dns_name} does not hold our {key.algorithm} key (p= differs)")


def _dmarc_finding(domain: str, found: LookupResult) -> Finding:
    name = f"_dmarc.{domain}"
    if found.status in ("timeout", "servfail"):
        return Finding("unknown", "DMARC", f"{name}: lookup failed ({found.status})")
    records = [r for r in found.records if r.replace(" ", "").lower().startswith("v=dmarc1")]
    if not records:
        return Finding("missing", "DMARC", f"{name} has no DMARC record; publish: \"{dmarc_record(domain)}\"")
    if len(records) > 1:
        return Finding("wrong", "DMARC", f"{name} has {len(records)} DMARC records (one is allowed)")
    return Finding("ok", "DMARC", f"{name} \"{records[0]}\"")

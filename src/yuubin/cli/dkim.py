"""`yuubin dkim ...`: the DKIM signing keys of our domains (make them, list them)."""

from __future__ import annotations

import argparse
import time

from yuubin.cli.common import CliError, SubParsers, add_group, load_config
from yuubin.config import Config


def _local_domain(cfg: Config, text: str) -> str:
    domain = text.strip().rstrip(".").lower()
    if domain not in cfg.local_domains:
        raise CliError(f"DOMAIN: {domain} is not one of domains.local ({', '.join(cfg.local_domains)})")
    return domain


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from yuubin.mailauth.dkimkeys import active_set, check_set_name, generate, next_set_name
    from yuubin.mailauth.dnsrecords import Record, zone_line
    cfg = load_config(args)
    domain = _local_domain(cfg, args.domain)
    if not cfg.data_dir.exists():
        cfg.data_dir.mkdir(mode=0o700, parents=True)
    try:
        name = check_set_name(args.selector) if args.selector else next_set_name(cfg.data_dir, domain)
    except ValueError as e:
        raise CliError(f"--selector: {e}") from None
    try:
        made = generate(cfg.data_dir, domain, name)
    except FileExistsError as e:
        raise CliError(str(e)) from None
    print(f"made key set {made.name} for {domain}:")
    for key in made.keys:
        print(f"  {key.path}  ({key.algorithm}, selector {key.selector})")
    print("\npublish these TXT records in the zone of " + domain + ":")
    for key in made.keys:
        print(zone_line(Record(key.dns_name, "TXT", key.txt_record())))
    signing = active_set(cfg.data_dir, domain, cfg.dkim.selectors)
    if signing is not None and signing.name == made.name:
        print(f"\n{made.name} is the newest set: yuubin serve signs with it from its next start."
              " Publish the records first (check with: yuubin check " + domain + ").")
    else:
        print(f"\nnot used for signing yet ([dkim] selectors = {list(cfg.dkim.selectors)}): publish the records,"
              f" wait for DNS caches, then add \"{made.name}\" first in [dkim] selectors and restart.")
    return 0


def cmd_dkim_list(args: argparse.Namespace) -> int:
    from yuubin.mailauth.dkimkeys import active_set, key_sets
    cfg = load_config(args)
    domains = [_local_domain(cfg, args.domain)] if args.domain else list(cfg.local_domains)
    for domain in domains:
        signing = active_set(cfg.data_dir, domain, cfg.dkim.selectors)
        sets = key_sets(cfg.data_dir, domain)
        if not sets:
            print(f"{domain}\t-\tno keys (yuubin dkim keygen {domain})")
        for s in sets:
            state = "signing" if signing is not None and s.name == signing.name else (
                "incomplete" if not s.complete else "not signing")
            made = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(s.created))
            selectors = ",".join(k.selector for k in s.keys)
            print(f"{domain}\t{s.name}\t{state}\t{made}\t{selectors}")
    return 0


def register(sub: SubParsers) -> None:
    """Add the dkim group: keygen, list."""
    dk = add_group(sub, "dkim", "DKIM signing keys: keygen, list")
    x = dk.add_parser("keygen", help="make a new key set (rsa 2048 + ed25519) for DOMAIN and print its DNS records")
    x.add_argument("domain", metavar="DOMAIN")
    x.add_argument("--selector", metavar="S", help="key set name (default: y<year><letter>, e.g. y2026a); "
                                                  "the DNS selectors are S-rsa and S-ed25519")
    x.set_defaults(func=cmd_dkim_keygen)
    x = dk.add_parser("list", help="list the key sets of each local domain and which one signs")
    x.add_argument("domain", metavar="DOMAIN", nargs="?")
    x.set_defaults(func=cmd_dkim_list)

"""The `yuubin` sub-commands for account security: password strength and audit, suspension,
auth lockouts and the nftables export of the submission allow lists.

Kept apart from cli.py so the commands of the post's incident response read in one place.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from yuubin import cli

log = logging.getLogger("yuubin.cli")


def _new_password_hash(address: str, allow_weak: bool) -> str:
    """Read the new password, refuse it when weak (unless --allow-weak, logged), hash it."""
    from yuubin.auth.passwords import hash_password
    from yuubin.auth.strength import weakness
    pw = cli._read_password()
    why = weakness(pw, address)
    if why and not allow_weak:
        raise cli.CliError(f"password: refused for {address}: {why}")
    if why:
        cli._setup_logging()
        log.warning('event=weak_password_allowed account=%s reason="%s" flag=--allow-weak', address, why)
    return hash_password(pw)


def cmd_account_add(args: argparse.Namespace) -> int:
    cfg = cli._load(args)
    address = cli._local_address_arg(cfg, args.address, "ADDRESS")
    store = cli._store(cfg)
    if store.account_exists(address):
        raise cli.CliError(f"ADDRESS: {address} already exists")
    store.add_account(address, _new_password_hash(address, args.allow_weak))
    print(f"added {address}")
    return 0


def cmd_account_passwd(args: argparse.Namespace) -> int:
    store = cli._store(cli._load(args))
    address = cli._address_arg(args.address, "ADDRESS")
    if not store.account_exists(address):
        raise cli.CliError(f"ADDRESS: no account {address}")
    store.set_password(address, _new_password_hash(address, args.allow_weak))
    print(f"password changed for {address}")
    return 0


def cmd_account_audit(args: argparse.Namespace) -> int:
    """Try the attacker's first guesses against every account; exit 1 when one falls."""
    from yuubin.auth.passwords import verify_password
    from yuubin.auth.strength import COMMON_PASSWORDS, audit_guesses
    store = cli._store(cli._load(args))
    accounts = [a for a in store.accounts() if not args.address or a.address in args.address]
    deadline = time.monotonic() + args.max_time
    weak, unfinished = [], []
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:  # argon2 releases the GIL while hashing
        for n, acct in enumerate(accounts, 1):
            guesses = audit_guesses(acct.address)
            found = None
            tried = 0
            for start in range(0, len(guesses), workers * 4):
                if time.monotonic() > deadline:
                    break
                batch = guesses[start:start + workers * 4]
                results = list(pool.map(lambda g, h=acct.password_hash: verify_password(h, g), batch))
                tried += len(batch)
                if any(results):
                    found = batch[results.index(True)]
                    break
            print(f"[{n}/{len(accounts)}] {acct.address}: {tried}/{len(guesses)} guesses tried", file=sys.stderr,
                  flush=True)
            if found is not None:
                kind = "a common password" if found in COMMON_PASSWORDS else "derived from its address"
                weak.append((acct.address, kind))
            elif tried < len(guesses):
                unfinished.append(acct.address)
    for address, kind in weak:
        print(f"WEAK\t{address}\tpassword guessed: {kind}; set a new one with `yuubin account passwd {address}`")
    for address in unfinished:
        print(f"UNFINISHED\t{address}\ttime limit reached (--max-time {args.max_time:g}s)")
    print(f"{len(accounts)} accounts audited, {len(weak)} weak, {len(unfinished)} unfinished")
    return 1 if weak else 0


def _hold(cfg, address: str, held: bool) -> int:
    from yuubin.durable import GroupCommitter
    from yuubin.policy.containment import hold_account_mail
    from yuubin.queue.edit import SpoolEditor
    from yuubin.queue.entrylock import EntryLocks
    from yuubin.queue.spool import Spool
    committer = GroupCommitter()
    spool = Spool(cfg.spool_dir, committer)
    editor = SpoolEditor(spool, EntryLocks(spool.root))  # the running server's scheduler edits the same entries
    try:
        return asyncio.run(hold_account_mail(spool, editor, address, held))
    finally:
        editor.close()
        committer.shutdown()


def cmd_account_suspend(args: argparse.Namespace) -> int:
    cfg = cli._load(args)
    store = cli._store(cfg)
    address = cli._address_arg(args.address, "ADDRESS")
    if not store.set_suspended(address, True):
        raise cli.CliError(f"ADDRESS: no account {address}")
    held = _hold(cfg, address, True)
    print(f"suspended {address}: submissions refused; {held} queued messages put on hold")
    return 0


def cmd_account_enable(args: argparse.Namespace) -> int:
    cfg = cli._load(args)
    store = cli._store(cfg)
    address = cli._address_arg(args.address, "ADDRESS")
    if not store.set_suspended(address, False):
        raise cli.CliError(f"ADDRESS: no account {address}")
    store.clear_submissions(address)  # else the counts that tripped the limit would suspend it again at once
    if args.release:
        print(f"enabled {address}; {_hold(cfg, address, False)} held messages released")
    else:
        print(f"enabled {address}; its held mail stays on hold (release it with --release)")
    return 0


def _guard(args: argparse.Namespace):
    from yuubin.policy.authguard import AuthGuard
    cfg = cli._load(args)
    return AuthGuard(cli._store(cfg), cfg.auth_guard, lambda ip: any(ip in n for n in cfg.trusted))


def cmd_auth_lockouts(args: argparse.Namespace) -> int:
    sources, accounts = _guard(args).lockouts()
    for lk in sources:
        until = datetime.datetime.fromtimestamp(lk.until).strftime("%Y-%m-%d %H:%M:%S")
        print(f"source\t{lk.source}\tlocked until {until}\toffence {lk.offences}")
    for account, failures, nsources in accounts:
        print(f"account\t{account}\t{failures} failures from {nsources} sources: unknown sources slowed down")
    if not sources and not accounts:
        print("no lockouts")
    return 0


def cmd_auth_unlock(args: argparse.Namespace) -> int:
    from yuubin.auth.accounts import AddressInputError
    try:
        done = _guard(args).unlock(args.target)
    except (AddressInputError, ValueError):
        raise cli.CliError(f"TARGET: {args.target!r} is neither an IP address, a network nor an address") from None
    print("\n".join(done) if done else f"nothing to unlock for {args.target}")
    return 0


def check_geo_source(cfg) -> None:
    """Raise ConfigError when a listener allows a country and geo.source cannot be read."""
    from yuubin.config import ConfigError
    from yuubin.geo import GeoDatabase, GeoError
    if any(lc.allow_countries for lc in cfg.listeners):
        try:
            GeoDatabase.load(cfg.geo_source)
        except GeoError as e:
            raise ConfigError(str(e)) from None


def nftables_ruleset(cfg) -> str:
    """An nftables table that admits 587/465 only from each listener's allow list."""
    from yuubin.geo import GeoDatabase, GeoError
    geo = None
    lines = ["#!/usr/sbin/nft -f", f"# Generated by `yuubin firewall nftables` from {cfg.source}.",
             "# Load with: nft -f FILE. Re-run after changing `allow` or updating geo.source.",
             "table inet yuubin", "delete table inet yuubin", "table inet yuubin {"]
    rules = []
    for i, lc in enumerate(cfg.listeners):
        if lc.kind not in ("submission", "submissions") or not (lc.allow_networks or lc.allow_countries):
            continue
        nets = list(lc.allow_networks)
        if lc.allow_countries:
            if geo is None:
                try:
                    geo = GeoDatabase.load(cfg.geo_source)
                except GeoError as e:
                    raise cli.CliError(str(e)) from None
            for cc in lc.allow_countries:
                nets.extend(geo.networks(cc))
        for family, ver in (("ipv4_addr", 4), ("ipv6_addr", 6)):
            fam_nets = list(ipaddress.collapse_addresses(n for n in nets if n.version == ver))
            name = f"allow{ver}_{lc.kind}_{i}"
            lines += [f"\tset {name} {{", f"\t\ttype {family}", "\t\tflags interval", "\t\tauto-merge"]
            if fam_nets:
                lines.append("\t\telements = { " + ", ".join(str(n) for n in fam_nets) + " }")
            lines.append("\t}")
            proto = "ip" if ver == 4 else "ip6"
            rules.append(f"\t\ttcp dport {lc.port} {proto} saddr @{name} accept")
        rules.append(f"\t\ttcp dport {lc.port} counter reject with tcp reset  # listener[{i}] {lc.kind}")
    lines += ["\tchain input {", "\t\ttype filter hook input priority filter - 5; policy accept;", *rules,
              "\t}", "}"]
    return "\n".join(lines) + "\n"


def cmd_firewall_nftables(args: argparse.Namespace) -> int:
    print(nftables_ruleset(cli._load(args)), end="")
    return 0


def register(sub, account) -> None:
    """Add these commands to the parser (`sub`: top level, `account`: the account group)."""
    x = account.add_parser("passwd", help="set a new password; stdin (one line) or prompted twice")
    x.add_argument("address")
    x.add_argument("--allow-weak", action="store_true", help=argparse.SUPPRESS)
    x.set_defaults(func=cmd_account_passwd)
    x = account.add_parser("audit", help="try common passwords and name variants on every account")
    x.add_argument("address", nargs="*", help="only these accounts")
    x.add_argument("--max-time", type=float, default=300.0, help="seconds in total (default 300)")
    x.set_defaults(func=cmd_account_audit)
    x = account.add_parser("suspend", help="refuse the account's submissions and hold its queued mail")
    x.add_argument("address")
    x.set_defaults(func=cmd_account_suspend)
    x = account.add_parser("enable", help="lift a suspension")
    x.add_argument("address")
    x.add_argument("--release", action="store_true", help="also release the account's held mail")
    x.set_defaults(func=cmd_account_enable)

    au = sub.add_parser("auth", help="login lockouts").add_subparsers(dest="sub", required=True,
                                                                      parser_class=cli._Parser)
    au.add_parser("lockouts", help="sources locked out and accounts under attack").set_defaults(
        func=cmd_auth_lockouts)
    x = au.add_parser("unlock", help="lift a lockout now (IP or network) or an account's slow-down")
    x.add_argument("target", metavar="IP|ADDRESS")
    x.set_defaults(func=cmd_auth_unlock)

    fw = sub.add_parser("firewall", help="firewall rules").add_subparsers(dest="sub", required=True,
                                                                          parser_class=cli._Parser)
    fw.add_parser("nftables", help="print an nftables ruleset enforcing the 587/465 allow lists").set_defaults(
        func=cmd_firewall_nftables)

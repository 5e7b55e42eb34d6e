"""`yuubin account ...`: adding and removing accounts, their passwords, the password audit and
suspension (which also holds the account's queued mail)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from yuubin.cli.common import (
    CliError,
    SubParsers,
    add_group,
    address_arg,
    load_config,
    local_address_arg,
    new_password_hash,
    open_store,
    plural,
    record_admin_action,
)
from yuubin.config import Config
from yuubin.logs import utc_time
from yuubin.store import SUSPENDED_BY_ADMIN, SUSPENDED_BY_LIMIT


def cmd_account_add(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    address = local_address_arg(cfg, args.address, "ADDRESS")
    store = open_store(cfg)
    if store.account_exists(address):
        raise CliError(f"ADDRESS: {address} already exists")
    store.add_account(address, new_password_hash(address, args.allow_weak))
    record_admin_action(store, "account_add", address)
    print(f"added {address}")
    return 0


def cmd_account_list(args: argparse.Namespace) -> int:
    store = open_store(load_config(args))
    why = {SUSPENDED_BY_ADMIN: " by the administrator", SUSPENDED_BY_LIMIT: " by the sending limit"}
    for a in store.accounts():
        print(f"{a.address}\tcreated {utc_time(a.created)}"
              + (f"\tsuspended{why.get(a.suspended_by, '')}" if a.suspended else ""))
    return 0


def cmd_account_remove(args: argparse.Namespace) -> int:
    store = open_store(load_config(args))
    address = address_arg(args.address, "ADDRESS")
    if not store.remove_account(address):
        raise CliError(f"ADDRESS: no account {address}")
    record_admin_action(store, "account_remove", address, "its Maildir is kept")
    print(f"removed {address} (its Maildir is kept)")
    return 0


def cmd_account_passwd(args: argparse.Namespace) -> int:
    store = open_store(load_config(args))
    address = address_arg(args.address, "ADDRESS")
    if not store.account_exists(address):
        raise CliError(f"ADDRESS: no account {address}")
    store.set_password(address, new_password_hash(address, args.allow_weak))
    record_admin_action(store, "account_passwd", address, "password changed")
    print(f"password changed for {address}")
    return 0


def _duration(seconds: float) -> str:
    s = max(1, round(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def _workers_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 64, got {text!r}")
    return int(text)


def audit_workers() -> int:
    """The cores this process may use (at most 8: each check also takes 64 MiB)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def cmd_account_audit(args: argparse.Namespace) -> int:
    """Try the attacker's first guesses against every account; exit 1 when one falls.

    The checks run in threads, one per core: argon2 releases the GIL while it hashes."""
    from yuubin.auth.passwords import verify_password
    from yuubin.auth.strength import COMMON_PASSWORDS, audit_guesses
    store = open_store(load_config(args))
    accounts = store.accounts()
    if args.address:
        wanted = [address_arg(a, "ADDRESS") for a in args.address]
        known = {a.address for a in accounts}
        if missing := [a for a in wanted if a not in known]:
            raise CliError(f"ADDRESS: no account {', '.join(missing)}")
        accounts = [a for a in accounts if a.address in wanted]
    workers = args.workers or audit_workers()
    weak: list[tuple[str, str]] = []
    unfinished: list[str] = []
    with ThreadPoolExecutor(workers) as pool:
        if accounts:
            # What one round of `workers` checks costs here, measured on a real hash (each stored
            # hash carries its own cost) with a password no one has: the estimate before the start.
            probe = accounts[0].password_hash
            started = time.monotonic()
            list(pool.map(lambda _: verify_password(probe, "\x00yuubin-audit-timing"), range(workers)))
            per_check = (time.monotonic() - started) / workers
            total = sum(len(audit_guesses(a.address)) for a in accounts)
            estimate = total * per_check
            note = (f"; --max-time {args.max_time:g}s stops it sooner" if estimate > args.max_time else "")
            print(f"auditing {plural(len(accounts), 'account')}: {plural(total, 'guess', 'guesses')} in all, "
                  f"{per_check * 1000:.0f} ms each with {workers} in parallel: at most about "
                  f"{_duration(estimate)}{note}", file=sys.stderr, flush=True)
        deadline = time.monotonic() + args.max_time
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
    print(f"{plural(len(accounts), 'account')} audited, {len(weak)} weak, {len(unfinished)} unfinished")
    return 1 if weak else 0


def _hold(cfg: Config, address: str, held: bool) -> int:
    """Hold (or release) the account's queued mail; returns how many entries changed."""
    from yuubin.durable import GroupCommitter
    from yuubin.policy.holds import hold_account_mail
    from yuubin.queue.edit import SpoolEditor
    from yuubin.queue.entrylock import EntryLocks
    from yuubin.queue.spool import Spool
    committer = GroupCommitter()
    spool = Spool(cfg.spool_dir, committer)
    editor = SpoolEditor(spool, EntryLocks(spool.root))  # the running server's scheduler edits the same entries
    try:
        return asyncio.run(hold_account_mail(editor, address, held))
    finally:
        editor.close()
        committer.shutdown()


def cmd_account_suspend(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    store = open_store(cfg)
    address = address_arg(args.address, "ADDRESS")
    if not store.set_suspended(address, True, SUSPENDED_BY_ADMIN):
        raise CliError(f"ADDRESS: no account {address}")
    held = _hold(cfg, address, True)
    record_admin_action(store, "account_suspend", address, f"submissions refused; {held} queued messages held")
    print(f"suspended {address}: submissions refused; {plural(held, 'queued message')} put on hold")
    return 0


def cmd_account_enable(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    store = open_store(cfg)
    address = address_arg(args.address, "ADDRESS")
    if not store.set_suspended(address, False):
        raise CliError(f"ADDRESS: no account {address}")
    store.clear_submissions(address)  # else the counts that tripped the limit would suspend it again at once
    if args.release:
        released = _hold(cfg, address, False)
        record_admin_action(store, "account_enable", address, f"{released} held messages released")
        print(f"enabled {address}; {plural(released, 'held message')} released")
    else:
        record_admin_action(store, "account_enable", address, "its held mail stays on hold")
        print(f"enabled {address}; its held mail stays on hold (release it with --release)")
    return 0


def register(sub: SubParsers) -> None:
    """Add the account group: add, list, remove, passwd, audit, suspend, enable."""
    a = add_group(sub, "account", "mail accounts: add, list, remove, passwd, audit, suspend, enable")
    x = a.add_parser("add", help="add an account; password from stdin (one line) or prompted twice")
    x.add_argument("address", metavar="ADDRESS")
    x.add_argument("--allow-weak", action="store_true", help=argparse.SUPPRESS)
    x.set_defaults(func=cmd_account_add)
    a.add_parser("list", help="list accounts").set_defaults(func=cmd_account_list)
    x = a.add_parser("remove", help="remove an account (its mail stays on disk)")
    x.add_argument("address", metavar="ADDRESS")
    x.set_defaults(func=cmd_account_remove)
    x = a.add_parser("passwd", help="set a new password; stdin (one line) or prompted twice")
    x.add_argument("address", metavar="ADDRESS")
    x.add_argument("--allow-weak", action="store_true", help=argparse.SUPPRESS)
    x.set_defaults(func=cmd_account_passwd)
    x = a.add_parser("audit", help="try common passwords and name variants on every account")
    x.add_argument("address", nargs="*", metavar="ADDRESS", help="only these accounts")
    x.add_argument("--max-time", type=float, default=300.0, help="seconds in total (default 300)")
    x.add_argument("--workers", type=_workers_arg, default=0, metavar="N",
                   help="checks in parallel (default: one per core, at most 8)")
    x.set_defaults(func=cmd_account_audit)
    x = a.add_parser("suspend", help="refuse the account's submissions and hold its queued mail")
    x.add_argument("address", metavar="ADDRESS")
    x.set_defaults(func=cmd_account_suspend)
    x = a.add_parser("enable", help="lift a suspension")
    x.add_argument("address", metavar="ADDRESS")
    x.add_argument("--release", action="store_true", help="also release the account's held mail")
    x.set_defaults(func=cmd_account_enable)

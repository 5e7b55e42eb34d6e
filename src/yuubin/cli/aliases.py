"""`yuubin alias ...`: addresses in our domains that deliver to other addresses."""

from __future__ import annotations

import argparse
import sys

from yuubin.cli.common import (
    CliError,
    SubParsers,
    add_group,
    address_arg,
    load_config,
    local_address_arg,
    open_store,
    record_admin_action,
)
from yuubin.config import Config
from yuubin.store import Store


def _nobody_here(cfg: Config, store: Store, targets: list[str]) -> list[str]:
    """The targets in our domains that reach no mailbox (no account, alias or postmaster by that name):
    mail to the alias would bounce for them."""
    from yuubin.auth.accounts import Directory
    from yuubin.smtp.address import parse_path
    directory = Directory(store, cfg.local_domains, cfg.postmaster, cfg.mailauth.report_address)
    out = []
    for t in targets:
        address = parse_path(f"<{t}>", smtputf8=True)  # normalized by address_arg: parses
        if address is not None and directory.is_local(address.domain) and directory.resolve(address) is None:
            out.append(t)
    return out


def cmd_alias_add(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    alias = local_address_arg(cfg, args.alias, "ALIAS")
    targets = [address_arg(t, "TARGET") for t in args.targets]
    if alias in targets:
        raise CliError(f"TARGET: {alias} cannot point to itself")
    store = open_store(cfg)
    if store.account_exists(alias):
        raise CliError(f"ALIAS: {alias} is an account")
    if missing := _nobody_here(cfg, store, targets):
        what = f"{', '.join(missing)}: no account or alias here"
        if not args.force:
            raise CliError(f"TARGET: {what} (add it first, or give --force to add the alias anyway)")
        print(f"yuubin: warning: TARGET: {what}; mail to {alias} for it will bounce until it exists",
              file=sys.stderr)
    store.add_alias(alias, targets)
    now = ", ".join(store.alias_targets(alias))
    record_admin_action(store, "alias_add", alias, f"added {', '.join(targets)}; now -> {now}")
    print(f"{alias} -> {now}")
    return 0


def cmd_alias_list(args: argparse.Namespace) -> int:
    store = open_store(load_config(args))
    for alias, targets in store.aliases().items():
        print(f"{alias}\t{', '.join(targets)}")
    return 0


def cmd_alias_remove(args: argparse.Namespace) -> int:
    store = open_store(load_config(args))
    alias = address_arg(args.alias, "ALIAS")
    if not store.remove_alias(alias):
        raise CliError(f"ALIAS: no alias {alias}")
    record_admin_action(store, "alias_remove", alias)
    print(f"removed {alias}")
    return 0


def register(sub: SubParsers) -> None:
    """Add the alias group: add, list, remove."""
    al = add_group(sub, "alias", "aliases: add, list, remove")
    x = al.add_parser("add", help="ALIAS delivers to every TARGET (local or remote)")
    x.add_argument("alias", metavar="ALIAS")
    x.add_argument("targets", nargs="+", metavar="TARGET")
    x.add_argument("--force", action="store_true", help="add it even when a local TARGET does not exist (yet)")
    x.set_defaults(func=cmd_alias_add)
    al.add_parser("list", help="list aliases").set_defaults(func=cmd_alias_list)
    x = al.add_parser("remove", help="remove an alias")
    x.add_argument("alias", metavar="ALIAS")
    x.set_defaults(func=cmd_alias_remove)

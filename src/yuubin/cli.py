"""The `yuubin` command.

Errors the admin can fix (bad config, bad argument, unknown account) print one line naming the
key or argument and exit with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from pathlib import Path

from yuubin import __version__
from yuubin.config import Config, ConfigError, check_tls_files, describe, load

EXIT_USAGE = 2

LOCALSERVE_CONFIG = """\
# Written by `yuubin localserve`: a server on loopback for trying yuubin with a mail client.
hostname = "localhost"
data_dir = "data"

[domains]
local = ["localhost.test"]
postmaster = "demo@localhost.test"      # mail to postmaster@ lands in the demo account

[network]
trusted = []                    # nobody relays without AUTH, not even loopback

[tls]
cert = "tls/cert.pem"           # self-signed, made on first run
key = "tls/key.pem"

[dnsbl]
zones = []                      # no DNS blocklists on loopback

[[listener]]
kind = "mx"
address = "127.0.0.1:2525"

[[listener]]
kind = "submission"             # a mail client sends here: STARTTLS, then AUTH
address = "127.0.0.1:2587"

[[listener]]
kind = "submissions"            # the same with TLS from the first byte
address = "127.0.0.1:2465"
"""

DEMO_ACCOUNT = "demo@localhost.test"


class CliError(Exception):
    """A one-line error for the admin; exit status 2."""


def _setup_logging(level: str = "info") -> None:
    from yuubin import logs
    logs.setup(level)


def _config_path(args: argparse.Namespace) -> str:
    path = args.config or os.environ.get("YUUBIN_CONFIG")
    if not path:
        raise CliError("-c/--config: no config file given (or set YUUBIN_CONFIG)")
    return path


def _load(args: argparse.Namespace) -> Config:
    return load(_config_path(args))


def _read_password(confirm: bool = True) -> str:
    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if confirm and getpass.getpass("again: ") != pw:
            raise CliError("password: the two entries differ")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        raise CliError("password: empty")
    return pw


def _store(cfg: Config):
    from yuubin.store import Store
    return Store(cfg.state_db)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    check_tls_files(cfg)
    _setup_logging(cfg.log_level)
    from yuubin.server import run
    return run(cfg)


def cmd_localserve(args: argparse.Namespace) -> int:
    from yuubin.auth.passwords import hash_password
    from yuubin.tls import make_self_signed

    base = Path(args.dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    cfg_path = base / "yuubin.toml"
    if not cfg_path.exists():
        cfg_path.write_text(LOCALSERVE_CONFIG, encoding="utf-8")
    cfg = load(cfg_path)
    if cfg.tls.cert and not cfg.tls.cert.exists():
        make_self_signed(cfg.tls.cert, cfg.tls.key, cfg.hostname)
    check_tls_files(cfg)
    store = _store(cfg)
    password = None
    if not store.account_exists(DEMO_ACCOUNT):
        password = secrets.token_urlsafe(12)
        store.add_account(DEMO_ACCOUNT, hash_password(password))
    store.close()
    _setup_logging(cfg.log_level)

    def ready(server) -> None:
        out = [f"yuubin {__version__} localserve: data in {base}"]
        for bl in server.listeners:
            out.append(f"  {bl.config.kind:<12} {bl.sockname[0]}:{bl.sockname[1]}")
        out.append(f"  config       {cfg_path}  (use with: yuubin -c {cfg_path} ...)")
        out.append(f"  certificate  {cfg.tls.cert} (self-signed)")
        out.append(f"  mail         {cfg.mail_dir}/<domain>/<user>/ (Maildir)")
        if password:
            out.append(f"  account      {DEMO_ACCOUNT}  password: {password}  (shown once)")
        else:
            out.append(f"  account      {DEMO_ACCOUNT}  (password was shown on the first run)")
        out.append("Ctrl-C stops.")
        print("\n".join(out), flush=True)

    from yuubin.server import run
    run(cfg, on_ready=ready)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    check_tls_files(cfg)
    from yuubin import cli_security
    cli_security.check_geo_source(cfg)  # a country in `allow` needs readable data, as at start
    print(f"# {cfg.source}: OK\n" + describe(cfg), end="")
    return 0


def cmd_account_list(args: argparse.Namespace) -> int:
    import datetime
    store = _store(_load(args))
    for a in store.accounts():
        created = datetime.datetime.fromtimestamp(a.created).strftime("%Y-%m-%d %H:%M")
        print(f"{a.address}\tcreated {created}" + ("\tsuspended" if a.suspended else ""))
    return 0


def cmd_account_remove(args: argparse.Namespace) -> int:
    store = _store(_load(args))
    address = _address_arg(args.address, "ADDRESS")
    if not store.remove_account(address):
        raise CliError(f"ADDRESS: no account {address}")
    print(f"removed {address} (its Maildir is kept)")
    return 0


def cmd_alias_add(args: argparse.Namespace) -> int:
    cfg = _load(args)
    alias = _local_address_arg(cfg, args.alias, "ALIAS")
    targets = [_address_arg(t, "TARGET") for t in args.targets]
    if alias in targets:
        raise CliError(f"TARGET: {alias} cannot point to itself")
    store = _store(cfg)
    if store.account_exists(alias):
        raise CliError(f"ALIAS: {alias} is an account")
    store.add_alias(alias, targets)
    print(f"{alias} -> {', '.join(store.alias_targets(alias))}")
    return 0


def cmd_alias_list(args: argparse.Namespace) -> int:
    store = _store(_load(args))
    for alias, targets in store.aliases().items():
        print(f"{alias}\t{', '.join(targets)}")
    return 0


def cmd_alias_remove(args: argparse.Namespace) -> int:
    store = _store(_load(args))
    alias = _address_arg(args.alias, "ALIAS")
    if not store.remove_alias(alias):
        raise CliError(f"ALIAS: no alias {alias}")
    print(f"removed {alias}")
    return 0


def _address_arg(text: str, name: str) -> str:
    from yuubin.auth.accounts import AddressInputError, normalize_address
    try:
        return normalize_address(text)
    except AddressInputError as e:
        raise CliError(f"{name}: {e}") from None


def _local_address_arg(cfg: Config, text: str, name: str) -> str:
    """An address argument that must be in one of our domains (accounts, aliases)."""
    address = _address_arg(text, name)
    if address.rpartition("@")[2] not in cfg.local_domains:
        raise CliError(f"{name}: {address}: domain is not in domains.local {list(cfg.local_domains)}")
    return address


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other CLI error
        self.exit(EXIT_USAGE, f"yuubin: error: {message} (see yuubin --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="yuubin", description="A self-hosted mail server: strict by default, easy to run.")
    p.add_argument("-c", "--config", help="config file (default: $YUUBIN_CONFIG)")
    p.add_argument("--version", action="version", version=f"yuubin {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="run the server from the config file (foreground, logs to stderr)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("localserve", help="run everything on loopback with a demo account, for trying it out")
    s.add_argument("--dir", default="./yuubin-data", help="where config, certificate and mail live")
    s.set_defaults(func=cmd_localserve)

    c = sub.add_parser("config", help="configuration").add_subparsers(dest="sub", required=True,
                                                                       parser_class=_Parser)
    c.add_parser("check", help="validate the file and print the effective settings").set_defaults(
        func=cmd_config_check)

    a = sub.add_parser("account", help="mail accounts").add_subparsers(dest="sub", required=True,
                                                                       parser_class=_Parser)
    x = a.add_parser("add", help="add an account; password from stdin (one line) or prompted twice")
    x.add_argument("address")
    x.add_argument("--allow-weak", action="store_true", help=argparse.SUPPRESS)
    from yuubin import cli_security
    x.set_defaults(func=cli_security.cmd_account_add)  # with the password strength check
    a.add_parser("list", help="list accounts").set_defaults(func=cmd_account_list)
    x = a.add_parser("remove", help="remove an account (its mail stays on disk)")
    x.add_argument("address")
    x.set_defaults(func=cmd_account_remove)
    cli_security.register(sub, a)  # passwd, audit, suspend, enable; auth ...; firewall ...

    al = sub.add_parser("alias", help="aliases").add_subparsers(dest="sub", required=True, parser_class=_Parser)
    x = al.add_parser("add", help="ALIAS delivers to every TARGET (local or remote)")
    x.add_argument("alias")
    x.add_argument("targets", nargs="+", metavar="TARGET")
    x.set_defaults(func=cmd_alias_add)
    al.add_parser("list", help="list aliases").set_defaults(func=cmd_alias_list)
    x = al.add_parser("remove", help="remove an alias")
    x.add_argument("alias")
    x.set_defaults(func=cmd_alias_remove)
    from yuubin import cli_queue
    cli_queue.register(sub)  # queue list, show, flush, hold, release, delete (outbound queue)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ConfigError) as e:
        print(f"yuubin: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"yuubin: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1

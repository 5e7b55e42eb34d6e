"""`yuubin serve`, `yuubin localserve` and `yuubin config check`: running the server and checking its config."""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yuubin import __version__
from yuubin.cli.common import SubParsers, add_group, load_config, open_store, setup_logging
from yuubin.config import Config, ConfigError, check_tls_files, describe, load

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


def _run_server(cfg: Config, on_ready: Callable[[Any], None] | None = None) -> int:
    """The one place the CLI starts the server; imported late, as no other command needs it."""
    from yuubin.app import run
    return run(cfg, on_ready=on_ready)


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    check_tls_files(cfg)
    setup_logging(cfg.log_level)
    return _run_server(cfg)


def cmd_localserve(args: argparse.Namespace) -> int:
    from yuubin.auth.passwords import hash_password
    from yuubin.tls import make_self_signed

    base = Path(args.dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    cfg_path = base / "yuubin.toml"
    if not cfg_path.exists():
        cfg_path.write_text(LOCALSERVE_CONFIG, encoding="utf-8")
    cfg = load(cfg_path)
    if cfg.tls.cert and cfg.tls.key and not cfg.tls.cert.exists():  # the config sets both or neither
        make_self_signed(cfg.tls.cert, cfg.tls.key, cfg.hostname)
    check_tls_files(cfg)
    store = open_store(cfg)
    password = None
    if not store.account_exists(DEMO_ACCOUNT):
        password = secrets.token_urlsafe(12)
        store.add_account(DEMO_ACCOUNT, hash_password(password))
    store.close()
    setup_logging(cfg.log_level)

    def ready(server: Any) -> None:
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

    _run_server(cfg, on_ready=ready)
    return 0


def check_geo_source(cfg: Config) -> None:
    """Raise ConfigError when a listener allows a country and geo.source cannot be read."""
    from yuubin.geo import GeoDatabase, GeoError
    if any(lc.allow_countries for lc in cfg.listeners):
        try:
            GeoDatabase.load(cfg.geo_source)
        except GeoError as e:
            raise ConfigError(str(e)) from None


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    check_tls_files(cfg)
    check_geo_source(cfg)  # a country in `allow` needs readable data, as at start
    print(f"# {cfg.source}: OK\n" + describe(cfg), end="")
    return 0


def register(sub: SubParsers) -> None:
    """Add serve, localserve and config check."""
    s = sub.add_parser("serve", help="run the server from the config file (foreground, logs to stderr)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("localserve", help="run everything on loopback with a demo account, for trying it out",
                       takes_config=False)  # it writes and uses its own config in --dir
    s.add_argument("--dir", default="./yuubin-data", help="where config, certificate and mail live")
    s.set_defaults(func=cmd_localserve)

    c = add_group(sub, "config", "the configuration file: check")
    c.add_parser("check", help="validate the file and print the effective settings").set_defaults(
        func=cmd_config_check)

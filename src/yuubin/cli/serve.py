"""`yuubin serve`, `yuubin localserve` and `yuubin config check`: running the server and checking its config."""

from __future__ import annotations

import argparse
import dataclasses
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yuubin import __version__
from yuubin.cli.common import CliError, SubParsers, add_group, load_config, open_store, setup_logging
from yuubin.config import Config, check_mail_access, describe, load

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
address = "127.0.0.1:{mx}"

[[listener]]
kind = "submission"             # a mail client sends here: STARTTLS, then AUTH
address = "127.0.0.1:{submission}"

[[listener]]
kind = "submissions"            # the same with TLS from the first byte
address = "127.0.0.1:{submissions}"

[[listener]]
kind = "imaps"                  # a mail client reads mail here: IMAP, TLS from the first byte
address = "127.0.0.1:{imaps}"

[[listener]]
kind = "imap"                   # IMAP with STARTTLS (no login before TLS)
address = "127.0.0.1:{imap}"
"""

DEMO_ACCOUNT = "demo@localhost.test"

# localserve's ports are --port-base plus these: 2525, 2587, 2465, 2143 and 2993 by default.
PORT_BASE = 2000
PORT_OFFSETS = {"mx": 525, "submission": 587, "submissions": 465, "imap": 143, "imaps": 993}


def _run_server(cfg: Config, on_ready: Callable[[Any], None] | None = None, allow_root: bool = False) -> int:
    """The one place the CLI starts the server; imported late, as no other command needs it."""
    from yuubin.app import run
    return run(cfg, on_ready=on_ready, allow_root=allow_root)


def check_startable(cfg: Config) -> None:
    """What serve refuses at start, short of binding (the server's own check, imported late)."""
    from yuubin.app import check
    check(cfg)


def _log_format(cfg: Config, args: argparse.Namespace) -> Config:
    """--log-format overrides [log] format (the workers read it from the config)."""
    return dataclasses.replace(cfg, log_format=args.log_format) if args.log_format else cfg


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _log_format(load_config(args), args)
    check_startable(cfg)
    check_mail_access(cfg)
    setup_logging(cfg.log_level, cfg.log_format)
    return _run_server(cfg)


def _port_base(text: str) -> int:
    """--port-base N: every localserve port must stay in range."""
    try:
        base = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    top = 65535 - max(PORT_OFFSETS.values())
    if not 0 <= base <= top:
        raise argparse.ArgumentTypeError(f"{base} is out of range 0-{top} "
                                         f"(the ports are N+525, N+587, N+465, N+143, N+993)")
    return base


def _move_ports(cfg: Config, base: int) -> Config:
    """The config with each listener on base + its kind's offset."""
    listeners = tuple(dataclasses.replace(lc, port=base + PORT_OFFSETS[lc.kind]) if lc.kind in PORT_OFFSETS
                      else lc for lc in cfg.listeners)
    return dataclasses.replace(cfg, listeners=listeners)


def cmd_localserve(args: argparse.Namespace) -> int:
    from yuubin.app import ListenerBindError
    from yuubin.auth.passwords import hash_password
    from yuubin.tls import make_self_signed

    base = Path(args.dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    cfg_path = base / "yuubin.toml"
    port_base = PORT_BASE if args.port_base is None else args.port_base
    if not cfg_path.exists():
        ports = {kind: port_base + offset for kind, offset in PORT_OFFSETS.items()}
        cfg_path.write_text(LOCALSERVE_CONFIG.format(**ports), encoding="utf-8")
    cfg = load(cfg_path)
    if args.port_base is not None:  # given again on a later run: moves what the file says, for this run
        cfg = _move_ports(cfg, args.port_base)
    if cfg.tls.cert and cfg.tls.key and not cfg.tls.cert.exists():  # the config sets both or neither
        make_self_signed(cfg.tls.cert, cfg.tls.key, cfg.hostname)
    cfg = _log_format(cfg, args)
    check_startable(cfg)
    setup_logging(cfg.log_level, cfg.log_format)

    def ready(server: Any) -> None:
        # The demo account is made only now that every listener is bound: a start that fails
        # must not make an account whose password nobody saw.
        store = open_store(cfg)
        try:
            password = None
            if not store.account_exists(DEMO_ACCOUNT):
                password = secrets.token_urlsafe(12)
                store.add_account(DEMO_ACCOUNT, hash_password(password))
        finally:
            store.close()
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
        imap = {bl.config.kind: bl.sockname for bl in server.listeners if bl.config.kind in ("imap", "imaps")}
        if imap:
            where = ", ".join(f"{a[0]}:{a[1]} ({'TLS' if k == 'imaps' else 'STARTTLS'})" for k, a in imap.items())
            out.append(f"  mail client  IMAP {where}, user {DEMO_ACCOUNT}, the password above; "
                       f"trust the self-signed certificate")
        out.append("Ctrl-C stops.")
        print("\n".join(out), flush=True)

    try:
        _run_server(cfg, on_ready=ready, allow_root=True)  # loopback ports: a demo, not a service
    except ListenerBindError as e:
        lc = e.listener
        example = port_base + 1000 if port_base + 1000 + max(PORT_OFFSETS.values()) <= 65535 else 10000
        raise CliError(f"localserve: listener {lc.kind} cannot listen on {lc.address}: {e.reason}; "
                       f"move all localserve ports with --port-base N (ports N+525, N+587, N+465, N+143, N+993), "
                       f"e.g. --port-base {example}") from None
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    check_startable(cfg)  # the same checks as serve at start: only the bind itself is left out
    check_mail_access(cfg)  # [mail] owner and group must be ours to give, as at start
    print(f"# {cfg.source}: OK\n" + describe(cfg), end="")
    return 0


def register(sub: SubParsers) -> None:
    """Add serve, localserve and config check."""
    s = sub.add_parser("serve", help="run the server from the config file (foreground, logs to stderr)")
    s.add_argument("--log-format", choices=["text", "json"], help="log lines as key=value text or JSON "
                   "(default: [log] format, text)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("localserve", help="run everything on loopback with a demo account, for trying it out",
                       takes_config=False)  # it writes and uses its own config in --dir
    s.add_argument("--dir", default="./yuubin-data", help="where config, certificate and mail live")
    s.add_argument("--port-base", type=_port_base, metavar="N",
                   help=f"listen on ports N+525 (mx), N+587 (submission), N+465 (submissions), N+143 (imap), "
                        f"N+993 (imaps); "
                        f"default {PORT_BASE}, or what DIR/yuubin.toml says")
    s.add_argument("--log-format", choices=["text", "json"], help="log lines as key=value text or JSON")
    s.set_defaults(func=cmd_localserve)

    c = add_group(sub, "config", "the configuration file: check")
    c.add_parser("check", help="validate the file and print the effective settings").set_defaults(
        func=cmd_config_check)

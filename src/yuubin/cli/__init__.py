"""The `yuubin` command: the parser assembled from the command groups, and the error handling.

Errors the admin can fix (bad config, bad argument, unknown account) print one line naming the
key or argument and exit with status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from yuubin import __version__
from yuubin.cli import accounts, aliases, mailbox, queue, security, serve
from yuubin.cli.common import EXIT_USAGE, CliError, Parser, add_commands, add_config_option
from yuubin.config import ConfigError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="yuubin", description="A self-hosted mail server: strict by default, easy to run.")
    add_config_option(p, None)  # also accepted after the command (cli/common.Commands)
    p.add_argument("--version", action="version", version=f"yuubin {__version__}")
    sub = add_commands(p, "command")
    # The order here is the order `yuubin --help` lists the commands in.
    serve.register(sub)  # serve, localserve, config check
    accounts.register(sub)  # account add, list, remove, passwd, audit, suspend, enable
    security.register(sub)  # auth lockouts, unlock; firewall nftables
    aliases.register(sub)  # alias add, list, remove
    queue.register(sub)  # queue list, show, flush, hold, release, delete (outbound queue)
    mailbox.register(sub)  # mailbox import, export (Dovecot Maildir)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)  # every leaf parser sets func to one of the cmd_* functions
        return status
    except CliError as e:
        print(f"yuubin: error: {e}", file=sys.stderr)
        return e.status
    except ConfigError as e:
        print(f"yuubin: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"yuubin: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1

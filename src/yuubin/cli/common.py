"""What every `yuubin` command group shares: the one-line error, the parser class, config loading,
password reading, address arguments and the record of admin actions for the server's log.

Imports no other cli module, so each command group can import it without forming a circle.
Heavy modules (the store, password hashing, logging setup) are imported when a command needs them.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from typing import TYPE_CHECKING, NoReturn, TypeAlias

from yuubin.config import Config, load

if TYPE_CHECKING:
    from yuubin.store import Store

EXIT_USAGE = 2

log = logging.getLogger("yuubin.cli")


class CliError(Exception):
    """A one-line error for the admin; exit status 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit 2, like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"yuubin: error: {message} (see yuubin --help)\n")


SubParsers: TypeAlias = "argparse._SubParsersAction[Parser]"


def add_group(sub: SubParsers, name: str, help: str) -> SubParsers:
    """A command group (`yuubin NAME SUB ...`) whose sub-command is required."""
    return sub.add_parser(name, help=help).add_subparsers(dest="sub", required=True, parser_class=Parser)


def setup_logging(level: str = "info") -> None:
    from yuubin import logs
    logs.setup(level)


def config_path(args: argparse.Namespace) -> str:
    path: str | None = args.config or os.environ.get("YUUBIN_CONFIG")
    if not path:
        raise CliError("-c/--config: no config file given (or set YUUBIN_CONFIG)")
    return path


def load_config(args: argparse.Namespace) -> Config:
    """The config named by -c/--config or $YUUBIN_CONFIG."""
    return load(config_path(args))


def open_store(cfg: Config) -> Store:
    from yuubin.store import Store
    return Store(cfg.state_db)


def admin_name() -> str:
    """Who runs the command, for the server's log: the admin behind sudo, else the login name."""
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user:
        return sudo_user
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def record_admin_action(store: Store, action: str, target: str, detail: str = "") -> None:
    """Leave what the admin did in state.db: the running server logs it within a second, a stopped
    one at its next start (the CLI's own stderr is gone with the terminal)."""
    import sqlite3
    try:
        store.record_admin_action(admin_name(), action, target, detail)
    except sqlite3.Error as e:  # the action itself is done: say what is missing, do not fail it
        print(f"yuubin: warning: {action} {target} done, but not recorded for the server's log: {e}",
              file=sys.stderr)


def read_password(confirm: bool = True) -> str:
    """Prompted (twice when `confirm`) on a terminal, else one line from stdin for scripts."""
    if sys.stdin.isatty():
        pw = getpass.getpass("password: ")
        if confirm and getpass.getpass("again: ") != pw:
            raise CliError("password: the two entries differ")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        raise CliError("password: empty")
    return pw


def new_password_hash(address: str, allow_weak: bool) -> str:
    """Read the new password, refuse it when weak (unless --allow-weak, logged), hash it."""
    from yuubin.auth.passwords import hash_password
    from yuubin.auth.strength import weakness
    pw = read_password()
    why = weakness(pw, address)
    if why and not allow_weak:
        raise CliError(f"password: refused for {address}: {why}")
    if why:
        setup_logging()
        log.warning('event=weak_password_allowed account=%s reason="%s" flag=--allow-weak', address, why)
    return hash_password(pw)


def address_arg(text: str, name: str) -> str:
    """The normalized address, or a CliError naming the argument."""
    from yuubin.auth.accounts import AddressInputError, normalize_address
    try:
        return normalize_address(text)
    except AddressInputError as e:
        raise CliError(f"{name}: {e}") from None


def local_address_arg(cfg: Config, text: str, name: str) -> str:
    """An address argument that must be in one of our domains (accounts, aliases)."""
    address = address_arg(text, name)
    if address.rpartition("@")[2] not in cfg.local_domains:
        raise CliError(f"{name}: {address}: domain is not in domains.local {list(cfg.local_domains)}")
    return address

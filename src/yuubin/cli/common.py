"""What every `yuubin` command group shares: the one-line error, the parser and sub-command classes
(-c anywhere, --help descriptions, typo suggestions), config loading, password reading, address
arguments and the record of admin actions for the server's log.

Imports no other cli module, so each command group can import it without forming a circle.
Heavy modules (the store, password hashing, logging setup) are imported when a command needs them.
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

from yuubin.config import Config, load

if TYPE_CHECKING:
    from yuubin.store import Store

EXIT_USAGE = 2
DEFAULT_CONFIG = "/etc/yuubin/yuubin.toml"
CONFIG_HELP = f"config file (default: $YUUBIN_CONFIG, else {DEFAULT_CONFIG})"

log = logging.getLogger("yuubin.cli")


class CliError(Exception):
    """A one-line error for the admin; exit status 2."""

    status = EXIT_USAGE


class CliFailure(CliError):
    """The command was right but could not do its work (e.g. it needs the running server); exit status 1."""

    status = 1


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and exit 2, like every other CLI error."""

    def error(self, message: str) -> NoReturn:
        hint = "" if "did you mean" in message else f" (see {self.prog} --help)"
        self.exit(EXIT_USAGE, f"yuubin: error: {message}{hint}\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """A mistyped command names the nearest one, not argparse's `argument sub: invalid choice`."""
        if action.choices is None or value in action.choices:
            return
        group = self.prog.partition(" ")[2]  # "yuubin queue" -> "queue"
        full = (lambda name: f"{group} {name}") if group else str
        what = "command" if isinstance(action, argparse._SubParsersAction) else f"{action.metavar or action.dest}"
        near = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1)
        message = f"unknown {what} {full(str(value))!r}"
        if near:
            message += f" (did you mean {full(near[0])!r}?)"
        raise argparse.ArgumentError(None, message)


def add_config_option(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", default=default, help=CONFIG_HELP)


if TYPE_CHECKING:
    _CommandsBase = argparse._SubParsersAction[Parser]
else:
    _CommandsBase = argparse._SubParsersAction


class Commands(_CommandsBase):
    """The sub-commands of `yuubin` or of a command group: each takes `-c FILE` after its name too
    (given there it wins over one before it) and shows its one-line help as the description of
    its own `--help`."""

    def add_parser(self, name: str, **kwargs: Any) -> Parser:
        takes_config: bool = kwargs.pop("takes_config", True)
        if "help" in kwargs:
            kwargs.setdefault("description", kwargs["help"])
        parser = super().add_parser(name, **kwargs)
        if takes_config:  # SUPPRESS: when not given here, the value from before the command stays
            add_config_option(parser, argparse.SUPPRESS)
        return parser


SubParsers: TypeAlias = Commands


def add_commands(parser: Parser, dest: str) -> SubParsers:
    """The required sub-command of `parser`, named COMMAND in usage and errors."""
    commands = parser.add_subparsers(dest=dest, required=True, metavar="COMMAND", parser_class=Parser,
                                     action=Commands)
    assert isinstance(commands, Commands)
    return commands


def add_group(sub: SubParsers, name: str, help: str) -> SubParsers:
    """A command group (`yuubin NAME SUB ...`) whose sub-command is required."""
    return add_commands(sub.add_parser(name, help=help), "sub")


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    from yuubin import logs
    logs.setup(level, fmt=fmt)


def config_path(args: argparse.Namespace) -> str:
    """-c/--config (before or after the command), else $YUUBIN_CONFIG, else the default path."""
    path: str | None = args.config or os.environ.get("YUUBIN_CONFIG")
    if path:
        return path
    if not os.path.exists(DEFAULT_CONFIG):
        raise CliError(f"{DEFAULT_CONFIG}: config file not found (the default; give -c FILE or set YUUBIN_CONFIG)")
    return DEFAULT_CONFIG


def load_config(args: argparse.Namespace) -> Config:
    """The config named by -c/--config, $YUUBIN_CONFIG or the default path."""
    return load(config_path(args))


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 entry`, `2 entries`: counts in output read as English."""
    return f"{n} {word if n == 1 else many or word + 's'}"


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

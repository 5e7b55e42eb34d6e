"""`yuubin mailbox import|export`: an account's mail from and to a Dovecot Maildir, keeping the
UIDs and keywords, so that mail clients do not download everything again after the move."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from yuubin.cli.common import (
    CliError,
    SubParsers,
    add_group,
    load_config,
    local_address_arg,
    open_store,
    plural,
    record_admin_action,
)
from yuubin.config import Config


def _account(cfg: Config, args: argparse.Namespace):  # -> (AccountStore, MailStore, GroupCommitter)
    from yuubin.delivery.maildir import Maildirs
    from yuubin.durable import FileAccess, GroupCommitter
    from yuubin.imap.store import MailStore
    address = local_address_arg(cfg, args.address, "ADDRESS")
    store = open_store(cfg)
    if not store.account_exists(address):
        raise CliError(f"ADDRESS: no account {address} (yuubin account add {address})")
    committer = GroupCommitter()
    ms = MailStore(Maildirs(cfg.mail_dir, cfg.hostname, FileAccess(cfg.mail.mode, cfg.mail.uid, cfg.mail.gid)),
                   committer)
    return store, address, ms, committer


def _show(report, verb: str) -> None:
    for f in report.folders:
        what = "UIDs kept" if f.kept_uids else "new UIDs (the folder already held mail: clients reload it)"
        extra = f", {f.skipped} already there" if f.skipped else ""
        print(f"{f.name}: {plural(f.messages, 'message')} {verb}, UIDVALIDITY {f.uidvalidity}, {what}{extra}")


def cmd_mailbox_import(args: argparse.Namespace) -> int:
    from yuubin.imap.dovecot import import_maildir
    cfg = load_config(args)
    source = Path(args.dir)
    if not (source / "cur").is_dir() and not (source / "new").is_dir():
        raise CliError(f"DIR: {source} is not a Maildir (no cur/ or new/)")
    store, address, ms, committer = _account(cfg, args)
    try:
        report = asyncio.run(import_maildir(ms.account(address), source, committer))
    finally:
        ms.close()
        committer.shutdown()
    _show(report, "imported")
    total = sum(f.messages for f in report.folders)
    record_admin_action(store, "mailbox_import", address, f"from={source} messages={total}")
    return 0


def cmd_mailbox_export(args: argparse.Namespace) -> int:
    from yuubin.imap.dovecot import export_maildir
    cfg = load_config(args)
    dest = Path(args.dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CliError(f"DIR: {dest} exists and is not an empty directory")
    store, address, ms, committer = _account(cfg, args)
    try:
        report = asyncio.run(export_maildir(ms.account(address), dest, committer))
    finally:
        ms.close()
        committer.shutdown()
    for f in report.folders:
        print(f"{f.name}: {plural(f.messages, 'message')} exported, UIDVALIDITY {f.uidvalidity}")
    print(f"give {dest} to the Dovecot mail user (chown -R) before Dovecot reads it")
    record_admin_action(store, "mailbox_export", address, f"to={dest}")
    return 0


def register(sub: SubParsers) -> None:
    """Add the mailbox group: import, export."""
    mb = add_group(sub, "mailbox", "an account's mail from and to a Dovecot Maildir: import, export")
    x = mb.add_parser("import", help="copy a Dovecot Maildir into an account, keeping UIDs (stop Dovecot first)")
    x.add_argument("address", metavar="ADDRESS")
    x.add_argument("dir", metavar="DIR", help="the Dovecot Maildir (with cur/, new/ and .Folder/ inside)")
    x.set_defaults(func=cmd_mailbox_import)
    x = mb.add_parser("export", help="write an account's mail as a Dovecot Maildir, keeping UIDs")
    x.add_argument("address", metavar="ADDRESS")
    x.add_argument("dir", metavar="DIR", help="a new or empty directory")
    x.set_defaults(func=cmd_mailbox_export)

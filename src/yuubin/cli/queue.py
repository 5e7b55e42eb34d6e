"""`yuubin queue ...` (list, show, flush, hold, release, delete); the work is in queue/control.py."""

from __future__ import annotations

import argparse
import sqlite3
import sys

from yuubin.cli.common import (
    CliError,
    CliFailure,
    SubParsers,
    add_group,
    load_config,
    record_admin_action,
    setup_logging,
)


def cmd_queue(args: argparse.Namespace) -> int:
    from yuubin.queue.control import NoServer, QueueError, run_command
    cfg = load_config(args)
    setup_logging(cfg.log_level)  # hold, release and delete are logged like server events
    qid: str | None = getattr(args, "id", None)  # not every queue subcommand has each argument
    sender: str | None = getattr(args, "sender", None)
    all_held: bool = getattr(args, "all_held", False)
    if args.sub in ("hold", "release", "delete") and not (qid or sender or all_held):
        raise CliError(f"queue {args.sub}: give an ID or --sender ADDRESS" +
                       (" or --all-held" if args.sub == "delete" else ""))
    # Imported now, opened at the first change: by then the queue tools may run as the spool's owner,
    # who must own what they create but may not be able to read the Python installation.
    from yuubin.store import Store
    store: Store | None = None

    def record(action: str, target: str, detail: str) -> None:
        nonlocal store
        if store is None:
            try:
                store = Store(cfg.state_db)
            except (sqlite3.Error, OSError) as e:  # the change is made: say what is missing, do not fail it
                print(f"yuubin: warning: {action} {target} done, but not recorded for the server's log: {e}",
                      file=sys.stderr)
                return
        record_admin_action(store, action, target, detail)

    try:
        print(run_command(cfg.spool_dir, args.sub, qid, sender, all_held, getattr(args, "json", False), record))
    except QueueError as e:
        raise CliError(str(e)) from None
    except NoServer as e:
        raise CliFailure(str(e)) from None
    finally:
        if store is not None:
            store.close()
    return 0


def register(sub: SubParsers) -> None:
    """Add the queue group: list, show, flush, hold, release, delete."""
    qs = add_group(sub, "queue", "the outbound queue: list, show, flush, hold, release, delete")
    x = qs.add_parser("list", help="id, age, state, next attempt, sender, recipients, last error")
    x.add_argument("--json", action="store_true", help="machine-readable output")
    x.set_defaults(func=cmd_queue)
    x = qs.add_parser("show", help="an entry's envelope, headers and attempts")
    x.add_argument("id", metavar="ID", help="a queue id or a unique start of one")
    x.set_defaults(func=cmd_queue)
    x = qs.add_parser("flush", help="retry now: one entry, or all (the running server acts within a second)")
    x.add_argument("id", nargs="?", metavar="ID", help="a queue id or a unique start of one (default: all)")
    x.set_defaults(func=cmd_queue)
    for name, text in (("hold", "never send these until released"), ("release", "send these again")):
        x = qs.add_parser(name, help=text)
        g = x.add_mutually_exclusive_group()
        g.add_argument("id", nargs="?", metavar="ID", help="a queue id or a unique start of one")
        g.add_argument("--sender", metavar="ADDRESS", help="every entry with this envelope sender")
        x.set_defaults(func=cmd_queue)
    x = qs.add_parser("delete", help="remove entries for good (logged)")
    g = x.add_mutually_exclusive_group()
    g.add_argument("id", nargs="?", metavar="ID", help="a queue id or a unique start of one")
    g.add_argument("--sender", metavar="ADDRESS", help="every entry with this envelope sender")
    g.add_argument("--all-held", action="store_true", help="every held entry")
    x.set_defaults(func=cmd_queue)

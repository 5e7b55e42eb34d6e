"""`yuubin backup DEST` and `yuubin restore SRC --dir DATA_DIR`: copies of data_dir (see backup.py)."""

from __future__ import annotations

import argparse
import pwd
from pathlib import Path

from yuubin.cli.common import CliError, CliFailure, SubParsers, load_config, plural


def cmd_backup(args: argparse.Namespace) -> int:
    from yuubin.backup import BackupError, backup
    cfg = load_config(args)
    try:
        result = backup(cfg.data_dir, Path(args.dest).resolve(), copy=args.copy)
    except BackupError as e:
        raise CliFailure(str(e)) from None
    how = f"{result.linked} hard-linked, {result.files - result.linked} copied"
    print(f"backup of {cfg.data_dir} in {result.dest}: {plural(result.files, 'file')} ({how}), "
          f"{result.bytes} bytes, {result.seconds:.1f}s")
    if result.skipped_incomplete:
        print(f"  {plural(result.skipped_incomplete, 'spool entry', 'spool entries')} still being written "
              "(not yet acknowledged to its sender) left out")
    if result.linked:
        print("  hard links share the disk with data_dir: copy the backup to another disk or host "
              "(e.g. tar or rsync -H)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from yuubin.backup import BackupError, restore
    uid = gid = -1
    if args.user:
        try:
            pw = pwd.getpwnam(args.user)
        except KeyError:
            raise CliError(f"--user: no user named {args.user!r} on this host") from None
        uid, gid = pw.pw_uid, pw.pw_gid
    data_dir = Path(args.dir).resolve()
    try:
        count = restore(Path(args.src).resolve(), data_dir, uid=uid, gid=gid)
    except BackupError as e:
        raise CliFailure(str(e)) from None
    print(f"restored {plural(count, 'file')} into {data_dir}: set data_dir = \"{data_dir}\" in the config "
          "and start the server (it delivers what was in the spool)")
    return 0


def register(sub: SubParsers) -> None:
    """Add backup and restore."""
    b = sub.add_parser("backup", help="copy state.db, the spool and the Maildirs to DEST while the server runs")
    b.add_argument("dest", metavar="DEST", help="a new (or empty) directory")
    b.add_argument("--copy", action="store_true",
                   help="copy every file (default: hard-link Maildir files when DEST is on the same file system)")
    b.set_defaults(func=cmd_backup)
    r = sub.add_parser("restore", help="check a backup and copy it into a new data directory",
                       takes_config=False)
    r.add_argument("src", metavar="SRC", help="a directory made by `yuubin backup`")
    r.add_argument("--dir", required=True, metavar="DATA_DIR", help="the new data directory (must be empty)")
    r.add_argument("--user", metavar="USER", help="give the restored files to this user (the [server] user)")
    r.set_defaults(func=cmd_restore)

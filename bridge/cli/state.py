"""``icp-bridge state``: the state database: check, backup, restore."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bridge.cli.common import add_config_option, service_paths


def _live_database(args: argparse.Namespace) -> Path:
    from bridge.state.store import state_database

    return state_database(Path(args.state) if args.state else service_paths(args.config)[1])


def cmd_check(args: argparse.Namespace) -> int:
    from bridge.state.maintenance import inspect

    path = Path(args.file) if args.file else _live_database(args)
    found = inspect(path)
    for note in found.notes:
        print(f"{path}: {note}")
    for problem in found.problems:
        print(f"{path}: {problem}")
    if found.problems:
        return 1
    print(f"{path}: sound")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from bridge.state.maintenance import MaintenanceError, backup, inspect

    source = _live_database(args)
    target = Path(args.file)
    try:
        made = backup(source, target, force=args.force)
    except MaintenanceError as e:
        print(f"icp-bridge state backup: {e}", file=sys.stderr)
        return 1
    if made is not None:
        print(f"created {made} (mode 0700)")
    found = inspect(target)
    if found.problems:  # the source itself is damaged: say so now, not at restore time
        for problem in found.problems:
            print(f"{target}: {problem}", file=sys.stderr)
        return 1
    print(f"{source} backed up to {target} ({os.path.getsize(target)} bytes)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from bridge.state.maintenance import MaintenanceError, restore

    live = _live_database(args)
    try:
        kept = restore(Path(args.file), live)
    except MaintenanceError as e:
        print(f"icp-bridge state restore: {e}", file=sys.stderr)
        return 1
    print(f"{args.file} restored to {live}" +
          (f"; the database it replaced is {kept}" if kept is not None else ""))
    return 0


def add_commands(commands: Any) -> None:
    state = commands.add_parser("state", help="the state database: check, backup, restore")
    actions = state.add_subparsers(dest="action", required=True)
    check = actions.add_parser(
        "check", help="say whether a state database is sound (and whether it is a copy taken "
                      "from a running bridge)")
    check.add_argument("file", nargs="?", help="[default: <state_dir>/state.sqlite3]")
    check.set_defaults(func=cmd_check)
    backup = actions.add_parser(
        "backup", help="copy the state database to FILE, consistent while the bridge runs "
                       "(SQLite's online backup; mode 0600)")
    backup.add_argument("file")
    backup.add_argument("--force", action="store_true", help="replace FILE if it exists")
    backup.set_defaults(func=cmd_backup)
    restore = actions.add_parser(
        "restore", help="put a backup in place of the state database (refused while a bridge "
                        "has it open); the replaced one is kept as state.sqlite3.before-restore")
    restore.add_argument("file")
    restore.set_defaults(func=cmd_restore)
    for action in (check, backup, restore):
        action.add_argument("--state", help="state directory [default: the configuration's "
                                            "state_dir]")
        add_config_option(action)

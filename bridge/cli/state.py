"""``icp-bridge state``: the state database (check)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_state(args: argparse.Namespace) -> int:
    from bridge.config import default_state_dir
    from bridge.state.store import check, state_database

    path = Path(args.file) if args.file else state_database(default_state_dir())
    problems = check(path)
    if problems:
        for problem in problems:
            print(f"{path}: {problem}")
        return 1
    print(f"{path}: sound")
    return 0


def add_commands(commands: Any) -> None:
    state = commands.add_parser("state", help="the state database")
    state_actions = state.add_subparsers(dest="action", required=True)
    state_check = state_actions.add_parser("check", help="say whether a state database is sound")
    state_check.add_argument("file", nargs="?", help="[default: <state_dir>/state.sqlite3]")
    state.set_defaults(func=cmd_state)

"""``icp-bridge users``: the users file (add, list, remove) and the failed-logon
lockouts kept in the state database (lockouts, unlock)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bridge.cli.common import add_config_option, read_password, service_authenticator, service_paths
from bridge.security.auth import (
    UserEntry,
    UsersFile,
    UsersFileError,
    check_username,
    hash_password,
    parse_users,
    read_users,
    write_users,
)
from bridge.security.permissions import LEVELS, level_name


def cmd_lockouts(args: argparse.Namespace) -> int:
    """List or clear failed-logon lockouts in the state database (the
    running bridge sees a cleared one at its next logon attempt)."""
    import time

    from bridge.security.throttle import LockoutStore, describe_key
    from bridge.state.store import state_database

    path = state_database(Path(args.state) if args.state else service_paths(args.config)[1])
    if not path.exists():
        print(f"no state database at {path}", file=sys.stderr)
        return 1
    store = LockoutStore(path)
    try:
        if args.action == "lockouts":
            now = time.time()
            rows = [(key, count) for key, count in sorted(store.load().items())
                    if count.locked_until > now or args.all]
            if not rows:
                print("no lockouts")
            for key, count in rows:
                left = max(0, count.locked_until - now)
                print(f"{describe_key(key)}\t{count.failures} failures\t"
                      f"{'locked ' + format(left, '.0f') + ' s more' if left else 'not locked'}")
            return 0
        what = f"source {args.source}" if args.source else f"user {args.name}"
        cleared = store.unlock_source(args.source) if args.source \
            else store.unlock_user(args.name or "")
        if cleared:
            print(f"unlocked {what} ({cleared} records)")
            return 0
        print(f"no lockout for {what}", file=sys.stderr)
        return 1
    finally:
        store.close()


def list_users(path: Path) -> int:
    """The good entries, and each bad one (exit 1) as the bridge names it."""
    try:
        parsed = parse_users(path.read_text(encoding="utf-8"), path)
    except FileNotFoundError:
        parsed = UsersFile()
    if not parsed.users and not parsed.problems:
        print(f"no users in {path}")
    for entry in parsed.users.values():
        print(f"{entry.name}\t{level_name(entry.permission)}")
    for problem in parsed.problems:
        print(f"bad entry: {problem} (that user cannot log on)", file=sys.stderr)
    return 1 if parsed.problems else 0


def _say_if_unused(named_config: str | None, path: Path) -> None:
    """A users file the service does not read (PAM, on an ogon host) is
    said so: a user added there would not log on, and a password kept there
    for nothing is one more to leak."""
    authenticator, why = service_authenticator(named_config)
    if authenticator == "pam":
        print(f"note: the service authenticates with PAM ({why}): it does not read {path}; "
              f"users log on with their system password at the permission.level property "
              f"(USER by default)", file=sys.stderr)


def cmd_users(args: argparse.Namespace) -> int:
    if args.action in ("lockouts", "unlock"):
        return cmd_lockouts(args)
    path = Path(args.users) if args.users else service_paths(args.config)[0]
    if not args.users:
        _say_if_unused(args.config, path)
    if args.action == "list":
        return list_users(path)
    try:
        users = read_users(path)
        check_username(args.name)
        if args.action == "add":
            password = read_password(f"password for {args.name}: ")
            if not password:
                raise SystemExit("empty password refused")
            users[args.name] = UserEntry(args.name, LEVELS[args.permission],
                                         hash_password(password, n=args.scrypt_n))
            write_users(path, users.values())
            print(f"user {args.name} ({args.permission}) saved in {path}")
        else:
            if users.pop(args.name, None) is None:
                print(f"no user {args.name} in {path}", file=sys.stderr)
                return 1
            write_users(path, users.values())
            print(f"user {args.name} removed from {path}")
    except UsersFileError as e:
        print(f"icp-bridge users: {e}", file=sys.stderr)
        return 1
    return 0


def add_commands(commands: Any) -> None:
    users = commands.add_parser("users", help="manage the users file")
    user_actions = users.add_subparsers(dest="action", required=True)
    add = user_actions.add_parser("add", help="add or change a user (password on stdin)")
    add.add_argument("name")
    add.add_argument("--permission", choices=sorted(LEVELS), required=True)
    # Tests use a cheap cost; operators keep the default.
    add.add_argument("--scrypt-n", type=int, default=2**15, help=argparse.SUPPRESS)
    listing = user_actions.add_parser("list", help="list users and their permission level")
    remove = user_actions.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    for action in (add, listing, remove):
        action.add_argument("--users", help="users file [default: the configuration's "
                                            "users_file]")
        add_config_option(action)
    lockouts = user_actions.add_parser(
        "lockouts", help="users and client addresses locked out after failed logons")
    lockouts.add_argument("--all", action="store_true", help="also counts not locked yet")
    unlock = user_actions.add_parser("unlock", help="clear a lockout (user, or --source ADDR)")
    unlock.add_argument("name", nargs="?")
    unlock.add_argument("--source", help="a client address instead of a user")
    for action in (lockouts, unlock):
        action.add_argument("--state", help="state directory [default: the configuration's "
                                            "state_dir]")
        add_config_option(action)
    users.set_defaults(func=cmd_users)

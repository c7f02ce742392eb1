"""What several commands share: reading a password, the admin token."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

TOKEN_ENV = "ICP_BRIDGE_TOKEN"  # noqa: S105 - the variable name, not a secret


def read_password(prompt: str) -> str:
    """From the terminal without echo, else the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("again: ") != first:
            raise SystemExit("passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


def token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise SystemExit(f"this command needs a token: --token or ${TOKEN_ENV} "
                         f"(get one with `icp-bridge ctl logon USER`)")
    return token

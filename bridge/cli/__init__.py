"""The ``icp-bridge`` command: ``users``, ``ctl``, ``peer``, ``backend`` and
``state``, one module each (``ctl events`` in ``events``); ``main`` is the
console script's entry point.

(The service itself runs under twistd: ``twistd -n icp-bridge``.)

The top of the house: it may import any room.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bridge.cli import ctl, standins, state, users


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icp-bridge",
        description="Tools for icp-bridge (the service runs as `twistd -n icp-bridge`).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    users.add_commands(commands)
    ctl.add_commands(commands)
    standins.add_commands(commands)
    state.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from thrift.Thrift import TException

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, TException) as e:
        print(f"icp-bridge {args.command}: {e}", file=sys.stderr)
        return 1

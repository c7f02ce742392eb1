"""The ``icp-bridge`` command: ``users``, ``ctl``, ``peer``, ``backend``,
``state`` and ``config``, one module each (``ctl events`` in ``events``;
what ctl prints in ``decode``, its connection in ``otsclient``); ``main`` is
the console script's entry point.

(The service itself runs under twistd: ``twistd -n icp-bridge``.)

The top of the house: it may import any room.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bridge.cli import config, ctl, standins, state, users


def package_version() -> str:
    """The installed package's version (setup.cfg's), as pip knows it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("icp-bridge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icp-bridge",
        description="Tools for icp-bridge (the service runs as `twistd -n icp-bridge`).",
    )
    parser.add_argument("--version", action="version",
                        version=f"icp-bridge {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    users.add_commands(commands)
    ctl.add_commands(commands)
    standins.add_commands(commands)
    state.add_commands(commands)
    config.add_commands(commands)
    return parser


def _token_value_attached(argv: list[str]) -> list[str]:
    """``--token VALUE`` as ``--token=VALUE``: a token may begin with "-"
    (one in 64 do), which argparse would take for an option."""
    for i, word in enumerate(argv[:-1]):
        if word == "--token":
            return [*argv[:i], f"--token={argv[i + 1]}", *argv[i + 2:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    from thrift.Thrift import TException

    from bridge.cli.otsclient import CtlError

    args = build_parser().parse_args(_token_value_attached(
        list(sys.argv[1:] if argv is None else argv)))
    where = " ".join(filter(None, ("icp-bridge", args.command, getattr(args, "call", None))))
    if getattr(args, "token", None):
        from bridge.cli.common import warn_token_on_command_line

        warn_token_on_command_line()
    try:
        return int(args.func(args))
    except CtlError as e:
        print(f"{where}: {e}", file=sys.stderr)
        return e.exit_code
    except (OSError, TException) as e:
        print(f"{where}: {e}", file=sys.stderr)
        return 1

"""What several commands share: reading a password, the admin token, the
service's configuration file and the paths it names."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

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


def config_file(named: str | None) -> Path | None:
    """The configuration file a tool reads: ``--config``, else the default
    one when it exists (as the service does)."""
    from bridge.config import default_config_file

    return Path(named) if named else default_config_file()


def service_paths(named_config: str | None) -> tuple[Path, Path]:
    """(users_file, state_dir) as the service would use them: from the
    configuration file (only these keys are read, so that a file with
    another mistake still lets the users be managed), else the defaults."""
    from bridge.config import ConfigError, check_values, default_state_dir, default_users_file
    from bridge.config_sources import TomlFile

    path = config_file(named_config)
    values = {}
    if path is not None:
        try:
            values = TomlFile(path).read()
        except ConfigError as e:
            raise SystemExit(str(e)) from None
    wanted = {key: values[key] for key in ("users_file", "state_dir") if key in values}
    parsed, problems = check_values(wanted, str(path))
    if problems:
        raise SystemExit(str(problems[0]))
    return (parsed.get("users_file", default_users_file()),
            parsed.get("state_dir", default_state_dir()))


def add_config_option(parser: argparse.ArgumentParser) -> None:
    from bridge.config import DEFAULT_CONFIG_FILE

    parser.add_argument("--config", help=f"the service's configuration file, for users_file "
                                         f"and state_dir [default: {DEFAULT_CONFIG_FILE} when "
                                         f"it exists]")

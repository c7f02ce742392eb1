"""What several commands share: reading a password, the admin token, the
service's configuration file and the paths it names."""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TOKEN_ENV = "ICP_BRIDGE_TOKEN"  # noqa: S105 - the variable name, not a secret


def read_password(prompt: str) -> str:
    """From the terminal without echo, else the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("again: ") != first:
            raise SystemExit("passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


#: Mode bits of a token file that let others read or write it.
_SHARED_BITS = stat.S_IRWXG | stat.S_IRWXO


def token(args: argparse.Namespace) -> str:
    """The admin token: ``--token-file`` (``-``: stdin), else ``--token``,
    else ``$ICP_BRIDGE_TOKEN``; read once per command (stdin can be read
    only once)."""
    cached = getattr(args, "resolved_token", None)
    if cached is not None:
        return str(cached)
    path = getattr(args, "token_file", None)
    if path is not None:
        value = read_token_file(path)
    else:
        value = getattr(args, "token", None) or os.environ.get(TOKEN_ENV, "")
    if not value:
        raise SystemExit(f"this command needs a token: --token-file FILE, --token-file - "
                         f"(stdin) or ${TOKEN_ENV} (get one with `icp-bridge ctl logon USER`)")
    args.resolved_token = value
    return value


def read_token_file(path: str) -> str:
    """The first line of ``path`` (``-``: stdin). A file that others may
    read or write is refused: its token would be theirs too."""
    from bridge.cli.otsclient import EXIT_USAGE, CtlError

    if path == "-":
        value = sys.stdin.readline().strip()
        if not value:
            raise CtlError("--token-file -: no token on stdin", EXIT_USAGE)
        return value
    try:
        # O_NOFOLLOW|O_NONBLOCK: the file itself, and a FIFO does not hang the check.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise CtlError(f"--token-file {path}: cannot read it: {e.strerror}", EXIT_USAGE) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CtlError(f"--token-file {path}: not a regular file", EXIT_USAGE)
        if info.st_mode & _SHARED_BITS:
            raise CtlError(f"--token-file {path}: refused: others may read or write it (mode "
                           f"{stat.S_IMODE(info.st_mode):04o}); `chmod 600 {path}` and use a "
                           f"new token if others could read this one", EXIT_USAGE)
        value = f.readline(4096).decode("utf-8", "replace").strip()
    if not value:
        raise CtlError(f"--token-file {path}: empty", EXIT_USAGE)
    return value


def warn_token_on_command_line() -> None:
    print("icp-bridge: warning: --token puts the token on the command line, which every "
          "local user can read (/proc/PID/cmdline) while this runs; use --token-file FILE "
          f"(mode 600), --token-file - (stdin) or ${TOKEN_ENV}", file=sys.stderr)


def config_file(named: str | None) -> Path | None:
    """The configuration file a tool reads: ``--config``, else the default
    one when it exists (as the service does)."""
    from bridge.config import default_config_file

    return Path(named) if named else default_config_file()


def config_values(named_config: str | None, keys: Iterable[str]
                  ) -> tuple[Path | None, dict[str, Any]]:
    """(the configuration file a tool reads, its values of ``keys`` only):
    a tool reads no more than it needs, so that a file with a mistake
    elsewhere still serves it. Raises ConfigError when it cannot be read."""
    from bridge.config_sources import TomlFile

    path = config_file(named_config)
    values = TomlFile(path).read() if path is not None else {}
    return path, {key: values[key] for key in keys if key in values}


def service_paths(named_config: str | None) -> tuple[Path, Path]:
    """(users_file, state_dir) as the service would use them: from the
    configuration file (only these keys are read, so that a file with
    another mistake still lets the users be managed), else the defaults."""
    from bridge.config import ConfigError, check_values, default_state_dir, default_users_file

    try:
        path, wanted = config_values(named_config, ("users_file", "state_dir"))
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    parsed, problems = check_values(wanted, str(path))
    if problems:
        raise SystemExit(str(problems[0]))
    return (parsed.get("users_file", default_users_file()),
            parsed.get("state_dir", default_state_dir()))


def service_authenticator(named_config: str | None) -> tuple[str, str]:
    """(authenticator, why) as the service would choose it: the TOML file's
    ``authenticator``, else PAM when ogon's config.ini is read (as ogon
    authenticates), else the users file. Only those keys are read."""
    from bridge.config import ConfigError, with_ogon_defaults

    try:
        path, wanted = config_values(named_config, ("authenticator", "ogon_config"))
    except ConfigError:
        return "users-file", ""  # the users file is the question here; config check says
    merged = with_ogon_defaults(wanted)
    authenticator = str(merged.get("authenticator", "users-file"))
    if "authenticator" in wanted:
        return authenticator, f"authenticator = {authenticator!r} in {path}"
    if authenticator == "pam":
        return authenticator, f"ogon's {merged['ogon_config']} is read, so it authenticates as " \
                              f"ogon does"
    return authenticator, ""


def add_config_option(parser: argparse.ArgumentParser) -> None:
    from bridge.config import DEFAULT_CONFIG_FILE

    parser.add_argument("--config", help=f"the service's configuration file, for users_file "
                                         f"and state_dir [default: {DEFAULT_CONFIG_FILE} when "
                                         f"it exists]")

"""``icp-bridge config check [FILE]``: what the bridge would say about a
configuration at startup (or refuse at a reload), without starting it:
the file's keys and values, ogon's property types, ogon's config.ini the
configuration names (``/etc/ogon/config.ini`` when it exists, as at a
start), the preflight against this machine, and the users file.

Exit status 0 when the bridge would start and run as configured; 1 when it
would refuse to (an error) or run with something broken (an alert: an
expired certificate, bad users-file entries). Warnings are printed and do
not change the status.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def cmd_check(args: argparse.Namespace) -> int:
    from bridge.config import DEFAULT_CONFIG_FILE, ConfigError
    from bridge.config_sources import ConfigSources
    from bridge.preflight import preflight
    from bridge.security.auth import parse_users, users_file_warnings

    path = Path(args.file) if args.file else DEFAULT_CONFIG_FILE
    # As twistd's --ogon-config: another config.ini than /etc/ogon/config.ini, or "" for none.
    flags = {"ogon_config": args.ogon_config} if args.ogon_config is not None else {}
    if not args.file and not path.exists():
        print(f"{path}: not there; the bridge uses the defaults (checked below)")
        sources = ConfigSources.for_service(None, flags)
    else:
        sources = ConfigSources.for_service(path, flags)
    try:
        loaded = sources.load()
    except ConfigError as e:
        for problem in e.problems:
            print(problem)
        return 1
    config = loaded.config
    properties = loaded.properties
    findings = preflight(config, loaded.origins, properties=properties, files=loaded.files)
    alerts = [str(p) for p in findings.alerts]
    warnings = [str(p) for p in [*loaded.warnings, *findings.warnings]]
    warnings += properties.problems if properties is not None else ()
    if config.authenticator == "users-file":
        users = config.users_file
        try:
            parsed = parse_users(users.read_text(encoding="utf-8"), users)
            alerts += parsed.problems
            warnings += users_file_warnings(users)
        except FileNotFoundError:
            warnings.append(f"users file {users} does not exist: every logon goes to the "
                            f"greeter (`icp-bridge users add`)")
        except (OSError, UnicodeDecodeError) as e:
            alerts.append(f"users file {users} cannot be read: {e}")
    for problem in findings.errors:
        print(problem)
    for line in alerts:
        print(f"error: {line}")
    for line in warnings:
        print(f"warning: {line}")
    if findings.errors or alerts:
        return 1
    what = ", ".join(loaded.files) or "the defaults"
    print(f"{what}: ok" + (f" ({len(warnings)} warnings)" if warnings else "") +
          ("" if os.geteuid() == 0 else " (checked as a user that is not root: backends "
           "would run as that user)"))
    return 0


def add_commands(commands: Any) -> None:
    config = commands.add_parser("config", help="the service's configuration")
    actions = config.add_subparsers(dest="action", required=True)
    check = actions.add_parser(
        "check", help="check a configuration as the bridge would at startup (with ogon's "
                      "config.ini it names): one line per problem (file, key or line, "
                      "what); exit 0 when it would start")
    check.add_argument("file", nargs="?",
                       help="[default: /etc/icp-bridge/bridge.toml, or the defaults; "
                            "/etc/ogon/config.ini too when it exists]")
    check.add_argument("--ogon-config", metavar="FILE",
                       help="ogon's config.ini, as the bridge's --ogon-config ('' for none) "
                            "[default: the configuration's ogon_config, else "
                            "/etc/ogon/config.ini when it exists]")
    check.set_defaults(func=cmd_check)

"""Whom a backend runs as and the environment it gets: ogon's variables
(WIRE.md section 5), the ``environment.filter`` pass-through list,
``environment.add``, the module's own table; and the values of a module's
placeholders."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bridge.backends.modules import LaunchContext, Module

#: ogon's PATH for sessions when the environment gives none (STD_PATH).
STANDARD_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Account:
    """Whom a backend runs as."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str


def own_account() -> Account:
    """The bridge's own account."""
    entry = pwd.getpwuid(os.geteuid())
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir,
                   entry.pw_shell)


def placeholders(module: Module, context: LaunchContext, pipe_dir: Path
                 ) -> dict[str, str]:
    """The values of a module's placeholders ({session_id}, {endpoint}, ...)."""
    values = {
        "session_id": str(context.session_id), "user": context.username,
        "width": str(context.width), "height": str(context.height),
        "bpp": str(context.bpp), "pipe_dir": str(pipe_dir),
    }
    values["endpoint"] = module.endpoint.format(**values)
    return values


def environment(module: Module, context: LaunchContext, account: Account,
                values: Mapping[str, str]) -> dict[str, str]:
    """A fresh environment (WIRE.md section 5): ogon's variables, the
    ``environment.filter`` pass-through list, ``environment.add``, the
    module's own table."""
    env: dict[str, str] = {}
    names = context.environment_pass
    if "*" in names:
        env.update(os.environ)
    else:
        env.update({name: os.environ[name] for name in names if name in os.environ})
    env.update({
        "USER": account.name, "LOGNAME": account.name, "HOME": account.home,
        "SHELL": account.shell, "UID": str(account.uid),
        "OGON_SID": str(context.session_id),
        "OGON_COOKIE": context.ogon_cookie, "OGON_BACKEND_COOKIE": context.backend_cookie,
        "OGON_CONNECTION_BPP": str(context.bpp),
        "OGON_SMAX": f"{context.max_width}x{context.max_height}",
    })
    env.setdefault("PATH", STANDARD_PATH)
    user = context.username or context.typed_user
    domain = context.domain if context.username else context.typed_domain
    if user:
        env["OGON_USER"] = user
    if domain:
        env["OGON_DOMAIN"] = domain
    if context.client_name:
        env["OGON_SESSION_CLIENT_NAME"] = context.client_name
    if context.client_address:
        env["OGON_SESSION_CLIENT_ADDRESS"] = context.client_address
    if context.rdp_server_uid is not None:
        env["OGON_UID"] = str(context.rdp_server_uid)
    if not context.username and context.rdp_server_pid is not None:
        env["OGON_PID"] = str(context.rdp_server_pid)  # greeters only, as ogon
    env.update(dict(context.environment_add))
    env.update({key: value.format(**values) for key, value in module.environment.items()})
    return env


#: Linux's MAX_ARG_STRLEN: no argument or NAME=value may be longer (E2BIG).
MAX_ARG_STRLEN = 32 * 4096


def exec_problem(argv: list[str], env: Mapping[str, str]) -> str | None:
    """Why exec would refuse this command line and environment (a NUL in a
    string, a string or all of them too long, text the file system
    encoding cannot carry), said for the log; None when it would not. Asked
    before a spawn, so that a value a client chose (a typed user name, a
    client name) makes a clear log line, not a traceback from the child."""
    total = 0
    for name in env:
        if not name or "=" in name:
            return f"environment variable {name[:64]!r} is not a name"
    items = [(f"argument {n}", arg) for n, arg in enumerate(argv)] + [
        (f"environment variable {name[:64]!r}", f"{name}={value}") for name, value in env.items()]
    for what, text in items:
        try:
            encoded = os.fsencode(text)
        except UnicodeError:
            return f"{what} cannot be encoded"
        if b"\0" in encoded:
            return f"{what} holds a NUL character"
        if len(encoded) + 1 > MAX_ARG_STRLEN:
            return f"{what} is {len(encoded)} bytes (at most {MAX_ARG_STRLEN - 1})"
        total += len(encoded) + 1 + 8  # and its pointer
    limit = os.sysconf("SC_ARG_MAX")
    if total > limit:
        return f"arguments and environment are {total} bytes (at most {limit})"
    return None

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

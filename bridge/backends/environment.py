"""Whom a backend runs as and the environment it gets, built as ogon's
session manager builds a session's environment block
(session-manager/common/session/Session.cpp: applyEnvironmentFilterAndAdd,
generateEnvBlockAndModify for a user's desktop,
generateAuthEnvBlockAndModify for a greeter, setClientBPP at a module's
start); and the values of a command module's placeholders.

The block starts empty. ``environment.filter`` copies the named variables
of the session manager's own environment (``*``: all of it), then
``environment.add`` adds ``NAME:value`` entries, then PATH gets ogon's
default when still missing. A desktop adds UID, SHELL, USER, HOME (the
user's account), the cookies, OGON_SID, the client's name and address,
OGON_SMAX (the user's maximum size) and OGON_UID (the RDP server's uid); a
greeter has no account, so no UID/SHELL/USER/HOME, but the cookies,
OGON_USER/OGON_DOMAIN (what the client typed), OGON_SID, the client,
OGON_SMAX (the global maximum), OGON_UID and OGON_PID (the RDP server's
pid). Neither gets LOGNAME. Every module adds OGON_CONNECTION_BPP.

Variables are set with WinPR's semantics (SetEnvironmentVariableEBA): a
name already there is replaced in place, a new one is appended, an empty
value moves the name to the end; the order is the block's order, which
ogon's backend launcher receives byte for byte.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bridge.backends.modules import LaunchContext, Module

#: ogon's PATH for sessions when the environment gives none (STD_PATH).
STANDARD_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Where ogon's Debian package installs its programs (OGON_BIN_PATH) and its
#: configuration with ``ogonXsession`` (OGON_CFG_PATH): ogon's session
#: manager puts both in front of its own PATH, which is where it looks for
#: the programs it starts by bare name.
OGON_BIN_DIRS = ("/usr/bin", "/etc/ogon")


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


def account_of(name: str) -> Account | None:
    """The system account ``name``, None if there is none."""
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError):
        return None
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)


def search_path(bin_dirs: Iterable[str], environ: Mapping[str, str] | None = None) -> str | None:
    """The bridge's PATH with ogon's directories in front, those not in it
    already (ogon's ApplicationContext::configureExecutableSearchPath);
    None when the bridge has no PATH (ogon then leaves it unset too)."""
    path = (os.environ if environ is None else environ).get("PATH")
    if path is None:
        return None
    present = path.split(":")
    extra = [d for d in bin_dirs if d and d not in present]
    return ":".join([*extra, path]) if extra else path


def manager_environment(bin_dirs: Iterable[str]) -> dict[str, str]:
    """The session manager's own environment as ogon's has it: the bridge's,
    with ogon's directories in front of PATH. What ``environment.filter``
    copies from, and what ogon-backend-launcher runs with."""
    env = dict(os.environ)
    path = search_path(bin_dirs, env)
    if path is not None:
        env["PATH"] = path
    return env


def set_variable(env: dict[str, str], name: str, value: str) -> None:
    """WinPR's SetEnvironmentVariableEBA on a block kept as an ordered dict."""
    if value == "":
        env.pop(name, None)
    env[name] = value


def _split(text: str) -> list[str]:
    """ogon's split(text, ";"): empty tokens skipped, nothing trimmed."""
    return [item for item in text.split(";") if item]


def filtered_base(context: LaunchContext, manager_env: Mapping[str, str]) -> dict[str, str]:
    """``environment.filter`` and ``environment.add`` applied to an empty
    block, then PATH's default (applyEnvironmentFilterAndAdd, checkEnvironmentPath)."""
    env: dict[str, str] = {}
    wanted = context.environment_filter.strip(" ")
    if wanted == "*":
        env.update(manager_env)
    else:
        for name in _split(wanted):
            if name in manager_env:
                set_variable(env, name, manager_env[name])
    for item in _split(context.environment_add_text):
        name, sep, value = item.partition(":")
        if sep and name:
            set_variable(env, name, value)
    if "PATH" not in env:
        set_variable(env, "PATH", STANDARD_PATH)
    return env


def session_environment(context: LaunchContext, manager_env: Mapping[str, str],
                        user: Account | None) -> dict[str, str]:
    """The session's environment block as ogon builds it, with the
    connection's colour depth (what every module starts with). ``user``:
    the desktop's account; None for a greeter."""
    env = filtered_base(context, manager_env)
    if user is not None:
        for name, value in (("UID", str(user.uid)), ("SHELL", user.shell),
                            ("USER", user.name), ("HOME", user.home)):
            set_variable(env, name, value)
    set_variable(env, "OGON_COOKIE", context.ogon_cookie)
    set_variable(env, "OGON_BACKEND_COOKIE", context.backend_cookie)
    if user is None:
        if context.typed_user:
            set_variable(env, "OGON_USER", context.typed_user)
        if context.typed_domain:
            set_variable(env, "OGON_DOMAIN", context.typed_domain)
    set_variable(env, "OGON_SID", str(context.session_id))
    if context.client_name:
        set_variable(env, "OGON_SESSION_CLIENT_NAME", context.client_name)
    if context.client_address:
        set_variable(env, "OGON_SESSION_CLIENT_ADDRESS", context.client_address)
    if context.max_width and context.max_height:
        set_variable(env, "OGON_SMAX", f"{context.max_width}x{context.max_height}")
    if context.rdp_server_uid is not None:
        set_variable(env, "OGON_UID", str(context.rdp_server_uid))
    if user is None and context.rdp_server_pid is not None:
        # Greeters only: ogon leaves it out of desktops, which outlive an RDP server.
        set_variable(env, "OGON_PID", str(context.rdp_server_pid))
    set_variable(env, "OGON_CONNECTION_BPP", str(context.bpp))
    return env


def environment_block(env: Mapping[str, str]) -> bytes:
    """The block as WinPR lays it out: ``NAME=value\\0`` each, then a final
    NUL (what ModuleStart's envBlock carries, both NULs included)."""
    return b"".join(f"{name}={value}".encode() + b"\0" for name, value in env.items()) + b"\0"


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
                values: Mapping[str, str], manager_env: Mapping[str, str] | None = None
                ) -> dict[str, str]:
    """A command module's environment: the session's block as ogon builds
    it (a desktop's account variables are those of the account it runs
    as), OGON_PIPE_PATH for one on a ``_Qt`` endpoint, then the module's
    own ``environment`` table."""
    env = session_environment(context, os.environ if manager_env is None else manager_env,
                              account if context.username else None)
    if not module.kind and values["endpoint"].endswith("_Qt"):
        # A Qt application on ogon's Qt endpoint (a greeter): the socket
        # ogon's Qt platform plugin listens on, as ogon's Qt module sets it.
        set_variable(env, "OGON_PIPE_PATH", f"{values['pipe_dir']}/{values['endpoint']}")
    for key, value in module.environment.items():
        set_variable(env, key, value.format(**values))
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

"""Configuration: every option with its default (``Config``), and the
checks that say what is wrong, one line per problem starting with the key
(``check_values``). Where the values come from (the TOML file, flags, and
the default file) is ``bridge.config_sources``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.backends.modules import Module
from bridge.security.permissions import LEVELS
from bridge.sessions.ogon_config import DEFAULT_PATH as DEFAULT_OGON_CONFIG
from bridge.sessions.properties import (
    PropertyValue,
    ogon_property,
    type_name,
)

#: Read when it exists and no --config is given.
DEFAULT_CONFIG_FILE = Path("/etc/icp-bridge/bridge.toml")
#: ``log_level``: the least important log lines written.
LOG_LEVELS = ("debug", "info", "warn", "error")


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a configuration: where (a file, "command line", or
    "" when it is not one source's), and what, starting with the key."""

    source: str
    text: str
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.source}: {self.text}" if self.source else self.text


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` are its lines, each
    worded for the operator."""

    def __init__(self, *problems: str | Problem) -> None:
        self.problems = [p if isinstance(p, Problem) else Problem("", p) for p in problems]
        super().__init__("\n".join(str(p) for p in self.problems))

    def from_source(self, source: str) -> list[Problem]:
        """The problems, each named with ``source`` unless it has one."""
        return [p if p.source else dataclasses.replace(p, source=source) for p in self.problems]


def did_you_mean(word: str, candidates: Iterable[str], cutoff: float = 0.75) -> str:
    """`` (did you mean X?)`` for the candidate closest to ``word`` (case
    ignored), or "" when none is close."""
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    return f" (did you mean {by_lower[close[0]]}?)" if close else ""


def default_config_file() -> Path | None:
    """The configuration file to read when none is named: DEFAULT_CONFIG_FILE
    when it exists."""
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None


def default_ogon_config() -> Path | None:
    """ogon's config.ini to read when ``ogon_config`` is not given:
    DEFAULT_OGON_CONFIG when it exists."""
    return DEFAULT_OGON_CONFIG if DEFAULT_OGON_CONFIG.exists() else None


def with_ogon_defaults(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (every source merged) with what an ogon host has, unless
    the operator says otherwise: its config.ini (``/etc/ogon/config.ini``,
    when it exists and ``ogon_config`` is not given) and, with such a file,
    PAM as ogon authenticates (unless ``authenticator`` is given)."""
    out = dict(values)
    default = default_ogon_config()
    if "ogon_config" not in out and default is not None:
        out["ogon_config"] = str(default)
    if out.get("ogon_config") and "authenticator" not in out:
        out["authenticator"] = "pam"
    return out


def _running_as_root() -> bool:
    return os.geteuid() == 0


def default_state_dir() -> Path:
    if _running_as_root():
        return Path("/var/lib/icp-bridge")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "icp-bridge"


def default_users_file() -> Path:
    if _running_as_root():
        return Path("/etc/icp-bridge/users")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "icp-bridge" / "users"


def backend_log_directory(config: Config) -> Path:
    """Where backends' output files go: ``backend_log_dir``, else a
    directory off the state database's filesystem, so that output can never
    fill the disk the state is written to: /run/icp-bridge/backends as root
    (a tmpfs), $XDG_RUNTIME_DIR/icp-bridge/backends otherwise, and only
    without either <state_dir>/backends."""
    if config.backend_log_dir is not None:
        return config.backend_log_dir
    if _running_as_root():
        return Path("/run/icp-bridge/backends")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "icp-bridge" / "backends"
    return config.state_dir / "backends"


def default_lock_dir(state_dir: Path) -> Path:
    """Where the ICP socket's liveness lock lives, away from the socket's
    world-writable directory: /run/icp-bridge as root, else the user's
    runtime directory, else the state directory."""
    if _running_as_root():
        return Path("/run/icp-bridge")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "icp-bridge" if runtime else state_dir


def default_modules() -> dict[str, Module]:
    """No command module is built in: the greeter and the desktop are ogon's
    module kinds by default (``module.greeter.modulename`` Qt running
    ``module.greeter.cmd``, ``module.xsession.modulename`` X11), as in ogon.
    A ``[modules.NAME]`` table of the same name takes precedence."""
    return {}


@dataclass
class Config:
    """Every option of the service; field names are the TOML keys."""

    icp_endpoint: str = "unix:/tmp/.pipe/ogon_SessionManager:mode=600"
    # TLS on 9091, as ogon's WTSAPI clients dial; without privateKey/certKey
    # the ssl.certificate / ssl.key pair is used (generated when missing).
    thrift_endpoint: str = "ssl:9091:interface=127.0.0.1"
    # twisted.web: /metrics, /events, /sessions, /healthz and a status page.
    # "" turns it off.
    admin_endpoint: str = "tcp:9092:interface=127.0.0.1"
    # Host names the admin endpoint answers besides the loopback names and the
    # address it is reached at ("name": any port, "name:port"); others get 421 (DNS rebinding).
    admin_allowed_hosts: list[str] = field(default_factory=list)
    # Admin endpoint connections at once (more are closed at once).
    admin_max_connections: int = 512
    # The session event journal keeps events_keep seconds, events_keep_count events.
    events_keep: float = 7 * 24 * 3600.0
    events_keep_count: int = 1_000_000
    # ogon's SessionNotification signals: "system" (the system bus), a D-Bus
    # address (unix:path=...), or "" for none.
    dbus_address: str = "system"
    state_dir: Path = field(default_factory=default_state_dir)
    users_file: Path = field(default_factory=default_users_file)
    # Real WTSAPI clients read /tmp/ogon.session.<sid>; files are 0600 and atomic.
    token_dir: Path = Path("/tmp")  # noqa: S108
    # Where winpr puts named pipes: backends' endpoints live here.
    pipe_dir: Path = Path("/tmp/.pipe")  # noqa: S108
    # The ICP socket's liveness lock; None: default_lock_dir(state_dir).
    lock_dir: Path | None = None
    authenticator: str = "users-file"
    # ogon's own config.ini, read with ogon's rules (bridge.sessions.ogon_config);
    # the TOML file's properties override it. None: none. The configuration's
    # sources make /etc/ogon/config.ini the default when it exists (with_ogon_defaults).
    ogon_config: Path | None = None
    call_timeout: float = 10.0
    token_lifetime: float = 24 * 3600.0
    max_icp_frame: int = 16 * 1024 * 1024
    max_icp_send: int = 32 * 1024
    max_thrift_frame: int = 4 * 1024 * 1024
    # Hardening: what a storm, a slow or idle client, a client that does not
    # read, an RDP server that stops reading may take. 0 disables a timeout.
    listen_backlog: int = 4096
    otsapi_workers: int = -1
    max_connections: int = 16384
    frame_timeout: float = 10.0
    first_call_timeout: float = 30.0
    tls_handshake_timeout: float = 10.0
    idle_timeout: float = 3600.0
    max_calls_per_connection: int = 1000
    max_output_buffer: int = 16 * 1024 * 1024
    icp_handshake_timeout: float = 10.0
    max_icp_pending: int = 50000
    max_icp_queued: int = 16 * 1024 * 1024
    # Failed logons (bridge.security.throttle): delays doubling up to
    # logon_delay_max; OTS API sources locked out after lockout_failures.
    logon_failures_before_delay: int = 3
    logon_delay_max: float = 8.0
    lockout_failures: int = 10
    lockout_time: float = 900.0
    # NIST SP 800-63B: a user's failures in a row before a lock of that user.
    account_failure_limit: int = 100
    # Failed RDP logons (all users) per minute before RDP checks are paced.
    rdp_failures_per_minute: int = 60
    # Failed-logon records kept in memory and in the state database.
    failure_records_max: int = 10_000
    # Password checks waiting for a thread, per kind (RDP server / OTS API).
    password_check_queue: int = 256
    # Empty: any peer uid may connect (the socket mode still applies).
    allowed_peer_uids: list[int] = field(default_factory=list)
    # Checked before ogon's virtualChannel.whiteList property.
    channels_allow: list[str] = field(default_factory=list)
    channels_deny: list[str] = field(default_factory=list)
    properties: dict[str, PropertyValue] = field(default_factory=dict)
    user_properties: dict[str, dict[str, PropertyValue]] = field(default_factory=dict)
    modules: dict[str, Module] = field(default_factory=default_modules)
    # A desktop never runs as uid 0 (a users-file or PAM user whose system
    # account is root, or a module's fixed user) unless this allows it.
    allow_root_desktops: bool = False
    # Backends' stdout/stderr files; None: /run/icp-bridge/backends as root,
    # else $XDG_RUNTIME_DIR/icp-bridge/backends (see backend_log_directory).
    backend_log_dir: Path | None = None
    # Each backend's file is started over past the first, and the largest
    # ones while all together pass the second.
    backend_log_max_per_session: int = 8 * 1024 * 1024
    backend_log_max_total: int = 256 * 1024 * 1024
    # /healthz is not ok while the state's or the backend logs' filesystem
    # has less free space than this.
    min_free_disk: int = 64 * 1024 * 1024
    # The least important log lines written: debug, info, warn or error.
    log_level: str = "info"
    # A farm (opt-in): the libpq connection string of the farm's PostgreSQL
    # ("": no farm). Never with a password in it: farm_password_file, or
    # libpq's PGPASSWORD / PGPASSFILE / ~/.pgpass; TLS through its sslmode.
    farm_database: str = ""
    farm_password_file: Path | None = None
    # Farm commands are signed with this key (none: this host neither issues nor runs them).
    farm_command_key_file: Path | None = None
    # This host's name in the farm (HAProxy's backend for it has this name).
    host_name: str = field(default_factory=socket.gethostname)
    # Seconds between heartbeats; a host not heard of for farm_stale_after is stale.
    farm_heartbeat: float = 5.0
    farm_stale_after: float = 20.0
    # Reconnect routing: HAProxy's stats socket (an endpoint string,
    # "unix:/run/haproxy/admin.sock") and the map file its config loads.
    haproxy_socket: str = ""
    haproxy_map: Path | None = None
    # Where ogon is installed: the directories put in front of PATH to find
    # ogon's programs by bare name (ogon-backend-x, ogonXsession,
    # ogon-backend-launcher), as ogon's session manager does with its
    # OGON_BIN_PATH and OGON_CFG_PATH (Debian: /usr/bin, /etc/ogon); the
    # directory of its module libraries for ogon-backend-launcher ("": next
    # to the launcher, else /usr/lib/<multiarch>/ogon1/modules); the launcher
    # keeper's socket (None: <state_dir>/launcher-keeper.sock).
    ogon_bin_dirs: list[str] = field(default_factory=lambda: ["/usr/bin", "/etc/ogon"])
    ogon_module_dir: str = ""
    ogon_keeper_socket: Path | None = None

    def problems(self) -> list[tuple[str, str]]:
        """What is wrong with the values as a whole: (top-level key, line)."""
        found: list[tuple[str, str]] = []
        if self.authenticator not in ("users-file", "pam"):
            hint = did_you_mean(self.authenticator, ("users-file", "pam"), 0.6)
            found.append(("authenticator", f"authenticator: {self.authenticator!r} is not one "
                          f"of users-file, pam{hint}"))
        for name in ("call_timeout", "token_lifetime", "max_icp_frame", "max_thrift_frame",
                     "events_keep", "events_keep_count", "listen_backlog", "max_connections",
                     "max_calls_per_connection", "max_output_buffer", "max_icp_pending",
                     "max_icp_queued", "logon_failures_before_delay", "lockout_failures",
                     "password_check_queue", "backend_log_max_per_session",
                     "backend_log_max_total", "account_failure_limit", "failure_records_max",
                     "admin_max_connections", "rdp_failures_per_minute"):
            if getattr(self, name) <= 0:
                found.append((name, f"{name}: must be positive"))
        if self.max_icp_send < 256:
            found.append(("max_icp_send", "max_icp_send: must be at least 256 bytes"))
        if not -1 <= self.otsapi_workers <= 64:  # bridge.otsapi.workers
            found.append(("otsapi_workers", "otsapi_workers: -1 (by the cores), 0 to 64"))
        for name in ("frame_timeout", "first_call_timeout", "tls_handshake_timeout",
                     "idle_timeout", "icp_handshake_timeout", "logon_delay_max", "lockout_time"):
            if getattr(self, name) < 0:
                found.append((name, f"{name}: must be 0 (off) or more seconds"))
        if self.backend_log_max_total < self.backend_log_max_per_session:
            found.append(("backend_log_max_total", "backend_log_max_total: must be at least "
                          "backend_log_max_per_session"))
        if self.min_free_disk < 0:
            found.append(("min_free_disk", "min_free_disk: must be 0 (off) or more bytes"))
        found.extend(self._farm_problems())
        for directory in self.ogon_bin_dirs:
            if not directory.startswith("/"):
                found.append(("ogon_bin_dirs", f"ogon_bin_dirs: {directory!r} is not an "
                              "absolute path"))
        for scope, table in [("properties", self.properties),
                             *((f"user_properties.{u}", t)
                               for u, t in self.user_properties.items())]:
            level = table.get("permission.level")
            if level is not None and str(level).lower() not in LEVELS:
                found.append((scope.split(".")[0],
                              f"{scope}.permission.level: must be full, user or guest"))
        return found

    def validate(self) -> None:
        found = self.problems()
        if found:
            raise ConfigError(*(line for _, line in found))

    def _farm_problems(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        if self.farm_database:
            from bridge.state.engines import conninfo_problem

            problem = conninfo_problem(self.farm_database)
            if problem is not None:
                found.append(("farm_database", f"farm_database: {problem}"))
        if not _HOST_NAME.fullmatch(self.host_name):
            found.append(("host_name", f"host_name: {self.host_name!r} is not a host name "
                          "(letters, digits, '.', '-', '_'; at most 63)"))
        if self.farm_heartbeat <= 0 or self.farm_stale_after <= self.farm_heartbeat:
            found.append(("farm_stale_after", "farm_stale_after: must be longer than "
                          "farm_heartbeat (both positive)"))
        if (self.haproxy_socket or self.haproxy_map) and not self.farm_database:
            found.append(("haproxy_map", "haproxy_map: reconnect routing needs farm_database"))
        if self.haproxy_socket and self.haproxy_map is None:
            found.append(("haproxy_socket", "haproxy_socket: needs haproxy_map (the map file "
                          "HAProxy loads)"))
        if self.haproxy_map is not None and not self.haproxy_map.is_absolute():
            found.append(("haproxy_map", "haproxy_map: an absolute path (HAProxy names the map "
                          "by it)"))
        return found


_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _number(key: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__}")
    if positive and value <= 0:
        raise ConfigError(f"{key}: must be positive")
    return float(value)


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__}")
    return value


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {type(value).__name__}")
    return value


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
    return value


def _seconds(key: str, value: Any) -> float:
    return _number(key, value, positive=False)


def _path(key: str, value: Any) -> Path:
    return Path(_string(key, value))


def _optional_path(key: str, value: Any) -> Path | None:
    """A path, or "" for none."""
    text = _string(key, value)
    return Path(text) if text else None


def _string_list(what: str) -> Callable[[str, Any], list[str]]:
    def check(key: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of {what}")
        return value
    return check


def _host_names(key: str, value: Any) -> list[str]:
    names = _string_list("host names")(key, value)
    for name in names:
        host, _, port = name.rpartition(":") if not name.endswith("]") else (name, "", "")
        if not (host or name) or (port and not port.isdigit()) or any(
                c in name for c in " /@?#"):
            raise ConfigError(f"{key}: {name!r} is not a host name (name or name:port)")
    return names


def _uids(key: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{key}: expected a list of integer uids")
    return value


def _describe_value(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    return f"the string {value!r}"[:80]


def _property_type_problem(key: str, path: str, value: PropertyValue) -> str | None:
    """A line when ogon reads ``path`` as another type than ``value`` has."""
    known = ogon_property(path)
    if known is None:
        return None
    name, kind = known
    if isinstance(value, bool) == (kind is bool) and isinstance(value, kind):
        return None
    hint = ""
    if kind is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        hint = f" (write {value.strip()} without quotes)"
    elif kind is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        hint = f" (write {value.strip().lower()} without quotes)"
    return (f"{key}.{path}: ogon reads {name} as {type_name(kind)}, not "
            f"{_describe_value(value)}{hint}; a value of another type is never found")


def _property_table(key: str, table: Any) -> dict[str, PropertyValue]:
    """Property paths compare case-insensitively (as in ogon): stored
    lower-case. A property ogon reads must have ogon's type."""
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table of property paths")
    out: dict[str, PropertyValue] = {}
    problems = []
    for path, value in table.items():
        if not isinstance(value, bool | int | str):
            problems.append(f"{key}.{path}: a property is a boolean, integer or string, "
                            f"not {type(value).__name__}")
            continue
        lowered = path.lower()
        if lowered in out:
            problems.append(f"{key}.{path}: given twice (property paths ignore case)")
            continue
        wrong_type = _property_type_problem(key, path, value)
        if wrong_type is not None:
            problems.append(wrong_type)
            continue
        out[lowered] = value
    if problems:
        raise ConfigError(*problems)
    return out


def _user_properties(key: str, value: Any) -> dict[str, dict[str, PropertyValue]]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table of per-user property tables")
    tables, problems = {}, []
    for user, table in value.items():
        try:
            tables[user] = _property_table(f"{key}.{user}", table)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(*problems)
    return tables


_MODULE_KEYS = {"command", "endpoint", "user", "ready_timeout", "stop_timeout", "environment"}


def _module(name: str, table: Any) -> Module:
    key = f"modules.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table")
    unknown = set(table) - _MODULE_KEYS
    if unknown:
        first = sorted(unknown)[0]
        raise ConfigError(f"{key}.{first}: unknown module option"
                          f"{did_you_mean(first, _MODULE_KEYS, 0.6)} "
                          f"(known: {', '.join(sorted(_MODULE_KEYS))})")
    for required in ("command", "endpoint"):
        if required not in table:
            raise ConfigError(f"{key}.{required}: missing")
    command = table["command"]
    if not isinstance(command, list) or not command or not all(
            isinstance(part, str) for part in command):
        raise ConfigError(f"{key}.command: expected a non-empty list of strings (argv)")
    environment = table.get("environment", {})
    if not isinstance(environment, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in environment.items()):
        raise ConfigError(f"{key}.environment: expected a table of strings")
    module = Module(
        name=name, command=tuple(command), endpoint=_string(f"{key}.endpoint", table["endpoint"]),
        user=_string(f"{key}.user", table.get("user", "session")),
        ready_timeout=_number(f"{key}.ready_timeout", table.get("ready_timeout", 30)),
        stop_timeout=_number(f"{key}.stop_timeout", table.get("stop_timeout", 5)),
        environment=dict(environment),
    )
    placeholders = {"session_id": "1", "user": "u", "endpoint": "e", "width": "1", "height": "1",
                    "bpp": "1", "pipe_dir": "/p"}
    for where, text in [(f"{key}.endpoint", module.endpoint),
                        *((f"{key}.command", part) for part in module.command),
                        *((f"{key}.environment.{k}", v) for k, v in environment.items())]:
        try:
            text.format(**placeholders)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"{where}: bad placeholder ({e}); use {{session_id}}, {{user}}, "
                              "{endpoint}, {width}, {height}, {bpp} or {pipe_dir}") from None
    return module


def _modules(key: str, value: Any) -> dict[str, Module]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected tables [modules.NAME]")
    modules, problems = default_modules(), []
    for name, table in value.items():
        try:
            modules[name] = _module(name, table)
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(*problems)
    return modules


def _log_level(key: str, value: Any) -> str:
    level = _string(key, value).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(LOG_LEVELS)}"
                          f"{did_you_mean(level, LOG_LEVELS, 0.6)}")
    return level


_CHECKERS: dict[str, Callable[[str, Any], Any]] = {
    "icp_endpoint": _string, "thrift_endpoint": _string, "admin_endpoint": _string,
    "admin_allowed_hosts": _host_names, "admin_max_connections": _integer,
    "events_keep": _number, "events_keep_count": _integer, "dbus_address": _string,
    "state_dir": _path, "users_file": _path, "token_dir": _path, "pipe_dir": _path,
    "authenticator": _string, "ogon_config": _optional_path, "lock_dir": _path,
    "call_timeout": _number, "token_lifetime": _number,
    "max_icp_frame": _integer, "max_icp_send": _integer, "max_thrift_frame": _integer,
    "listen_backlog": _integer, "otsapi_workers": _integer, "max_connections": _integer,
    "frame_timeout": _seconds, "first_call_timeout": _seconds, "tls_handshake_timeout": _seconds,
    "idle_timeout": _seconds, "max_calls_per_connection": _integer,
    "max_output_buffer": _integer, "icp_handshake_timeout": _seconds,
    "max_icp_pending": _integer, "max_icp_queued": _integer,
    "logon_failures_before_delay": _integer, "logon_delay_max": _seconds,
    "lockout_failures": _integer, "lockout_time": _seconds, "password_check_queue": _integer,
    "account_failure_limit": _integer, "failure_records_max": _integer,
    "rdp_failures_per_minute": _integer, "allowed_peer_uids": _uids,
    "channels_allow": _string_list("channel names"), "channels_deny": _string_list("channel names"),
    "properties": _property_table, "user_properties": _user_properties,
    "modules": _modules, "log_level": _log_level,
    "allow_root_desktops": _boolean, "backend_log_dir": _path,
    "backend_log_max_per_session": _integer, "backend_log_max_total": _integer,
    "min_free_disk": _integer,
    "farm_database": _string, "farm_password_file": _path, "host_name": _string,
    "farm_heartbeat": _number, "farm_stale_after": _number, "haproxy_socket": _string,
    "haproxy_map": _path, "farm_command_key_file": _path,
    "ogon_bin_dirs": _string_list("directories"), "ogon_module_dir": _string,
    "ogon_keeper_socket": _path,
}
assert set(_CHECKERS) == {f.name for f in dataclasses.fields(Config)}, "every option is checked"


#: Renamed keys: the old name still works.
ALIASES = {"metrics_endpoint": "admin_endpoint"}  # reserved in 0.1, never served


def check_values(values: Mapping[str, Any], source: str) -> tuple[dict[str, Any], list[Problem]]:
    """Each known key of ``values`` through its checker: the parsed values
    and one Problem per thing wrong (unknown keys included)."""
    parsed: dict[str, Any] = {}
    problems: list[Problem] = []
    for key, value in values.items():
        key = ALIASES.get(key, key)
        checker = _CHECKERS.get(key)
        if checker is None:
            problems.append(Problem(source, f"unknown option {key!r}"
                                            f"{did_you_mean(key, _CHECKERS, 0.6)}"))
            continue
        try:
            parsed[key] = checker(key, value)
        except ConfigError as e:
            problems += e.from_source(source)
    return parsed, problems


def config_from_mapping(values: dict[str, Any], base: Config | None = None) -> Config:
    """A Config from TOML-like values over ``base`` (defaults if None)."""
    parsed, problems = check_values(values, "")
    if problems:
        raise ConfigError(*problems)
    config = dataclasses.replace(base) if base is not None else Config()
    for key, value in parsed.items():
        setattr(config, key, value)
    config.validate()
    return config

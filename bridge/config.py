"""Configuration: defaults, the TOML file, and validation with one clear
message naming the offending key."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.permissions import LEVELS


class ConfigError(Exception):
    """A configuration problem, worded for the operator (one line)."""


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


PropertyValue = bool | int | str


@dataclass
class Config:
    """Every option of the service; field names are the TOML keys."""

    icp_endpoint: str = "unix:/tmp/.pipe/ogon_SessionManager:mode=600"
    thrift_endpoint: str = "tcp:9091:interface=127.0.0.1"
    metrics_endpoint: str = ""
    state_dir: Path = field(default_factory=default_state_dir)
    users_file: Path = field(default_factory=default_users_file)
    # Real WTSAPI clients read /tmp/ogon.session.<sid>; files are 0600 and atomic.
    token_dir: Path = Path("/tmp")  # noqa: S108
    authenticator: str = "users-file"
    call_timeout: float = 10.0
    token_lifetime: float = 24 * 3600.0
    max_icp_frame: int = 16 * 1024 * 1024
    max_thrift_frame: int = 4 * 1024 * 1024
    # Empty: any peer uid may connect (the socket mode still applies).
    allowed_peer_uids: list[int] = field(default_factory=list)
    # Empty allow list: every channel not denied is allowed.
    channels_allow: list[str] = field(default_factory=list)
    channels_deny: list[str] = field(default_factory=list)
    greeter_endpoint: str = "ogon_greeter_{session_id}"
    desktop_endpoint: str = "ogon_desktop_{session_id}"
    max_width: int = 3840
    max_height: int = 2160
    properties: dict[str, PropertyValue] = field(default_factory=dict)
    user_properties: dict[str, dict[str, PropertyValue]] = field(default_factory=dict)

    def validate(self) -> None:
        if self.authenticator not in ("users-file", "pam"):
            raise ConfigError(
                f"authenticator: {self.authenticator!r} is not one of users-file, pam"
            )
        for name in ("call_timeout", "token_lifetime"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        for name in ("max_icp_frame", "max_thrift_frame", "max_width", "max_height"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive")
        for template_name in ("greeter_endpoint", "desktop_endpoint"):
            try:
                getattr(self, template_name).format(session_id=1)
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(
                    f"{template_name}: bad template ({e}); only {{session_id}} may be used"
                ) from None
        level = self.properties.get("permission.level")
        if level is not None and str(level).lower() not in LEVELS:
            raise ConfigError("properties.permission.level: must be full, user or guest")


_PATH_FIELDS = {"state_dir", "users_file", "token_dir"}


def _check_type(key: str, value: Any, expected: Any) -> Any:
    """Coerce/validate one TOML value against the dataclass field type."""
    if key in _PATH_FIELDS:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path string, got {type(value).__name__}")
        return Path(value)
    if key == "call_timeout" or key == "token_lifetime":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number of seconds, got {type(value).__name__}")
        return float(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__}")
        return value
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        return value
    if key == "allowed_peer_uids":
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{key}: expected a list of integer uids")
        return value
    if key in ("channels_allow", "channels_deny"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of channel names")
        return value
    if key == "properties":
        return _check_properties(key, value)
    if key == "user_properties":
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of per-user property tables")
        return {user: _check_properties(f"{key}.{user}", table) for user, table in value.items()}
    raise ConfigError(f"{key}: unsupported option")  # pragma: no cover - every field is listed


def _check_properties(key: str, table: Any) -> dict[str, PropertyValue]:
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: expected a table of property paths")
    for path, value in table.items():
        if not isinstance(value, bool | int | str):
            raise ConfigError(
                f"{key}.{path}: a property is a boolean, integer or string, "
                f"not {type(value).__name__}"
            )
    return dict(table)


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}
_SIMPLE = {"int": int, "str": str, "float": float}


def config_from_mapping(values: dict[str, Any], base: Config | None = None) -> Config:
    """A Config from TOML-like values over ``base`` (defaults if None)."""
    config = dataclasses.replace(base) if base is not None else Config()
    for key, value in values.items():
        if key not in _FIELD_TYPES:
            known = ", ".join(sorted(_FIELD_TYPES))
            raise ConfigError(f"unknown option {key!r} (known: {known})")
        expected = _SIMPLE.get(str(_FIELD_TYPES[key]), None)
        setattr(config, key, _check_type(key, value, expected))
    config.validate()
    return config


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML file at ``path`` (if any), then apply flag ``overrides``."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    values.update(overrides or {})
    return config_from_mapping(values)

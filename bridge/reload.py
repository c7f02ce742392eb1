"""Reloading the configuration of a running bridge (SIGHUP, ``systemctl
reload``): every source read again, checked as at startup, then what
changed applied and logged key by key; sessions are not touched.

A configuration that does not check (or whose preflight finds an error) is
refused with one line, and the running one stays; so is a config.ini that
cannot be used (its line: ``FILE:LINE: what``). What can change live:

- ogon's properties (global and per user), from the TOML file and from
  ogon's config.ini (``ogon_config``, read again as ogon reads it on
  SIGHUP), ``channels_allow``/``_deny``, ``modules``: seen by the next
  logon, lookup, channel or backend start (running backends keep the module
  they started with);
- the users file (``users_file``; it is also read again when it changes);
- ``log_level``;
- the OTS API's connection limits, the failed-logon throttle,
  ``token_lifetime``, ``events_keep``/``events_keep_count``.

Everything else (endpoints, directories, the authenticator, ICP limits,
``call_timeout``) is kept as it runs, with a line saying that the change
waits for a restart. A certificate is read when the OTS API starts
listening: a new ``ssl.certificate`` is answered over ICP at once but
served by the OTS API only after a restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from bridge.config import Config, ConfigError
from bridge.config_sources import ConfigSources
from bridge.preflight import Findings, preflight
from bridge.security.auth import UsersFileAuthenticator
from bridge.sessions.ogon_config import MergedProperties, OgonConfig
from bridge.sessions.properties import ogon_property

if TYPE_CHECKING:
    from bridge.service import BridgeService

#: Keys applied to the running bridge (the rest wait for a restart).
LIVE_KEYS = frozenset({
    "properties", "user_properties", "ogon_config", "channels_allow", "channels_deny", "modules",
    "users_file", "log_level", "max_connections", "frame_timeout", "first_call_timeout",
    "tls_handshake_timeout", "idle_timeout", "max_calls_per_connection", "max_output_buffer",
    "logon_failures_before_delay", "logon_delay_max", "lockout_failures", "lockout_time",
    "password_check_queue", "token_lifetime", "events_keep", "events_keep_count",
    "account_failure_limit", "failure_records_max", "rdp_failures_per_minute",
})
#: Config key -> the OTS API's ConnectionLimits field.
_CONNECTION_LIMITS = {
    "frame_timeout": "frame_timeout", "first_call_timeout": "first_call_timeout",
    "tls_handshake_timeout": "tls_handshake_timeout", "idle_timeout": "idle_timeout",
    "max_calls_per_connection": "max_calls_in_flight",
    "max_output_buffer": "max_pending_output",
}
#: Config key -> the failed-logon ThrottlePolicy field.
_THROTTLE = {
    "logon_failures_before_delay": "failures_before_delay", "logon_delay_max": "delay_max",
    "lockout_failures": "lockout_failures", "lockout_time": "lockout_time",
    "password_check_queue": "queue_limit", "account_failure_limit": "account_failure_limit",
    "failure_records_max": "records_max", "rdp_failures_per_minute": "rdp_failures_per_minute",
}


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"  # ogon_config = ""
    text = repr(str(value)) if not isinstance(value, int | float | bool) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _property_changes(label: str, old: Mapping[str, Any], new: Mapping[str, Any]
                      ) -> list[str]:
    """One line per property added, removed or changed, each starting with
    ``label`` then the property. Values are shown for ogon's own properties
    only: a site's own may hold anything."""
    lines = []
    for path in sorted(set(old) | set(new)):
        before, after = old.get(path, None), new.get(path, None)
        if before == after and type(before) is type(after):
            continue
        known = ogon_property(path)
        if known is None:
            what = "added" if before is None else "removed" if after is None else "changed"
            lines.append(f"{label}{path}: {what}")
        else:
            lines.append(f"{label}{known[0]}: {'(unset)' if before is None else _shown(before)}"
                         f" -> {'(unset)' if after is None else _shown(after)}")
    return lines


def ogon_config_changes(old: OgonConfig | None, new: OgonConfig | None) -> list[str]:
    """One line per property config.ini changed (``FILE: path: a -> b``;
    ``FILE [user_NAME]: ...`` for a user's)."""
    source = new.source if new is not None else old.source if old is not None else ""
    empty: dict[str, Any] = {}
    lines = _property_changes(f"{source}: ", old.global_values if old else empty,
                              new.global_values if new else empty)
    old_users = old.user_values if old else {}
    new_users = new.user_values if new else {}
    for user in sorted(set(old_users) | set(new_users)):
        lines += _property_changes(f"{source} [user_{user}]: ", old_users.get(user, empty),
                                   new_users.get(user, empty))
    return lines


def describe_changes(old: Config, new: Config) -> list[tuple[str, str]]:
    """(top-level key, line) for every difference; no module environment
    values (they may hold secrets)."""
    changes: list[tuple[str, str]] = []
    for item in dataclasses.fields(Config):
        key = item.name
        before, after = getattr(old, key), getattr(new, key)
        if before == after:
            continue
        if key == "properties":
            changes += [(key, line) for line in _property_changes(f"{key}.", before, after)]
        elif key == "user_properties":
            for user in sorted(set(before) | set(after)):
                changes += [(key, line) for line in _property_changes(
                    f"{key}.{user}.", before.get(user, {}), after.get(user, {}))]
        elif key == "modules":
            for name in sorted(set(before) | set(after)):
                was, now = before.get(name), after.get(name)
                if was == now:
                    continue
                if was is None or now is None:
                    what = "added" if was is None else "removed"
                    changes.append((key, f"modules.{name}: {what}"))
                    continue
                fields = [f.name for f in dataclasses.fields(now)
                          if getattr(was, f.name) != getattr(now, f.name)]
                changes.append((key, f"modules.{name}: {', '.join(fields)} changed"))
        else:
            changes.append((key, f"{key}: {_shown(before)} -> {_shown(after)}"))
    return changes


class Reloader:
    """Reads the sources again and applies the result to ``service``."""

    log = Logger()

    def __init__(self, service: BridgeService, sources: ConfigSources,
                 set_log_level: Callable[[str], None] | None = None,
                 check: Callable[..., Findings] = preflight) -> None:
        self.service = service
        self.sources = sources
        self.set_log_level = set_log_level
        self.check = check

    def reload(self) -> bool:
        """True when the new configuration was applied."""
        service = self.service
        try:
            loaded = self.sources.load_settings()
            properties = loaded.read_properties()  # config.ini, as ogon reads it on SIGHUP
        except ConfigError as e:
            return self._refused(e.problems[0], len(e.problems))
        findings = self.check(loaded.config, loaded.origins, properties=properties,
                              files=loaded.files)
        if findings.errors:
            return self._refused(findings.errors[0], len(findings.errors))
        for problem in [*loaded.warnings, *findings.warnings]:
            self.log.warn("{problem}", problem=str(problem))
        for problem in findings.alerts:
            self.log.error("{problem}", problem=str(problem))
        running = service.config
        changes = describe_changes(running, loaded.config)
        changes += [("ogon_config", line) for line in ogon_config_changes(
            service.served_properties.ini, properties.ini)]
        kept = dataclasses.replace(loaded.config)
        if self.set_log_level is not None:  # first: a more verbose level shows the lines below
            self.set_log_level(kept.log_level)
        for key, line in changes:
            if key in LIVE_KEYS:
                self.log.info("reload: {change}", change=line)
            else:
                self.log.warn("reload: {change} in {source}: takes effect at the next restart "
                              "(the running value stays)", change=line,
                              source=loaded.origins.get(key, "the configuration"))
                setattr(kept, key, getattr(running, key))
        self.apply(kept, properties)
        service.operations.reloads["applied"] += 1
        service.operations.reload_refused = ""
        self.log.info("configuration reloaded from {sources}: {count} change{s}",
                      sources=", ".join(loaded.files) or "the defaults",
                      count=len(changes), s="" if len(changes) == 1 else "s")
        return True

    def _refused(self, problem: object, count: int) -> bool:
        more = f" (and {count - 1} more: `icp-bridge config check` lists them)" \
            if count > 1 else ""
        self.service.operations.reloads["refused"] += 1
        self.service.operations.reload_refused = str(problem)
        self.log.error("configuration not reloaded, the running one stays: {problem}{more}",
                       problem=str(problem), more=more)
        return False

    def apply(self, new: Config, properties: MergedProperties) -> None:
        """Make ``new`` the running configuration (its restart-only keys
        equal to the running ones) and serve ``properties``."""
        service = self.service
        service.serve_properties(properties)
        service.channels.reconfigure(new.channels_allow, new.channels_deny)
        if service.workers is not None:
            service.workers.policy_changed(channels=(new.channels_allow, new.channels_deny))
        # The lifecycle's flows hold this very dict: the next logon sees it.
        service.config.modules.clear()
        service.config.modules.update(new.modules)
        new.modules = service.config.modules
        limits = service.thrift_limits
        for key, name in _CONNECTION_LIMITS.items():
            setattr(limits, name, getattr(new, key))
        limits.max_connections = new.max_connections
        if limits.fd_limit is not None:  # below the descriptor limit, as at startup
            limits.max_connections = min(new.max_connections,
                                         max(16, limits.fd_limit - limits.fd_reserve))
        if service.workers is not None:  # the OTS API worker processes enforce them too
            service.workers.limits_changed(limits)
        service.guard.policy = dataclasses.replace(
            service.guard.policy, **{field: getattr(new, key) for key, field in _THROTTLE.items()})
        service.otsapi.token_lifetime = new.token_lifetime
        service.config = new
        users = service.operations.users
        if isinstance(users, UsersFileAuthenticator):
            users.reload(new.users_file)

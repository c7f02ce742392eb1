"""Where the configuration comes from: an ordered list of sources (the TOML
file, then the command line's flags), read, checked, merged; then ogon's own
config.ini, which the result names (``ogon_config``), for the properties
under the TOML file's. Startup, every reload and ``icp-bridge config
check`` read them through ``ConfigSources``, so a reload reads every source
again (config.ini too, as ogon does on SIGHUP) in one step, and one broken
source refuses it whole.

Each source is checked on its own, so that a problem names its file (and a
config.ini problem its line); then the values are merged (later sources
win; the ``properties``, ``user_properties`` and ``modules`` tables merge
entry by entry) and checked as a whole. Properties ogon does not read are
warnings, not errors. The TOML file's properties must have the type ogon
reads them as (an error); config.ini's are typed by their suffix, as ogon
types them, and one of another type than ogon reads is a warning: ogon takes
it, and the bridge serves it as ogon does (``ogon_config_warnings``).

``load_properties`` is the one place the served properties are put
together: config.ini under the TOML file's, over ogon's defaults.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bridge.config import (
    ALIASES,
    Config,
    ConfigError,
    Problem,
    check_values,
    default_modules,
    did_you_mean,
    with_ogon_defaults,
)
from bridge.security.tls import default_pair
from bridge.sessions.ogon_config import (
    MergedProperties,
    OgonConfig,
    OgonConfigError,
    merge_properties,
    read_ogon_config,
)
from bridge.sessions.properties import (
    CONNECTION_PREFIX,
    OGON_DEFAULTS,
    PropertyTable,
    PropertyValue,
    known_property_names,
    ogon_property,
)

#: Tables whose entries several sources may each set (merged entry by entry).
_MERGED_TABLES = ("properties", "modules")


#: The top-level options (Config's fields), for a key that strayed into a table.
_OPTIONS = frozenset(field.name for field in dataclasses.fields(Config))


def _unknown_property(path: str, known: list[str]) -> str | None:
    """What to say about a property path ogon does not read (None when it
    reads it): a warning, not an error, since sites add their own and they
    are answered over ICP all the same; with the closest of ogon's names."""
    if ogon_property(path) is not None:
        return None
    if path.lower().startswith(CONNECTION_PREFIX):
        return "answered from the client's connection; a configured value is never used"
    return f"not a property ogon reads{did_you_mean(path, known)}; kept, and answered over ICP"


def property_warnings(values: Mapping[str, Any], module_names: Iterable[str]) -> list[str]:
    """Lines for the TOML-like ``values``' properties ogon does not read."""
    known = known_property_names(tuple(module_names))
    tables: list[tuple[str, Any]] = [("properties", values.get("properties"))]
    user_tables = values.get("user_properties")
    if isinstance(user_tables, dict):
        tables += [(f"user_properties.{user}", t) for user, t in user_tables.items()]
    lines = []
    for key, table in tables:
        if not isinstance(table, dict):
            continue
        for path in table:
            if not isinstance(path, str):
                continue
            unknown = _unknown_property(path, known)
            if unknown is not None and path in _OPTIONS:
                # A TOML table takes every key after its header: an option
                # written below [properties] lands here, and silently.
                unknown += (f"; {path} is a top-level option: write it above the first "
                            f"[table] of the file")
            if unknown is not None:
                lines.append(f"{key}.{path}: {unknown}")
    return lines


#: How config.ini spells each type: the suffix of its keys.
_SUFFIXES = {bool: "_bool", int: "_number", str: "_string"}
_INI_TYPES = {bool: "a boolean", int: "a number", str: "a string"}


def _hides_global(merged: MergedProperties, user: str, path: str,
                  value: PropertyValue) -> bool:
    """Whether merge_properties says that ``user``'s ``value`` for ``path``
    (served as it is) hides the global value of another type."""
    served = merged.per_user.get(user, {}).get(path)
    general = merged.global_values.get(path, merged.defaults.get(path))
    return type(served) is type(value) and served == value and general is not None \
        and type(general) is not type(value)


def ogon_config_warnings(ini: OgonConfig, merged: MergedProperties,
                         module_names: Iterable[str]) -> list[str]:
    """``FILE:LINE: ...`` for each config.ini entry whose suffix gives one of
    ogon's properties another type than ogon reads it as, and for each
    property ogon does not read. Warnings: ogon takes such an entry (asked
    for its own type, the property is then not found and the reader falls
    back to its own value), and the bridge serves it as ogon does. A user's
    entry whose type hides the global one is said once, by merge_properties."""
    tables = [("", ini.global_values), *ini.user_values.items()]
    ini_modules = {path.split(".")[1] for _, table in tables for path in table
                   if path.startswith("module.") and path.count(".") == 2}
    known = known_property_names((*module_names, *sorted(ini_modules)))
    lines = []
    for user, table in tables:
        for path, value in table.items():
            where = f"{ini.source}:{ini.lines.get((user, path), 0)}"
            ogons = ogon_property(path)
            if ogons is None:
                lines.append(f"{where}: {path}: {_unknown_property(path, known)}")
            elif type(value) is not ogons[1] and not (
                    user and _hides_global(merged, user, path, value)):
                name, kind = ogons
                lines.append(f"{where}: {name} is {_INI_TYPES[type(value)]} here, but ogon "
                             f"reads it as {_INI_TYPES[kind]}: asked for {_INI_TYPES[kind]}, "
                             f"it is not found and its reader falls back to its own value "
                             f"(as in ogon; use the {_SUFFIXES[kind]} suffix)")
    return lines


def load_properties(config: Config) -> MergedProperties:
    """The properties the bridge serves, put together here and nowhere else:
    ogon's config.ini (``ogon_config``) under the TOML file's, over ogon's
    defaults with the TLS pair's default paths filled in (they depend on
    running as root) and the Qt greeter in ogon's (first) bin directory
    (``${OGON_BIN_PATH}/ogon-qt-greeter``). Reads the file each time
    (startup, reload, config check); raises OgonConfigError. The
    config.ini's warnings are in the result's ``problems``."""
    certificate, key = default_pair(os.geteuid() == 0, config.state_dir)
    bin_dir = config.ogon_bin_dirs[0] if config.ogon_bin_dirs else "/usr/bin"
    defaults: dict[str, PropertyValue] = {**OGON_DEFAULTS, "ssl.certificate": str(certificate),
                                          "ssl.key": str(key),
                                          "module.greeter.cmd": f"{bin_dir}/ogon-qt-greeter"}
    ini = read_ogon_config(config.ogon_config) if config.ogon_config is not None else None
    merged = merge_properties(ini, config.properties, config.user_properties, defaults)
    if ini is None:
        return merged
    extra = ogon_config_warnings(ini, merged, config.modules)
    return dataclasses.replace(merged, problems=(*merged.problems, *extra))


def property_table(config: Config) -> PropertyTable:
    """A table of what load_properties says (raises OgonConfigError)."""
    return load_properties(config).table()


def ogon_config_problem(error: OgonConfigError) -> Problem:
    """A config.ini that cannot be used, as a configuration problem: its
    line is ``FILE:LINE: what`` as the error says it."""
    where = f"{error.source}:{error.line}" if error.line else error.source
    return Problem(where, error.what)


class ConfigSource(Protocol):
    """Where some of the configuration comes from."""

    @property
    def name(self) -> str:
        """For the operator: a file's path, or "command line"."""
        ...

    def read(self) -> dict[str, Any]:
        """TOML-like values (keys as Config's fields); raises ConfigError
        when the source cannot be read at all."""
        ...


@dataclass(frozen=True)
class TomlFile:
    """The bridge's TOML file."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def read(self) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                return tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {self.path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {self.path}: {e}") from None


@dataclass(frozen=True)
class Flags:
    """Values given on the command line (they win over the files)."""

    values: Mapping[str, Any]
    name: str = "command line"

    def read(self) -> dict[str, Any]:
        return dict(self.values)


@dataclass
class LoadedConfig:
    """A checked configuration: the Config, the warnings (lines worth
    logging that do not stop it), which source set each top-level key, the
    files read; once ``read_properties`` ran, the properties to serve."""

    config: Config
    warnings: list[Problem]
    origins: dict[str, str]
    files: list[str] = field(default_factory=list)
    properties: MergedProperties | None = None

    def read_properties(self) -> MergedProperties:
        """Read ogon's config.ini the configuration names (if any) and put
        the properties together (``load_properties``); raises ConfigError
        with the file's one line (``FILE:LINE: what``)."""
        try:
            self.properties = load_properties(self.config)
        except OgonConfigError as e:
            raise ConfigError(ogon_config_problem(e)) from None
        if self.config.ogon_config is not None:
            self.files.append(str(self.config.ogon_config))
        return self.properties


def _merge(into: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        key = ALIASES.get(key, key)
        current = into.get(key)
        if key in _MERGED_TABLES and isinstance(current, dict) and isinstance(value, dict):
            into[key] = {**current, **value}
        elif key == "user_properties" and isinstance(current, dict) \
                and isinstance(value, dict):
            merged = dict(current)
            for user, table in value.items():
                old = merged.get(user)
                merged[user] = {**old, **table} if isinstance(old, dict) and \
                    isinstance(table, dict) else table
            into[key] = merged
        else:
            into[key] = value


@dataclass
class ConfigSources:
    """The bridge's own sources of the configuration, in order (later ones
    win), and ogon's config.ini they name. ``load`` reads them all again:
    what every reload and ``config check`` do; startup reads the first
    (``load_settings``) with twistd's options and config.ini when it makes
    the service, so that a broken config.ini is said there as
    BridgeService says it."""

    sources: list[ConfigSource]

    @classmethod
    def for_service(cls, path: Path | None, overrides: Mapping[str, Any] | None = None
                    ) -> ConfigSources:
        """The TOML file at ``path`` (if any), then the flags."""
        sources: list[ConfigSource] = [TomlFile(path)] if path is not None else []
        if overrides:
            sources.append(Flags(overrides))
        return cls(sources)

    @property
    def files(self) -> list[str]:
        return [source.name for source in self.sources if not isinstance(source, Flags)]

    def load(self) -> LoadedConfig:
        """Every source, then ogon's config.ini they name: the configuration
        and the properties to serve (``properties``); raises ConfigError."""
        loaded = self.load_settings()
        loaded.read_properties()
        return loaded

    def load_settings(self) -> LoadedConfig:
        """Read, check, merge the bridge's own sources (the defaults for an
        ogon host included: ``with_ogon_defaults``); raises ConfigError with
        every problem found."""
        merged: dict[str, Any] = {}
        origins: dict[str, str] = {}
        problems: list[Problem] = []
        warnings: list[Problem] = []
        for source in self.sources:
            try:
                values = source.read()
            except ConfigError as e:
                problems += e.problems
                continue
            _, found = check_values(values, source.name)
            problems += found
            module_names = [*default_modules(), *(merged.get("modules") or {}),
                            *(values.get("modules") or {})]
            warnings += [Problem(source.name, line, warning=True)
                         for line in property_warnings(values, module_names)]
            _merge(merged, values)
            origins.update({ALIASES.get(key, key): source.name for key in values})
        if problems:
            raise ConfigError(*problems)
        parsed, found = check_values(with_ogon_defaults(merged), "")
        if found:  # the sources are sound each; only their sum is not
            raise ConfigError(*found)
        config = Config()
        for key, value in parsed.items():
            setattr(config, key, value)
        wrong = [Problem(origins.get(key, ""), line) for key, line in config.problems()]
        if wrong:
            raise ConfigError(*wrong)
        return LoadedConfig(config, warnings, origins, self.files)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML file at ``path`` (if any), then apply flag ``overrides``
    (config.ini is not read: it holds properties, which a Config does not)."""
    return ConfigSources.for_service(path, overrides).load_settings().config

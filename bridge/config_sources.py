"""Where the configuration comes from: an ordered list of sources (the TOML
file, then the command line's flags; a reader of ogon's own config.ini can
join the list), read, checked, merged. Startup and every reload call
``ConfigSources.load``, so a reload reads every source again in one step.

Each source is checked on its own, so that a problem names its file; then
the values are merged (later sources win; the ``properties``,
``user_properties`` and ``modules`` tables merge entry by entry) and checked
as a whole. Properties ogon does not read are warnings, not errors.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
from bridge.sessions.properties import CONNECTION_PREFIX, known_property_names, ogon_property

#: Tables whose entries several sources may each set (merged entry by entry).
_MERGED_TABLES = ("properties", "modules")


def property_warnings(values: Mapping[str, Any], module_names: Iterable[str]) -> list[str]:
    """Lines for properties ogon does not read (a warning, not an error:
    sites add their own, and they are answered over ICP all the same), with
    the closest of ogon's names when one is close."""
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
            if not isinstance(path, str) or ogon_property(path) is not None:
                continue
            if path.lower().startswith(CONNECTION_PREFIX):
                lines.append(f"{key}.{path}: answered from the client's connection; a "
                             f"configured value is never used")
                continue
            lines.append(f"{key}.{path}: not a property ogon reads{did_you_mean(path, known)}; "
                         f"kept, and answered over ICP")
    return lines


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
    logging that do not stop it), and which source set each top-level key."""

    config: Config
    warnings: list[Problem]
    origins: dict[str, str]


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
    """The sources of the configuration, in order (later ones win). ``load``
    reads them all again: what startup and every reload do."""

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
        """Read, check, merge; raises ConfigError with every problem found."""
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
        return LoadedConfig(config, warnings, origins)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the TOML file at ``path`` (if any), then apply flag ``overrides``."""
    return ConfigSources.for_service(path, overrides).load().config

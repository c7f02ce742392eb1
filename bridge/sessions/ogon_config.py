"""ogon's own configuration file (``/etc/ogon/config.ini``), read with
ogon's rules, and merged with the properties of the bridge's TOML file.

ogon reads the file with Boost's ``read_ini`` and walks the tree in its
PropertyManager (session-manager/common/config/PropertyManager.cpp,
parsePropertyGlobal); the rules below are theirs:

- lines are trimmed; ``#`` or ``;`` first makes a comment (no comments after
  a value); ``[name]`` opens a section (text after the first ``]`` is
  ignored); every other line is ``key=value`` split at the first ``=``, both
  sides trimmed, no quoting;
- a key given twice in one section, or a section name given twice, makes the
  file invalid (an empty section dropped before the next header does not
  count);
- ``[global...]`` and keys before the first header are global; ``[user...]``
  is for the user named by the section name less its first five characters
  (``[user_bob]`` is bob); any other section prefixes its keys with its
  name and a dot;
- ``path_type=value``: ``_string``, ``_number`` (a decimal ``long``) or
  ``_bool`` (true only when the value starts with ``true``); every ``_`` of
  the path becomes ``.``; property names ignore case, user names do not;
- an empty value is ignored; a property set twice in a level keeps the
  later value, type included.

Where ogon ignores a broken file and runs on its defaults, reading it here
raises :class:`OgonConfigError` naming the file and line, so that the
bridge refuses to start (or, at a reload, keeps what it runs). A number that
is not one is an error too (ogon logs it and drops the line). What ogon
accepts but an operator would not mean (no type suffix, ``True`` read as
false, ``[userbob]`` meaning user ``ob``) is a *problem*: one line each, for
the log.

Everything here is pure (bytes in, tables out) so that a reload can call it
as startup does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bridge.sessions.properties import PropertyTable, PropertyValue

#: Where ogon's Debian package installs it (``${SYSCONFDIR}/ogon/config.ini``).
DEFAULT_PATH = Path("/etc/ogon/config.ini")

# What Boost's trim removes: isspace() in the C locale.
_SPACE = " \t\n\r\v\f"
_BOM = "\ufeff"
_DECIMAL = re.compile(r"[+-]?[0-9]+", re.ASCII)
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_SUFFIXES: tuple[tuple[str, type], ...] = (("_number", int), ("_string", str), ("_bool", bool))
_TYPE_NAMES = {bool: "boolean", int: "number", str: "string"}


class OgonConfigError(Exception):
    """The file cannot be used: unreadable, or a line ogon's parser refuses.
    ``str()`` is one line: ``FILE:LINE: what`` (``FILE: what`` when no line
    is to blame)."""

    def __init__(self, source: str, line: int, what: str) -> None:
        self.source, self.line, self.what = source, line, what
        super().__init__(f"{source}:{line}: {what}" if line else f"{source}: {what}")


@dataclass(frozen=True)
class OgonConfig:
    """What a config.ini sets. Property paths are lower-cased (ogon compares
    them ignoring case); user names are as written. ``lines`` says where
    each property was set, by ``(user, path)`` with user ``""`` for global.
    ``problems``: lines ogon takes silently that the operator should hear
    about, each ``FILE:LINE: what``."""

    source: str
    global_values: Mapping[str, PropertyValue] = field(default_factory=dict)
    user_values: Mapping[str, Mapping[str, PropertyValue]] = field(default_factory=dict)
    lines: Mapping[tuple[str, str], int] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


def type_name(value: PropertyValue) -> str:
    return _TYPE_NAMES[type(value)]


# -- the INI layer (Boost's read_ini) ------------------------------------------------

@dataclass
class _Section:
    name: str | None  # None: the keys before the first header
    line: int
    entries: list[tuple[str, str, int]] = field(default_factory=list)  # key, value, line


def _read_ini(data: bytes, source: str) -> list[_Section]:
    """The sections of the file in order, as read_ini builds its tree.
    Raises OgonConfigError where read_ini throws."""
    root = _Section(None, 0)
    sections: list[_Section] = [root]
    names: set[str] = set()  # children of the tree's root: sections and root keys
    current = root
    # std::getline splits at \n only; \r goes with the trim.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise OgonConfigError(source, number, f"not UTF-8 ({e.reason} at byte "
                                                  f"{e.start})") from None
        if number == 1 and text.startswith(_BOM):
            raise OgonConfigError(source, 1, "the file starts with a UTF-8 byte-order mark, "
                                             "which ogon reads as part of the first line "
                                             "(and then ignores the whole file); remove it")
        line = text.strip(_SPACE)
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if current is not root and not current.entries:
                sections.remove(current)  # an empty section is dropped again
                names.discard(current.name or "")
            end = line.find("]")
            if end < 0:
                raise OgonConfigError(source, number, "unmatched '['")
            name = line[1:end].strip(_SPACE)
            if name in names:
                raise OgonConfigError(source, number, f"section [{name}] given twice "
                                                      "(ogon then ignores the whole file)")
            names.add(name)
            current = _Section(name, number)
            sections.append(current)
            continue
        equals = line.find("=")
        if equals < 0:
            raise OgonConfigError(source, number, "'=' character not found in line")
        if equals == 0:
            raise OgonConfigError(source, number, "key expected before '='")
        key, value = line[:equals].strip(_SPACE), line[equals + 1:].strip(_SPACE)
        for other_key, _, other_line in current.entries:
            if other_key == key:
                where = f"in [{current.name}]" if current.name is not None \
                    else "before the first section"
                raise OgonConfigError(
                    source, number, f"{key} given twice {where} (first on line {other_line}); "
                                    "ogon then ignores the whole file")
        current.entries.append((key, value, number))
        if current is root:
            names.add(key)
    if current is not root and not current.entries:
        sections.remove(current)
    return sections


# -- the property layer (ogon's PropertyManager) -------------------------------------

def _typed(path: str) -> tuple[str, type] | None:
    """The property name and type a key's suffix gives, or None."""
    for suffix, kind in _SUFFIXES:
        if path.endswith(suffix) and len(path) > len(suffix):
            return path[: -len(suffix)].replace("_", "."), kind
    return None


class _Builder:
    """The tables, filled in file order as ogon's walk fills its maps."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.global_values: dict[str, PropertyValue] = {}
        self.user_values: dict[str, dict[str, PropertyValue]] = {}
        self.lines: dict[tuple[str, str], int] = {}
        self.problems: list[str] = []

    def problem(self, line: int, what: str) -> None:
        self.problems.append(f"{self.source}:{line}: {what}")

    def section(self, section: _Section) -> None:
        name, user, prefix = section.name, "", ""
        if name is not None and name.startswith("user"):
            user = name[5:]
            if not user:
                self.problem(section.line, f"section [{name}] names no user (ogon takes the "
                                           "name after the first five characters); its "
                                           "entries are ignored, as ogon ignores them")
                return
            if name[4] != "_":
                self.problem(section.line, f"section [{name}] is for user {user!r}: ogon drops "
                                           "the first five characters of a [user...] name")
        elif name is not None and not name.startswith("global"):
            prefix = name + "."
        for key, value, line in section.entries:
            self.entry(user, prefix + key, value, line)

    def entry(self, user: str, full_path: str, value: str, line: int) -> None:
        if not value:
            return  # ogon skips an empty value: the default stays
        typed = _typed(full_path)
        if typed is None:
            self.problem(line, f"{full_path} has no _string, _number or _bool suffix; ignored, "
                               "as ogon ignores it")
            return
        path, kind = typed
        parsed: PropertyValue
        if kind is int:
            if not _DECIMAL.fullmatch(value) or not _LONG_MIN <= int(value) <= _LONG_MAX:
                raise OgonConfigError(self.source, line,
                                      f"{full_path}={value}: not a decimal number (ogon would "
                                      "log it and ignore the line)")
            parsed = int(value)
        elif kind is bool:
            parsed = value.startswith("true")
            if value not in ("true", "false"):
                self.problem(line, f"{full_path}={value} is read as {str(parsed).lower()}: ogon "
                                   "takes only a value starting with 'true' as true")
        else:
            parsed = value
        key = path.lower()
        if key == "permission.level" and isinstance(parsed, str) \
                and parsed.lower() not in ("full", "user", "guest"):
            self.problem(line, f"{full_path}={value} is neither FULL, USER nor GUEST: the level "
                               "is GUEST, as in ogon")
        table = self.user_values.setdefault(user, {}) if user else self.global_values
        earlier = self.lines.get((user, key))
        if earlier is not None:
            self.problem(line, f"property {path} is also set on line {earlier}; the later one "
                               "wins, as in ogon")
        table[key] = parsed
        self.lines[user, key] = line


def parse_ogon_config(data: bytes, source: str) -> OgonConfig:
    """The properties a config.ini's bytes set, read with ogon's rules.
    ``source`` names the file in messages. Raises OgonConfigError."""
    builder = _Builder(source)
    for section in _read_ini(data, source):
        if section.name is None:
            for key, value, line in section.entries:
                builder.entry("", key, value, line)
        else:
            builder.section(section)
    return OgonConfig(source, builder.global_values, builder.user_values, builder.lines,
                      tuple(builder.problems))


def read_ogon_config(path: Path) -> OgonConfig:
    """Read and parse the file at ``path``. Raises OgonConfigError (also
    when it cannot be read)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OgonConfigError(str(path), 0, f"cannot read ogon's config file: "
                                            f"{e.strerror or e}") from None
    return parse_ogon_config(data, str(path))


# -- config.ini and the TOML file together -------------------------------------------

@dataclass(frozen=True)
class MergedProperties:
    """The property tables the bridge serves: ``global_values`` and
    ``per_user`` (lower-cased paths) over ``defaults``; ``ini``, the
    config.ini they came from, if any. For the log, one line each:
    ``overrides``, each property the TOML file overrides; ``problems``, the
    config.ini's problems and each user entry whose type hides the global
    one."""

    global_values: Mapping[str, PropertyValue]
    per_user: Mapping[str, Mapping[str, PropertyValue]]
    defaults: Mapping[str, PropertyValue]
    ini: OgonConfig | None = None
    overrides: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    def table(self) -> PropertyTable:
        """A table that serves these properties."""
        return PropertyTable(self.global_values, self.per_user, self.defaults)


def _lowered(table: Mapping[str, PropertyValue]) -> dict[str, PropertyValue]:
    return {path.lower(): value for path, value in table.items()}


def merge_properties(ini: OgonConfig | None, toml_global: Mapping[str, PropertyValue],
                     toml_users: Mapping[str, Mapping[str, PropertyValue]],
                     defaults: Mapping[str, PropertyValue]) -> MergedProperties:
    """config.ini is the site's ogon configuration; the TOML file's
    ``[properties]`` and ``[user_properties.NAME]`` override it, each in
    its level. A lookup then asks the user's table (TOML over config.ini),
    then the global one (TOML over config.ini), then ogon's defaults."""
    overrides: list[str] = []
    problems: list[str] = list(ini.problems) if ini is not None else []
    global_values = dict(ini.global_values) if ini is not None else {}
    per_user = {user: dict(table) for user, table in ini.user_values.items()} \
        if ini is not None else {}

    def override(user: str, table: dict[str, PropertyValue],
                 values: Mapping[str, PropertyValue]) -> None:
        for path, value in _lowered(values).items():
            if ini is not None and path in table:
                line = ini.lines.get((user, path), 0)
                where = f"[user_properties.{user}]" if user else "[properties]"
                overrides.append(f"property {path}{f' for user {user}' if user else ''}: the "
                                 f"TOML file's {where} overrides {ini.source}:{line}")
            table[path] = value

    override("", global_values, toml_global)
    for user, values in toml_users.items():
        override(user, per_user.setdefault(user, {}), values)
    lowered_defaults = _lowered(defaults)
    for user, table in per_user.items():
        for path, value in table.items():
            general = global_values.get(path, lowered_defaults.get(path))
            if general is not None and type(general) is not type(value):
                problems.append(f"property {path} for user {user} is a {type_name(value)}, the "
                             f"global one a {type_name(general)}: asked for a "
                             f"{type_name(general)}, {user}'s sessions find none (as in ogon)")
    return MergedProperties(global_values, per_user, lowered_defaults, ini, tuple(overrides),
                            tuple(problems))

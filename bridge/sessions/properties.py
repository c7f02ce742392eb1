"""Session-manager properties, looked up the way ogon's PropertyManager does.

Paths compare case-insensitively; a user's own value wins over the global
one, which wins over ogon's default. ``current.connection.*`` paths are
answered from the asking connection's client. Values are booleans,
integers (signed, 64-bit, as ogon's ``long``) or strings, and a property is
only found under its own type: asking for a number that is configured as a
string answers "not found", as in ogon.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bridge.sessions.model import Session

PropertyValue = bool | int | str

#: ogon's own defaults (session-manager/common/appcontext/ApplicationContext.cpp
#: setupDefaultValues), all of them and nothing more (a property ogon has no
#: default for, such as ``session.remotecontrol.ask``, is answered "not
#: found" over ICP as ogon answers it; its reader has a fallback), by
#: lower-cased path. ``ssl.certificate`` and ``ssl.key`` are filled in by
#: ``bridge.config_sources.load_properties``, since where they live depends
#: on whether the bridge runs as root.
OGON_DEFAULTS: dict[str, PropertyValue] = {
    "tcp.keepalive.params": "-1,-1",
    "module": "xsession",
    "auth.module": "PAM",
    "auth.greeter": "greeter",
    "session.reconnect": True,
    "session.reconnect.fromsameclient": False,
    "session.timeout": 1,
    "session.singlesession": True,
    "environment.filter": "",
    "environment.add": "",
    "permission.level": "USER",
    "permission.groups.whitelist": "*",
    "permission.groups.blacklist": "",
    "virtualchannel.whitelist": "*",
    "session.maxxres": 1920,
    "session.maxyres": 1200,
    "session.xres": 1024,
    "session.yres": 768,
    "session.colordepth": 24,
    # The module configurations ogon defines itself; ordinary properties,
    # answered over ICP like any other.
    "module.xsession.modulename": "X11",
    "module.xsession.startwm": "ogonXsession",
    "module.xsession.uselauncher": True,
    # A boolean in ogon (setPropertyBool given the path's char*), so asking
    # for it as a string finds nothing and the launcher's own name is used.
    "module.xsession.launcherexecutable": True,
    "module.greeter.modulename": "Qt",
    # ${OGON_BIN_PATH}/ogon-qt-greeter as ogon's Debian package builds it.
    "module.greeter.cmd": "/usr/bin/ogon-qt-greeter",
    "module.greeter.uselauncher": False,
}

CONNECTION_PREFIX = "current.connection."

#: The type ogon reads each property as (spec section 1.6), by ogon's
#: spelling: a property configured with another type is "not found" for
#: its reader, which then falls back to a hard-coded value (a quoted
#: ``session.timeout = "30"`` would end every disconnected session at once).
OGON_PROPERTY_TYPES: dict[str, type] = {
    "ssl.certificate": str, "ssl.key": str, "tcp.keepalive.params": str,
    "module": str, "auth.module": str, "auth.greeter": str,
    "session.reconnect": bool, "session.reconnect.fromSameClient": bool,
    "session.singleSession": bool, "session.timeout": int,
    "session.remotecontrol.ask": bool,
    "environment.filter": str, "environment.add": str,
    "permission.level": str, "permission.groups.whiteList": str,
    "permission.groups.blackList": str, "virtualChannel.whiteList": str,
    "session.maxXRes": int, "session.maxYRes": int, "session.xres": int, "session.yres": int,
    "session.colordepth": int,
    # Read by ogon's RDP server over ICP (rdp-server/frontend.c).
    "ogon.forceWeakRdpKey": bool, "ogon.showDebugInfo": bool,
    "ogon.disableGraphicsPipeline": bool, "ogon.bitrate": int,
    "ogon.disableGraphicsPipelineH264": bool, "ogon.enableFullAVC444": bool,
    "ogon.restrictAVC444": bool,
}
#: ``module.<name>.<option>``: what ogon's module kinds read per module
#: (``colordepth`` is in ogon's shipped files, though nothing reads it).
OGON_MODULE_PROPERTY_TYPES: dict[str, type] = {
    "modulename": str, "uselauncher": bool, "launcherexecutable": str,
    "launcherdebugfile": str, "displayOffset": int, "dpi": int, "fontPath": str,
    "noKPCursor": bool, "xauthoritypath": str, "stopwm": str, "startwm": str,
    "startvc": str, "cmd": str, "colordepth": int,
}
_TYPES_BY_KEY = {path.lower(): (path, kind) for path, kind in OGON_PROPERTY_TYPES.items()}
_MODULE_TYPES_BY_KEY = {option.lower(): (option, kind)
                        for option, kind in OGON_MODULE_PROPERTY_TYPES.items()}


def ogon_property(path: str) -> tuple[str, type] | None:
    """ogon's spelling and type of a property path (any case), or None for a
    property ogon does not read (sites add their own; they are answered
    over ICP all the same)."""
    key = path.lower()
    known = _TYPES_BY_KEY.get(key)
    if known is not None:
        return known
    parts = path.split(".")
    if len(parts) == 3 and parts[0].lower() == "module" and parts[1]:
        option = _MODULE_TYPES_BY_KEY.get(parts[2].lower())
        if option is not None:
            return f"module.{parts[1]}.{option[0]}", option[1]
    return None


def known_property_names(module_names: list[str] | tuple[str, ...] = ()) -> list[str]:
    """ogon's property names (with ``module.<name>.*`` for the given
    modules): what a misspelt property is compared with."""
    names = list(OGON_PROPERTY_TYPES)
    for module in module_names:
        names += [f"module.{module}.{option}" for option in OGON_MODULE_PROPERTY_TYPES]
    return names


def type_name(kind: type) -> str:
    """How the operator's TOML spells a property type."""
    return {bool: "a boolean (true/false)", int: "an integer", str: "a string"}[kind]


@dataclass(frozen=True)
class ConnectionValues:
    """What ``current.connection.*`` answers for one client connection
    (ogon's Connection::getProperty): the size in use (clamped to the
    session's maximum), the colour depth, and the size the client asked for."""

    xres: int
    yres: int
    colordepth: int
    initialxres: int
    initialyres: int


def connection_values(session: Session) -> ConnectionValues | None:
    """``current.connection.*`` of the session's client (None without one)."""
    if session.connection_id is None:
        return None
    c = session.client
    return ConnectionValues(c.width, c.height, c.color_depth, c.initial_width,
                            c.initial_height)


class PropertyTable:
    """Global properties, per-user overrides and ogon's defaults."""

    def __init__(self, global_values: Mapping[str, PropertyValue],
                 per_user: Mapping[str, Mapping[str, PropertyValue]],
                 defaults: Mapping[str, PropertyValue] | None = None) -> None:
        #: Bumped by every replace(), so that what is derived from the
        #: properties (ChannelPolicy's lists) knows to derive it again.
        self.generation = 0
        self._defaults: dict[str, PropertyValue] = {}
        self.replace(global_values, per_user, OGON_DEFAULTS if defaults is None else defaults)

    def replace(self, global_values: Mapping[str, PropertyValue],
                per_user: Mapping[str, Mapping[str, PropertyValue]],
                defaults: Mapping[str, PropertyValue] | None = None) -> None:
        """New values, all at once and in place (a reload): every part
        holding this table sees them at its next lookup, as ogon's reload
        does (what a session decided when it started, such as its backend,
        stays). ``defaults`` None keeps the table's own."""
        if defaults is not None:
            self._defaults = {k.lower(): v for k, v in defaults.items()}
        self._global = {**self._defaults,
                        **{k.lower(): v for k, v in global_values.items()}}
        self._per_user = {user: {k.lower(): v for k, v in table.items()}
                          for user, table in per_user.items()}
        self.generation += 1

    def get(self, path: str, username: str = "",
            connection: ConnectionValues | None = None) -> PropertyValue | None:
        key = path.lower()
        if key.startswith(CONNECTION_PREFIX):
            if connection is None:
                return None
            value = getattr(connection, key[len(CONNECTION_PREFIX):], None)
            return value if isinstance(value, int) else None
        user_table = self._per_user.get(username) if username else None
        if user_table is not None and key in user_table:
            return user_table[key]
        return self._global.get(key)

    def get_bool(self, path: str, username: str = "",
                 connection: ConnectionValues | None = None) -> bool | None:
        value = self.get(path, username, connection)
        return value if isinstance(value, bool) else None

    def get_number(self, path: str, username: str = "",
                   connection: ConnectionValues | None = None) -> int | None:
        value = self.get(path, username, connection)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value

    def get_string(self, path: str, username: str = "",
                   connection: ConnectionValues | None = None) -> str | None:
        value = self.get(path, username, connection)
        return value if isinstance(value, str) else None

    def bool_or(self, path: str, username: str, default: bool) -> bool:
        value = self.get_bool(path, username)
        return default if value is None else value

    def number_or(self, path: str, username: str, default: int) -> int:
        value = self.get_number(path, username)
        return default if value is None else value

    def string_or(self, path: str, username: str, default: str) -> str:
        value = self.get_string(path, username)
        return default if value is None else value

    def split_list(self, path: str, username: str = "") -> list[str]:
        """A ``;``-separated list property (ogon's whiteList/blackList form),
        trimmed, empty entries dropped."""
        text = self.get_string(path, username) or ""
        return [item.strip() for item in text.split(";") if item.strip()]


def as_uint32(value: int) -> int:
    """A property number in PropertyNumberResponse.value (uint32): ogon
    stores a ``long`` there, which keeps the low 32 bits (-1 -> 0xFFFFFFFF)."""
    return value & 0xFFFFFFFF


def as_int32(value: int) -> int:
    """A property number in PropertyValue.intValue (int32), truncated to
    32 bits as ogon's ``long`` to ``int32`` assignment does."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class ChannelPolicy:
    """Which virtual channels a session may open.

    ogon's rule (Session::isVirtualChannelAllowed): the
    ``virtualChannel.whiteList`` property, ``;``-separated, ``*`` for all,
    names compared case-insensitively; an empty list allows nothing. The
    bridge's own ``channels_deny`` list is checked first, and a non-empty
    ``channels_allow`` list narrows further.
    """

    def __init__(self, properties: PropertyTable, allow: list[str], deny: list[str]) -> None:
        self.properties = properties
        self.reconfigure(allow, deny)

    def reconfigure(self, allow: list[str], deny: list[str]) -> None:
        """New lists (a reload); the parsed whiteLists are read again too."""
        self._allow = {name.lower() for name in allow}
        self._deny = {name.lower() for name in deny}
        # The parsed whiteList per user (keys: session users): every channel
        # open asks; parsed again after the properties were replaced.
        self._white: dict[str, frozenset[str]] = {}
        self._generation = self.properties.generation

    def allowed(self, name: str, username: str = "") -> bool:
        key = name.lower()
        if key in self._deny or (self._allow and key not in self._allow):
            return False
        if self._generation != self.properties.generation:
            self._white.clear()
            self._generation = self.properties.generation
        white = self._white.get(username)
        if white is None:
            white = self._white[username] = frozenset(
                item.lower() for item in self.properties.split_list(
                    "virtualChannel.whiteList", username))
        return "*" in white or key in white

"""Permission flags a token carries (WIRE.md section 3) and the rule for
using them."""

from __future__ import annotations

import enum


class Permission(enum.IntFlag):
    QUERY_INFORMATION = 0x001
    SET_INFORMATION = 0x002
    REMOTE_CONTROL = 0x004
    LOGON = 0x008
    LOGOFF = 0x010
    MESSAGE = 0x020
    CONNECT = 0x040
    DISCONNECT = 0x080
    VIRTUAL_CHANNEL = 0x100


FULL = 0x1FF
USER = Permission.CONNECT | Permission.QUERY_INFORMATION | Permission.LOGON  # 0x049
GUEST = Permission.LOGON  # 0x008

#: Level names as operators write them (users file, CLI, config).
LEVELS: dict[str, int] = {"full": FULL, "user": int(USER), "guest": int(GUEST)}


def level_value(name: str) -> int:
    """The flags of a level name (case-insensitive); ValueError if unknown."""
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown permission level {name!r} (full, user or guest)") from None


def ogon_level(value: str | None) -> int:
    """The flags ogon gives the ``permission.level`` property's value
    (Session::initPermissions, OTSApiHandler::logonConnection): FULL or USER
    in any case; anything else, and no value, is GUEST."""
    level = (value or "").lower()
    return LEVELS[level] if level in ("full", "user") else int(GUEST)


def level_name(flags: int) -> str:
    for name, value in LEVELS.items():
        if value == flags:
            return name
    return f"0x{flags:03x}"

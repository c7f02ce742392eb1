"""What ``ctl`` prints: OTS API values decoded for people and for ``--json``.

WTSAPI speaks in numbers and Windows times; an operator reads names and
dates: connect states by name ("Active"), message box answers by name
("IDOK"), FILETIMEs as ISO-8601 local times with their offset, durations
as "2 h 5 min". The same decoded values go to ``--json`` (times as ISO
strings, null where there is none), so that a script sees what a person
sees.
"""

from __future__ import annotations

import datetime
from typing import Any

from bridge.sessions.model import state_name

#: 1601-01-01 to 1970-01-01 in 100 ns ticks (Windows FILETIME).
_FILETIME_UNIX_EPOCH = 116444736000000000

#: WTS_INFO_CLASS by the name WTSAPI gives it (without the WTS prefix),
#: the ones the OTS API carries (WIRE.md section 3).
INFO_CLASSES = {
    "SessionId": 4, "UserName": 5, "WinStationName": 6, "DomainName": 7, "ConnectState": 8,
    "ClientBuildNumber": 9, "ClientName": 10, "ClientProductId": 12, "ClientHardwareId": 13,
    "ClientAddress": 14, "ClientDisplay": 15, "ClientProtocolType": 16, "IdleTime": 17,
    "LogonTime": 18, "SessionInfo": 24,
}
INFO_NAMES = {number: name for name, number in INFO_CLASSES.items()}

#: What WTSSendMessage answers (winuser.h IDOK..IDCONTINUE, wtsapi.h
#: IDTIMEOUT/IDASYNC); 0 is the OTS API's failure value.
MESSAGE_RESULTS = {
    1: "IDOK", 2: "IDCANCEL", 3: "IDABORT", 4: "IDRETRY", 5: "IDIGNORE", 6: "IDYES", 7: "IDNO",
    8: "IDCLOSE", 9: "IDHELP", 10: "IDTRYAGAIN", 11: "IDCONTINUE", 32000: "IDTIMEOUT",
    32001: "IDASYNC",
}

#: Message box buttons (winuser.h MB_OK..MB_CANCELTRYCONTINUE), by the
#: name ``ctl message --style`` takes.
MESSAGE_STYLES = {
    "ok": 0, "okcancel": 1, "abortretryignore": 2, "yesnocancel": 3, "yesno": 4,
    "retrycancel": 5, "canceltrycontinue": 6,
}

#: WTSClientProtocolType.
PROTOCOL_TYPES = {0: "console", 1: "legacy", 2: "RDP"}

#: TWTSINFO's time fields (FILETIME).
_WTSINFO_TIMES = ("ConnectTime", "DisconnectTime", "LastInputTime", "LogonTime", "CurrentTime")


def message_result(value: int) -> str:
    """A sendMessage answer by name ("IDOK"); 0 is a failure; others as numbers."""
    if value == 0:
        return "failed"
    return MESSAGE_RESULTS.get(value, str(value))


def message_style(text: str) -> int:
    """``--style``: a name (yesno) or a number (4, 0x24)."""
    name = text.lower().removeprefix("mb_")
    if name in MESSAGE_STYLES:
        return MESSAGE_STYLES[name]
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"not a message style: {text} (a number, or one of "
                         f"{', '.join(MESSAGE_STYLES)})") from None


def unix_time(filetime: int | None) -> float | None:
    """A FILETIME as unix seconds; None for 0 (never / not known)."""
    if not filetime:
        return None
    return (filetime - _FILETIME_UNIX_EPOCH) / 10_000_000


def iso(unix_seconds: float | None) -> str | None:
    """ISO-8601 in local time with its offset, to the second
    (2026-12-02T01:02:03+01:00); None for None."""
    if unix_seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(unix_seconds).astimezone()
    return moment.isoformat(timespec="seconds")


def duration(seconds: float | None) -> str | None:
    """A span as people say it: "45 s", "5 min", "2 h 5 min", "3 d 4 h"."""
    if seconds is None:
        return None
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"


def _value_field(value: Any) -> Any:
    """The one set field of a TSessionInfoValue union."""
    for field in ("WTSINFO", "displayValue", "stringValue", "int64Value", "int32Value",
                  "int16Value", "boolValue"):
        found = getattr(value, field, None)
        if found is not None:
            return found
    return None


def wtsinfo(info: Any) -> dict[str, Any]:
    """TWTSINFO (WTSSessionInfo) with its state by name and its times in ISO."""
    decoded: dict[str, Any] = {}
    # In the IDL's field order (thrift_spec: None, then (id, type, name, ...)).
    for name in (spec[2] for spec in type(info).thrift_spec if spec):
        value = getattr(info, name)
        if name in _WTSINFO_TIMES:
            decoded[name] = iso(unix_time(value))
        elif name == "State":
            decoded[name] = state_name(value)
        else:
            decoded[name] = value
    return decoded


def info_value(info_class: int, value: Any) -> Any:
    """A querySessionInformation answer decoded: names for states and
    protocol types, ISO times, the display as width/height/depth."""
    raw = _value_field(value)
    if info_class == INFO_CLASSES["SessionInfo"] and raw is not None:
        return wtsinfo(raw)
    if info_class == INFO_CLASSES["ClientDisplay"] and raw is not None:
        return {"width": raw.displayWidth, "height": raw.displayHeight,
                "color_depth": raw.colorDepth}
    if info_class == INFO_CLASSES["ConnectState"]:
        return state_name(raw)
    if info_class == INFO_CLASSES["LogonTime"]:
        return iso(unix_time(raw))
    if info_class == INFO_CLASSES["ClientProtocolType"]:
        return PROTOCOL_TYPES.get(raw, raw)
    return raw


def text(value: Any) -> str:
    """A decoded value on one line ("-" for nothing); a display as WxH@bpp."""
    if value is None or value == "":
        return "-"
    if isinstance(value, dict) and set(value) == {"width", "height", "color_depth"}:
        return f"{value['width']}x{value['height']}, {value['color_depth']} bpp"
    return str(value)

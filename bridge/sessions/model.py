"""What a session is: its state, its client, the backend it runs, and a
change to it as the journal records it. The vocabulary every room shares;
it imports nothing of the bridge."""

from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, TypeVar

_T = TypeVar("_T")


class ConnectState(enum.IntEnum):
    """WTS_CONNECTSTATE_CLASS (WIRE.md section 3)."""

    ACTIVE = 0
    CONNECTED = 1
    CONNECT_QUERY = 2
    SHADOW = 3
    DISCONNECTED = 4
    IDLE = 5
    LISTEN = 6
    RESET = 7
    DOWN = 8
    INIT = 9


def state_name(state: int | None) -> str | None:
    """A connect state as WTSAPI names it ("Active", "ConnectQuery"); an
    unknown number as itself."""
    if state is None:
        return None
    try:
        return ConnectState(state).name.title().replace("_", "")
    except ValueError:
        return str(state)


@dataclass
class ClientInfo:
    """What the RDP server told us about the client in LogonUser. ``width``
    and ``height`` are the size in use (clamped to the session's maximum);
    ``initial_*`` what the client asked for."""

    host_name: str = ""
    address: str = ""
    build_number: int = 0
    product_id: int = 0
    hardware_id: int = 0
    protocol_type: int = 0
    width: int = 0
    height: int = 0
    color_depth: int = 0
    initial_width: int = 0
    initial_height: int = 0


_IMMUTABLE = (str, int, float, bool, bytes, type(None), enum.Enum)


def snapshot(value: _T) -> _T:
    """What ``copy.deepcopy(value)`` gives for a session or any part of one
    (dataclass instances holding scalars, enums, lists, dicts and more of
    them), at about a fifth of its cost: the registry copies a session
    twice per change. Anything else is left to deepcopy."""
    if isinstance(value, _IMMUTABLE):
        return value
    kind = type(value)
    if kind is list:
        return [snapshot(item) for item in value]  # type: ignore[attr-defined,return-value]
    if kind is dict:
        return {key: snapshot(item) for key, item in value.items()}  # type: ignore[attr-defined,return-value]
    if dataclasses.is_dataclass(kind):
        copied = object.__new__(kind)
        copied.__dict__.update({name: snapshot(item) for name, item in value.__dict__.items()})
        return copied
    return copy.deepcopy(value)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def plain(value: Any) -> Any:
    """``dataclasses.asdict(value)`` without the deep copies it makes of
    every leaf (for JSON, which copies anyway)."""
    kind = type(value)
    if kind is list:
        return [plain(item) for item in value]
    if kind is dict:
        return {key: plain(item) for key, item in value.items()}
    names = _FIELD_NAMES.get(kind)
    if names is None:
        if not dataclasses.is_dataclass(kind):
            return value
        names = _FIELD_NAMES[kind] = tuple(f.name for f in dataclasses.fields(kind))
    return {name: plain(getattr(value, name)) for name in names}


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot),
    None if there is no such process, or only its zombie is left."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = data[data.rfind(b")") + 2:].split()
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass
class ProcessRecord:
    """One more process of a backend (ogon's X11 module: the window
    manager beside the X server), as the state store keeps it."""

    role: str
    pid: int
    start_ticks: int
    log_path: str = ""


@dataclass
class BackendRecord:
    """The backend process a session runs, as the state store keeps it so
    that a restarted bridge can find it again. ``start_ticks`` is the
    process start time from /proc (tells a live backend from a reused pid).

    For ogon's module kinds: ``kind`` (X11, Qt, Weston; "" for a command
    module), whether ogon-backend-launcher runs it (``pid`` is then the
    launcher's), the WinStationName (``station``, ogon's
    ``<kind>:<custom info>``), its other processes, and what its stop needs
    (``details``: the display, the stopwm command, ...). ``uid``: the real
    uid it was spawned as (-1: not known, a record of an older version or
    of a process another program spawned); no process of another uid is
    ever signalled as this one."""

    module: str
    pid: int
    start_ticks: int
    endpoint: str
    log_path: str = ""
    kind: str = ""
    launcher: bool = False
    station: str = ""
    processes: list[ProcessRecord] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    uid: int = -1

    @classmethod
    def from_dict(cls, data: dict) -> BackendRecord:
        """The record ``dataclasses.asdict`` gave (TypeError if it is not
        one: unknown or missing fields, a process that is no mapping)."""
        data = dict(data)
        processes = data.get("processes", [])
        if not isinstance(processes, list) or not all(isinstance(p, dict) for p in processes):
            raise TypeError("processes is not a list of mappings")
        data["processes"] = [ProcessRecord(**p) for p in processes]
        return cls(**data)


@dataclass
class Session:
    """One session. ``connection_id`` is the RDP server's id for the client
    connection currently attached, None while disconnected."""

    session_id: int
    username: str
    domain: str
    state: ConnectState
    connection_id: int | None = None
    client: ClientInfo = field(default_factory=ClientInfo)
    connect_time: float | None = None
    logon_time: float | None = None
    disconnect_time: float | None = None
    # Flags of the level the user logged on with (0 for a greeter).
    permission: int = 0
    # session_id of the session this one shadows (remote-controls), if any.
    shadowing: int | None = None
    backend_cookie: str = ""
    ogon_cookie: str = ""
    backend: BackendRecord | None = None
    # The SBP major version the greeter announced (None: it did not say).
    sbp_major: int | None = None
    # When it entered its current state (older state files lack it: None).
    state_since: float | None = None

    @property
    def logged_on(self) -> bool:
        """A user is authenticated in it (not just a greeter)."""
        return self.logon_time is not None

    @property
    def win_station_name(self) -> str:
        """ogon's WinStationName: ``<module kind>:<custom info>`` of the
        module it runs (``X11:<display>``, ``Qt:<pid>``, ``Weston:<pid>``;
        a command module ``<module name>:<pid>``), "" before one started.
        It stays while the session is disconnected, as ogon's does."""
        return self.backend.station if self.backend is not None else ""


class SessionEvent(enum.Enum):
    CREATED = "created"  # a greeter or new desktop session began
    LOGGED_ON = "logged-on"  # a user authenticated into the session
    SWITCHED = "switched"  # the greeter's connection moved to the user's desktop
    RECONNECTED = "reconnected"
    DISCONNECTED = "disconnected"
    SHADOW_STARTED = "shadow-started"
    SHADOW_STOPPED = "shadow-stopped"
    BACKEND_STARTED = "backend-started"
    BACKEND_EXITED = "backend-exited"
    CHANGED = "changed"  # anything else worth keeping (client info, SBP version)
    ENDED = "ended"  # logged off; the session is gone


@dataclass
class SessionChange:
    """One change to one session: what a journal row records. ``session`` is
    a snapshot taken right after the change; ``event_id`` is filled in by the
    persister (the journal's id)."""

    event: SessionEvent
    session: Session
    old_state: ConnectState | None
    new_state: ConnectState | None
    reason: str
    time: float
    next_session_id: int
    event_id: int | None = None


class StateWriteError(Exception):
    """A change could not be stored; the text says why, for the log."""

"""A session as a row of the state database (JSON), and reading a row that
does not parse: what can still be read is kept, so that a damaged row never
orphans a running desktop.

A row is read strictly first. When that fails, each field is read on its
own: a row whose user, logon time, cookies and backend (pid and start time)
are sound is restored, its other fields at their defaults. Otherwise the
row's session cannot be given back to anyone; if its backend's pid and
start time can still be found (even in text that is no JSON any more), the
caller stops that backend -- only if the pid is still the same process.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from bridge.sessions.model import BackendRecord, ClientInfo, ConnectState, Session, plain


def session_to_json(session: Session) -> str:
    data = plain(session)
    data["state"] = int(session.state)
    return json.dumps(data, sort_keys=True)


def session_from_json(text: str) -> Session:
    """Strict: ValueError, TypeError or KeyError on anything wrong."""
    data = json.loads(text)
    data["state"] = ConnectState(data["state"])
    data["client"] = ClientInfo(**data["client"])
    if data.get("backend") is not None:
        data["backend"] = BackendRecord.from_dict(data["backend"])
    return Session(**data)


@dataclass
class RowReading:
    """What one row gave: a ``session`` to restore, or a ``stray`` (a session
    that cannot be restored: the caller ends it and stops its backend, if
    any); ``note`` says what was wrong ("" for a sound row)."""

    session: Session | None = None
    stray: Session | None = None
    note: str = ""


#: Fields without which a restored session would be wrong (it could not be
#: given back to its user, or its backend would not know the RDP server).
_ESSENTIAL = ("username", "logon_time", "backend", "backend_cookie", "ogon_cookie")
_TYPES: dict[str, tuple[type, ...]] = {
    "username": (str,), "domain": (str,), "connection_id": (int, type(None)),
    "connect_time": (int, float, type(None)), "logon_time": (int, float),
    "disconnect_time": (int, float, type(None)), "permission": (int,),
    "shadowing": (int, type(None)), "backend_cookie": (str,), "ogon_cookie": (str,),
    "sbp_major": (int, type(None)), "state_since": (int, float, type(None)),
}


def _backend(value: Any) -> BackendRecord | None:
    if not isinstance(value, dict):
        return None
    try:
        record = BackendRecord.from_dict(value)
    except TypeError:
        return None
    ints = all(isinstance(getattr(record, name), int) and not isinstance(
        getattr(record, name), bool) for name in ("pid", "start_ticks"))
    strings = all(isinstance(getattr(record, name), str)
                  for name in ("module", "endpoint", "log_path"))
    return record if ints and strings and record.pid > 0 else None


def _backend_from_text(text: str) -> BackendRecord | None:
    """Pid and start time found in text that is no JSON any more."""
    pid = re.search(r'"pid"\s*:\s*(\d+)', text)
    ticks = re.search(r'"start_ticks"\s*:\s*(\d+)', text)
    if pid is None or ticks is None or int(pid.group(1)) <= 0:
        return None
    module = re.search(r'"module"\s*:\s*"([^"\\]{1,64})"', text)
    return BackendRecord(module.group(1) if module else "?", int(pid.group(1)),
                         int(ticks.group(1)), "")


def _field_ok(name: str, value: Any) -> bool:
    kinds = _TYPES[name]
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def read_row(session_id: int, text: str) -> RowReading:
    """A row of the sessions table, read as well as it can be."""
    try:
        session = session_from_json(text)
        if session.session_id != session_id:
            raise ValueError(f"it says session {session.session_id}")
        return RowReading(session=session)
    except (ValueError, TypeError, KeyError) as e:
        error = str(e)[:120] or type(e).__name__
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        backend = _backend_from_text(text)
        stray = Session(session_id, "", "", ConnectState.DISCONNECTED, backend=backend)
        return RowReading(stray=stray, note=f"not JSON ({error})")
    values: dict[str, Any] = {}
    bad = []
    for name in _TYPES:
        if name in data and _field_ok(name, data[name]):
            values[name] = data[name]
        else:
            bad.append(name)
    backend = _backend(data.get("backend"))
    if backend is None:
        bad.append("backend")
    try:
        client = ClientInfo(**data["client"])
        if not all(isinstance(v, str if f.type == "str" else int) for f, v in zip(
                dataclasses.fields(ClientInfo), dataclasses.astuple(client), strict=True)):
            raise TypeError("client fields of the wrong type")
        values["client"] = client
    except (KeyError, TypeError):
        bad.append("client")
    missing = [name for name in _ESSENTIAL if name in bad]
    note = f"{error}; unreadable: {', '.join(bad)}" if bad else error
    if missing or not values.get("username"):
        stray = Session(session_id, values.get("username", ""), "",
                        ConnectState.DISCONNECTED, backend=backend)
        return RowReading(stray=stray, note=note)
    # The state is DISCONNECTED after any restart; the rest has defaults.
    values.setdefault("domain", "")
    session = Session(session_id=session_id, state=ConnectState.DISCONNECTED, backend=backend,
                      **values)
    return RowReading(session=session, note=f"{note} (defaults used)")

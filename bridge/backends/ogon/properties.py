"""The properties ogon's modules read, looked up as ogon's module callbacks
look them up: by the module's session id (a user's own value, then the
global one; ``current.connection.*`` from the session's client), under
``<baseConfigPath>.<name>`` with ``baseConfigPath = module.<config name>``
(session-manager/module/common/module_helper.cpp), and a value is only
found under its own type.

Also which kind a config name selects (Session::startModule): the kind by
``module.<cfg>.modulename`` (per user), whether ogon-backend-launcher runs
it by ``module.<cfg>.uselauncher`` (global only; true when missing), and
the launcher's ``launcherexecutable`` and ``launcherdebugfile``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bridge.backends.modules import BackendError

PropertyValue = bool | int | str
#: (session id, path) -> the value as ogon's property manager answers it for
#: that session, None when not found. Built by the lifecycle, which knows
#: sessions, users and clients.
PropertyLookup = Callable[[int, str], PropertyValue | None]

#: The module kinds ogon ships (the Name each module library exports).
KINDS = ("X11", "Qt", "Weston")
#: Each kind's library in ogon's module directory.
LIBRARIES = {"X11": "libogon-mod-x11.so", "Qt": "libogon-mod-qt.so",
             "Weston": "libogon-mod-weston.so"}
#: ogon's REMOTE_LAUNCHER_PROCESS: the launcher when the property is missing.
LAUNCHER = "ogon-backend-launcher"
#: The buffers ogon's modules read strings into (value + NUL must fit).
STRING_LIMIT = 4096
COMMAND_LIMIT = 256


class ModuleProperties:
    """One module's view of the properties: ``module.<cfg>.<name>`` for
    its session, and the session-wide ones its helpers read."""

    def __init__(self, lookup: PropertyLookup, session_id: int, config_name: str) -> None:
        self.lookup = lookup
        self.session_id = session_id
        self.config_name = config_name
        self.base = f"module.{config_name}"

    def _get(self, path: str) -> PropertyValue | None:
        return self.lookup(self.session_id, path)

    def string(self, name: str, limit: int = STRING_LIMIT) -> str | None:
        """getPropertyStringWrapper: None when missing, not a string, or
        too long for the module's buffer."""
        value = self._get(f"{self.base}.{name}")
        if not isinstance(value, str) or len(value.encode()) + 1 > limit:
            return None
        return value

    def number(self, name: str) -> int | None:
        return self.number_at(f"{self.base}.{name}")

    def boolean(self, name: str) -> bool | None:
        value = self._get(f"{self.base}.{name}")
        return value if isinstance(value, bool) else None

    def number_at(self, path: str) -> int | None:
        value = self._get(path)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value

    def resolution(self) -> tuple[int, int, int]:
        """ogon's initResolutions: the size the client asked for, capped by
        session.maxXRes/maxYRes; when either is 0, both come from
        session.xres/yres (1024x768); the colour depth of the connection,
        else session.colordepth (24)."""
        def number(path: str) -> int:
            value = self.number_at(path)
            return 0 if value is None else value

        initial_x, max_x = number("current.connection.initialxres"), number("session.maxxres")
        initial_y, max_y = number("current.connection.initialyres"), number("session.maxyres")
        xres = max_x if initial_x > max_x else initial_x
        yres = max_y if initial_y > max_y else initial_y
        depth = number("current.connection.colordepth")
        if xres == 0 or yres == 0:
            configured_x, configured_y = self.number_at("session.xres"), self.number_at(
                "session.yres")
            xres = 1024 if configured_x is None else configured_x
            yres = 768 if configured_y is None else configured_y
        if depth == 0:
            colordepth = self.number_at("session.colordepth")
            depth = 24 if colordepth is None else colordepth
        return xres, yres, depth


@dataclass(frozen=True)
class KindChoice:
    """What a config name selects: ogon's module kind, whether
    ogon-backend-launcher runs it and, if so, how it is started."""

    config_name: str
    kind: str
    use_launcher: bool
    launcher_command: str = ""


def selects_kind(lookup: PropertyLookup, session_id: int, config_name: str) -> bool:
    """Whether ``module.<cfg>.modulename`` names a kind for this session."""
    return isinstance(lookup(session_id, f"module.{config_name}.modulename"), str)


def choose_kind(lookup: PropertyLookup, global_lookup: Callable[[str], PropertyValue | None],
                session_id: int, config_name: str) -> KindChoice:
    """Session::startModule's choice for ``config_name``. Raises BackendError
    (ogon's "Property %s not found", "no module found for name %s")."""
    base = f"module.{config_name}"
    kind = lookup(session_id, f"{base}.modulename")
    if not isinstance(kind, str):
        raise BackendError(f"property {base}.modulename not found")
    if kind not in KINDS:
        raise BackendError(f"no module found for name {kind!r} ({base}.modulename; ogon's "
                           f"kinds are {', '.join(KINDS)})")
    # Looked up globally (session id 0 in ogon): a user's own value has no effect.
    use = global_lookup(f"{base}.uselauncher")
    use_launcher = use if isinstance(use, bool) else True
    if not use_launcher:
        return KindChoice(config_name, kind, False)
    executable = lookup(session_id, f"{base}.launcherexecutable")
    if not isinstance(executable, str):
        executable = LAUNCHER  # ogon's built-in default is a bool: never a string
    debug_file = lookup(session_id, f"{base}.launcherdebugfile")
    # RemoteModule::startLauncher: the debug file in single quotes, which
    # WinPR's splitting keeps (the launcher strips them).
    command = f"{executable} {session_id}" + (
        f" '{debug_file}'" if isinstance(debug_file, str) else "")
    return KindChoice(config_name, kind, True, command)

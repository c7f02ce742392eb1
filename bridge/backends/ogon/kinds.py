"""ogon's module kinds for a session: the kind a config name selects
(``module.<cfg>.modulename``: X11, Qt, Weston) started as ogon starts it,
by the bridge itself or through ogon-backend-launcher
(``module.<cfg>.uselauncher``), and adopted again after a restart.

Qt (session-manager/module/Qt/qt_module.cpp): ``<cmd> -platform ogon``
with ``OGON_PIPE_PATH`` set, as the session's user (a greeter has none: as
the bridge's user), in the bridge's working directory; ready when
``ogon_<session>_Qt`` appears (5 s). Weston (weston_module.cpp): ``<cmd>
--backend=ogon-backend.so --session-id=<id> --width=<w> --height=<h>`` as
the user, in their home, on ``ogon_<session>_Weston``. Both are stopped
with SIGTERM, SIGKILL after 2 s. X11: ``bridge.backends.ogon.x11``.
"""

from __future__ import annotations

import os
import platform
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from bridge.backends.endpoint import start_mark
from bridge.backends.environment import (
    OGON_BIN_DIRS,
    Account,
    account_of,
    environment_block,
    own_account,
    session_environment,
)
from bridge.backends.launcher import BackendLauncher
from bridge.backends.modules import BackendError, LaunchContext, Module, SessionBackend
from bridge.backends.ogon.commandline import command_line_to_argv
from bridge.backends.ogon.keeper_client import LauncherKeeper
from bridge.backends.ogon.properties import (
    COMMAND_LIMIT,
    LIBRARIES,
    KindChoice,
    ModuleProperties,
    PropertyLookup,
    PropertyValue,
    choose_kind,
    selects_kind,
)
from bridge.backends.ogon.x11 import X11Backend
from bridge.backends.processes import find
from bridge.sessions.model import BackendRecord

#: qt_module.cpp and weston_module.cpp wait 5 s for the pipe, stop with 2 s.
READY_TIMEOUT = 5.0
STOP_TIMEOUT = 2.1


def multiarch() -> str:
    """Debian's multiarch triplet (x86_64-linux-gnu), where ogon's package
    puts its libraries."""
    return str(sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu")


def packaged_module_dir() -> str:
    """OGON_MODULE_LIB_PATH of ogon's Debian package."""
    return f"/usr/lib/{multiarch()}/ogon1/modules"


@dataclass(frozen=True)
class OgonSettings:
    """Where ogon is installed, as the configuration says: the directories
    put in front of PATH for ogon's programs (``ogon_bin_dirs``), the
    module libraries' directory (``ogon_module_dir``; "" finds it next to
    the launcher, else ogon's packaged one), the keeper's socket."""

    keeper_socket: Path
    bin_dirs: tuple[str, ...] = OGON_BIN_DIRS
    module_dir: str = ""


def _braces(text: str) -> str:
    """Text taken literally by a command module's placeholder formatting."""
    return text.replace("{", "{{").replace("}", "}}")


class OgonModules:
    """Starts and adopts ogon's module kinds for sessions."""

    def __init__(self, reactor: Any, launcher: BackendLauncher, settings: OgonSettings) -> None:
        self.reactor = reactor
        self.launcher = launcher
        self.settings = settings
        self.keeper = LauncherKeeper(reactor, launcher, settings.keeper_socket)

    @property
    def search_path(self) -> str | None:
        """The session manager's PATH, where ogon looks its programs up."""
        return self.launcher.manager_env.get("PATH")

    @staticmethod
    def selects(lookup: PropertyLookup, session_id: int, config_name: str) -> bool:
        """Whether ``module.<cfg>.modulename`` is set for this session."""
        return selects_kind(lookup, session_id, config_name)

    @staticmethod
    def choose(lookup: PropertyLookup, global_lookup: Callable[[str], PropertyValue | None],
               session_id: int, config_name: str) -> KindChoice:
        return choose_kind(lookup, global_lookup, session_id, config_name)

    def module_file(self, kind: str, launcher_executable: str) -> str:
        """The kind's module library the launcher loads (ModuleStart's
        moduleFileName): in ``ogon_module_dir`` when configured; else the
        first directory that has it of ogon's OGON_ADDITIONAL_MODULES, the
        launcher's own installation (``<prefix>/sbin/..`` + lib/<multiarch>,
        lib, lib64 ``/ogon1/modules``) and ogon's packaged directory."""
        library = LIBRARIES[kind]
        if self.settings.module_dir:
            return os.path.join(self.settings.module_dir, library)
        candidates = [d for d in os.environ.get("OGON_ADDITIONAL_MODULES", "").split(":") if d]
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(launcher_executable)))
        candidates += [os.path.join(prefix, part, "ogon1", "modules")
                       for part in (f"lib/{multiarch()}", "lib", "lib64")]
        candidates.append(packaged_module_dir())
        for directory in candidates:
            path = os.path.join(directory, library)
            if os.path.isfile(path):
                return path
        raise BackendError(f"ogon's module library {library} is not in any of "
                           f"{', '.join(candidates)} (set ogon_module_dir)")

    # -- starting ----------------------------------------------------------------------

    async def start(self, choice: KindChoice, context: LaunchContext,
                    lookup: PropertyLookup) -> SessionBackend:
        """Start the chosen kind for the session. Raises BackendError."""
        properties = ModuleProperties(lookup, context.session_id, choice.config_name)
        user = account_of(context.username) if context.username else None
        if context.username and user is None:
            raise BackendError(f"no system account {context.username[:64]!r} for "
                               f"{choice.kind} (getpwnam failed)")
        if choice.use_launcher:
            return await self._through_launcher(choice, context, lookup, user)
        if choice.kind == "X11":
            if user is None:
                raise BackendError("X11 needs a user (getpwnam failed): it cannot be a greeter")
            env = session_environment(context, self.launcher.manager_env, user)
            x11 = X11Backend(self.launcher, context.session_id, choice.config_name, user, env,
                             None, self.search_path)
            return await self.launcher.counted(choice.config_name,
                                               Deferred.fromCoroutine(x11.start(properties)))
        module = self.local_module(choice, context, properties, user)
        return await self.launcher.start(module, context)

    def local_module(self, choice: KindChoice, context: LaunchContext,
                     properties: ModuleProperties, user: Account | None) -> Module:
        """ogon's Qt or Weston module, as a module the launcher runs."""
        sid = context.session_id
        command = properties.string("cmd", COMMAND_LIMIT)
        if command is None:
            raise BackendError(f"could not query module.{choice.config_name}.cmd")
        if choice.kind == "Qt":
            argv = command_line_to_argv(f"{command} -platform ogon")
            endpoint = f"ogon_{sid}_Qt"
            # The endpoint's own name, or the one it gets when that is taken.
            environment = {"OGON_PIPE_PATH": "{pipe_dir}/{endpoint}"}
            cwd: str | None = ""
        else:
            if user is None:
                raise BackendError("Weston needs a user (getpwnam failed): it cannot be a "
                                   "greeter")
            xres, yres, _ = properties.resolution()
            argv = command_line_to_argv(f"{command} --backend=ogon-backend.so "
                                        f"--session-id={sid} --width={xres} --height={yres}")
            endpoint = f"ogon_{sid}_Weston"
            environment = {}
            cwd = user.home
        if not argv:
            raise BackendError(f"module.{choice.config_name}.cmd is empty")
        return Module(choice.config_name, tuple(_braces(part) for part in argv), endpoint,
                      user="session", ready_timeout=READY_TIMEOUT, stop_timeout=STOP_TIMEOUT,
                      environment=environment, kind=choice.kind, cwd=cwd,
                      search_path=self.search_path)

    async def _through_launcher(self, choice: KindChoice, context: LaunchContext,
                                lookup: PropertyLookup, user: Account | None) -> SessionBackend:
        argv = command_line_to_argv(choice.launcher_command)
        executable = find(argv[0], self.search_path)
        if executable is None:
            raise BackendError(f"{argv[0]!r} not found in PATH ({self.search_path})")
        # ogon's module protocol (its generated code): loaded by the first
        # module run through the launcher, not by every start of the bridge.
        from bridge.backends.ogon.remote import LauncherBackend
        from protocols.generated import Module_pb2

        env = session_environment(context, self.launcher.manager_env, user)
        request = Module_pb2.ModuleStartRequest(
            sessionId=context.session_id, userName=context.username,
            userDomain=context.domain if context.username else "",
            baseConfigPath=f"module.{choice.config_name}", envBlock=environment_block(env),
            moduleFileName=self.module_file(choice.kind, executable),
            remoteIp=context.client_address)
        # The module's processes run as the user; a greeter's as the launcher (root).
        switch = self.launcher.as_root and user is not None
        claim_uid = user.uid if switch and user is not None else own_account().uid
        backend = LauncherBackend(self.launcher, self.keeper, context.session_id,
                                  choice.config_name, choice.kind, lookup)
        return await self.launcher.counted(choice.config_name, Deferred.fromCoroutine(backend.start(
            executable, argv, dict(self.launcher.manager_env), request, claim_uid,
            start_mark())))

    # -- adopting ------------------------------------------------------------------------

    async def adopt(self, record: BackendRecord, context: LaunchContext,
                    lookup: PropertyLookup) -> SessionBackend | None:
        """Take a recorded ogon module back after a restart; None when it is gone."""
        if record.launcher:
            from bridge.backends.ogon.remote import LauncherBackend

            backend = LauncherBackend(self.launcher, self.keeper, context.session_id,
                                      record.module, record.kind, lookup)
            return backend if await backend.adopt(record) else None
        if record.kind == "X11":
            user = account_of(record.details.get("user", context.username))
            if user is None:
                return None
            env = session_environment(context, self.launcher.manager_env, user)
            x11 = X11Backend(self.launcher, context.session_id, record.module, user, env, None,
                             self.search_path)
            properties = ModuleProperties(lookup, context.session_id, record.module)
            return x11 if x11.adopt(record, properties) else None
        module = Module(record.module, (), record.endpoint, stop_timeout=STOP_TIMEOUT,
                        kind=record.kind)
        return self.launcher.adopt(context.session_id, module, record)

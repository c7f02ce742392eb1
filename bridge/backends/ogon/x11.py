"""ogon's X11 module run by the bridge itself (``module.<cfg>.uselauncher``
false), as session-manager/module/X11/x11_module.cpp does it.

Start: the xauth file (``xauthoritypath`` or the user's home), XAUTHORITY
in the environment; ``ogon-backend-x -displayfd <fd>:<displayOffset>
-geometry WxH -depth 24 -dpi N [-fp <fontPath>] -auth <file> [-nkc]`` as
the user, the display read back from the descriptor (up to 5 s);
``DISPLAY``; ready when ``ogon_<display>_X11`` appears (5 s); then
``startwm`` (default ``ogonXsession``) as the user. The X server and the
window manager both end the session when they exit. A connect runs
``startvc``. Stop: ``stopwm`` (up to 5 s), the window manager (SIGTERM,
SIGKILL after 10 s), the X server (2 s), startvc (5 s), then the sockets
a dead X server left. Every process goes through the launcher's one
spawn primitive; all are recorded, so a restarted bridge adopts them.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from bridge.backends.endpoint import EndpointClaim, start_mark
from bridge.backends.environment import Account, set_variable
from bridge.backends.launcher import Backend, BackendLauncher
from bridge.backends.modules import BackendError, Module, pipe_file
from bridge.backends.ogon.commandline import command_line_to_argv
from bridge.backends.ogon.properties import ModuleProperties
from bridge.backends.ogon.xauth import ensure_cookie
from bridge.backends.processes import Spawn, find, spawn_process
from bridge.sessions.model import BackendRecord, ProcessRecord

#: x11_module.cpp's timings (TerminateChildProcess rounds up by 100 ms).
STARTUP_TIMEOUT = 5.0
PIPE_TIMEOUT = 5.0
WM_STOP = 10.1
X_STOP = 2.1
VC_STOP = 5.1
STOPWM_WAIT = 5.0
#: The descriptor the X server writes its display to (-displayfd N:offset).
DISPLAY_FD = 3
X11_SOCKETS = "/tmp/.X11-unix/X"  # noqa: S108 - the X server's own, as ogon looks at it


class X11Backend:
    """ogon's X11 module for one session: its X server, window manager and
    startvc process, started or adopted by the bridge."""

    log = Logger()

    def __init__(self, launcher: BackendLauncher, session_id: int, config_name: str,
                 account: Account, env: dict[str, str], cwd: str | None,
                 search_path: str | None) -> None:
        self.launcher = launcher
        self.session_id = session_id
        self.config_name = config_name
        self.account = account
        self.env = env
        self.cwd = cwd
        self.search_path = search_path
        self.record = BackendRecord(config_name, 0, 0, "", kind="X11")
        self.running = True
        self.last_lines: deque[str] = deque(maxlen=5)
        self.x: Backend | None = None
        self.wm: Backend | None = None
        self.vc: Backend | None = None
        self.display: int | None = None
        self.stopwm: str | None = None
        self.properties: ModuleProperties | None = None
        # Told when the record changes after the start (a startvc process).
        self.record_changed: Callable[[], None] | None = None
        self._exit_waiters: list[Deferred[str]] = []
        self._stopping: Deferred[str] | None = None
        self.exit_reason: str | None = None

    # -- what the lifecycle uses ----------------------------------------------------

    @property
    def name(self) -> str:
        return self.config_name

    @property
    def pid(self) -> int:
        return self.record.pid

    def when_exited(self) -> Deferred[str]:
        if not self.running:
            assert self.exit_reason is not None
            return succeed(self.exit_reason)
        d: Deferred[str] = Deferred()
        self._exit_waiters.append(d)
        return d

    def stop(self) -> Deferred[str]:
        """ogon's stop: stopwm, the window manager, the X server, startvc."""
        d = self.when_exited()
        if self.running:
            self._begin_stop("stopped")
        return d

    def _begin_stop(self, why: str) -> Deferred[str]:
        """The stop sequence, once; later calls wait for the same one."""
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop(why))
        result: Deferred[str] = Deferred()
        self._stopping.addBoth(lambda outcome: (result.callback(why), outcome)[1])
        return result

    def connected(self) -> None:
        """A client came: run ``startvc`` (a previous one keeps running)."""
        if not self.running or self.properties is None:
            return
        command = self.properties.string("startvc")
        if command is None:
            return
        try:
            self.vc = self._spawn_command(command, "startvc", VC_STOP, self.env.get("HOME"))
        except BackendError as e:
            self.log.error("session {session_id}: startvc did not start: {error}",
                           session_id=self.session_id, error=str(e))
            return
        self.record.processes = [p for p in self.record.processes if p.role != "startvc"]
        self.record.processes.append(ProcessRecord("startvc", self.vc.pid,
                                                   self.vc.record.start_ticks,
                                                   self.vc.record.log_path))
        if self.record_changed is not None:
            self.record_changed()

    def disconnected(self) -> None:
        """ogon's X11 module does nothing when the client goes."""

    def detach(self) -> None:
        """The bridge stops; the processes keep running for the next start."""

    # -- starting -------------------------------------------------------------------

    def _module(self, role: str, stop_timeout: float) -> Module:
        """What names one of its processes (log lines, output file, metrics)."""
        return Module(f"{self.config_name}-{role}", (), "", stop_timeout=stop_timeout,
                      kind="X11")

    def _spawn_command(self, command: str, role: str, stop_timeout: float,
                       cwd: str | None, child_fds: dict[int, int | str] | None = None,
                       endpoint: str = "") -> Backend:
        """A command line as ogon's CreateProcessAsUserA runs it: split the
        WinPR way, looked up in the session manager's PATH, as the user,
        with the module's environment block."""
        argv = command_line_to_argv(command)
        if not argv:
            raise BackendError(f"{role}: empty command line")
        executable = find(argv[0], self.search_path)
        if executable is None:
            raise BackendError(f"{role}: {argv[0]!r} not found in PATH ({self.search_path})")
        backend = spawn_process(
            self.launcher,
            Spawn(self.session_id, self._module(role, stop_timeout), executable, argv,
                  dict(self.env), self.account, cwd, child_fds or {}),
            endpoint=endpoint)
        backend.when_exited().addCallback(self._process_exited, backend, role)
        return backend

    async def start(self, properties: ModuleProperties) -> X11Backend:
        """x11_rds_module_start. Raises BackendError (what was started is
        stopped again)."""
        self.properties = properties
        sid = self.session_id
        directory = properties.string("xauthoritypath")
        if directory is not None:
            xauthority, self.cwd = f"{directory}/.Xauthority.ogon.{sid}", None
        else:
            home = self.env.get("HOME") or self.account.home
            xauthority, self.cwd = f"{home}/.Xauthority.ogon", home
        set_variable(self.env, "XAUTHORITY", xauthority)
        try:
            ensure_cookie(Path(xauthority), self.account.uid, self.account.gid)
        except OSError as e:
            raise BackendError(f"X11: cannot write the xauth file {xauthority}: "
                               f"{e.strerror or e}") from None
        offset = properties.number("displayOffset")
        dpi = properties.number("dpi")
        font_path = properties.string("fontPath")
        no_kp_cursor = properties.boolean("noKPCursor")
        xres, yres, _ = properties.resolution()
        # %u of ogon's sprintf: the unsigned 32-bit values.
        offset = (10 if offset is None else offset) & 0xFFFFFFFF
        dpi = (96 if dpi is None else dpi) & 0xFFFFFFFF
        line = (f"ogon-backend-x -displayfd {DISPLAY_FD}:{offset} -geometry {xres}x{yres} "
                f"-depth 24 -dpi {dpi}")
        if font_path is not None:
            line += f" -fp {font_path}"
        line += f" -auth {xauthority}"
        if no_kp_cursor:
            line += " -nkc"
        mark = start_mark()
        self.x = self._spawn_command(line, "x", X_STOP, self.cwd, {DISPLAY_FD: "r"})
        self.record = BackendRecord(self.config_name, self.x.pid, self.x.record.start_ticks, "",
                                    self.x.record.log_path, kind="X11", uid=self.x.record.uid)
        try:
            self.display = await self._read_display(self.x)
        except BackendError:
            await self._begin_stop("did not start")
            raise
        endpoint = f"ogon_{self.display}_X11"
        set_variable(self.env, "DISPLAY", f":{self.display}")
        # The display is the X server's word: its pipe's name may be another
        # session's, which is never removed (take_back off).
        self.x.claim = EndpointClaim(pipe_file(self.launcher.pipe_dir, endpoint), self._uid(),
                                     mark, take_back=False)
        self.x.record.endpoint = endpoint
        try:
            await self.launcher.wait_ready(self.x, PIPE_TIMEOUT)
        except BackendError:
            await self._begin_stop("did not start")
            raise
        self.stopwm = properties.string("stopwm")
        startwm = properties.string("startwm") or "ogonXsession"
        try:
            self.wm = self._spawn_command(startwm, "wm", WM_STOP, self.cwd)
        except BackendError:
            await self._begin_stop("did not start")
            raise
        self.record = BackendRecord(
            self.config_name, self.x.pid, self.x.record.start_ticks, endpoint,
            self.x.record.log_path, kind="X11", station=f"X11:{self.display}",
            processes=[ProcessRecord("window-manager", self.wm.pid, self.wm.record.start_ticks,
                                     self.wm.record.log_path)],
            details=self._details(), uid=self.x.record.uid)
        return self

    def _uid(self) -> int:
        switch = self.launcher.as_root and self.account.uid != os.geteuid()
        return self.account.uid if switch else os.geteuid()

    def _details(self) -> dict[str, str]:
        details = {"display": str(self.display), "user": self.account.name,
                   "cwd": self.cwd or "", "xauthority": self.env.get("XAUTHORITY", "")}
        if self.stopwm is not None:
            details["stopwm"] = self.stopwm
        return details

    def _read_display(self, x: Backend) -> Deferred[int]:
        """The display number the X server writes to its -displayfd, up to
        a newline (x11_module.cpp reads until the last byte is one)."""
        d: Deferred[int] = Deferred()
        data = bytearray()

        def fail(why: str) -> None:
            if not d.called:
                if timer.active():
                    timer.cancel()
                x.on_child_data = None
                d.errback(BackendError(f"X11: could not get the display number ({why})",
                                       list(x.last_lines)))

        def received(fd: int, chunk: bytes) -> None:
            if fd != DISPLAY_FD or d.called:
                return
            if not chunk:
                fail("the X server closed its -displayfd")
                return
            data.extend(chunk)
            if data.endswith(b"\n"):
                digits = bytes(data).lstrip(b" \t").split(b"\n")[0].split()[0:1]
                if not digits or not digits[0].isdigit():
                    fail(f"it wrote {bytes(data)[:40]!r}")
                    return
                timer.cancel()
                x.on_child_data = None
                d.callback(int(digits[0]))

        timer = self.launcher.clock.callLater(STARTUP_TIMEOUT, fail,
                                              f"nothing within {STARTUP_TIMEOUT:g} s")
        x.on_child_data = received
        x.when_exited().addCallback(lambda how: fail(f"the X server {how}"))
        return d

    # -- adopting after a restart -----------------------------------------------------

    def adopt(self, record: BackendRecord, properties: ModuleProperties) -> bool:
        """Watch the processes a previous run started; False when the X
        server or the window manager is gone."""
        self.properties = properties
        self.record = record
        details = record.details
        self.display = int(details.get("display", "0"))
        self.stopwm = details.get("stopwm")
        self.cwd = details.get("cwd") or None
        set_variable(self.env, "XAUTHORITY", details.get("xauthority", ""))
        set_variable(self.env, "DISPLAY", f":{self.display}")
        x = self.launcher.adopt(self.session_id, self._module("x", X_STOP), record)
        wm_record = next((p for p in record.processes if p.role == "window-manager"), None)
        wm = None if wm_record is None else self.launcher.adopt(
            self.session_id, self._module("wm", WM_STOP),
            BackendRecord(self.config_name, wm_record.pid, wm_record.start_ticks, "",
                          wm_record.log_path))
        vc_record = next((p for p in record.processes if p.role == "startvc"), None)
        if vc_record is not None:
            self.vc = self.launcher.adopt(
                self.session_id, self._module("startvc", VC_STOP),
                BackendRecord(self.config_name, vc_record.pid, vc_record.start_ticks, "",
                              vc_record.log_path))
        self.x, self.wm = x, wm
        if x is None or wm is None:
            return False
        x.when_exited().addCallback(self._process_exited, x, "x")
        wm.when_exited().addCallback(self._process_exited, wm, "wm")
        return True

    # -- ending -------------------------------------------------------------------------

    def _process_exited(self, how: str, backend: Backend, role: str) -> None:
        self.last_lines.extend(backend.last_lines)
        if role not in ("x", "wm") or not self.running or self._stopping is not None \
                or (role == "wm" and self.wm is not backend):
            return
        # ogon: both are terminateSession processes; the session ends and
        # the module is stopped (stopwm, then the other one).
        what = "X server" if role == "x" else "window manager"
        self._begin_stop(f"{what} {how}")

    async def _stop(self, why: str) -> str:
        if self.stopwm is not None and self.wm is not None:
            await self._run_stopwm(self.stopwm)
        for process in (self.wm, self.x, self.vc):
            if process is not None and process.running:
                await process.stop()
        self._remove_stale_x_socket()
        self.running = False
        self.exit_reason = why
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(why)
        return why

    async def _run_stopwm(self, command: str) -> None:
        """x11_execute_stop_script: as the user, in HOME; up to 5 s, then
        SIGTERM and SIGKILL after 0.5 s."""
        try:
            stopper = self._spawn_command(command, "stopwm", 0.5, self.env.get("HOME"))
        except BackendError as e:
            self.log.error("session {session_id}: stopwm did not start: {error}",
                           session_id=self.session_id, error=str(e))
            return
        waited = stopper.when_exited()
        timer = self.launcher.clock.callLater(STOPWM_WAIT, stopper.stop)
        await waited
        if timer.active():
            timer.cancel()

    def _remove_stale_x_socket(self) -> None:
        """A crashed X server leaves /tmp/.X11-unix/X<display>: removed when
        nothing listens there any more (as ogon does)."""
        if self.display is None:
            return
        path = f"{X11_SOCKETS}{self.display}"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(path)
        except OSError as e:
            if e.errno == errno.ECONNREFUSED:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        finally:
            probe.close()


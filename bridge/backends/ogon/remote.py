"""An ogon module run by ogon-backend-launcher (``module.<cfg>.uselauncher``),
as ogon's RemoteModule drives it (session-manager/common/module/RemoteModule.cpp).

The launcher runs as root under the launcher keeper (so that it survives
the bridge), started as ``<launcherexecutable> <session id>
['<launcherdebugfile>']`` with the session manager's own environment. The
bridge speaks ogon's module protocol with it (``protocols.module``):
ModuleStart with the session's environment block and the kind's module
library, answering the module's property questions from the property
table meanwhile; ModuleGetCustomInfo for the WinStationName;
ModuleConnect and ModuleDisconnect as clients come and go; ModuleStop and
ModuleExit at the end. The launcher's exit is the session's end. Requests
go one at a time, as ogon's launcher reads them.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.stdio import StandardIO
from twisted.logger import Logger
from twisted.python.failure import Failure

from bridge.backends.endpoint import READY, EndpointClaim
from bridge.backends.launcher import BackendLauncher, process_start_ticks
from bridge.backends.logs import LogFile
from bridge.backends.modules import BackendError, pipe_file
from bridge.backends.ogon.keeper_client import LauncherKeeper
from bridge.backends.ogon.properties import PropertyLookup
from bridge.sessions.model import BackendRecord, StateWriteError
from protocols import module as mp
from protocols.errors import IcpError, IcpTimeoutError
from protocols.generated import Module_pb2

#: How long each request may take: a start includes the X server's 5 s and
#: the pipe's 5 s (and PAM); a stop stopwm's 5 s, the window manager's 10 s
#: and the X server's 2 s. Otherwise ogon's REMOTE_TIMEOUT.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
CALL_TIMEOUT = 15.0
#: After ModuleExit (or SIGTERM), the launcher's exit is awaited this long.
EXIT_WAIT = 15.0


class _PidfdReader:
    """Readable once the process has exited."""

    def __init__(self, fd: int, backend: LauncherBackend) -> None:
        self.fd = fd
        self.backend = backend

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.backend._launcher_gone()

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "launcher-pidfd"


class LauncherBackend:
    """One session's module inside an ogon-backend-launcher."""

    log = Logger()

    def __init__(self, launcher: BackendLauncher, keeper: LauncherKeeper, session_id: int,
                 config_name: str, kind: str, lookup: PropertyLookup) -> None:
        self.launcher = launcher
        self.keeper = keeper
        self.session_id = session_id
        self.config_name = config_name
        self.kind = kind
        self.lookup = lookup
        self.record = BackendRecord(config_name, 0, 0, "", kind=kind, launcher=True)
        self.running = True
        self.exit_reason: str | None = None
        self.last_lines: deque[str] = deque(maxlen=5)
        self.protocol: mp.ModuleProtocol | None = None
        self._lock = DeferredLock()
        self._pidfd: _PidfdReader | None = None
        self._exit_waiters: list[Deferred[str]] = []
        self._stopping = False
        self._output: LogFile | None = None

    @property
    def name(self) -> str:
        return self.config_name

    @property
    def pid(self) -> int:
        return self.record.pid

    # -- the channel ---------------------------------------------------------------

    def _handlers(self) -> dict[int, Any]:
        def boolean(request: Any) -> Message:
            value = self.lookup(request.sessionId, request.path)
            if isinstance(value, bool):
                return Module_pb2.PropertyBoolResponse(success=True, value=value)
            return Module_pb2.PropertyBoolResponse(success=False)

        def number(request: Any) -> Message:
            value = self.lookup(request.sessionId, request.path)
            if isinstance(value, int) and not isinstance(value, bool):
                # A long's low 32 bits, as ogon's uint32 field carries it.
                return Module_pb2.PropertyNumberResponse(success=True, value=value & 0xFFFFFFFF)
            return Module_pb2.PropertyNumberResponse(success=False)

        def string(request: Any) -> Message:
            value = self.lookup(request.sessionId, request.path)
            if isinstance(value, str):
                return Module_pb2.PropertyStringResponse(success=True, value=value)
            return Module_pb2.PropertyStringResponse(success=False)

        return {mp.MSG_PROPERTY_BOOL: boolean, mp.MSG_PROPERTY_NUMBER: number,
                mp.MSG_PROPERTY_STRING: string}

    def _open_channel(self, write_fd: int, read_fd: int) -> None:
        """Speak the module protocol writing to ``write_fd`` (the launcher's
        stdin pipe) and reading ``read_fd`` (its stdout pipe). The keeper
        holds copies of both, so closing ours (at a stop, or when the
        bridge dies) is never a close the launcher sees."""
        protocol = mp.ModuleProtocol(self._handlers(), clock=self.launcher.clock,
                                     call_timeout=CALL_TIMEOUT)
        StandardIO(protocol, stdin=read_fd, stdout=write_fd, reactor=self.launcher.reactor)
        self.protocol = protocol
        protocol.when_closed().addCallback(self._channel_closed, protocol)

    def _channel_closed(self, reason: Exception, protocol: mp.ModuleProtocol) -> None:
        if self.protocol is protocol:
            self.protocol = None
            if self.running and not self._stopping:
                self.log.info("session {session_id}: channel to ogon-backend-launcher (pid "
                              "{pid}) closed: {reason}", session_id=self.session_id,
                              pid=self.pid, reason=str(reason))

    async def _call(self, msg_type: int, request: Message, timeout: float) -> Any:
        """One request to the launcher, after any earlier one was answered.
        Raises IcpError (a timeout kills the launcher, as ogon's
        stopLauncher does)."""
        await self._lock.acquire()
        try:
            protocol = self.protocol
            if protocol is None:
                raise IcpError("no channel to the launcher")
            try:
                return await protocol.call(msg_type, request, timeout)
            except IcpTimeoutError:
                self.log.error("session {session_id}: ogon-backend-launcher (pid {pid}) did not "
                               "answer {method} within {timeout:g} s; killing it",
                               session_id=self.session_id, pid=self.pid,
                               method=mp.MODULE_METHODS[msg_type].name, timeout=timeout)
                self._kill(signal.SIGKILL)
                raise
        finally:
            self._lock.release()

    # -- starting ---------------------------------------------------------------------

    async def start(self, executable: str, argv: list[str], environment: dict[str, str],
                    request: Module_pb2.ModuleStartRequest, claim_uid: int,
                    not_before_ns: int) -> LauncherBackend:
        """Start the launcher and the module in it; fires once ModuleStart
        answered a pipe whose socket is the module's. Raises BackendError
        (the launcher is then stopped)."""
        # Pipes, as ogon's session manager makes them (CreatePipe): WinPR
        # writes to the launcher's stdout only when it is write-only.
        stdin_read, stdin_write = os.pipe()
        stdout_read, stdout_write = os.pipe()
        try:
            # Its stderr (until it turns to journald or /dev/null), bounded as
            # every backend's output is.
            log_path, errors = self.launcher.logs.create(self.session_id,
                                                         f"{self.config_name}-launcher")
        except OSError as e:
            for fd in (stdin_read, stdin_write, stdout_read, stdout_write):
                os.close(fd)
            raise BackendError(f"cannot create the launcher's output file: "
                               f"{e.strerror or e}") from None
        try:
            pid, ticks = await self.keeper.spawn(
                executable, argv, environment, os.getcwd(), stdin_read, stdout_write,
                stdin_write, stdout_read, errors)
        except BackendError:
            os.close(stdin_write)
            os.close(stdout_read)
            raise
        finally:
            for fd in (stdin_read, stdout_write, errors):
                os.close(fd)
        # The keeper runs it as the keeper runs: as the bridge's own user.
        self.record = BackendRecord(self.config_name, pid, ticks, "", str(log_path),
                                    kind=self.kind, launcher=True, uid=os.getuid())
        self._output = self.launcher.logs.attach(log_path, f"session {self.session_id} "
                                                           f"{self.config_name} launcher")
        self._record_spawn()
        self.log.info("session {session_id}: started {module} through ogon-backend-launcher "
                      "(pid {pid}): {command}", session_id=self.session_id,
                      module=self.config_name, pid=pid, command=" ".join(argv)[:300])
        self._open_channel(stdin_write, stdout_read)
        if not self._watch(pid):
            self._launcher_gone()
        try:
            answer = await self._call(mp.MSG_MODULE_START, request, START_TIMEOUT)
        except IcpError as e:
            raise await self._end_failed_start(f"ModuleStart failed: {e}", log_path) from None
        if not answer.pipeName:
            await self._call_quietly(mp.MSG_MODULE_STOP, Module_pb2.ModuleStopRequest())
            raise await self._end_failed_start("the module returned no pipe name", log_path)
        endpoint = answer.pipeName
        claim = EndpointClaim(pipe_file(self.launcher.pipe_dir, endpoint), claim_uid,
                              not_before_ns)
        found, why_not = claim.check()
        if found != READY:
            await self._call_quietly(mp.MSG_MODULE_STOP, Module_pb2.ModuleStopRequest())
            raise await self._end_failed_start(f"its endpoint is not the module's ({why_not})",
                                               log_path)
        station = f"{self.kind}:"
        try:
            info = await self._call(mp.MSG_MODULE_GET_CUSTOM_INFO,
                                    Module_pb2.ModuleGetCustomInfoRequest(), CALL_TIMEOUT)
            station += info.info
        except IcpError as e:
            self.log.warn("session {session_id}: ModuleGetCustomInfo failed: {error}",
                          session_id=self.session_id, error=str(e))
        self.record = BackendRecord(self.config_name, pid, ticks, endpoint.rpartition("\\")[2],
                                    str(log_path), kind=self.kind, launcher=True,
                                    station=station, uid=os.getuid())
        return self

    def _record_spawn(self) -> None:
        """In the ledger of spawned backends at once, as every backend is: a
        bridge killed during the start leaves nothing the next run does not
        know of (it stops the launcher when no session owns it)."""
        try:
            self.launcher.ledger.spawned(self.session_id, self.record)
        except StateWriteError as e:
            self._kill(signal.SIGKILL)
            raise BackendError(f"ogon-backend-launcher stopped at once: the spawn could not "
                               f"be recorded ({e})") from None

    async def _call_quietly(self, msg_type: int, request: Message) -> Any:
        try:
            return await self._call(msg_type, request, STOP_TIMEOUT)
        except IcpError:
            return None

    async def _end_failed_start(self, why: str, log_path: Path) -> BackendError:
        """ogon frees the context (ModuleExit); the launcher exits then.
        Returns the error to raise."""
        self._stopping = True
        if self.protocol is not None:
            await self._call_quietly(mp.MSG_MODULE_EXIT, Module_pb2.ModuleExitRequest())
        await self._wait_or_kill()
        return BackendError(f"{self.kind} through ogon-backend-launcher: {why}",
                            _tail(log_path))

    # -- watching ---------------------------------------------------------------------

    def _watch(self, pid: int) -> bool:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        self._pidfd = _PidfdReader(fd, self)
        self.launcher.reactor.addReader(self._pidfd)
        return True

    def _launcher_gone(self) -> None:
        if self._pidfd is not None:
            self.launcher.reactor.removeReader(self._pidfd)
            os.close(self._pidfd.fd)
            self._pidfd = None
        if not self.running:
            return
        self.running = False
        if not self.launcher.closed:
            self.launcher.ledger.gone(self.record)
        if self._output is not None:
            self.launcher.logs.release(self._output)
            self._output = None
        Deferred.fromCoroutine(self._report_exit())

    async def _report_exit(self) -> None:
        how = await self.keeper.status(self.pid) or "exited"
        how = f"(ogon-backend-launcher) {how}"
        self.exit_reason = how
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()
        waiters, self._exit_waiters = self._exit_waiters, []
        for d in waiters:
            d.callback(how)

    def when_exited(self) -> Deferred[str]:
        if not self.running and self.exit_reason is not None:
            return succeed(self.exit_reason)
        d: Deferred[str] = Deferred()
        self._exit_waiters.append(d)
        return d

    def _kill(self, signum: int) -> None:
        """Signal the launcher's process group (it leads its own session),
        if it is still the process started."""
        if process_start_ticks(self.pid) != self.record.start_ticks:
            return
        try:
            os.killpg(self.pid, signum)
        except OSError:
            pass

    async def _wait_or_kill(self) -> None:
        """Wait for the launcher's exit; SIGKILL after EXIT_WAIT."""
        exited = self.when_exited()
        if not self.running and self.exit_reason is not None:
            return
        timer = self.launcher.clock.callLater(EXIT_WAIT, self._kill, signal.SIGKILL)
        await exited
        if timer.active():
            timer.cancel()

    # -- after a restart ------------------------------------------------------------------

    async def adopt(self, record: BackendRecord) -> bool:
        """Take the launcher a previous run started back: its channel from
        the keeper, its exit watched. False when it is gone."""
        self.record = record
        if record.pid <= 0 or process_start_ticks(record.pid) != record.start_ticks:
            return False
        fds = await self.keeper.attach(record.pid, record.start_ticks)
        if fds is not None:
            self._open_channel(*fds)
        else:
            self.log.warn("session {session_id}: the launcher keeper does not know "
                          "ogon-backend-launcher {pid}; it is watched without its channel",
                          session_id=self.session_id, pid=record.pid)
        if not self._watch(record.pid):
            return False
        self.log.info("session {session_id}: adopted {module} in ogon-backend-launcher "
                      "(pid {pid})", session_id=self.session_id, module=self.config_name,
                      pid=record.pid)
        return True

    # -- what the lifecycle uses ------------------------------------------------------------

    def connected(self) -> None:
        Deferred.fromCoroutine(self._notify(mp.MSG_MODULE_CONNECT,
                                            Module_pb2.ModuleConnectRequest()))

    def disconnected(self) -> None:
        Deferred.fromCoroutine(self._notify(mp.MSG_MODULE_DISCONNECT,
                                            Module_pb2.ModuleDisconnectRequest()))

    async def _notify(self, msg_type: int, request: Message) -> None:
        if not self.running or self._stopping or self.protocol is None:
            return
        name = mp.MODULE_METHODS[msg_type].name
        try:
            answer = await self._call(msg_type, request, CALL_TIMEOUT)
        except IcpError as e:
            self.log.warn("session {session_id}: {method} failed: {error}",
                          session_id=self.session_id, method=name, error=str(e))
            return
        if answer.success != 0:
            self.log.warn("session {session_id}: the module answered {method} with {result}",
                          session_id=self.session_id, method=name, result=answer.success)

    def stop(self) -> Deferred[str]:
        """ModuleStop, then ModuleExit; the launcher's exit is awaited
        (SIGKILL after a while). Without a channel: SIGTERM, which the
        launcher forwards to its processes before it stops its module."""
        d = self.when_exited()
        if self.running and not self._stopping:
            self._stopping = True
            Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        if self.protocol is not None:
            answer = await self._call_quietly(mp.MSG_MODULE_STOP, Module_pb2.ModuleStopRequest())
            if answer is not None and answer.success != 0:
                self.log.warn("session {session_id}: the module answered ModuleStop with "
                              "{result}", session_id=self.session_id, result=answer.success)
            await self._call_quietly(mp.MSG_MODULE_EXIT, Module_pb2.ModuleExitRequest())
        else:
            self._kill(signal.SIGTERM)
        await self._wait_or_kill()

    def detach(self) -> None:
        """The bridge stops: let go of the channel (the keeper keeps it open)
        and of the watch; the launcher and its module run on."""
        if self._pidfd is not None:
            self.launcher.reactor.removeReader(self._pidfd)
            os.close(self._pidfd.fd)
            self._pidfd = None
        protocol, self.protocol = self.protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()


def _tail(path: Path, lines: int = 5) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]

"""How a session ends, and the requests that end one: the OTS API's
logoffSession, the RDP server's LogoffUserSession, a backend that exits."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from bridge.backends.launcher import BackendLauncher
from bridge.backends.modules import SessionBackend
from bridge.lifecycle.authentication import LogonAuthentication
from bridge.lifecycle.remote_control import RemoteControl
from bridge.lifecycle.runner import kill_recorded
from bridge.lifecycle.runtime import RdpCaller, SessionRuntime
from bridge.sessions.model import ConnectState, Session
from bridge.sessions.registry import SessionRegistry
from protocols import icp
from protocols.errors import IcpError, IcpTimeoutError
from protocols.generated import ICP_pb2


class SessionEnding:
    """Ends sessions: LogoffUserSession to the RDP server for the client,
    the shadowing of it stopped, its backend stopped, its PAM session
    closed, the registry told.

    Invariant: ``_ending`` holds the ids of the sessions an ``end()`` is
    working on (a backend exiting meanwhile ends nothing twice).
    """

    log = Logger()

    def __init__(self, registry: SessionRegistry, rdp: RdpCaller, runtime: SessionRuntime,
                 authentication: LogonAuthentication, remote_control: RemoteControl,
                 launcher: BackendLauncher, call_timeout: float) -> None:
        self.registry = registry
        self.rdp = rdp
        self.runtime = runtime
        self.authentication = authentication
        self.remote_control = remote_control
        self.launcher = launcher
        self.call_timeout = call_timeout
        self._ending: set[int] = set()

    async def tell_logoff(self, connection_id: int, timeout: float | None = None) -> str:
        """LogoffUserSession to the RDP server (it drops that client).
        Returns "loggedoff" or "refused" (its answer), "timeout" (none in
        time) or "failed" (FAILED, NOTFOUND, no RDP server)."""
        try:
            response = await self.rdp.call(
                icp.MSG_LOGOFF_USER_SESSION,
                ICP_pb2.LogoffUserSessionRequest(connectionId=connection_id), timeout)
        except IcpTimeoutError:
            self.log.info("LogoffUserSession for connection {connection_id}: no answer in time",
                          connection_id=connection_id)
            return "timeout"
        except IcpError as e:
            self.log.info("LogoffUserSession for connection {connection_id}: {error}",
                          connection_id=connection_id, error=str(e))
            return "failed"
        return "loggedoff" if response.loggedoff else "refused"

    async def end(self, session: Session, reason: str, tell_rdp: bool = True,
                  backend_gone: bool = False) -> None:
        """End the session: tell the RDP server LogoffUserSession for its
        connection (waiting at most the call timeout), stop its backend
        (unless it is known to be gone), forget it. Idempotent."""
        session_id = session.session_id
        if session_id in self._ending or self.registry.get(session_id) is not session:
            return
        self._ending.add(session_id)
        try:
            self.runtime.cancel_timeout(session)
            if tell_rdp and session.connection_id is not None:
                await self.tell_logoff(session.connection_id, self.call_timeout)
            for spy in self.registry.shadowed_by(session):
                if spy.connection_id is not None:
                    self.remote_control.stop_shadow_call(spy)
            backend = self.runtime.backends.pop(session_id, None)
            self.registry.end(session, reason)
            self.authentication.close_pam_session(session_id)
            if backend is not None and backend.running:
                backend.stop()
            elif session.backend is not None and backend is None and not backend_gone:
                kill_recorded(self.launcher, session.backend, session_id,
                              f"its session ended ({reason})")
        finally:
            self._ending.discard(session_id)

    def backend_exited(self, session: Session, backend: SessionBackend, how: str) -> None:
        """The backend a session ran exited: the session ends (unless it is
        gone or already ending)."""
        current = self.registry.get(session.session_id)
        if current is None or session.session_id in self._ending:
            return
        self.log.info("session {session_id}: backend {module} (pid {pid}) {how}; "
                      "ending the session", session_id=session.session_id,
                      module=backend.name, pid=backend.pid, how=how)
        Deferred.fromCoroutine(self.end(current, f"backend {backend.name} {how}",
                                        backend_gone=True))

    async def logoff(self, session: Session, wait: bool,
                     reason: str = "logged off through the OTS API") -> bool:
        """OTS API logoffSession: the session ends whatever the RDP server
        answers; the result is its answer (with ``wait``), else True.
        ``reason`` goes to the log and the journal (who asked)."""
        if session.state is ConnectState.SHADOW:
            await self.remote_control.stop_own_shadowing(session)
        result = True
        connection_id = session.connection_id
        if connection_id is not None:
            told = Deferred.fromCoroutine(self.tell_logoff(connection_id, self.call_timeout))
            if wait:
                result = await told == "loggedoff"
        await self.end(session, reason, tell_rdp=False)
        return result

    async def client_logged_off(self, connection_id: int) -> bool:
        """ICP LogoffUserSession from the RDP server: the session ends."""
        session = self.registry.by_connection(connection_id)
        if session is None:
            self.log.info("logoff for unknown connection {connection_id}",
                          connection_id=connection_id)
            return False
        await self.end(session, "logged off by the RDP server", tell_rdp=False)
        return True

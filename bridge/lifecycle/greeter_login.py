"""The greeter's login: SBP requests a greeter sends through the RDP server
(VersionInfo, AuthenticateUser, EndSession), and the SwitchTo that moves
its connection to the user's desktop."""

from __future__ import annotations

from twisted.logger import Logger

from bridge.backends.modules import BackendError
from bridge.lifecycle.authentication import LogonAuthentication
from bridge.lifecycle.ending import SessionEnding
from bridge.lifecycle.policies import SessionPolicies
from bridge.lifecycle.runner import BackendRunner
from bridge.lifecycle.runtime import RdpCaller, SessionRuntime, stored
from bridge.security.auth import Identity
from bridge.security.token_files import SessionTokenFiles
from bridge.sessions.model import ConnectState, Session, StateWriteError
from bridge.sessions.registry import SessionRegistry
from protocols import icp
from protocols.errors import IcpError, IcpHandlerError
from protocols.generated import ICP_pb2, SBP_pb2

AUTH_SUCCESSFUL = SBP_pb2.AuthenticateUserResponse.AUTH_SUCCESSFUL
AUTH_BAD_CREDENTIALS = SBP_pb2.AuthenticateUserResponse.AUTH_BAD_CREDENTIALS
AUTH_WRONG_SESSION_STATE = SBP_pb2.AuthenticateUserResponse.AUTH_WRONG_SESSION_STATE
AUTH_UNKNOWN_ERROR = SBP_pb2.AuthenticateUserResponse.AUTH_UNKNOWN_ERROR
#: ogon's SBP protocol major version; a greeter speaking another is refused.
SBP_VERSION = (1, 1)


class GreeterLogin:
    """Logs a user on from a greeter session. On good credentials the user
    gets the session the policies pick, or the greeter's own session now
    runs their new desktop (same id, as in ogon); the RDP server switches
    the greeter's connection to it (SwitchTo), and only once it did is the
    greeter stopped and the login answered AUTH_SUCCESSFUL."""

    log = Logger()

    def __init__(self, registry: SessionRegistry, rdp: RdpCaller, runtime: SessionRuntime,
                 authentication: LogonAuthentication, policies: SessionPolicies,
                 ending: SessionEnding, runner: BackendRunner,
                 token_files: SessionTokenFiles) -> None:
        self.registry = registry
        self.rdp = rdp
        self.runtime = runtime
        self.authentication = authentication
        self.policies = policies
        self.ending = ending
        self.runner = runner
        self.token_files = token_files

    def sbp_version(self, session_id: int, major: int, minor: int) -> tuple[int, int]:
        """SBP VersionInfo: remember whether the greeter speaks our major
        (ogon refuses its other SBP calls when not); answers ours."""
        session = self.registry.get(session_id)
        if session is None:
            self.log.warn("SBP version {major}.{minor} for unknown session {session_id}",
                          major=major, minor=minor, session_id=session_id)
        else:
            if major != SBP_VERSION[0]:
                self.log.warn("session {session_id}: greeter speaks SBP {major}.{minor}, not "
                              "{ours}.x; its SBP calls will be refused",
                              session_id=session_id, major=major, minor=minor,
                              ours=SBP_VERSION[0])
            try:
                self.registry.note(session, f"greeter speaks SBP {major}.{minor}",
                                   lambda s: setattr(s, "sbp_major", major))
            except StateWriteError:
                # The registry logged it and undid the note; which SBP version
                # the greeter speaks is not worth failing its VersionInfo.
                return SBP_VERSION
        return SBP_VERSION

    def _check_sbp(self, session_id: int, session: Session | None) -> Session:
        """The session an SBP call is for. As ogon (CallIn's
        putInSessionExecutor_sesId) an unknown session, or one whose greeter
        announced another SBP major version, answers FAILED without a
        description."""
        if session is None:
            raise IcpHandlerError(f"SBP call for unknown session {session_id}", on_wire=False)
        if session.sbp_major is not None and session.sbp_major != SBP_VERSION[0]:
            raise IcpHandlerError(f"SBP version {session.sbp_major} is not compatible",
                                  on_wire=False)
        return session

    async def authenticate_user(self, session_id: int, username: str, password: str,
                                domain: str) -> int:
        """SBP AuthenticateUser from a greeter: on success the greeter's
        connection is switched to the user's desktop (SwitchTo) and only then
        is the greeter stopped. Returns an AUTH_STATUS; raises
        IcpHandlerError (FAILED) when the switch fails."""
        greeter = self._check_sbp(session_id, self.registry.get(session_id))
        if greeter.logged_on or greeter.state is not ConnectState.CONNECTED \
                or greeter.connection_id is None:
            self.log.warn("greeter login in session {session_id} refused: state {state}",
                          session_id=session_id, state=greeter.state.name)
            return AUTH_WRONG_SESSION_STATE
        identity = await self.authentication.authenticate(
            username, password, domain, f"greeter of session {session_id}",
            greeter.client.address)
        if identity is None:
            return AUTH_BAD_CREDENTIALS
        if self.registry.get(session_id) is not greeter or greeter.connection_id is None:
            return AUTH_WRONG_SESSION_STATE  # the client left while we checked
        connection_id = greeter.connection_id
        target = await self.policies.session_for(identity, greeter.client.host_name)
        if target is not None:
            self.authentication.release(identity)
            await self._switch_to_existing(greeter, connection_id, target)
        else:
            await self._switch_to_new_desktop(greeter, identity)
        return AUTH_SUCCESSFUL

    async def _switch(self, connection_id: int, session: Session,
                      username: str | None = None) -> None:
        """SwitchTo: the RDP server connects ``connection_id`` to the
        session's backend, with the maximum size of ``username`` (default:
        the session's user). Raises IcpHandlerError when it does not."""
        answer = self.runner.answer_for(session, username)
        request = ICP_pb2.SwitchToRequest(
            connectionId=connection_id, serviceEndpoint=answer.service_endpoint,
            maxHeight=answer.max_height, maxWidth=answer.max_width,
            backendCookie=answer.backend_cookie, ogonCookie=answer.ogon_cookie)
        try:
            response = await self.rdp.call(icp.MSG_SWITCH_TO, request)
        except IcpError as e:
            self.log.error("SwitchTo of connection {connection_id} to session {session_id} "
                           "failed: {error}", connection_id=connection_id,
                           session_id=session.session_id, error=str(e))
            raise IcpHandlerError("switching the connection failed") from e
        if not response.success:
            self.log.error("RDP server refused SwitchTo of connection {connection_id} to "
                           "session {session_id}", connection_id=connection_id,
                           session_id=session.session_id)
            raise IcpHandlerError("the RDP server refused the switch")
        self.log.info("RDP server switched connection {connection_id} to {endpoint} (session "
                      "{session_id})", connection_id=connection_id,
                      endpoint=answer.service_endpoint, session_id=session.session_id)

    async def _switch_to_existing(self, greeter: Session, connection_id: int,
                                  target: Session) -> None:
        await self.policies.take_over(target, "greeter login")
        await self._switch(connection_id, target)
        client = greeter.client
        await self.ending.end(greeter, "greeter login: switched to session "
                                       f"{target.session_id}", tell_rdp=False)
        self.runtime.cancel_timeout(target)
        with stored():
            self.registry.switched(target, connection_id, client)

    async def _switch_to_new_desktop(self, greeter: Session, identity: Identity) -> None:
        """ogon reuses the greeter's session for the new desktop: same id,
        now the user's."""
        backends = self.runtime.backends
        greeter_backend = backends.get(greeter.session_id)
        probe = Session(**{**greeter.__dict__, "username": identity.username,
                           "domain": identity.domain})
        try:
            if self.runner.runs_own_pam_session(probe):
                self.authentication.release(identity)  # ogon's launcher opens its own
            else:
                await self.authentication.open_pam_session(greeter, identity)
            desktop = await self.runner.start(probe, greeter=False)
        except BackendError as e:
            self.authentication.close_pam_session(greeter.session_id)
            self.log.error("desktop for user {username} in session {session_id} did not start: "
                           "{error}; the greeter stays", username=identity.username,
                           session_id=greeter.session_id, error=e.describe())
            raise IcpHandlerError("the desktop could not be started") from e
        if self.registry.get(greeter.session_id) is not greeter:
            desktop.stop()
            raise IcpHandlerError("the client went away during the login")
        backends.pop(greeter.session_id, None)  # its exit no longer ends the session
        try:
            self.runner.record(greeter, desktop)
        except StateWriteError as e:
            self.authentication.close_pam_session(greeter.session_id)
            desktop.stop()
            if greeter_backend is not None:
                self.runner.watch(greeter, greeter_backend)
            raise IcpHandlerError("session state could not be stored") from e
        try:
            assert greeter.connection_id is not None
            # The session is still the greeter's until the switch succeeded;
            # its maximum size is already the user's, as in ogon.
            await self._switch(greeter.connection_id, greeter, identity.username)
        except IcpHandlerError:
            # Back to the greeter first, so that the desktop's exit ends nothing.
            backends.pop(greeter.session_id, None)
            if greeter_backend is not None and greeter_backend.running:
                self.registry.set_backend(greeter, greeter_backend.record, decided=False)
                self.runner.watch(greeter, greeter_backend)
            desktop.stop()
            self.authentication.close_pam_session(greeter.session_id)
            raise
        try:
            self.registry.log_on(greeter, identity.username, identity.domain,
                                 identity.permission, reason="greeter login")
            self.token_files.issue(greeter)
        except StateWriteError as e:
            await self.ending.end(greeter, "session state could not be stored")
            raise IcpHandlerError("session state could not be stored") from e
        if greeter_backend is not None:
            self.log.info("session {session_id}: stopping the greeter (pid {pid})",
                          session_id=greeter.session_id, pid=greeter_backend.pid)
            greeter_backend.stop()

    async def end_session_request(self, session_id: int) -> bool:
        """SBP EndSession: the greeter (or desktop) asks to end its session."""
        session = self._check_sbp(session_id, self.registry.get(session_id))
        await self.ending.end(session, "ended by its backend (SBP EndSession)")
        return True

"""A session's lifetime: choose it, start its backend, hand its endpoint to
the RDP server, switch a greeter's connection to a desktop, watch the
backend, disconnect, time out and end. Both the ICP handlers and the OTS
API handler call this; they only check, ask and map the answer.

Behaviour follows ogon's session manager (session-manager/common/session,
call and otsapi; WIRE.md sections 2, 4 and 5): the ``session.reconnect``,
``session.reconnect.fromSameClient``, ``session.singleSession`` and
``session.timeout`` properties, LogoffUserSession to the RDP server for a
disconnect or a logoff, SwitchTo after a greeter login.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from bridge.backends.launcher import Backend, BackendLauncher
from bridge.backends.modules import BackendError, LaunchContext, Module, pipe_name
from bridge.security.auth import Authenticator, Identity, logon_allowed
from bridge.security.throttle import RDP, LogonGuard
from bridge.security.token_files import SessionTokenFiles
from bridge.sessions.model import ClientInfo, ConnectState, Session, StateWriteError
from bridge.sessions.properties import ConnectionValues, PropertyTable
from bridge.sessions.registry import SessionRegistry
from protocols import icp
from protocols.errors import IcpError, IcpHandlerError, IcpTimeoutError
from protocols.generated import ICP_pb2, SBP_pb2

AUTH_SUCCESSFUL = SBP_pb2.AuthenticateUserResponse.AUTH_SUCCESSFUL
AUTH_BAD_CREDENTIALS = SBP_pb2.AuthenticateUserResponse.AUTH_BAD_CREDENTIALS
AUTH_WRONG_SESSION_STATE = SBP_pb2.AuthenticateUserResponse.AUTH_WRONG_SESSION_STATE
AUTH_UNKNOWN_ERROR = SBP_pb2.AuthenticateUserResponse.AUTH_UNKNOWN_ERROR
#: ogon's SBP protocol major version; a greeter speaking another is refused.
SBP_VERSION = (1, 1)
MESSAGE_REQUEST_REMOTE_CONTROL = 2
MB_YESNO = 4
IDYES = 6
#: ogon asks the shadowed user for 30 s and waits one more for the answer.
REMOTE_CONTROL_ASK_TIMEOUT = 30
_COOKIE_ALPHABET = string.digits + string.ascii_letters


def make_cookie() -> str:
    """A backend/ogon cookie: 50 random alphanumerics, like ogon's."""
    return "".join(secrets.choice(_COOKIE_ALPHABET) for _ in range(50))


class RdpCaller(Protocol):
    def call(self, msg_type: int, request: Message, timeout: float | None = None
             ) -> Deferred[Any]: ...


@dataclass(frozen=True)
class LogonAnswer:
    """What LogonUser answers: the endpoint the RDP server connects to."""

    service_endpoint: str
    max_width: int
    max_height: int
    backend_cookie: str
    ogon_cookie: str


@dataclass(frozen=True)
class RdpPeer:
    """Who the RDP server is (SO_PEERCRED), for OGON_UID / OGON_PID."""

    uid: int | None = None
    pid: int | None = None


class SessionLifecycle:
    """Every session transition the bridge makes, on the reactor."""

    log = Logger()

    def __init__(self, registry: SessionRegistry, rdp: RdpCaller,
                 authenticator: Authenticator | LogonGuard,
                 properties: PropertyTable, modules: dict[str, Module],
                 launcher: BackendLauncher, token_files: SessionTokenFiles,
                 clock: IReactorTime, call_timeout: float = 10.0,
                 peer: Callable[[], RdpPeer] = RdpPeer,
                 cookie: Callable[[], str] = make_cookie) -> None:
        self.registry = registry
        self.rdp = rdp
        self.guard = authenticator if isinstance(authenticator, LogonGuard) else LogonGuard(
            authenticator, clock)
        self.properties = properties
        self.modules = modules
        self.launcher = launcher
        self.token_files = token_files
        self.clock = clock
        self.call_timeout = call_timeout
        self.peer = peer
        self.cookie = cookie
        self.backends: dict[int, Backend] = {}
        self._timeouts: dict[int, IDelayedCall] = {}
        self._pam_closers: dict[int, Callable[[], Deferred[Any]]] = {}
        self._ending: set[int] = set()
        self.shutting_down = False

    # -- properties of a session ------------------------------------------------

    def max_size(self, username: str) -> tuple[int, int]:
        return (max(0, self.properties.number_or("session.maxXRes", username, 0)),
                max(0, self.properties.number_or("session.maxYRes", username, 0)))

    def connection_values(self, session: Session) -> ConnectionValues | None:
        if session.connection_id is None:
            return None
        c = session.client
        return ConnectionValues(c.width, c.height, c.color_depth, c.initial_width,
                                c.initial_height)

    @staticmethod
    def _clamped(client: ClientInfo, max_width: int, max_height: int) -> ClientInfo:
        width, height = client.initial_width or client.width, client.initial_height or client.height
        return ClientInfo(**{
            **client.__dict__, "initial_width": width, "initial_height": height,
            "width": min(width, max_width) if max_width else width,
            "height": min(height, max_height) if max_height else height,
        })

    def answer_for(self, session: Session) -> LogonAnswer:
        max_width, max_height = self.max_size(session.username)
        endpoint = session.backend.endpoint if session.backend is not None else ""
        return LogonAnswer(pipe_name(endpoint), max_width, max_height,
                           session.backend_cookie, session.ogon_cookie)

    # -- backends ---------------------------------------------------------------

    def _module(self, session: Session, greeter: bool, typed_user: str = "") -> Module:
        if greeter:
            name = self.properties.string_or("auth.greeter", typed_user, "greeter")
        else:
            name = self.properties.string_or("module", session.username, "xsession")
        module = self.modules.get(name)
        if module is None:
            raise BackendError(f"module {name!r} is not configured (add [modules.{name}] "
                               f"to the configuration)")
        return module

    def _context(self, session: Session, typed_user: str = "", typed_domain: str = ""
                 ) -> LaunchContext:
        user = session.username
        max_width, max_height = self.max_size(user)
        add = []
        for item in self.properties.split_list("environment.add", user):
            name, sep, value = item.partition(":")
            if sep and name:
                add.append((name, value))
        peer = self.peer()
        return LaunchContext(
            session_id=session.session_id, username=user, domain=session.domain,
            width=session.client.width, height=session.client.height,
            bpp=session.client.color_depth, max_width=max_width, max_height=max_height,
            client_name=session.client.host_name, client_address=session.client.address,
            backend_cookie=session.backend_cookie, ogon_cookie=session.ogon_cookie,
            rdp_server_uid=peer.uid, rdp_server_pid=peer.pid,
            typed_user=typed_user, typed_domain=typed_domain,
            environment_add=tuple(add),
            environment_pass=tuple(self.properties.split_list("environment.filter", user)),
        )

    async def _start_backend(self, session: Session, greeter: bool, typed_user: str = "",
                             typed_domain: str = "") -> Backend:
        """Start the session's greeter or desktop and wait until its endpoint
        accepts connections. Raises BackendError (logged by the caller)."""
        module = self._module(session, greeter, typed_user)
        return await self.launcher.start(module, self._context(session, typed_user,
                                                               typed_domain))

    def _watch(self, session: Session, backend: Backend) -> None:
        """A backend that exits ends its session (if it still runs that backend)."""
        self.backends[session.session_id] = backend

        def exited(how: str) -> None:
            if self.backends.get(session.session_id) is not backend:
                return
            del self.backends[session.session_id]
            current = self.registry.get(session.session_id)
            if current is None or session.session_id in self._ending:
                return
            self.log.info("session {session_id}: backend {module} (pid {pid}) {how}; "
                          "ending the session", session_id=session.session_id,
                          module=backend.module.name, pid=backend.pid, how=how)
            Deferred.fromCoroutine(self.end(current, f"backend {backend.module.name} {how}",
                                            backend_gone=True))

        backend.when_exited().addCallback(exited)

    def _record(self, session: Session, backend: Backend) -> None:
        """Store the running backend with the session; raises StateWriteError."""
        self.registry.set_backend(session, backend.record)
        self._watch(session, backend)

    # -- LogonUser ----------------------------------------------------------------

    async def logon_user(self, connection_id: int, username: str, password: str,
                         domain: str, client: ClientInfo) -> LogonAnswer:
        """ICP LogonUser: authenticate, pick or start the session, answer its
        endpoint once the backend is ready. Raises IcpHandlerError (FAILED)."""
        if self.shutting_down:
            raise IcpHandlerError("the session manager is shutting down")
        old = self.registry.by_connection(connection_id)
        if old is not None:
            # The RDP server reuses an id only for a new client: the old one is gone.
            await self.client_gone(old, "connection id reused by a new logon")
        identity = None
        if username:
            identity = await self._authenticate(username, password, domain,
                                                f"connection {connection_id}", client.address)
        if identity is None:
            return await self._greeter_logon(connection_id, client, username, domain)
        try:
            return await self._user_logon(connection_id, client, identity)
        except BackendError as e:
            self.log.error("desktop for user {username} on connection {connection_id} did not "
                           "start: {error}; giving the connection the greeter",
                           username=identity.username, connection_id=connection_id,
                           error=e.describe())
            return await self._greeter_logon(connection_id, client, username, domain)

    @property
    def authenticator(self) -> Authenticator:
        return self.guard.authenticator

    async def _authenticate(self, username: str, password: str, domain: str,
                            where: str, source: str) -> Identity | None:
        if len(username) > 256 or any(ord(c) < 32 for c in username):
            self.log.warn("logon ({where}) refused: the user name is not a name ({length} "
                          "characters, control characters)", where=where, length=len(username))
            return None
        if not logon_allowed(self.properties, username):
            self.log.warn("logon of user {username} ({where}) refused by "
                          "permission.groups.whiteList/blackList", username=username, where=where)
            return None
        # PAM keeps its handle for the desktop's PAM session.
        options = {"for_session": True} if hasattr(self.authenticator, "open_session") else {}
        identity = await self.guard.authenticate(username, password, domain, source, RDP,
                                                 **options)
        if identity is None:
            self.log.info("logon of user {username} ({where}) not accepted", username=username,
                          where=where)
        return identity

    def _release(self, identity: Identity) -> None:
        """The identity starts no desktop: end its PAM handle, if any."""
        release = getattr(self.authenticator, "release", None)
        if identity.pam is not None and release is not None:
            release(identity)

    async def _open_pam_session(self, session: Session, identity: Identity) -> None:
        """With PAM, a desktop runs inside a PAM session, closed at its end."""
        opener = getattr(self.authenticator, "open_session", None)
        if opener is None or identity.pam is None:
            return
        closer = await opener(identity)
        if closer is not None:
            self._pam_closers[session.session_id] = closer

    def _close_pam_session(self, session_id: int) -> None:
        closer = self._pam_closers.pop(session_id, None)
        if closer is not None:
            closer().addErrback(lambda f: self.log.failure(
                "closing the PAM session of session {session_id} failed", f,
                session_id=session_id))

    def _choose(self, identity: Identity, client_host: str) -> tuple[Session | None,
                                                                      Session | None]:
        """ogon's choice for a user who logged on: (session to take over or
        reconnect to, session to end first). Both None: a new session."""
        user = identity.username
        reconnect = self.properties.bool_or("session.reconnect", user, True)
        same_client = self.properties.bool_or("session.reconnect.fromSameClient", user, False)
        single = self.properties.bool_or("session.singleSession", user, False)
        candidates = [s for s in self.registry.sessions_of(user, identity.domain)
                      if not same_client or s.client.host_name == client_host]
        logged_in = [s for s in candidates if s.state in (
            ConnectState.DISCONNECTED, ConnectState.ACTIVE, ConnectState.INIT,
            ConnectState.SHADOW)]
        if reconnect:
            if single:
                return (logged_in[0] if logged_in else None), None
            disconnected = [s for s in candidates if s.state is ConnectState.DISCONNECTED]
            return (disconnected[0] if disconnected else None), None
        if single and logged_in:
            return None, logged_in[0]
        return None, None

    async def _user_logon(self, connection_id: int, client: ClientInfo,
                          identity: Identity) -> LogonAnswer:
        target, replace = self._choose(identity, client.host_name)
        if replace is not None:
            await self.end(replace, "single session: replaced by a new logon")
        max_width, max_height = self.max_size(identity.username)
        client = self._clamped(client, max_width, max_height)
        if target is not None:
            self._release(identity)
            await self._take_over(target, "logon")
            self._cancel_timeout(target)
            try:
                self.registry.reconnect(target, connection_id, client)
            except StateWriteError as e:
                raise IcpHandlerError("session state could not be stored") from e
            return self.answer_for(target)
        try:
            session = self.registry.create(
                connection_id, client, identity.username, identity.domain, identity.permission,
                cookies=(self.cookie(), self.cookie()))
        except StateWriteError as e:
            self._release(identity)
            raise IcpHandlerError("session state could not be stored") from e
        try:
            await self._open_pam_session(session, identity)
            backend = await self._start_backend(session, greeter=False)
        except BackendError:
            self._close_pam_session(session.session_id)
            self.registry.end(session, "desktop did not start")
            raise
        await self._backend_ready(session, backend, identity)
        return self.answer_for(session)

    async def _greeter_logon(self, connection_id: int, client: ClientInfo, typed_user: str,
                             typed_domain: str) -> LogonAnswer:
        max_width, max_height = self.max_size("")
        client = self._clamped(client, max_width, max_height)
        try:
            session = self.registry.create(connection_id, client,
                                           cookies=(self.cookie(), self.cookie()))
        except StateWriteError as e:
            raise IcpHandlerError("session state could not be stored") from e
        try:
            backend = await self._start_backend(session, greeter=True, typed_user=typed_user,
                                                typed_domain=typed_domain)
        except BackendError as e:
            self.log.error("greeter for connection {connection_id} did not start: {error}",
                           connection_id=connection_id, error=e.describe())
            self.registry.end(session, "greeter did not start")
            raise IcpHandlerError("the greeter could not be started") from e
        await self._backend_ready(session, backend, None)
        return self.answer_for(session)

    async def _backend_ready(self, session: Session, backend: Backend,
                             identity: Identity | None) -> None:
        """The backend a logon started is the session's: recorded, the
        session Connected (and, for a desktop, the user logged on with a
        token file). Raises IcpHandlerError when the client went away
        meanwhile or the state cannot be stored."""
        if self.registry.get(session.session_id) is not session:
            backend.stop()  # the client went away while the backend started
            raise IcpHandlerError("the client went away during logon")
        try:
            self._record(session, backend)
            self.registry.connected(session)
            if identity is not None:
                self.registry.log_on(session, identity.username, identity.domain,
                                     identity.permission)
                self.token_files.issue(session)
        except StateWriteError as e:
            await self.end(session, "session state could not be stored")
            raise IcpHandlerError("session state could not be stored") from e

    # -- SBP: the greeter's login ---------------------------------------------------

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

    def _check_sbp(self, session: Session | None) -> None:
        if session is not None and session.sbp_major is not None \
                and session.sbp_major != SBP_VERSION[0]:
            raise IcpHandlerError(f"SBP version {session.sbp_major} is not compatible")

    async def authenticate_user(self, session_id: int, username: str, password: str,
                                domain: str) -> int:
        """SBP AuthenticateUser from a greeter: on success the greeter's
        connection is switched to the user's desktop (SwitchTo) and only then
        is the greeter stopped. Returns an AUTH_STATUS; raises
        IcpHandlerError (FAILED) when the switch fails."""
        greeter = self.registry.get(session_id)
        self._check_sbp(greeter)
        if greeter is None:
            self.log.warn("greeter login for unknown session {session_id}",
                          session_id=session_id)
            return AUTH_UNKNOWN_ERROR
        if greeter.logged_on or greeter.state is not ConnectState.CONNECTED \
                or greeter.connection_id is None:
            self.log.warn("greeter login in session {session_id} refused: state {state}",
                          session_id=session_id, state=greeter.state.name)
            return AUTH_WRONG_SESSION_STATE
        identity = await self._authenticate(username, password, domain,
                                            f"greeter of session {session_id}",
                                            greeter.client.address)
        if identity is None:
            return AUTH_BAD_CREDENTIALS
        if self.registry.get(session_id) is not greeter or greeter.connection_id is None:
            return AUTH_WRONG_SESSION_STATE  # the client left while we checked
        connection_id = greeter.connection_id
        target, replace = self._choose(identity, greeter.client.host_name)
        if replace is not None:
            await self.end(replace, "single session: replaced by a new logon")
        if target is not None:
            self._release(identity)
            await self._switch_to_existing(greeter, connection_id, target)
        else:
            await self._switch_to_new_desktop(greeter, identity)
        return AUTH_SUCCESSFUL

    async def _switch(self, connection_id: int, session: Session) -> None:
        """SwitchTo: the RDP server connects ``connection_id`` to the
        session's backend. Raises IcpHandlerError when it does not."""
        answer = self.answer_for(session)
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

    async def _take_over(self, target: Session, by: str) -> None:
        """A new logon (or greeter login) takes ``target``: its client, if
        any, is disconnected first. Raises IcpHandlerError if the session
        ended meanwhile."""
        if target.connection_id is not None:
            self.log.info("session {session_id}: single session, disconnecting connection "
                          "{connection_id} for the new {by}",
                          session_id=target.session_id, connection_id=target.connection_id,
                          by=by)
            await self._detach(target, f"single session: taken over by a new {by}")
        if self.registry.get(target.session_id) is not target:
            raise IcpHandlerError(f"the session ended during the {by}")

    async def _switch_to_existing(self, greeter: Session, connection_id: int,
                                  target: Session) -> None:
        await self._take_over(target, "greeter login")
        await self._switch(connection_id, target)
        client = greeter.client
        await self.end(greeter, "greeter login: switched to session "
                                f"{target.session_id}", tell_rdp=False)
        self._cancel_timeout(target)
        try:
            self.registry.switched(target, connection_id, client)
        except StateWriteError as e:
            raise IcpHandlerError("session state could not be stored") from e

    async def _switch_to_new_desktop(self, greeter: Session, identity: Identity) -> None:
        """ogon reuses the greeter's session for the new desktop: same id,
        now the user's."""
        greeter_backend = self.backends.get(greeter.session_id)
        probe = Session(**{**greeter.__dict__, "username": identity.username,
                           "domain": identity.domain})
        try:
            await self._open_pam_session(greeter, identity)
            desktop = await self._start_backend(probe, greeter=False)
        except BackendError as e:
            self._close_pam_session(greeter.session_id)
            self.log.error("desktop for user {username} in session {session_id} did not start: "
                           "{error}; the greeter stays", username=identity.username,
                           session_id=greeter.session_id, error=e.describe())
            raise IcpHandlerError("the desktop could not be started") from e
        if self.registry.get(greeter.session_id) is not greeter:
            desktop.stop()
            raise IcpHandlerError("the client went away during the login")
        self.backends.pop(greeter.session_id, None)  # its exit no longer ends the session
        try:
            self._record(greeter, desktop)
        except StateWriteError as e:
            self._close_pam_session(greeter.session_id)
            desktop.stop()
            if greeter_backend is not None:
                self._watch(greeter, greeter_backend)
            raise IcpHandlerError("session state could not be stored") from e
        try:
            assert greeter.connection_id is not None
            await self._switch(greeter.connection_id, greeter)
        except IcpHandlerError:
            # Back to the greeter first, so that the desktop's exit ends nothing.
            self.backends.pop(greeter.session_id, None)
            if greeter_backend is not None and greeter_backend.running:
                self.registry.set_backend(greeter, greeter_backend.record, decided=False)
                self._watch(greeter, greeter_backend)
            desktop.stop()
            self._close_pam_session(greeter.session_id)
            raise
        try:
            self.registry.log_on(greeter, identity.username, identity.domain,
                                 identity.permission, reason="greeter login")
            self.token_files.issue(greeter)
        except StateWriteError as e:
            await self.end(greeter, "session state could not be stored")
            raise IcpHandlerError("session state could not be stored") from e
        if greeter_backend is not None:
            self.log.info("session {session_id}: stopping the greeter (pid {pid})",
                          session_id=greeter.session_id, pid=greeter_backend.pid)
            greeter_backend.stop()

    async def end_session_request(self, session_id: int) -> bool:
        """SBP EndSession: the greeter (or desktop) asks to end its session."""
        session = self.registry.get(session_id)
        self._check_sbp(session)
        if session is None:
            return False
        await self.end(session, "ended by its backend (SBP EndSession)")
        return True

    # -- the RDP server's notices ---------------------------------------------------------

    async def client_gone(self, session: Session, reason: str) -> None:
        """The session's client connection went away (not asked by us): a
        greeter ends; a user's session waits Disconnected (or ends, by
        session.timeout / session.reconnect)."""
        if not session.logged_on:
            await self.end(session, reason, tell_rdp=False)
            return
        if self.shutting_down:
            # Kept for the next start: no timeout policy while we stop.
            if self.registry.get(session.session_id) is session:
                self.registry.disconnect(session, reason)
            return
        await self._disconnected(session, reason)

    def client_disconnected(self, connection_id: int) -> bool:
        """ICP DisconnectUserSession (ogon's TaskDisconnect for a connection)."""
        session = self.registry.by_connection(connection_id)
        if session is None:
            self.log.info("disconnect for unknown connection {connection_id}",
                          connection_id=connection_id)
            return False
        if session.logged_on and session.state not in (ConnectState.ACTIVE, ConnectState.SHADOW):
            return False
        Deferred.fromCoroutine(self.client_gone(session, "client disconnected"))
        return True

    async def client_logged_off(self, connection_id: int) -> bool:
        """ICP LogoffUserSession from the RDP server: the session ends."""
        session = self.registry.by_connection(connection_id)
        if session is None:
            self.log.info("logoff for unknown connection {connection_id}",
                          connection_id=connection_id)
            return False
        await self.end(session, "logged off by the RDP server", tell_rdp=False)
        return True

    def rdp_server_lost(self) -> None:
        """Every client connection went with the RDP server."""
        for session in list(self.registry):
            if session.connection_id is not None:
                Deferred.fromCoroutine(self.client_gone(session, "RDP server went away"))

    def remote_control_ended(self, spy_connection_id: int) -> bool:
        spy = self.registry.by_connection(spy_connection_id)
        if spy is None:
            return False
        self.registry.set_shadowing(spy, None, decided=False)
        return True

    # -- disconnect, logoff, end -----------------------------------------------------

    async def _tell_logoff(self, connection_id: int, timeout: float | None = None) -> str:
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

    async def _detach(self, session: Session, reason: str) -> None:
        """Take a session's client away for another logon (ogon's
        TaskLogonUser::disconnectSession): LogoffUserSession for its
        connection, then Disconnected, without the timeout policy."""
        if session.state is ConnectState.SHADOW:
            await self.stop_own_shadowing(session)
        if session.connection_id is not None:
            await self._tell_logoff(session.connection_id, self.call_timeout)
        if self.registry.get(session.session_id) is session and (
                session.connection_id is not None
                or session.state is not ConnectState.DISCONNECTED):
            self.registry.disconnect(session, reason)

    async def _disconnected(self, session: Session, reason: str) -> None:
        """Mark the session Disconnected and apply ogon's policy: with
        session.reconnect false or session.timeout 0 it ends at once; with a
        positive timeout it ends that many minutes later; negative: never."""
        if self.registry.get(session.session_id) is not session:
            return
        if session.state is not ConnectState.DISCONNECTED or session.connection_id is not None:
            self.registry.disconnect(session, reason)
        user = session.username
        minutes = self.properties.number_or("session.timeout", user, 0)
        if minutes == 0 or not self.properties.bool_or("session.reconnect", user, True):
            await self.end(session, "disconnected (session.timeout 0 or session.reconnect "
                                    "false)", tell_rdp=False)
            return
        self._schedule_timeout(session)

    def _schedule_timeout(self, session: Session) -> None:
        self._cancel_timeout(session)
        minutes = self.properties.number_or("session.timeout", session.username, 0)
        if minutes < 0 or session.disconnect_time is None:
            return
        delay = max(0.0, session.disconnect_time + minutes * 60 - self.clock.seconds())

        def expire() -> None:
            self._timeouts.pop(session.session_id, None)
            current = self.registry.get(session.session_id)
            if current is not None and current.state is ConnectState.DISCONNECTED:
                self.log.info("session {session_id} of user {username} ends {minutes} minutes "
                              "after its disconnect (session.timeout)",
                              session_id=session.session_id, username=session.username,
                              minutes=minutes)
                Deferred.fromCoroutine(self.end(current, "session.timeout"))

        self._timeouts[session.session_id] = self.clock.callLater(delay, expire)

    def _cancel_timeout(self, session: Session) -> None:
        call = self._timeouts.pop(session.session_id, None)
        if call is not None and call.active():
            call.cancel()

    async def _disconnect(self, session: Session, wait: bool, reason: str) -> bool:
        """ogon's OTS disconnect: stop shadowing, tell the RDP server
        LogoffUserSession (it drops the client), mark Disconnected. With
        ``wait``, only once it answered: False when it does not in time."""
        if session.state is ConnectState.SHADOW:
            await self.stop_own_shadowing(session)
        connection_id = session.connection_id
        if connection_id is None:
            return True
        told = Deferred.fromCoroutine(self._tell_logoff(connection_id, self.call_timeout))
        if wait and await told == "timeout":
            self.log.warn("disconnect of session {session_id}: the RDP server did not "
                          "answer in time", session_id=session.session_id)
            return False
        if self.registry.get(session.session_id) is session \
                and session.connection_id == connection_id:
            await self.client_gone(session, reason)
        return True

    async def disconnect(self, session: Session, wait: bool) -> bool:
        """OTS API disconnectSession."""
        return await self._disconnect(session, wait, "disconnected through the OTS API")

    async def logoff(self, session: Session, wait: bool) -> bool:
        """OTS API logoffSession: the session ends whatever the RDP server
        answers; the result is its answer (with ``wait``), else True."""
        if session.state is ConnectState.SHADOW:
            await self.stop_own_shadowing(session)
        result = True
        connection_id = session.connection_id
        if connection_id is not None:
            told = Deferred.fromCoroutine(self._tell_logoff(connection_id, self.call_timeout))
            if wait:
                result = await told == "loggedoff"
        await self.end(session, "logged off through the OTS API", tell_rdp=False)
        return result

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
            self._cancel_timeout(session)
            if tell_rdp and session.connection_id is not None:
                await self._tell_logoff(session.connection_id, self.call_timeout)
            for spy in self.registry.shadowed_by(session):
                if spy.connection_id is not None:
                    self._stop_shadow_call(spy)
            backend = self.backends.pop(session_id, None)
            self.registry.end(session, reason)
            self._close_pam_session(session_id)
            if backend is not None and backend.running:
                backend.stop()
            elif session.backend is not None and backend is None and not backend_gone:
                self.launcher.kill_orphan(session.backend)
        finally:
            self._ending.discard(session_id)

    # -- shadowing (remote control) ---------------------------------------------------

    async def start_shadow(self, spy: Session, target: Session, hotkey_vk: int,
                           hotkey_modifiers: int, flags: int) -> bool:
        """ogon's TaskStartRemoteControl: the spy must not be shadowing
        already, the target must be Active, both need a client; with
        session.remotecontrol.ask the target's user is asked first."""
        if spy.state is ConnectState.SHADOW:
            self.log.info("session {session_id} is already shadowing", session_id=spy.session_id)
            return False
        if target.state is not ConnectState.ACTIVE:
            self.log.info("remote control of session {target} refused: it is {state}, not "
                          "Active", target=target.session_id, state=target.state.name)
            return False
        if spy.connection_id is None or target.connection_id is None:
            self.log.info("remote control {spy} -> {target} refused: a session has no client",
                          spy=spy.session_id, target=target.session_id)
            return False
        if self.properties.bool_or("session.remotecontrol.ask", target.username, False):
            if not await self._ask_remote_control(spy, target):
                return False
        request = ICP_pb2.OtsApiStartRemoteControlRequest(
            connectionId=spy.connection_id, targetConnectionId=target.connection_id,
            hotKeyVk=hotkey_vk & 0xFF, hotKeyModifiers=hotkey_modifiers & 0xFFFF,
            flags=flags & 0xFFFFFFFF)
        try:
            response = await self.rdp.call(icp.MSG_START_REMOTE_CONTROL, request,
                                           self.call_timeout)
        except IcpError as e:
            self.log.warn("remote control {spy} -> {target} failed: {error}",
                          spy=spy.session_id, target=target.session_id, error=str(e))
            return False
        if not response.success:
            return False
        if self.registry.get(spy.session_id) is spy and self.registry.get(
                target.session_id) is target:
            try:
                self.registry.set_shadowing(spy, target)
            except StateWriteError:
                self._stop_shadow_call(spy)
                return False
        return True

    async def _ask_remote_control(self, spy: Session, target: Session) -> bool:
        assert target.connection_id is not None
        request = ICP_pb2.MessageRequest(
            connectionId=target.connection_id, type=MESSAGE_REQUEST_REMOTE_CONTROL,
            style=MB_YESNO, timeout=REMOTE_CONTROL_ASK_TIMEOUT, parameterNum=2,
            parameter1=spy.username, parameter2="")
        try:
            response = await self.rdp.call(icp.MSG_MESSAGE, request,
                                           REMOTE_CONTROL_ASK_TIMEOUT + 1)
        except IcpError as e:
            self.log.info("remote control request to session {target}: {error}",
                          target=target.session_id, error=str(e))
            return False
        if response.result != IDYES:
            self.log.info("user of session {target} did not allow remote control by session "
                          "{spy}", target=target.session_id, spy=spy.session_id)
            return False
        return True

    def _stop_shadow_call(self, spy: Session) -> Deferred[bool]:
        assert spy.connection_id is not None
        d = self.rdp.call(icp.MSG_STOP_REMOTE_CONTROL, ICP_pb2.OtsApiStopRemoteControlRequest(
            connectionId=spy.connection_id), self.call_timeout)

        def answered(response: Any) -> bool:
            if self.registry.get(spy.session_id) is spy and spy.shadowing is not None:
                self.registry.set_shadowing(spy, None, decided=False)
            return True

        def failed(failure: Any) -> bool:
            failure.trap(IcpError)
            self.log.warn("stopping the shadowing of session {session_id}: {error}",
                          session_id=spy.session_id, error=failure.getErrorMessage())
            return False

        return d.addCallbacks(answered, failed)

    async def stop_own_shadowing(self, spy: Session) -> bool:
        if spy.shadowing is None or spy.connection_id is None:
            return True
        return bool(await self._stop_shadow_call(spy))

    async def stop_shadowing(self, session: Session) -> bool:
        """OTS stopRemoteControlSession: stop every session shadowing
        ``session`` (ogon) and ``session``'s own shadowing (WTSAPI's sense)."""
        for spy in [*self.registry.shadowed_by(session),
                    *([session] if session.shadowing is not None else [])]:
            if spy.connection_id is not None:
                await self._stop_shadow_call(spy)
        return True

    # -- restart and shutdown -------------------------------------------------------

    def adopt(self, kept: list[Session], dropped: list[Session]) -> None:
        """After a restart: watch each restored session's backend again, or
        end the session when its backend is gone; stop the backends of
        greeter sessions that did not survive; schedule session.timeout."""
        for session in dropped:
            if session.backend is not None:
                self.launcher.kill_orphan(session.backend)
        for session in kept:
            record = session.backend
            module = self.modules.get(record.module) if record is not None else None
            backend = None
            if record is not None and module is not None:
                backend = self.launcher.adopt(session.session_id, module, record)
            if backend is None:
                self.log.info("session {session_id}: its backend is gone; ending it",
                              session_id=session.session_id)
                Deferred.fromCoroutine(self.end(session, "backend gone after restart",
                                                tell_rdp=False, backend_gone=True))
                continue
            self._watch(session, backend)
            if session.state is ConnectState.DISCONNECTED:
                self._schedule_timeout(session)

    async def shutdown(self) -> None:
        """The bridge stops: greeter sessions end (nothing can resume them);
        user sessions and their backends stay for the next start."""
        self.shutting_down = True
        for session in list(self.registry):
            if not session.logged_on:
                await self.end(session, "bridge stopping", tell_rdp=False)
        # User sessions' backends outlive the bridge: stop watching them.
        self.backends.clear()
        for call in self._timeouts.values():
            if call.active():
                call.cancel()
        self._timeouts.clear()
        self.launcher.close()



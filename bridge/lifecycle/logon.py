"""ICP LogonUser: a client connection gets its session, and the RDP server
the endpoint of the session's backend."""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from bridge.backends.modules import BackendError, SessionBackend
from bridge.lifecycle.authentication import LogonAuthentication
from bridge.lifecycle.ending import SessionEnding
from bridge.lifecycle.policies import SessionPolicies
from bridge.lifecycle.runner import BackendRunner
from bridge.lifecycle.runtime import LogonAnswer, SessionRuntime, stored
from bridge.security.auth import Identity, is_user_name
from bridge.security.token_files import SessionTokenFiles
from bridge.sessions.model import ClientInfo, Session, StateWriteError
from bridge.sessions.registry import SessionRegistry
from protocols.errors import IcpHandlerError


class Logon:
    """Chooses and starts a session for LogonUser. With good credentials:
    the session the policies pick (a reconnect or a take-over) or a new one
    running the user's desktop; without, or when the desktop does not
    start: a greeter session. Answers once the backend is ready."""

    log = Logger()

    def __init__(self, registry: SessionRegistry, runtime: SessionRuntime,
                 authentication: LogonAuthentication, policies: SessionPolicies,
                 ending: SessionEnding, runner: BackendRunner,
                 token_files: SessionTokenFiles, cookie: Callable[[], str]) -> None:
        self.registry = registry
        self.runtime = runtime
        self.authentication = authentication
        self.policies = policies
        self.ending = ending
        self.runner = runner
        self.token_files = token_files
        self.cookie = cookie

    async def logon_user(self, connection_id: int, username: str, password: str,
                         domain: str, client: ClientInfo) -> LogonAnswer:
        """ICP LogonUser: authenticate, pick or start the session, answer its
        endpoint once the backend is ready. Raises IcpHandlerError (FAILED)."""
        if self.runtime.shutting_down:
            raise IcpHandlerError("the session manager is shutting down")
        old = self.registry.by_connection(connection_id)
        if old is not None:
            # The RDP server reuses an id only for a new client: the old one is gone.
            await self.policies.client_gone(old, "connection id reused by a new logon")
        identity = None
        if username:
            identity = await self.authentication.authenticate(
                username, password, domain, f"connection {connection_id}", client.address)
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

    @staticmethod
    def _clamped(client: ClientInfo, max_width: int, max_height: int) -> ClientInfo:
        width, height = client.initial_width or client.width, client.initial_height or client.height
        return ClientInfo(**{
            **client.__dict__, "initial_width": width, "initial_height": height,
            "width": min(width, max_width) if max_width else width,
            "height": min(height, max_height) if max_height else height,
        })

    async def _user_logon(self, connection_id: int, client: ClientInfo,
                          identity: Identity) -> LogonAnswer:
        target = await self.policies.session_for(identity, client.host_name)
        max_width, max_height = self.runner.max_size(identity.username)
        client = self._clamped(client, max_width, max_height)
        if target is not None:
            self.authentication.release(identity)
            await self.policies.take_over(target, "logon")
            self.runtime.cancel_timeout(target)
            with stored():
                self.registry.reconnect(target, connection_id, client)
            return self.runner.answer_for(target)
        try:
            session = self.registry.create(
                connection_id, client, identity.username, identity.domain, identity.permission,
                cookies=(self.cookie(), self.cookie()))
        except StateWriteError as e:
            self.authentication.release(identity)
            raise IcpHandlerError("session state could not be stored") from e
        try:
            if self.runner.runs_own_pam_session(session):
                self.authentication.release(identity)  # ogon's launcher opens its own
            else:
                await self.authentication.open_pam_session(session, identity)
            backend = await self.runner.start(session, greeter=False)
        except BackendError:
            self.authentication.close_pam_session(session.session_id)
            self.registry.end(session, "desktop did not start")
            raise
        await self._backend_ready(session, backend, identity)
        return self.runner.answer_for(session)

    def _typed(self, connection_id: int, what: str, text: str) -> str:
        """What the client typed, for the greeter's environment (OGON_USER,
        OGON_DOMAIN); "" when it is no name (a NUL or another control
        character, over 256 characters), which would fail the greeter's exec."""
        if not text or is_user_name(text):
            return text
        self.log.warn("connection {connection_id}: the typed {what} is not a name ({length} "
                      "characters{nul}); the greeter starts without it",
                      connection_id=connection_id, what=what, length=len(text),
                      nul=", a NUL among them" if "\0" in text else "")
        return ""

    async def _greeter_logon(self, connection_id: int, client: ClientInfo, typed_user: str,
                             typed_domain: str) -> LogonAnswer:
        typed_user = self._typed(connection_id, "user name", typed_user)
        typed_domain = self._typed(connection_id, "domain", typed_domain)
        max_width, max_height = self.runner.max_size("")
        client = self._clamped(client, max_width, max_height)
        with stored():
            session = self.registry.create(connection_id, client,
                                           cookies=(self.cookie(), self.cookie()))
        try:
            backend = await self.runner.start(session, greeter=True, typed_user=typed_user,
                                              typed_domain=typed_domain)
        except BackendError as e:
            self.log.error("greeter for connection {connection_id} did not start: {error}",
                           connection_id=connection_id, error=e.describe())
            self.registry.end(session, "greeter did not start")
            raise IcpHandlerError("the greeter could not be started") from e
        await self._backend_ready(session, backend, None)
        return self.runner.answer_for(session)

    async def _backend_ready(self, session: Session, backend: SessionBackend,
                             identity: Identity | None) -> None:
        """The backend a logon started is the session's: recorded, the
        session Connected (and, for a desktop, the user logged on with a
        token file). Raises IcpHandlerError when the client went away
        meanwhile or the state cannot be stored."""
        if self.registry.get(session.session_id) is not session:
            backend.stop()  # the client went away while the backend started
            raise IcpHandlerError("the client went away during logon")
        try:
            self.runner.record(session, backend)
            self.registry.connected(session)
            if identity is not None:
                self.registry.log_on(session, identity.username, identity.domain,
                                     identity.permission)
                self.token_files.issue(session)
        except StateWriteError as e:
            await self.ending.end(session, "session state could not be stored")
            raise IcpHandlerError("session state could not be stored") from e

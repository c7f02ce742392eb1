"""ogon's session policies: which session a user's logon gets, and what
happens when a session's client goes (session.reconnect,
.reconnect.fromSameClient, .singleSession, .timeout)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.lifecycle.ending import SessionEnding
from bridge.lifecycle.remote_control import RemoteControl
from bridge.lifecycle.runtime import SessionRuntime
from bridge.security.auth import Identity
from bridge.sessions.model import ConnectState, Session
from bridge.sessions.properties import PropertyTable
from bridge.sessions.registry import SessionRegistry
from protocols.errors import IcpHandlerError


class SessionPolicies:
    """Decides and applies ogon's policies. At a logon: reconnect to a
    disconnected session, take over the user's single session, or replace
    it. When a client goes (it left, the RDP server said so or went away,
    an admin disconnected it): a greeter session ends; a user's waits
    Disconnected for ``session.timeout`` minutes (0: it ends at once;
    negative: forever)."""

    log = Logger()

    def __init__(self, registry: SessionRegistry, properties: PropertyTable,
                 clock: IReactorTime, runtime: SessionRuntime, ending: SessionEnding,
                 remote_control: RemoteControl, call_timeout: float) -> None:
        self.registry = registry
        self.properties = properties
        self.clock = clock
        self.runtime = runtime
        self.ending = ending
        self.remote_control = remote_control
        self.call_timeout = call_timeout
        # In a farm: what a user's logon asks of the other hosts first
        # (session.farm.singleSession, bridge.farm.policies); never raises.
        self.before_logon: Callable[[Identity], Awaitable[None]] | None = None

    # -- a logon -------------------------------------------------------------------

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

    async def session_for(self, identity: Identity, client_host: str) -> Session | None:
        """The session a user who logged on (LogonUser or the greeter) gets:
        one to reconnect to or take over, or None for a new one; a single
        session it replaces is ended first."""
        if self.before_logon is not None:
            await self.before_logon(identity)
        target, replace = self._choose(identity, client_host)
        if replace is not None:
            await self.ending.end(replace, "single session: replaced by a new logon")
        return target

    async def take_over(self, target: Session, by: str) -> None:
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

    async def _detach(self, session: Session, reason: str) -> None:
        """Take a session's client away for another logon (ogon's
        TaskLogonUser::disconnectSession): LogoffUserSession for its
        connection, then Disconnected, without the timeout policy."""
        if session.state is ConnectState.SHADOW:
            await self.remote_control.stop_own_shadowing(session)
        if session.connection_id is not None:
            await self.ending.tell_logoff(session.connection_id, self.call_timeout)
        if self.registry.get(session.session_id) is session and (
                session.connection_id is not None
                or session.state is not ConnectState.DISCONNECTED):
            self.registry.disconnect(session, reason)

    # -- a client that goes ---------------------------------------------------------

    async def client_gone(self, session: Session, reason: str) -> None:
        """The session's client connection went away (not asked by us): a
        greeter ends; a user's session waits Disconnected (or ends, by
        session.timeout / session.reconnect)."""
        if not session.logged_on:
            await self.ending.end(session, reason, tell_rdp=False)
            return
        if self.runtime.shutting_down:
            # Kept for the next start: no timeout policy while we stop.
            if self.registry.get(session.session_id) is session:
                self.registry.disconnect(session, reason)
            return
        await self._disconnected(session, reason)

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
            await self.ending.end(session, "disconnected (session.timeout 0 or "
                                           "session.reconnect false)", tell_rdp=False)
            return
        self.schedule_timeout(session)

    def schedule_timeout(self, session: Session) -> None:
        """End the Disconnected session ``session.timeout`` minutes after
        its disconnect (counted across restarts), unless it is negative."""
        self.runtime.cancel_timeout(session)
        minutes = self.properties.number_or("session.timeout", session.username, 0)
        if minutes < 0 or session.disconnect_time is None:
            return
        delay = max(0.0, session.disconnect_time + minutes * 60 - self.clock.seconds())

        def expire() -> None:
            self.runtime.timeouts.pop(session.session_id, None)
            current = self.registry.get(session.session_id)
            if current is not None and current.state is ConnectState.DISCONNECTED:
                self.log.info("session {session_id} of user {username} ends {minutes} minutes "
                              "after its disconnect (session.timeout)",
                              session_id=session.session_id, username=session.username,
                              minutes=minutes)
                Deferred.fromCoroutine(self.ending.end(current, "session.timeout"))

        self.runtime.timeouts[session.session_id] = self.clock.callLater(delay, expire)

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

    def rdp_server_lost(self) -> None:
        """Every client connection went with the RDP server."""
        for session in list(self.registry):
            if session.connection_id is not None:
                Deferred.fromCoroutine(self.client_gone(session, "RDP server went away"))

    async def disconnect(self, session: Session, wait: bool,
                         reason: str = "disconnected through the OTS API") -> bool:
        """OTS API disconnectSession (ogon's OTS disconnect): stop shadowing,
        tell the RDP server LogoffUserSession (it drops the client), mark
        Disconnected. With ``wait``, only once it answered: False when it
        does not in time. ``reason`` goes to the log and the journal."""
        if session.state is ConnectState.SHADOW:
            await self.remote_control.stop_own_shadowing(session)
        connection_id = session.connection_id
        if connection_id is None:
            return True
        told = Deferred.fromCoroutine(self.ending.tell_logoff(connection_id, self.call_timeout))
        if wait and await told == "timeout":
            self.log.warn("disconnect of session {session_id}: the RDP server did not "
                          "answer in time", session_id=session.session_id)
            return False
        if self.registry.get(session.session_id) is session \
                and session.connection_id == connection_id:
            await self.client_gone(session, reason)
        return True

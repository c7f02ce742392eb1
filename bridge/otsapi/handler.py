"""The OTS API handler: the fourteen ``otsapi`` methods with ogon's semantics.

Methods that need the RDP server send an ICP request and return a Deferred;
every refusal or failure answers the method's failure value (WIRE.md
section 2), marked ``refused`` or ``failed`` for the call counts, and logs
one line saying why. Logoff, disconnect and message are the
``SessionActions`` the admin endpoint shares. Method and argument names
are those of the IDL, since the Thrift server calls them by wire name.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from bridge.lifecycle.facade import SessionLifecycle
from bridge.lifecycle.runtime import RdpCaller
from bridge.otsapi.actions import Actor, NoClientError, SessionActions
from bridge.otsapi.readonly import WTS_CURRENT_SESSION
from bridge.otsapi.virtual_channels import VirtualChannelCalls
from bridge.security.auth import Authenticator, Identity, is_user_name, logon_allowed
from bridge.security.permissions import Permission, ogon_level
from bridge.security.throttle import OTSAPI, LogonGuard
from bridge.security.tokens import TokenRecord, TokenStore
from bridge.sessions.model import StateWriteError
from bridge.sessions.properties import ChannelPolicy, PropertyTable
from bridge.sessions.registry import SessionRegistry
from protocols.generated.otsapi_blocking.ttypes import (
    TReturnLogonConnection,
)
from protocols.thrift_server import Outcome, current_peer, current_source, failed, refused

#: The way in, as the journal's reasons name it.
VIA = "the OTS API"


class OtsApiHandler(VirtualChannelCalls):
    """Implements ``service otsapi``."""

    # Only these read current_peer (the client's address) and current_source
    # (who it is): for throttling, and to say who ended, disconnected or
    # messaged a session.
    methods_wanting_peer = frozenset({"logonConnection", "logoffSession", "disconnectSession",
                                      "sendMessage"})

    def __init__(self, registry: SessionRegistry, tokens: TokenStore, rdp: RdpCaller,
                 authenticator: Authenticator | LogonGuard,
                 lifecycle: SessionLifecycle, properties: PropertyTable,
                 channels: ChannelPolicy, token_lifetime: float,
                 pam_levels: bool = False, actions: SessionActions | None = None) -> None:
        """``token_lifetime``: a logon token's life without use (seconds).
        ``pam_levels``: users authenticate through PAM, so a user's level is
        the ``permission.level`` property. ``actions``: logoff, disconnect
        and message, shared with the admin endpoint (default: its own)."""
        super().__init__(registry, tokens, rdp, channels)
        self.registry: SessionRegistry = registry
        self.guard = LogonGuard.around(authenticator, registry.clock)
        self.token_lifetime = token_lifetime
        self.pam_levels = pam_levels
        self.lifecycle = lifecycle
        self.properties = properties
        self.actions = actions or SessionActions(lifecycle, rdp, registry.clock)

    # -- helpers --------------------------------------------------------------

    def _actor(self, record: TokenRecord) -> Actor:
        return Actor(record.username, VIA, current_peer.get())

    @staticmethod
    def _done(result: bool) -> bool | Outcome:
        """A lifecycle action's result: False is a failure (logged there)."""
        return result if result else failed(False)

    def _lifecycle(self, method: str, session_id: int, work: Any
                   ) -> Deferred[bool | Outcome]:
        """Run a lifecycle coroutine; a stored-state failure answers False."""
        def not_stored(failure: Failure) -> Outcome:
            failure.trap(StateWriteError)
            self.log.warn("{method} for session {session_id} failed: {reason}",
                          method=method, session_id=session_id,
                          reason=failure.getErrorMessage())
            return failed(False)

        return Deferred.fromCoroutine(work).addCallbacks(self._done, not_stored)

    # -- local methods --------------------------------------------------------

    def logonConnection(self, username: str | None, password: str | None, domain: str | None
                        ) -> TReturnLogonConnection | Outcome | Deferred[Any]:
        username, domain = username or "", domain or ""
        refusal = refused(TReturnLogonConnection(success=False, authToken=""))

        def decided(identity: Identity | None) -> TReturnLogonConnection | Outcome:
            if identity is None:
                # A guesser causes one per attempt: rate-limited (the guard
                # counts them).
                self.guard.log_limit.warn(self.log, "failed OTS API logon",
                                          "failed OTS API logon for user {username}",
                                          username=username)
                return refusal
            if self.pam_levels:
                level = self.properties.get_string("permission.level", identity.username)
                identity = Identity(identity.username, identity.domain, ogon_level(level))
            try:
                token = self.tokens.issue(identity, lifetime=self.token_lifetime)
            except StateWriteError as e:
                self.log.error("OTS API logon for user {username} failed: {error}",
                               username=username, error=str(e))
                return failed(TReturnLogonConnection(success=False, authToken=""))
            self.log.info("OTS API logon for user {username}", username=username)
            return TReturnLogonConnection(success=True, authToken=token)

        if not username or not is_user_name(username):
            self.guard.log_limit.warn(self.log, "OTS API logon not a name",
                                      "OTS API logon refused: no user name, or not a name")
            return refusal
        if not logon_allowed(self.properties, username):
            self.guard.log_limit.warn(self.log, "OTS API logon groups",
                                      "OTS API logon of user {username} refused by "
                                      "permission.groups.whiteList/blackList", username=username)
            return refusal
        return Deferred.fromCoroutine(self.guard.authenticate(
            username, password or "", domain, current_source.get(), OTSAPI)).addCallback(decided)

    def logoffConnection(self, authToken: str | None) -> bool | Outcome:
        try:
            return self.tokens.revoke(authToken or "") or refused(False)
        except StateWriteError as e:
            self.log.error("logoffConnection failed: {error}", error=str(e))
            return failed(False)

    # -- bridged methods -------------------------------------------------------

    def disconnectSession(self, authToken: str | None, sessionId: int | None,
                          wait: bool | None) -> bool | Outcome | Deferred[Any]:
        """ogon's TaskDisconnect: LogoffUserSession for the session's
        connection (the RDP server drops the client), then Disconnected;
        without ``wait`` True as soon as that is sent."""
        auth = self._authorize("disconnectSession", authToken, sessionId, Permission.DISCONNECT)
        if auth is None:
            return refused(False)
        record, session = auth
        return self.actions.disconnect(session, bool(wait), self._actor(record)).addCallback(
            self._done)

    def logoffSession(self, authToken: str | None, sessionId: int | None,
                      wait: bool | None) -> bool | Outcome | Deferred[Any]:
        """ogon's TaskLogoff: the session ends whatever the RDP server
        answers; with ``wait`` the answer is the RDP server's."""
        auth = self._authorize("logoffSession", authToken, sessionId, Permission.LOGOFF)
        if auth is None:
            return refused(False)
        record, session = auth
        return self.actions.logoff(session, bool(wait), self._actor(record)).addCallback(
            self._done)

    def startRemoteControlSession(self, authToken: str | None, sourceLogonId: int | None,
                                  targetLogonId: int | None, HotkeyVk: int | None,
                                  HotkeyModifiers: int | None, flags: int | None
                                  ) -> bool | Outcome | Deferred[Any]:
        """As ogon: only with a session token, from its own session, with
        the session's REMOTE_CONTROL right, onto an Active session."""
        method = "startRemoteControlSession"
        record = self.tokens.lookup(authToken or "")
        if record is None or record.session_id is None:
            self._refuse(method, sourceLogonId, "needs the token of the caller's session")
            return refused(False)
        source_id = record.session_id if sourceLogonId in (None, WTS_CURRENT_SESSION) \
            else sourceLogonId
        if source_id != record.session_id:
            self._refuse(method, sourceLogonId, "can only start from the token's own session")
            return refused(False)
        if targetLogonId == source_id:
            self._refuse(method, sourceLogonId, "a session cannot shadow itself")
            return refused(False)
        if not record.permission & Permission.REMOTE_CONTROL:
            self._refuse(method, sourceLogonId, "token lacks REMOTE_CONTROL")
            return refused(False)
        spy = self.registry.get(source_id)
        target = self.registry.get(targetLogonId) if targetLogonId is not None else None
        if spy is None or target is None:
            self._refuse(method, targetLogonId, "no such session")
            return refused(False)
        return self._lifecycle(method, source_id, self.lifecycle.start_shadow(
            spy, target, HotkeyVk or 0, HotkeyModifiers or 0, flags or 0))

    def stopRemoteControlSession(self, authToken: str | None, sourceLogonId: int | None,
                                 targetLogonId: int | None
                                 ) -> bool | Outcome | Deferred[Any]:
        """Stops the shadowing that involves ``sourceLogonId``: of every
        session shadowing it (ogon) and its own, if it is shadowing."""
        method = "stopRemoteControlSession"
        auth = self._authorize(method, authToken, sourceLogonId, Permission.REMOTE_CONTROL)
        if auth is None:
            return refused(False)
        session = auth[1]
        return self._lifecycle(method, session.session_id,
                               self.lifecycle.stop_shadowing(session))

    def sendMessage(self, authToken: str | None, sessionId: int | None, title: str | None,
                    message: str | None, style: int | None, timeout: int | None,
                    wait: bool | None) -> int | Outcome | Deferred[Any]:
        """ogon's sendMessage (SessionActions.message): IDASYNC once sent,
        or with ``wait`` the user's answer or IDTIMEOUT; 0 on failure."""
        method = "sendMessage"
        auth = self._authorize(method, authToken, sessionId, Permission.MESSAGE)
        if auth is None:
            return refused(0)
        record, session = auth
        try:
            result = self.actions.message(session, title or "", message or "", style or 0,
                                          timeout or 0, bool(wait), self._actor(record))
        except NoClientError:
            self._refuse(method, session.session_id, "session has no client connection")
            return refused(0)
        if isinstance(result, Deferred):
            return result.addCallback(lambda answer: answer or failed(0))
        return result or failed(0)

"""A logon's credentials, checked for the lifecycle (ICP LogonUser and the
greeter's SBP login alike), and the PAM session a user's desktop runs in."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

from bridge.security.auth import Authenticator, Identity, is_user_name, logon_allowed
from bridge.security.throttle import RDP, LogonGuard
from bridge.sessions.model import Session
from bridge.sessions.properties import PropertyTable


class LogonAuthentication:
    """Checks a logon from the RDP side: a user name that is a name, ogon's
    group rule (``permission.groups.*``), then the LogonGuard (throttling,
    lockouts) and the authenticator behind it. With PAM the handle of an
    accepted logon is kept for the PAM session its desktop runs in, which
    this object opens and closes.

    Invariant: ``_pam_closers`` holds a closer exactly for the sessions whose
    PAM session is open.
    """

    log = Logger()

    def __init__(self, guard: LogonGuard, properties: PropertyTable) -> None:
        self.guard = guard
        self.properties = properties
        self._pam_closers: dict[int, Callable[[], Deferred[Any]]] = {}

    @property
    def authenticator(self) -> Authenticator:
        return self.guard.authenticator

    async def authenticate(self, username: str, password: str, domain: str,
                           where: str, source: str) -> Identity | None:
        """The Identity, or None (logged) when the logon is not accepted.
        ``where`` names the connection or greeter for the log; ``source`` is
        the client's address, for throttling."""
        if not is_user_name(username):
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
            # A guesser causes one per attempt: rate-limited (the guard
            # counts them).
            self.guard.log_limit.emit(self.log, LogLevel.info, "not accepted",
                                      "logon of user {username} ({where}) not accepted",
                                      username=username, where=where)
        return identity

    def release(self, identity: Identity) -> None:
        """The identity starts no desktop: end its PAM handle, if any."""
        release = getattr(self.authenticator, "release", None)
        if identity.pam is not None and release is not None:
            release(identity)

    async def open_pam_session(self, session: Session, identity: Identity) -> None:
        """With PAM, a desktop runs inside a PAM session, closed at its end."""
        opener = getattr(self.authenticator, "open_session", None)
        if opener is None or identity.pam is None:
            return
        closer = await opener(identity)
        if closer is not None:
            self._pam_closers[session.session_id] = closer

    def close_pam_session(self, session_id: int) -> None:
        closer = self._pam_closers.pop(session_id, None)
        if closer is not None:
            closer().addErrback(lambda f: self.log.failure(
                "closing the PAM session of session {session_id} failed", f,
                session_id=session_id))

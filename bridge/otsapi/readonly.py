"""The OTS API methods that only read: what a process answers from the
sessions and tokens it knows, without the RDP server or a state change.

The main process answers them (``OtsApiHandler`` inherits these), and so
do the OTS API worker processes (``bridge.otsapi.worker``) from their copy
of the sessions and tokens: the same code, so the same answers. Every
refusal is an ``Outcome`` marked refused (and logged through ``_refuse``
where the method logs one): a worker turns it into "ask the main process",
which then decides, logs and counts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.otsapi.session_info import session_info
from bridge.security.permissions import Permission
from bridge.security.tokens import TokenRecord
from bridge.sessions.model import Session
from protocols.generated.otsapi_blocking.ttypes import (
    TReturnEnumerateSession,
    TReturnQuerySessionInformation,
    TSessionInfo,
    TVersion,
)
from protocols.thrift_server import Outcome, refused

VERSION = (1, 1)
WTS_CURRENT_SESSION = -1


class Sessions(Protocol):
    """The sessions a process knows (the registry, or a worker's copy)."""

    clock: IReactorTime

    def __iter__(self) -> Iterator[Session]:
        """In session id order."""
        ...

    def get(self, session_id: int) -> Session | None: ...


class Tokens(Protocol):
    def lookup(self, token: str) -> TokenRecord | None:
        """The token's live record (its use counts as use), else None."""
        ...


class ReadOnlyCalls:
    """ping, getVersionInfo, getPermissionForToken, enumerateSessions and
    querySessionInformation, and the token check the other methods share."""

    log = Logger()

    def __init__(self, registry: Sessions, tokens: Tokens) -> None:
        self.registry = registry
        self.tokens = tokens

    # -- helpers --------------------------------------------------------------

    def _refuse(self, method: str, session_id: int | None, reason: str) -> None:
        self.log.info("{method} for session {session_id} refused: {reason}",
                      method=method, session_id=session_id, reason=reason)

    @staticmethod
    def _owns(record: TokenRecord, session: Session) -> bool:
        if record.session_id is not None:
            return record.session_id == session.session_id
        return (session.logged_on and session.username == record.username
                and session.domain.lower() == record.domain.lower())

    def _authorize(self, method: str, token: str | None, session_id: int | None,
                   flag: Permission) -> tuple[TokenRecord, Session] | None:
        """The token's record and the session it may act on with ``flag``,
        or None (logged) when it may not (ogon's getSessionAndCheckForPerm:
        a token may do anything to its own session, needs the flag for
        another's)."""
        record = self.tokens.lookup(token or "")
        if record is None:
            self._refuse(method, session_id, "unknown or expired token")
            return None
        if session_id is None or session_id == WTS_CURRENT_SESSION:
            if record.session_id is None:
                self._refuse(method, session_id,
                             "WTS_CURRENT_SESSION needs a session token")
                return None
            session_id = record.session_id
        session = self.registry.get(session_id)
        if session is None:
            self._refuse(method, session_id, "no such session")
            return None
        if not self._owns(record, session) and (record.permission & flag) != flag:
            self._refuse(method, session_id, f"token lacks {flag.name}")
            return None
        return record, session

    # -- methods that only read ------------------------------------------------

    def getVersionInfo(self, versionInfo: TVersion | None) -> TVersion:
        return TVersion(VersionMajor=VERSION[0], VersionMinor=VERSION[1])

    def ping(self, input: int | None) -> int:
        return input or 0

    def getPermissionForToken(self, authToken: str | None) -> int | Outcome:
        record = self.tokens.lookup(authToken or "")
        return record.permission if record is not None else refused(0)

    def enumerateSessions(self, authToken: str | None, Version: int | None
                          ) -> TReturnEnumerateSession | Outcome:
        record = self.tokens.lookup(authToken or "")
        if record is None:
            self._refuse("enumerateSessions", None, "unknown or expired token")
            return refused(TReturnEnumerateSession(returnValue=False, sessionInfoList=[]))
        if not record.permission & Permission.QUERY_INFORMATION:
            self._refuse("enumerateSessions", None, "token lacks QUERY_INFORMATION")
            return refused(TReturnEnumerateSession(returnValue=False, sessionInfoList=[]))
        sessions = [
            TSessionInfo(sessionId=s.session_id, winStationName=s.win_station_name,
                         connectState=int(s.state))
            for s in self.registry
        ]
        return TReturnEnumerateSession(returnValue=True, sessionInfoList=sessions)

    def querySessionInformation(self, authToken: str | None, sessionId: int | None,
                                infoClass: int | None
                                ) -> TReturnQuerySessionInformation | Outcome:
        refusal = refused(TReturnQuerySessionInformation(returnValue=False))
        auth = self._authorize("querySessionInformation", authToken, sessionId,
                               Permission.QUERY_INFORMATION)
        if auth is None:
            return refusal
        value = session_info(auth[1], infoClass, self.registry.clock)
        if value is None:
            self._refuse("querySessionInformation", sessionId,
                         f"info class {infoClass} not available")
            return refusal
        return TReturnQuerySessionInformation(returnValue=True, infoValue=value)

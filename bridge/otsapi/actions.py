"""What an admin does to a session — log it off, disconnect it, show its
user a message — carried out one way whoever asks: the OTS API methods
(logoffSession, disconnectSession, sendMessage) and the admin endpoint's
``POST /sessions/<id>/...`` routes both call :class:`SessionActions`,
after each checked the caller in its own way. A farm will hold one per
host and pick it by the session's host; the actions themselves stay here.

Every action says who asked (:class:`Actor`): the token's user, the way in
and the client's address go to the log and, for a logoff or a
disconnect, into the journal event's reason ("logged off through the OTS
API by alice from 127.0.0.1").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from bridge.lifecycle.facade import SessionLifecycle
from bridge.lifecycle.runtime import RdpCaller
from bridge.otsapi.session_info import signed
from bridge.sessions.model import Session, StateWriteError
from protocols import icp
from protocols.errors import IcpError, IcpTimeoutError
from protocols.generated import ICP_pb2
from protocols.loglimit import LogLimiter

#: include/ogon/message.h: the only Message type sendMessage sends.
MESSAGE_CUSTOM_TYPE = 1
#: WTSSendMessage's answers when there is no click (wtsapi.h).
IDTIMEOUT = 32000
IDASYNC = 32001


@dataclass(frozen=True)
class Actor:
    """Who asks for an action: the token's user, the way in ("the OTS
    API", "the admin endpoint") and the client's address ("" unknown)."""

    username: str
    via: str
    source: str = ""

    def describe(self) -> str:
        """"through the OTS API by alice from 127.0.0.1"."""
        source = f" from {self.source}" if self.source else ""
        return f"through {self.via} by {self.username or '(no user)'}{source}"


class NoClientError(Exception):
    """The session has no client connection (Disconnected): nobody to
    show a message to."""


class SessionActions:
    """Logoff, disconnect and message for one bridge's sessions, as ogon's
    TaskLogoff, TaskDisconnect and sendMessage do them."""

    log = Logger()

    def __init__(self, lifecycle: SessionLifecycle, rdp: RdpCaller, clock: IReactorTime
                 ) -> None:
        self.lifecycle = lifecycle
        self.rdp = rdp
        # A failing RDP server fails every message alike: one line per 10 s.
        self.log_limit = LogLimiter(clock)

    def logoff(self, session: Session, wait: bool, actor: Actor) -> Deferred[bool]:
        """The session ends whatever the RDP server answers; fires with its
        answer (``wait``) or True; False when the end could not be stored."""
        return self._run("logoff", session, self.lifecycle.logoff(
            session, wait, f"logged off {actor.describe()}"))

    def disconnect(self, session: Session, wait: bool, actor: Actor) -> Deferred[bool]:
        """The RDP server drops the client; the session waits Disconnected
        (or ends, by its policy). With ``wait``: False when the RDP server
        does not answer in time."""
        return self._run("disconnect", session, self.lifecycle.disconnect(
            session, wait, f"disconnected {actor.describe()}"))

    def _run(self, action: str, session: Session, work: object) -> Deferred[bool]:
        def failed(failure: Failure) -> bool:
            failure.trap(StateWriteError)
            self.log.warn("{action} of session {session_id} failed: {reason}",
                          action=action, session_id=session.session_id,
                          reason=failure.getErrorMessage())
            return False

        return Deferred.fromCoroutine(work).addErrback(failed)  # type: ignore[arg-type]

    def message(self, session: Session, title: str, text: str, style: int, timeout: int,
                wait: bool, actor: Actor) -> int | Deferred[int]:
        """ogon's sendMessage: a MESSAGE_CUSTOM_TYPE box with the title and
        text. Without ``wait``: IDASYNC once sent (0 when it cannot be).
        With: the user's answer, or IDTIMEOUT when ``timeout`` seconds pass
        (0: as long as the RDP server keeps the box) or the RDP server
        answers 0; 0 when the RDP server fails it. Raises NoClientError."""
        connection_id = session.connection_id
        if connection_id is None:
            raise NoClientError(f"session {session.session_id} has no client connection")
        seconds = max(timeout, 0)
        self.log.info("message to session {session_id} {who} ({length} characters)",
                      session_id=session.session_id, who=actor.describe(),
                      length=len(title) + len(text))
        request = ICP_pb2.MessageRequest(
            connectionId=connection_id, type=MESSAGE_CUSTOM_TYPE, style=style & 0xFFFFFFFF,
            timeout=seconds, parameterNum=2, parameter1=title, parameter2=text,
        )
        d = self.rdp.call(icp.MSG_MESSAGE, request, seconds if seconds else math.inf)
        if not wait:
            d.addErrback(self._message_failed, session)
            # Fired already: it could not even be sent (no RDP server).
            return 0 if d.called else IDASYNC

        def answered(response: ICP_pb2.MessageResponse) -> int:
            return signed(response.result, 32) if response.result else IDTIMEOUT

        def failed(failure: Failure) -> int:
            if failure.check(IcpTimeoutError):
                self.log.info("message to session {session_id}: no answer within {s} s",
                              session_id=session.session_id, s=seconds)
                return IDTIMEOUT
            return self._message_failed(failure, session)

        return d.addCallbacks(answered, failed)

    def _message_failed(self, failure: Failure, session: Session) -> int:
        failure.trap(IcpError)
        self.log_limit.warn(self.log, ("message", type(failure.value)),
                            "sendMessage for session {session_id} failed: {reason}",
                            method="sendMessage", session_id=session.session_id,
                            reason=failure.getErrorMessage())
        return 0

"""What the lifecycle's flows share: the bookkeeping of live sessions beside
the registry (SessionRuntime), the RDP server as they call it, who it is,
and what a logon answers."""

from __future__ import annotations

import secrets
import string
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from bridge.sessions.model import Session, StateWriteError
from protocols.errors import IcpHandlerError

if TYPE_CHECKING:
    from bridge.backends.modules import SessionBackend

_COOKIE_ALPHABET = string.digits + string.ascii_letters
# A random byte below this is one of the alphabet's characters, each of them
# equally often (248 = 4 * 62); bytes above it are drawn again.
_COOKIE_BYTE_LIMIT = 256 - 256 % len(_COOKIE_ALPHABET)
_COOKIE_LENGTH = 50


def make_cookie() -> str:
    """A backend/ogon cookie: 50 random alphanumerics, like ogon's, from one
    read of the kernel's random bytes (secrets.choice per character made 50
    reads: 3% of the reactor's time in a storm of logons)."""
    chosen: list[str] = []
    while len(chosen) < _COOKIE_LENGTH:
        chosen.extend(_COOKIE_ALPHABET[byte % len(_COOKIE_ALPHABET)]
                      for byte in secrets.token_bytes(64) if byte < _COOKIE_BYTE_LIMIT)
    return "".join(chosen[:_COOKIE_LENGTH])


class RdpCaller(Protocol):
    """The RDP server, as the flows call it (the RDP link; a fake in tests)."""

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


@contextmanager
def stored() -> Iterator[None]:
    """A registry change the ICP answer depends on: when it cannot be stored
    (StateWriteError, the change undone) the call answers FAILED."""
    try:
        yield
    except StateWriteError as e:
        raise IcpHandlerError("session state could not be stored") from e


class SessionRuntime:
    """What the flows hold for live sessions beside the registry, in one
    place: never stored, gone with the process.

    ``backends``: the backend each session runs and is watched for (its exit
    ends the session); a session is missing while its backend is being
    replaced, and after a restart until its backend is adopted.
    ``timeouts``: the pending session.timeout of each Disconnected session.
    ``shutting_down``: set once the bridge stops; no logon is started then.
    """

    def __init__(self) -> None:
        self.backends: dict[int, SessionBackend] = {}
        self.timeouts: dict[int, IDelayedCall] = {}
        self.shutting_down = False

    def cancel_timeout(self, session: Session) -> None:
        call = self.timeouts.pop(session.session_id, None)
        if call is not None and call.active():
            call.cancel()

    def cancel_all_timeouts(self) -> None:
        for call in self.timeouts.values():
            if call.active():
                call.cancel()
        self.timeouts.clear()

"""virtualChannelOpen and virtualChannelClose: checked against the sessions,
tokens and channel policy a process knows, then asked of the RDP server.

The main process answers them (``OtsApiHandler`` inherits these), and so
do the OTS API worker processes from their copy of the sessions and tokens,
asking the RDP server through the main process (which relays the ICP
request and its answer, see ``bridge.otsapi.workers``): the same code, so
the same answers. A refusal is an ``Outcome`` marked refused, as in
``ReadOnlyCalls``: a worker leaves those to the main process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from bridge.lifecycle.runtime import RdpCaller
from bridge.otsapi.readonly import ReadOnlyCalls, Sessions, Tokens
from bridge.otsapi.session_info import signed
from bridge.security.permissions import Permission
from bridge.sessions.model import Session
from bridge.sessions.properties import ChannelPolicy
from protocols import icp
from protocols.errors import IcpError
from protocols.generated import ICP_pb2
from protocols.generated.otsapi_blocking.ttypes import TReturnVirtualChannelOpen
from protocols.loglimit import LogLimiter
from protocols.thrift_server import Outcome, failed, refused

WTS_CHANNEL_OPTION_DYNAMIC = 0x1

T = TypeVar("T")


def _vc_open_failed() -> TReturnVirtualChannelOpen:
    return TReturnVirtualChannelOpen(pipeName="", instance=0)


class VirtualChannelCalls(ReadOnlyCalls):
    """The two methods that only ask the RDP server, and the read-only ones."""

    def __init__(self, registry: Sessions, tokens: Tokens, rdp: RdpCaller,
                 channels: ChannelPolicy) -> None:
        super().__init__(registry, tokens)
        self.rdp = rdp
        self.channels = channels
        # Under backpressure every bridged call can fail alike: one line per
        # method and reason per 10 s, with a count.
        self.log_limit = LogLimiter(registry.clock)

    # -- helpers --------------------------------------------------------------

    def _bridged(self, method: str, session: Session, msg_type: int, request: Message,
                 on_answer: Callable[[Any], T], failure_value: Callable[[], T] | T,
                 timeout: float | None = None) -> Deferred[T | Outcome]:
        """Send ``request`` to the RDP server; fires with ``on_answer(response)``
        or, on any ICP failure, with the failure value (logged). A callable
        ``failure_value`` is called for it, so structs are built only when
        needed."""
        d = self.rdp.call(msg_type, request, timeout)
        d.addCallbacks(on_answer, self._bridge_failed,
                       errbackArgs=(method, session.session_id, failure_value))
        return d

    def _bridge_failed(self, failure: Failure, method: str, session_id: int,
                       failure_value: Callable[[], T] | T) -> Outcome:
        failure.trap(IcpError)
        self.log_limit.warn(self.log, (method, type(failure.value)),
                            "{method} for session {session_id} failed: {reason}",
                            method=method, session_id=session_id,
                            reason=failure.getErrorMessage())
        return failed(failure_value() if callable(failure_value) else failure_value)

    def _connection(self, method: str, session: Session) -> int | None:
        if session.connection_id is None:
            self._refuse(method, session.session_id, "session has no client connection")
        return session.connection_id

    # -- the methods -------------------------------------------------------------

    def virtualChannelOpen(self, authToken: str | None, sessionId: int | None,
                           virtualName: str | None, isDynChannel: bool | None,
                           flags: int | None
                           ) -> TReturnVirtualChannelOpen | Outcome | Deferred[Any]:
        method = "virtualChannelOpen"
        auth = self._authorize(method, authToken, sessionId, Permission.VIRTUAL_CHANNEL)
        if auth is None:
            return refused(_vc_open_failed())
        session = auth[1]
        name = virtualName or ""
        if not self.channels.allowed(name, session.username):
            self._refuse(method, session.session_id, f"channel {name} is not allowed")
            return refused(_vc_open_failed())
        connection_id = self._connection(method, session)
        if connection_id is None:
            return refused(_vc_open_failed())
        flags = (flags or 0) & 0xFFFFFFFF
        dynamic = bool(isDynChannel) and bool(flags & WTS_CHANNEL_OPTION_DYNAMIC)
        request = ICP_pb2.OtsApiVirtualChannelOpenRequest(
            connectionId=connection_id, virtualName=name, dynamicChannel=dynamic,
            flags=flags if dynamic else 0,
        )
        return self._bridged(
            method, session, icp.MSG_VIRTUAL_CHANNEL_OPEN, request,
            lambda r: TReturnVirtualChannelOpen(pipeName=r.connectionString,
                                                instance=signed(r.instance, 32))
            if r.connectionString else failed(_vc_open_failed()),
            _vc_open_failed,
        )

    def virtualChannelClose(self, authToken: str | None, sessionId: int | None,
                            virtualName: str | None, instance: int | None
                            ) -> bool | Outcome | Deferred[Any]:
        method = "virtualChannelClose"
        auth = self._authorize(method, authToken, sessionId, Permission.VIRTUAL_CHANNEL)
        if auth is None:
            return refused(False)
        session = auth[1]
        connection_id = self._connection(method, session)
        if connection_id is None:
            return refused(False)
        request = ICP_pb2.OtsApiVirtualChannelCloseRequest(
            connectionId=connection_id, virtualName=virtualName or "",
            instance=(instance or 0) & 0xFFFFFFFF,
        )
        return self._bridged(method, session, icp.MSG_VIRTUAL_CHANNEL_CLOSE, request,
                             lambda r: r.success or failed(False), False)

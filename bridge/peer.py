"""A stand-in RDP server: speaks ICP to the bridge like FreeRDS/ogon's does.

It connects, shakes hands, logs scripted users on, and answers what the
bridge asks (virtual channels, messages, switch-to, shadowing, disconnect,
logoff) plausibly. ``answer_delay`` holds every answer, for load tests.
Used by ``icp-bridge peer``, the tests and the benchmark.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

from protocols import icp
from protocols.errors import IcpHandlerError
from protocols.generated import ICP_pb2

IDOK = 1


@dataclass
class ClientConnection:
    """One simulated RDP client connection."""

    connection_id: int
    username: str = ""
    service_endpoint: str = ""
    channels: dict[int, str] = field(default_factory=dict)  # instance -> name
    shadowing: int | None = None


class StandInRdpServer:
    log = Logger()

    def __init__(self, reactor: Any, answer_delay: float = 0.0,
                 call_timeout: float = icp.DEFAULT_CALL_TIMEOUT) -> None:
        self.reactor = reactor
        self.answer_delay = answer_delay
        self.call_timeout = call_timeout
        self.connections: dict[int, ClientConnection] = {}
        self.protocol: icp.IcpProtocol | None = None
        # The latest requests from the bridge (bounded: the stand-in may run
        # for hours under load), and how many arrived in all.
        self.requests_seen: deque[tuple[str, Message]] = deque(maxlen=1000)
        self.requests_count = 0
        # Request type names answered FAILED, for failure tests.
        self.refuse: set[str] = set()
        # While true, answers wait in ``held`` until release() (tests).
        self.hold = False
        self.held: list[tuple[Deferred[Message], Any, Message]] = []
        self._seen_waiters: list[tuple[int, Deferred[None]]] = []
        self._next_instance = 1

    # -- talking to the bridge -------------------------------------------------

    def build_protocol(self) -> icp.IcpProtocol:
        self.protocol = icp.IcpProtocol(self.handlers(), clock=self.reactor, initiator=True,
                                        call_timeout=self.call_timeout)
        return self.protocol

    async def connect(self, endpoint: str) -> icp.IcpProtocol:
        """Connect to the bridge's ICP endpoint (a client endpoint string,
        e.g. ``unix:/tmp/.pipe/ogon_SessionManager``) and finish the handshake."""
        proto = await connectProtocol(clientFromString(self.reactor, endpoint),
                                      self.build_protocol())
        await proto.when_ready()
        return proto

    def _call(self, msg_type: int, request: Message) -> Deferred[Any]:
        if self.protocol is None:
            raise RuntimeError("not connected")
        return self.protocol.call(msg_type, request)

    async def logon(self, connection_id: int, username: str, password: str, domain: str = "",
                    width: int = 1920, height: int = 1080) -> ICP_pb2.LogonUserResponse:
        response = await self._call(icp.MSG_LOGON_USER, ICP_pb2.LogonUserRequest(
            connectionId=connection_id, username=username, password=password, domain=domain,
            width=width, height=height, colorDepth=32, clientHostName=f"client{connection_id}",
            clientAddress="192.0.2.10", clientBuildNumber=19041, clientProductId=1,
            clientHardwareId=0, clientProtocolType=2,
        ))
        self.connections[connection_id] = ClientConnection(
            connection_id, username, response.serviceEndpoint)
        return response

    async def ping(self) -> bool:
        return (await self._call(icp.MSG_PING, ICP_pb2.PingRequest())).pong

    async def is_channel_allowed(self, name: str) -> bool:
        response = await self._call(icp.MSG_IS_CHANNEL_ALLOWED,
                                    ICP_pb2.IsChannelAllowedRequest(channelName=name))
        return response.channelAllowed

    async def client_disconnected(self, connection_id: int) -> bool:
        self.connections.pop(connection_id, None)
        response = await self._call(icp.MSG_DISCONNECT_USER_SESSION,
                                    ICP_pb2.DisconnectUserSessionRequest(
                                        connectionId=connection_id))
        return response.disconnected

    async def client_logged_off(self, connection_id: int) -> bool:
        self.connections.pop(connection_id, None)
        response = await self._call(icp.MSG_LOGOFF_USER_SESSION,
                                    ICP_pb2.LogoffUserSessionRequest(connectionId=connection_id))
        return response.loggedoff

    def close(self) -> None:
        if self.protocol is not None:
            self.protocol.close()

    # -- answering the bridge --------------------------------------------------

    def handlers(self) -> dict[int, icp.Handler]:
        return {
            icp.MSG_PING: self._answer(lambda r: ICP_pb2.PingResponse(pong=True)),
            icp.MSG_VIRTUAL_CHANNEL_OPEN: self._answer(self._vc_open),
            icp.MSG_VIRTUAL_CHANNEL_CLOSE: self._answer(self._vc_close),
            icp.MSG_SWITCH_TO: self._answer(self._switch_to),
            icp.MSG_START_REMOTE_CONTROL: self._answer(self._start_shadow),
            icp.MSG_STOP_REMOTE_CONTROL: self._answer(self._stop_shadow),
            icp.MSG_MESSAGE: self._answer(lambda r: ICP_pb2.MessageResponse(result=IDOK)),
            icp.MSG_DISCONNECT_USER_SESSION: self._answer(self._disconnect),
            icp.MSG_LOGOFF_USER_SESSION: self._answer(self._logoff),
        }

    def when_requests_seen(self, count: int) -> Deferred[None]:
        """Fires once ``count`` requests from the bridge have arrived in all."""
        d: Deferred[None] = Deferred()
        self._seen_waiters.append((count, d))
        self._check_seen()
        return d

    def _check_seen(self) -> None:
        if not self._seen_waiters:
            return
        ready = [(n, d) for n, d in self._seen_waiters if self.requests_count >= n]
        for waiter in ready:
            self._seen_waiters.remove(waiter)
            waiter[1].callback(None)

    def release(self, order: list[int] | None = None) -> None:
        """Answer the held requests, in ``order`` (indexes) if given."""
        held, self.held = self.held, []
        for index in order if order is not None else range(len(held)):
            d, build, request = held[index]
            d.callback(build(request))

    def _answer(self, build: Any) -> icp.Handler:
        def handler(request: Message) -> Message | Deferred[Message]:
            name = type(request).__name__
            self.requests_seen.append((name, request))
            self.requests_count += 1
            try:
                if name in self.refuse:
                    raise IcpHandlerError(f"{name} refused by the stand-in")
                if self.hold:
                    d: Deferred[Message] = Deferred()
                    self.held.append((d, build, request))
                    return d
                if self.answer_delay > 0:
                    return deferLater(self.reactor, self.answer_delay, build, request)
                return build(request)
            finally:
                # Waiters may release() at once: only once the request is held.
                self._check_seen()

        return handler

    def _connection(self, connection_id: int) -> ClientConnection:
        connection = self.connections.get(connection_id)
        if connection is None:
            # Clients the bridge knows from before our restart: take them.
            connection = self.connections[connection_id] = ClientConnection(connection_id)
        return connection

    def _vc_open(self, request: ICP_pb2.OtsApiVirtualChannelOpenRequest
                 ) -> ICP_pb2.OtsApiVirtualChannelOpenResponse:
        connection = self._connection(request.connectionId)
        instance = self._next_instance
        self._next_instance += 1
        connection.channels[instance] = request.virtualName
        kind = "dvc" if request.dynamicChannel else "svc"
        return ICP_pb2.OtsApiVirtualChannelOpenResponse(
            # winpr names pipes like Windows does
            connectionString=f"\\\\.\\pipe\\ogon_{request.connectionId}_{kind}_"
                             f"{request.virtualName}_{instance}",
            instance=instance,
        )

    def _vc_close(self, request: ICP_pb2.OtsApiVirtualChannelCloseRequest
                  ) -> ICP_pb2.OtsApiVirtualChannelCloseResponse:
        connection = self._connection(request.connectionId)
        name = connection.channels.get(request.instance)
        success = name == request.virtualName
        if success:
            del connection.channels[request.instance]
        return ICP_pb2.OtsApiVirtualChannelCloseResponse(success=success)

    def _switch_to(self, request: ICP_pb2.SwitchToRequest) -> ICP_pb2.SwitchToResponse:
        self._connection(request.connectionId).service_endpoint = request.serviceEndpoint
        return ICP_pb2.SwitchToResponse(success=True)

    def _start_shadow(self, request: ICP_pb2.OtsApiStartRemoteControlRequest
                      ) -> ICP_pb2.OtsApiStartRemoteControlResponse:
        known = request.targetConnectionId in self.connections
        if known:
            self._connection(request.connectionId).shadowing = request.targetConnectionId
        return ICP_pb2.OtsApiStartRemoteControlResponse(success=known)

    def _stop_shadow(self, request: ICP_pb2.OtsApiStopRemoteControlRequest
                     ) -> ICP_pb2.OtsApiStopRemoteControlResponse:
        connection = self._connection(request.connectionId)
        was = connection.shadowing is not None
        connection.shadowing = None
        return ICP_pb2.OtsApiStopRemoteControlResponse(success=was)

    def _disconnect(self, request: ICP_pb2.DisconnectUserSessionRequest
                    ) -> ICP_pb2.DisconnectUserSessionResponse:
        return ICP_pb2.DisconnectUserSessionResponse(
            disconnected=self.connections.pop(request.connectionId, None) is not None)

    def _logoff(self, request: ICP_pb2.LogoffUserSessionRequest
                ) -> ICP_pb2.LogoffUserSessionResponse:
        return ICP_pb2.LogoffUserSessionResponse(
            loggedoff=self.connections.pop(request.connectionId, None) is not None)

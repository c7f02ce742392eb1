"""A stand-in RDP server: speaks ICP to the bridge the way ogon's does.

Like ogon's RDP server (rdp-server/icp/icp.c) it answers only Ping,
SwitchTo, LogoffUserSession, the OTS API's virtual channel and remote
control requests and Message; anything else (DisconnectUserSession
included) is answered NOTFOUND. It logs client connections on, tells the
bridge when a client leaves (DisconnectUserSession) and, like the real
one, connects to the backend endpoint a logon or SwitchTo names. A stand-in
backend (``icp-bridge backend``) greets that connection with its session
id, which is how the stand-in can log a user on through the greeter (SBP
AuthenticateUser, as the greeter would). Every request from the bridge is
recorded. ``answer_delay`` holds every answer, for load tests. Used by
``icp-bridge peer``, the tests and the benchmark.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, quoteStringArgument
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

from bridge.backends.modules import pipe_file
from protocols import icp
from protocols.errors import IcpHandlerError
from protocols.generated import ICP_pb2, SBP_pb2

#: Connection attempts to a backend that refuses, and the pause between them.
BACKEND_CONNECT_TRIES = 10
BACKEND_CONNECT_RETRY = 0.02
IDOK = 1



def _connect(endpoint: Any, protocol: Any) -> Deferred[Any]:
    """``connectProtocol`` without its factory's "Starting factory" lines in
    the peer's output (one per connection)."""
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False
    return endpoint.connect(factory)

class _BackendLink(Protocol):
    """The stand-in RDP server's connection to a backend's endpoint."""

    def __init__(self) -> None:
        self.greeting: Deferred[str] = Deferred()
        self._received = b""

    def dataReceived(self, data: bytes) -> None:
        self._received += data
        if b"\n" in self._received and not self.greeting.called:
            self.greeting.callback(self._received.split(b"\n", 1)[0].decode("ascii", "replace"))

    def connectionLost(self, reason: object = None) -> None:
        if not self.greeting.called:
            self.greeting.callback("")


@dataclass
class ClientConnection:
    """One simulated RDP client connection."""

    connection_id: int
    username: str = ""
    service_endpoint: str = ""
    channels: dict[int, str] = field(default_factory=dict)  # instance -> name
    shadowing: int | None = None
    # The session id the backend told us when we connected to it, if it did.
    backend_session: int | None = None
    backend: _BackendLink | None = None


class StandInRdpServer:
    log = Logger()

    def __init__(self, reactor: Any, answer_delay: float = 0.0,
                 call_timeout: float = icp.DEFAULT_CALL_TIMEOUT,
                 pipe_dir: Path | None = None,
                 max_send_frame: int = icp.DEFAULT_MAX_SEND_FRAME) -> None:
        self.reactor = reactor
        # ogon's RDP server sends what it reads (32 KiB); an attack sends more.
        self.max_send_frame = max_send_frame
        self.answer_delay = answer_delay
        self.call_timeout = call_timeout
        # With a pipe directory, connect to each backend endpoint, as ogon does.
        self.pipe_dir = pipe_dir
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
        # What Message answers (the user's click): IDOK unless a test says.
        self.message_result = IDOK
        self.switch_success = True
        self._seen_waiters: list[tuple[int, Deferred[None]]] = []
        self._next_instance = 1

    # -- talking to the bridge -------------------------------------------------

    def build_protocol(self) -> icp.IcpProtocol:
        self.protocol = icp.IcpProtocol(self.handlers(), clock=self.reactor, initiator=True,
                                        call_timeout=self.call_timeout,
                                        max_send_frame=self.max_send_frame)
        return self.protocol

    async def connect(self, endpoint: str) -> icp.IcpProtocol:
        """Connect to the bridge's ICP endpoint (a client endpoint string,
        e.g. ``unix:/tmp/.pipe/ogon_SessionManager``) and finish the handshake."""
        proto = await _connect(clientFromString(self.reactor, endpoint), self.build_protocol())
        await proto.when_ready()
        return proto

    def _call(self, msg_type: int, request: Message,
              timeout: float | None = None) -> Deferred[Any]:
        if self.protocol is None:
            raise RuntimeError("not connected")
        return self.protocol.call(msg_type, request, timeout)

    async def logon(self, connection_id: int, username: str, password: str, domain: str = "",
                    width: int = 1920, height: int = 1080,
                    timeout: float | None = None,
                    address: str = "192.0.2.10") -> ICP_pb2.LogonUserResponse:
        """``address``: the clientAddress the RDP client reports about itself
        (it chooses it: any text)."""
        response = await self._call(icp.MSG_LOGON_USER, ICP_pb2.LogonUserRequest(
            connectionId=connection_id, username=username, password=password, domain=domain,
            width=width, height=height, colorDepth=32, clientHostName=f"client{connection_id}",
            clientAddress=address, clientBuildNumber=19041, clientProductId=1,
            clientHardwareId=0, clientProtocolType=2,
        ), timeout)
        connection = ClientConnection(connection_id, username, response.serviceEndpoint)
        self.connections[connection_id] = connection
        await self._attach_backend(connection)
        return response

    async def greeter_login(self, connection_id: int, username: str, password: str,
                            domain: str = "", session_id: int | None = None,
                            timeout: float | None = None) -> int:
        """Log a user on through the greeter of ``connection_id``, as ogon's
        greeter does over SBP (VersionInfo, then AuthenticateUser); returns
        the AUTH_STATUS. The session id is the one the stand-in backend told
        us, unless given."""
        connection = self.connections[connection_id]
        sid = session_id if session_id is not None else connection.backend_session
        if sid is None:
            raise RuntimeError(f"no session id known for connection {connection_id}")
        await self._call(icp.MSG_SBP_VERSION_INFO,
                         SBP_pb2.VersionInfoRequest(sessionId=sid, vmajor=1, vminor=1))
        response = await self._call(icp.MSG_SBP_AUTHENTICATE_USER, SBP_pb2.AuthenticateUserRequest(
            sessionId=sid, username=username, password=password, domain=domain), timeout)
        return int(response.authStatus)

    async def ping(self) -> bool:
        return (await self._call(icp.MSG_PING, ICP_pb2.PingRequest())).pong

    async def is_channel_allowed(self, name: str) -> bool:
        response = await self._call(icp.MSG_IS_CHANNEL_ALLOWED,
                                    ICP_pb2.IsChannelAllowedRequest(channelName=name))
        return response.channelAllowed

    async def client_disconnected(self, connection_id: int) -> bool:
        """The client went away by itself: tell the bridge, as ogon does."""
        self._drop(connection_id)
        response = await self._call(icp.MSG_DISCONNECT_USER_SESSION,
                                    ICP_pb2.DisconnectUserSessionRequest(
                                        connectionId=connection_id))
        return response.disconnected

    async def remote_control_ended(self, spy_connection_id: int, spied_connection_id: int
                                   ) -> bool:
        connection = self.connections.get(spy_connection_id)
        if connection is not None:
            connection.shadowing = None
        response = await self._call(icp.MSG_REMOTE_CONTROL_ENDED, ICP_pb2.RemoteControlEndedRequest(
            spyId=spy_connection_id, spiedId=spied_connection_id))
        return response.success

    def close(self) -> None:
        for connection_id in list(self.connections):
            self._drop(connection_id)
        if self.protocol is not None:
            self.protocol.close()

    # -- backends ----------------------------------------------------------------

    async def _attach_backend(self, connection: ClientConnection) -> None:
        """Connect to the backend endpoint, as the RDP server does; read the
        stand-in backend's greeting (its session id) if it sends one."""
        if self.pipe_dir is None or not connection.service_endpoint:
            return
        if connection.backend is not None:
            connection.backend.transport.loseConnection()
            connection.backend = None
        path = pipe_file(self.pipe_dir, connection.service_endpoint)
        try:
            backend = await self._connect_backend(path)
            greeting = await backend.greeting.addTimeout(2.0, self.reactor)
        except Exception as e:
            self.log.warn("connection {connection_id}: cannot connect to backend {path}: "
                          "{error}", connection_id=connection.connection_id, path=str(path),
                          error=str(e))
            return
        connection.backend = backend
        for word in greeting.split():
            if word.startswith("sid="):
                connection.backend_session = int(word[4:])
        self.log.info("connection {connection_id}: connected to backend {endpoint} "
                      "(session {sid})", connection_id=connection.connection_id,
                      endpoint=connection.service_endpoint, sid=connection.backend_session)

    async def _connect_backend(self, path: Path) -> _BackendLink:
        """Connect to a backend's socket. A backend that made its socket
        file but does not listen on it yet refuses for a moment: try again
        a few times, as a real RDP server's WaitNamedPipe would wait."""
        endpoint = clientFromString(self.reactor, f"unix:{quoteStringArgument(str(path))}")
        for _ in range(BACKEND_CONNECT_TRIES - 1):
            try:
                return await _connect(endpoint, _BackendLink())
            except ConnectionRefusedError:
                await deferLater(self.reactor, BACKEND_CONNECT_RETRY, lambda: None)
        return await _connect(endpoint, _BackendLink())

    def _drop(self, connection_id: int) -> ClientConnection | None:
        connection = self.connections.pop(connection_id, None)
        if connection is not None and connection.backend is not None \
                and connection.backend.transport is not None:
            connection.backend.transport.loseConnection()
        return connection

    # -- answering the bridge: the types ogon's RDP server answers -------------

    def handlers(self) -> dict[int, icp.Handler]:
        return {
            icp.MSG_PING: self._answer(lambda r: ICP_pb2.PingResponse(pong=True)),
            icp.MSG_SWITCH_TO: self._answer(self._switch_to),
            icp.MSG_LOGOFF_USER_SESSION: self._answer(self._logoff),
            icp.MSG_VIRTUAL_CHANNEL_OPEN: self._answer(self._vc_open),
            icp.MSG_VIRTUAL_CHANNEL_CLOSE: self._answer(self._vc_close),
            icp.MSG_START_REMOTE_CONTROL: self._answer(self._start_shadow),
            icp.MSG_STOP_REMOTE_CONTROL: self._answer(self._stop_shadow),
            icp.MSG_MESSAGE: self._answer(
                lambda r: ICP_pb2.MessageResponse(result=self.message_result)),
        }

    def seen(self, name: str) -> list[Message]:
        """The recorded requests of one type (e.g. "SwitchToRequest")."""
        return [request for kind, request in self.requests_seen if kind == name]

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

    def _known(self, connection_id: int) -> ClientConnection | None:
        return self.connections.get(connection_id)

    def _connection(self, connection_id: int) -> ClientConnection:
        connection = self.connections.get(connection_id)
        if connection is None:
            # Clients the bridge knows from before our restart: take them.
            connection = self.connections[connection_id] = ClientConnection(connection_id)
        return connection

    def _switch_to(self, request: ICP_pb2.SwitchToRequest
                   ) -> ICP_pb2.SwitchToResponse | Deferred[ICP_pb2.SwitchToResponse]:
        connection = self._known(request.connectionId)
        if connection is None or not self.switch_success:
            return ICP_pb2.SwitchToResponse(success=False)
        connection.service_endpoint = request.serviceEndpoint
        connection.backend_session = None

        async def switch() -> ICP_pb2.SwitchToResponse:
            await self._attach_backend(connection)
            return ICP_pb2.SwitchToResponse(success=True)

        return Deferred.fromCoroutine(switch())

    def _logoff(self, request: ICP_pb2.LogoffUserSessionRequest
                ) -> ICP_pb2.LogoffUserSessionResponse:
        """The RDP server drops that client (also for an OTS API disconnect)."""
        return ICP_pb2.LogoffUserSessionResponse(
            loggedoff=self._drop(request.connectionId) is not None)

    def _vc_open(self, request: ICP_pb2.OtsApiVirtualChannelOpenRequest
                 ) -> ICP_pb2.OtsApiVirtualChannelOpenResponse:
        connection = self._known(request.connectionId)
        if connection is None:
            return ICP_pb2.OtsApiVirtualChannelOpenResponse(connectionString="", instance=0)
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
        connection = self._known(request.connectionId)
        name = connection.channels.get(request.instance) if connection is not None else None
        success = name is not None and name == request.virtualName
        if success and connection is not None:
            del connection.channels[request.instance]
        return ICP_pb2.OtsApiVirtualChannelCloseResponse(success=success)

    def _start_shadow(self, request: ICP_pb2.OtsApiStartRemoteControlRequest
                      ) -> ICP_pb2.OtsApiStartRemoteControlResponse:
        spy = self._known(request.connectionId)
        known = spy is not None and request.targetConnectionId in self.connections
        if known and spy is not None:
            spy.shadowing = request.targetConnectionId
        return ICP_pb2.OtsApiStartRemoteControlResponse(success=known)

    def _stop_shadow(self, request: ICP_pb2.OtsApiStopRemoteControlRequest
                     ) -> ICP_pb2.OtsApiStopRemoteControlResponse:
        connection = self._known(request.connectionId)
        was = connection is not None and connection.shadowing is not None
        if connection is not None:
            connection.shadowing = None
        return ICP_pb2.OtsApiStopRemoteControlResponse(success=was)

"""The bridge against a stand-in RDP server built from WIRE.md alone: frames
with ``struct``, messages with the generated classes, no code from
``protocols.icp`` or ``bridge.rdp.standin``. What a real RDP server does first,
over the real UNIX socket."""

from __future__ import annotations

import struct
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from bridge.sessions.model import ConnectState
from protocols.generated import ICP_pb2, SBP_pb2
from tests.conftest import BridgeUnderTest
from tests.wire import HANDSHAKE, RPCBase, frame, handshake, request, response

SUCCESS = 0


class WireMdPeer(Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.frames: list[RPCBase] = []
        self.waiters: list[Deferred[RPCBase]] = []
        self.tag = 1

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 4:
            (length,) = struct.unpack_from("!I", self.buffer)
            if len(self.buffer) < 4 + length:
                return
            rpc = RPCBase.FromString(self.buffer[4 : 4 + length])
            self.buffer = self.buffer[4 + length :]
            if self.waiters:
                self.waiters.pop(0).callback(rpc)
            else:
                self.frames.append(rpc)

    def next_frame(self) -> Deferred[RPCBase]:
        if self.frames:
            return succeed(self.frames.pop(0))
        d: Deferred[RPCBase] = Deferred()
        self.waiters.append(d)
        return d

    async def call(self, msg_type: int, message: Any, response_type: Any) -> Any:
        self.tag += 1
        self.transport.write(frame(request(self.tag, msg_type, message)))
        rpc = await self.next_frame()
        assert (rpc.isResponse, rpc.tag, rpc.msgType, rpc.status) == (
            True, self.tag, msg_type, SUCCESS), rpc
        return response_type.FromString(rpc.payload)


@pytest_twisted.ensureDeferred
async def test_rdp_server_from_wire_md(bridge: BridgeUnderTest) -> None:
    peer = await connectProtocol(UNIXClientEndpoint(reactor, bridge.icp_path), WireMdPeer())
    peer.transport.write(frame(handshake(tag=1, major=1, minor=1)))
    answer = await peer.next_frame()
    assert (answer.isResponse, answer.tag, answer.msgType, answer.status) == (
        True, 1, HANDSHAKE, SUCCESS)
    assert (answer.versionInfo.vmajor, answer.versionInfo.vminor) == (1, 1)

    assert (await peer.call(ICP_pb2.Ping, ICP_pb2.PingRequest(), ICP_pb2.PingResponse)).pong
    allowed = await peer.call(ICP_pb2.IsChannelAllowed,
                              ICP_pb2.IsChannelAllowedRequest(channelName="cliprdr"),
                              ICP_pb2.IsChannelAllowedResponse)
    assert allowed.channelAllowed
    logon = await peer.call(ICP_pb2.LogonUser, ICP_pb2.LogonUserRequest(
        connectionId=5, username="alice", password="alice-pw", domain="", width=1024,
        height=768, colorDepth=24, clientHostName="thin1", clientAddress="192.0.2.7",
        clientBuildNumber=7601, clientProductId=1, clientHardwareId=0, clientProtocolType=2,
    ), ICP_pb2.LogonUserResponse)
    assert logon.serviceEndpoint == "\\\\.\\pipe\\ogon_1_xsession", "winpr's pipe name"
    property_answer = await peer.call(
        ICP_pb2.PropertyNumber,
        ICP_pb2.PropertyNumberRequest(connectionId=5, path="session.timeout"),
        ICP_pb2.PropertyNumberResponse)
    assert (property_answer.success, property_answer.value) == (True, 30)

    # The bridge's own request (an OTS API virtualChannelOpen), answered by us.
    session = bridge.service.registry.by_connection(5)
    link_call = bridge.service.link.call(ICP_pb2.OtsApiVirtualChannelOpen,
                                         ICP_pb2.OtsApiVirtualChannelOpenRequest(
                                             connectionId=5, virtualName="CLIPRDR",
                                             dynamicChannel=False, flags=0))
    asked = await peer.next_frame()
    assert (asked.isResponse, asked.msgType) == (False, ICP_pb2.OtsApiVirtualChannelOpen)
    opened = ICP_pb2.OtsApiVirtualChannelOpenRequest.FromString(asked.payload)
    assert (opened.connectionId, opened.virtualName) == (5, "CLIPRDR")
    peer.transport.write(frame(response(asked.tag, asked.msgType,
                                        ICP_pb2.OtsApiVirtualChannelOpenResponse(
                                            connectionString="pipe", instance=9))))
    assert (await link_call).instance == 9

    disconnected = await peer.call(
        ICP_pb2.DisconnectUserSession, ICP_pb2.DisconnectUserSessionRequest(connectionId=5),
        ICP_pb2.DisconnectUserSessionResponse)
    assert disconnected.disconnected and session.state is ConnectState.DISCONNECTED
    again = await peer.call(ICP_pb2.LogonUser, ICP_pb2.LogonUserRequest(
        connectionId=6, username="alice", password="alice-pw", domain="", width=1024,
        height=768, colorDepth=24, clientHostName="thin1", clientAddress="192.0.2.7",
        clientBuildNumber=7601, clientProductId=1, clientHardwareId=0, clientProtocolType=2,
    ), ICP_pb2.LogonUserResponse)
    assert again.serviceEndpoint == logon.serviceEndpoint, "back to the same session"
    logged_off = await peer.call(
        ICP_pb2.LogoffUserSession, ICP_pb2.LogoffUserSessionRequest(connectionId=6),
        ICP_pb2.LogoffUserSessionResponse)
    assert logged_off.loggedoff and bridge.service.registry.get(session.session_id) is None

    # The greeter's login (WIRE.md section 4), as the RDP server forwards it.
    greeter = await peer.call(ICP_pb2.LogonUser, ICP_pb2.LogonUserRequest(
        connectionId=7, username="", password="", domain="", width=1024, height=768,
        colorDepth=24, clientHostName="thin2", clientAddress="192.0.2.8", clientBuildNumber=1,
        clientProductId=1, clientHardwareId=0, clientProtocolType=2), ICP_pb2.LogonUserResponse)
    greeter_id = bridge.service.registry.by_connection(7).session_id
    assert greeter.serviceEndpoint == f"\\\\.\\pipe\\ogon_{greeter_id}_greeter"
    version = await peer.call(202, SBP_pb2.VersionInfoRequest(sessionId=greeter_id, vmajor=1,
                                                              vminor=1),
                              SBP_pb2.VersionInfoResponse)
    assert (version.vmajor, version.vminor) == (1, 1)
    peer.tag += 1
    peer.transport.write(frame(request(peer.tag, 200, SBP_pb2.AuthenticateUserRequest(
        sessionId=greeter_id, username="bob", password="bob-pw", domain=""))))
    switch = await peer.next_frame()
    assert (switch.isResponse, switch.msgType) == (False, ICP_pb2.SwitchTo)
    to = ICP_pb2.SwitchToRequest.FromString(switch.payload)
    assert (to.connectionId, to.serviceEndpoint) == (
        7, f"\\\\.\\pipe\\ogon_{greeter_id}_xsession")
    assert len(to.backendCookie) == len(to.ogonCookie) == 50
    peer.transport.write(frame(response(switch.tag, switch.msgType,
                                        ICP_pb2.SwitchToResponse(success=True))))
    authenticated = await peer.next_frame()
    assert (authenticated.isResponse, authenticated.tag, authenticated.status) == (
        True, peer.tag, SUCCESS)
    assert SBP_pb2.AuthenticateUserResponse.FromString(authenticated.payload).authStatus == 0
    assert bridge.service.registry.get(greeter_id).username == "bob"
    peer.transport.loseConnection()

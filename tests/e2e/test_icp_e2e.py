"""The ICP side over a real UNIX socket: the stand-in RDP server against the
real service."""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from bridge.endpoints import StartupError
from bridge.sessions.model import ConnectState
from protocols.generated import ICP_pb2
from protocols.icp import (
    MSG_LOGOFF_USER_SESSION,
    MSG_PROPERTY_BULK,
    MSG_PROPERTY_NUMBER,
    MSG_PROPERTY_STRING,
)
from tests.conftest import BridgeUnderTest, start_bridge
from tests.wire import frame, handshake


class RawClient(Protocol):
    """Bytes in, bytes out, and a Deferred for the close."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.closed.callback(None)


async def raw_connect(path: str) -> RawClient:
    return await connectProtocol(UNIXClientEndpoint(reactor, path), RawClient())


@pytest_twisted.ensureDeferred
async def test_logon_properties_disconnect_logoff(bridge: BridgeUnderTest) -> None:
    peer = await bridge.peer()
    assert peer.protocol.peer_version == (1, 1)
    assert await peer.ping()
    assert await peer.is_channel_allowed("cliprdr")
    assert not await peer.is_channel_allowed("BLOCKED")

    greeter = await peer.logon(1, "alice", "wrong")
    assert greeter.serviceEndpoint == "\\\\.\\pipe\\ogon_1_greeter"
    assert peer.connections[1].backend_session == 1, "the stand-in connected to the greeter"
    desktop = await peer.logon(1, "alice", "alice-pw")
    assert desktop.serviceEndpoint == "\\\\.\\pipe\\ogon_2_xsession"
    assert bridge.service.registry.get(1) is None, "the greeter ended with its connection"
    assert (desktop.maxWidth, desktop.maxHeight) == (1920, 1200), "ogon's session.maxX/YRes"
    assert len(desktop.backendCookie) == len(desktop.ogonCookie) == 50
    session = bridge.service.registry.by_connection(1)
    assert session.username == "alice" and session.state is ConnectState.ACTIVE
    assert session.client.host_name == "client1" and session.client.width == 1920
    assert peer.connections[1].backend_session == session.session_id

    token_file = bridge.base / "tokens" / f"ogon.session.{session.session_id}"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().splitlines()[0]
    assert bridge.service.tokens.lookup(token).session_id == session.session_id

    number = await peer._call(MSG_PROPERTY_NUMBER, ICP_pb2.PropertyNumberRequest(
        connectionId=1, path="SESSION.Timeout"))
    assert (number.success, number.value) == (True, 30), "paths ignore case"
    width = await peer._call(MSG_PROPERTY_NUMBER, ICP_pb2.PropertyNumberRequest(
        connectionId=1, path="current.connection.xres"))
    assert (width.success, width.value) == (True, 1920)
    text = await peer._call(MSG_PROPERTY_STRING, ICP_pb2.PropertyStringRequest(
        connectionId=1, path="desktop.name"))
    assert (text.success, text.value) == (True, "kde"), "per-user override"
    missing = await peer._call(MSG_PROPERTY_STRING, ICP_pb2.PropertyStringRequest(
        connectionId=1, path="no.such"))
    assert missing.success is False
    bulk = await peer._call(MSG_PROPERTY_BULK, ICP_pb2.PropertyBulkRequest(
        connectionId=1, properties=[
            {"propertyType": 0, "propertyPath": "ssl.enabled"},
            {"propertyType": 1, "propertyPath": "session.timeout"},
            {"propertyType": 2, "propertyPath": "desktop.name"},
            {"propertyType": 1, "propertyPath": "desktop.name"},
            {"propertyType": 2, "propertyPath": "ssl.certificate"}]))
    assert [(r.success, r.boolValue, r.intValue, r.stringValue) for r in bulk.results[:4]] == [
        (True, True, 0, ""), (True, False, 30, ""), (True, False, 0, "kde"),
        (False, False, 0, "")]
    assert bulk.results[4].success and bulk.results[4].stringValue.endswith("ogon.crt")

    assert await peer.client_disconnected(1)
    assert session.state is ConnectState.DISCONNECTED and session.connection_id is None
    again = await peer.logon(2, "alice", "alice-pw")
    assert again.serviceEndpoint == desktop.serviceEndpoint, "reconnected to the same session"
    assert bridge.service.registry.by_connection(2) is session

    # ogon's RDP server never sends LogoffUserSession, but the bridge takes it.
    gone = await peer._call(MSG_LOGOFF_USER_SESSION,
                            ICP_pb2.LogoffUserSessionRequest(connectionId=2))
    assert gone.loggedoff
    assert bridge.service.registry.get(session.session_id) is None
    assert not token_file.exists()
    assert bridge.service.tokens.lookup(token) is None


@pytest_twisted.ensureDeferred
async def test_second_rdp_server_is_refused_first_keeps_working(
        bridge: BridgeUnderTest) -> None:
    first = await bridge.peer()
    second = await raw_connect(bridge.icp_path)
    second.transport.write(frame(handshake(tag=1)))
    await second.closed
    assert second.received == b"", "refused before any answer"
    assert await first.ping()


@pytest_twisted.ensureDeferred
async def test_garbage_frame_drops_only_that_connection(bridge: BridgeUnderTest) -> None:
    bad = await raw_connect(bridge.icp_path)
    bad.transport.write(frame(handshake(tag=1)) + frame(b"\xde\xad\xbe\xef garbage"))
    await bad.closed
    peer = await bridge.peer()
    assert await peer.ping()


@pytest_twisted.ensureDeferred
async def test_oversize_length_drops_only_that_connection(bridge: BridgeUnderTest) -> None:
    peer = await bridge.peer()
    await peer.logon(1, "bob", "bob-pw")
    peer.protocol.transport.write(struct.pack("!I", 16 * 1024 * 1024 + 1))
    await peer.protocol.when_closed()
    session = bridge.service.registry.by_connection(1)
    assert session is None, "sessions of the lost RDP server are disconnected"
    assert [s.state for s in bridge.service.registry] == [ConnectState.DISCONNECTED]
    again = await bridge.peer()
    assert await again.ping()
    await again.logon(7, "bob", "bob-pw")
    assert bridge.service.registry.by_connection(7).username == "bob"


@pytest_twisted.ensureDeferred
async def test_peer_uid_not_allowed_is_refused(short_dir: Path) -> None:
    running = await start_bridge(short_dir, allowed_peer_uids=[os.getuid() + 1])
    try:
        client = await raw_connect(running.icp_path)
        client.transport.write(frame(handshake(tag=1)))
        await client.closed
        assert client.received == b""
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_peer_uid_allowed(short_dir: Path) -> None:
    running = await start_bridge(short_dir, allowed_peer_uids=[os.getuid()])
    try:
        peer = await running.peer()
        assert await peer.ping()
    finally:
        await running.stop()


def test_stale_socket_is_replaced_live_one_refused(short_dir: Path) -> None:
    from bridge.endpoints import claim_unix_socket

    def prepare_unix_socket(path: Path) -> None:
        os.close(claim_unix_socket(path, short_dir / "run"))

    path = short_dir / "sub" / "icp.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    prepare_unix_socket(path)
    assert not path.exists()

    live = socket.socket(socket.AF_UNIX)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(StartupError, match="another process is listening"):
            prepare_unix_socket(path)
    finally:
        live.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(StartupError, match="not a socket"):
        prepare_unix_socket(path)


@pytest_twisted.ensureDeferred
async def test_second_bridge_on_same_socket_refuses_to_start(bridge: BridgeUnderTest) -> None:
    from bridge.service import BridgeService
    from tests.conftest import make_config

    other = BridgeService(make_config(bridge.base, state_dir=bridge.base / "state2"), reactor)
    with pytest.raises(StartupError, match="another icp-bridge"):
        other.startService()
    other.store.close()
    peer = await bridge.peer()
    assert await peer.ping()


@pytest_twisted.ensureDeferred
async def test_socket_mode_and_directory(short_dir: Path) -> None:
    running = await start_bridge(short_dir, icp_endpoint=f"unix:{short_dir}/a/b/icp.sock:mode=600")
    try:
        mode = stat.S_IMODE((short_dir / "a" / "b" / "icp.sock").stat().st_mode)
        assert mode == 0o600
    finally:
        await running.stop()

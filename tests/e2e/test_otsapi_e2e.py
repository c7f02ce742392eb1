"""The OTS API through a running bridge, with thrift's own clients and the
stand-in RDP server: every method's success, refusals, failures, timeouts
and disconnects."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from thrift.Thrift import TApplicationException
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from bridge.rdp.standin import StandInRdpServer
from bridge.security.permissions import FULL
from bridge.sessions.model import ConnectState
from protocols.generated.otsapi_blocking.ttypes import TVersion
from protocols.icp import MSG_MESSAGE
from tests.conftest import BridgeUnderTest, start_bridge
from tests.e2e.otsapi_client import BlockingClient, twisted_client

WTS_CURRENT_SESSION = -1


class World:
    """A bridge on a Clock, a stand-in RDP server with alice (connection 1)
    and bob (connection 2) logged on, and a framed blocking client."""

    bridge: BridgeUnderTest
    peer: StandInRdpServer
    clock: Clock
    client: BlockingClient
    alice: int
    bob: int

    def session_token(self, session_id: int) -> str:
        path = self.bridge.base / "tokens" / f"ogon.session.{session_id}"
        return path.read_text().splitlines()[0]

    async def logon(self, user: str, password: str) -> str:
        r = await self.client.call("logonConnection", user, password, "")
        assert r.success
        return r.authToken


@pytest_twisted.async_yield_fixture
async def world(short_dir: Path) -> AsyncIterator[World]:
    w = World()
    w.clock = Clock()
    w.bridge = await start_bridge(short_dir, clock=w.clock)
    w.peer = await w.bridge.peer()
    await w.peer.logon(1, "alice", "alice-pw")
    await w.peer.logon(2, "bob", "bob-pw")
    registry = w.bridge.service.registry
    w.alice = registry.by_connection(1).session_id
    w.bob = registry.by_connection(2).session_id
    w.client = BlockingClient(w.bridge.thrift_port)
    yield w
    w.client.close()
    w.peer.release()
    await w.bridge.stop()


@pytest_twisted.ensureDeferred
async def test_local_methods(world: World) -> None:
    c = world.client
    version = await c.call("getVersionInfo", TVersion(1, 0))
    assert (version.VersionMajor, version.VersionMinor) == (1, 1)
    assert await c.call("ping", 42) == 42
    assert await c.call("ping", -7) == -7

    assert not (await c.call("logonConnection", "alice", "nope", "")).success
    token = await world.logon("alice", "alice-pw")
    assert len(token) >= 40
    assert await c.call("getPermissionForToken", token) == FULL
    assert await c.call("getPermissionForToken", "bogus") == 0

    sessions = await c.call("enumerateSessions", token, 1)
    assert sessions.returnValue
    registry = world.bridge.service.registry

    def station(session_id: int) -> str:
        """A command module's WinStationName: <module name>:<pid>."""
        return f"xsession:{registry.get(session_id).backend.pid}"

    assert [(s.sessionId, s.connectState, s.winStationName) for s in sessions.sessionInfoList] \
        == [(world.alice, 0, station(world.alice)), (world.bob, 0, station(world.bob))]

    async def query(info_class: int, session: int | None = None) -> Any:
        r = await c.call("querySessionInformation", token, session or world.bob, info_class)
        assert r.returnValue, info_class
        return r.infoValue

    assert (await query(4)).int32Value == world.bob
    assert (await query(5)).stringValue == "bob"
    assert (await query(6)).stringValue == station(world.bob)
    assert (await query(7)).stringValue == ""
    assert (await query(8)).int32Value == ConnectState.ACTIVE
    assert (await query(9)).int32Value == 19041
    assert (await query(10)).stringValue == "client2"
    assert (await query(12)).int16Value == 1
    assert (await query(13)).int32Value == 0
    assert (await query(14)).stringValue == "192.0.2.10"
    display = (await query(15)).displayValue
    assert (display.displayWidth, display.displayHeight, display.colorDepth) == (1920, 1080, 32)
    assert (await query(16)).int16Value == 2
    assert (await query(18)).int64Value == 116444736000000000, "FILETIME of the Clock's 0"
    info = (await query(24)).WTSINFO
    assert (info.SessionId, info.UserName, info.State) == (world.bob, "bob", 0)
    assert info.LogonTime == 116444736000000000
    unknown = await c.call("querySessionInformation", token, world.bob, 3)
    assert not unknown.returnValue

    assert await c.call("logoffConnection", token)
    assert await c.call("getPermissionForToken", token) == 0
    assert not (await c.call("enumerateSessions", token, 1)).returnValue


@pytest_twisted.ensureDeferred
async def test_bridged_methods(world: World) -> None:
    c, peer = world.client, world.peer
    token = await world.logon("alice", "alice-pw")

    opened = await c.call("virtualChannelOpen", token, world.bob, "CLIPRDR", False, 0)
    assert opened.pipeName.endswith("_svc_CLIPRDR_1") and opened.instance == 1
    name, request = peer.requests_seen[-1]
    assert name == "OtsApiVirtualChannelOpenRequest"
    assert (request.connectionId, request.dynamicChannel, request.flags) == (2, False, 0)

    dynamic = await c.call("virtualChannelOpen", token, world.bob, "echo", True, 0x5)
    assert "_dvc_echo_" in dynamic.pipeName
    assert (peer.requests_seen[-1][1].dynamicChannel, peer.requests_seen[-1][1].flags) == (
        True, 5)
    await c.call("virtualChannelOpen", token, world.bob, "echo", True, 0x4)
    assert (peer.requests_seen[-1][1].dynamicChannel, peer.requests_seen[-1][1].flags) == (
        False, 0), "dynamic only with isDynChannel and WTS_CHANNEL_OPTION_DYNAMIC"
    await c.call("virtualChannelOpen", token, world.bob, "echo", False, 0x1)
    assert peer.requests_seen[-1][1].dynamicChannel is False

    assert await c.call("virtualChannelClose", token, world.bob, "CLIPRDR", opened.instance)
    assert not await c.call("virtualChannelClose", token, world.bob, "CLIPRDR", opened.instance)

    assert await c.call("sendMessage", token, world.bob, "Title", "Hello", 0, 5, True) == 1
    message = peer.requests_seen[-1][1]
    assert (message.type, message.parameterNum, message.parameter1, message.parameter2,
            message.timeout) == (1, 2, "Title", "Hello", 5), "MESSAGE_CUSTOM_TYPE"
    assert await c.call("sendMessage", token, world.bob, "T", "M", 0, 0, False) == 32001

    alice_token = world.session_token(world.alice)
    assert not await c.call("startRemoteControlSession", token, world.alice, world.bob,
                            0x47, 2, 0), "a logon token cannot start remote control"
    assert await c.call("startRemoteControlSession", alice_token, world.alice, world.bob,
                        0x47, 2, 0)
    shadow = peer.requests_seen[-1][1]
    assert (shadow.connectionId, shadow.targetConnectionId, shadow.hotKeyVk,
            shadow.hotKeyModifiers) == (1, 2, 0x47, 2)
    registry = world.bridge.service.registry
    assert registry.get(world.alice).shadowing == world.bob
    assert registry.get(world.alice).state is ConnectState.SHADOW, "the spy is in Shadow"
    states = await c.call("enumerateSessions", token, 1)
    assert [s.connectState for s in states.sessionInfoList] == [3, 0]
    assert not await c.call("startRemoteControlSession", alice_token, world.alice, world.bob,
                            0, 0, 0), "already shadowing"
    assert await c.call("stopRemoteControlSession", token, world.bob, world.alice)
    assert peer.requests_seen[-1][0] == "OtsApiStopRemoteControlRequest"
    assert registry.get(world.alice).shadowing is None
    assert registry.get(world.alice).state is ConnectState.ACTIVE
    assert not await c.call("startRemoteControlSession", alice_token, world.alice,
                            world.alice, 0, 0, 0), "no self-shadowing"
    assert not await c.call("startRemoteControlSession", alice_token, world.bob,
                            world.alice, 0, 0, 0), "source must be the caller's session"

    # ogon's RDP server has no DisconnectUserSession handler: a disconnect is
    # a LogoffUserSession for the connection, then the session waits.
    assert await c.call("disconnectSession", token, world.bob, True)
    assert registry.get(world.bob).state is ConnectState.DISCONNECTED
    assert peer.requests_seen[-1][0] == "LogoffUserSessionRequest"
    assert peer.requests_seen[-1][1].connectionId == 2
    assert 2 not in peer.connections, "the RDP server dropped that client"
    assert await c.call("logoffSession", token, world.bob, False)
    assert registry.get(world.bob) is None
    assert await c.call("logoffSession", token, world.alice, True)
    assert registry.get(world.alice) is None
    assert peer.requests_seen[-1][0] == "LogoffUserSessionRequest"


@pytest_twisted.ensureDeferred
async def test_session_token_acts_on_its_own_session(world: World) -> None:
    c = world.client
    bob_token = world.session_token(world.bob)
    assert await c.call("getPermissionForToken", bob_token) == 0x049
    own = await c.call("virtualChannelOpen", bob_token, WTS_CURRENT_SESSION, "rail", False, 0)
    assert own.pipeName and world.peer.requests_seen[-1][1].connectionId == 2
    other = await c.call("virtualChannelOpen", bob_token, world.alice, "rail", False, 0)
    assert (other.pipeName, other.instance) == ("", 0)
    assert await c.call("sendMessage", bob_token, world.alice, "t", "m", 0, 0, True) == 0
    assert not await c.call("disconnectSession", bob_token, world.alice, True)
    assert not await c.call("logoffSession", bob_token, world.alice, True)
    # USER level has QUERY_INFORMATION, so another session may be queried.
    assert (await c.call("querySessionInformation", bob_token, world.alice, 5)).returnValue


@pytest_twisted.ensureDeferred
async def test_refusals_answer_failure_values(world: World) -> None:
    c = world.client
    guest = await world.logon("guest", "guest-pw")
    with capturedLogs() as events:
        assert (await c.call("virtualChannelOpen", guest, world.bob, "x", False, 0)).pipeName \
            == ""
    assert any("lacks VIRTUAL_CHANNEL" in str(e.get("reason")) for e in events)
    assert not (await c.call("enumerateSessions", guest, 1)).returnValue
    assert not (await c.call("querySessionInformation", guest, world.bob, 5)).returnValue
    token = await world.logon("alice", "alice-pw")
    assert (await c.call("virtualChannelOpen", token, 999, "x", False, 0)).pipeName == ""
    assert not (await c.call("querySessionInformation", token, 999, 5)).returnValue
    assert not await c.call("virtualChannelClose", "bogus", world.bob, "x", 1)
    assert await c.call("sendMessage", "", world.bob, "t", "m", 0, 0, True) == 0
    assert (await c.call("virtualChannelOpen", token, world.bob, "BLOCKED", False, 0)
            ).pipeName == "", "channel deny list applies to the OTS API too"
    assert (await c.call("virtualChannelOpen", token, WTS_CURRENT_SESSION, "x", False, 0)
            ).pipeName == "", "a logon token has no current session"
    assert not world.peer.held


@pytest_twisted.ensureDeferred
async def test_peer_failed_and_notfound_answer_failure_values(world: World) -> None:
    c = world.client
    token = await world.logon("alice", "alice-pw")
    world.peer.refuse.add("OtsApiVirtualChannelOpenRequest")
    with capturedLogs() as events:
        r = await c.call("virtualChannelOpen", token, world.bob, "x", False, 0)
    assert (r.pipeName, r.instance) == ("", 0)
    assert any("refused by the stand-in" in str(e.get("reason")) for e in events)
    del world.peer.protocol.handlers[MSG_MESSAGE]
    assert await c.call("sendMessage", token, world.bob, "t", "m", 0, 0, True) == 0


@pytest_twisted.ensureDeferred
async def test_timeout_answers_failure_value(world: World) -> None:
    c = world.client
    token = await world.logon("alice", "alice-pw")
    world.peer.hold = True
    seen = world.peer.requests_count
    pending = c.call("virtualChannelOpen", token, world.bob, "slow", False, 0)
    await world.peer.when_requests_seen(seen + 1)
    world.clock.advance(9.9)
    assert not pending.called
    world.clock.advance(0.2)
    r = await pending
    assert (r.pipeName, r.instance) == ("", 0)
    world.peer.release()  # the late answer is logged and ignored
    assert await c.call("ping", 1) == 1


@pytest_twisted.ensureDeferred
async def test_rdp_server_dying_fails_pending_calls_at_once(world: World) -> None:
    c = world.client
    token = await world.logon("alice", "alice-pw")
    extra = BlockingClient(world.bridge.thrift_port)
    world.peer.hold = True
    seen = world.peer.requests_count
    pending = [c.call("virtualChannelOpen", token, world.bob, "a", False, 0),
               extra.call("disconnectSession", token, world.alice, True)]
    await world.peer.when_requests_seen(seen + 2)
    started = time.monotonic()
    world.peer.close()
    results = [await d for d in pending]
    elapsed = time.monotonic() - started
    # As ogon: a disconnect whose LogoffUserSession was answered (here: failed
    # by the loss) goes ahead; the session is disconnected either way.
    assert results[0].pipeName == "" and results[1] is True
    assert elapsed < 1.0, "no clock advance: failed by the disconnect, not a timeout"
    extra.close()
    # No RDP server at all: failure values at once, and sessions wait disconnected.
    assert (await c.call("virtualChannelOpen", token, world.bob, "a", False, 0)).pipeName == ""
    assert await c.call("sendMessage", token, world.bob, "t", "m", 0, 0, True) == 0
    assert all(s.state is ConnectState.DISCONNECTED for s in world.bridge.service.registry)


@pytest_twisted.ensureDeferred
async def test_unframed_client_is_served_and_named(world: World) -> None:
    buffered = BlockingClient(world.bridge.thrift_port, framed=False)
    with capturedLogs() as events:
        assert await buffered.call("ping", 9) == 9
        assert await buffered.call("ping", 10) == 10
    buffered.close()
    assert any("unframed" in e.get("log_format", "") for e in events)


@pytest_twisted.ensureDeferred
async def test_handler_bug_answers_internal_error_and_stays_up(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(token: str) -> int:
        raise RuntimeError("bug")

    monkeypatch.setattr(world.bridge.service.otsapi, "getPermissionForToken", broken)
    with pytest.raises(TApplicationException) as raised:
        await world.client.call("getPermissionForToken", "x")
    assert raised.value.type == TApplicationException.INTERNAL_ERROR
    assert await world.client.call("ping", 3) == 3, "same connection still works"


@pytest_twisted.ensureDeferred
async def test_many_clients_out_of_order_answers_reach_their_callers(world: World) -> None:
    token = await world.logon("alice", "alice-pw")
    count = 200
    clients = [await twisted_client(world.bridge.thrift_port) for _ in range(count)]
    world.peer.hold = True
    seen = world.peer.requests_count
    calls = [proto.client.virtualChannelOpen(token, world.bob, f"ch{i}", False, 0)
             for i, proto in enumerate(clients)]
    await world.peer.when_requests_seen(seen + count)
    order = list(range(count))
    random.Random(7).shuffle(order)
    world.peer.release(order)
    results = [await d for d in calls]
    assert [r.pipeName.split("_svc_")[1].rsplit("_", 1)[0] for r in results] == [
        f"ch{i}" for i in range(count)]
    for proto in clients:
        proto.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_send_message_waits_as_ogon(world: World) -> None:
    c, peer = world.client, world.peer
    token = await world.logon("alice", "alice-pw")
    peer.hold = True
    seen = peer.requests_count
    timed = c.call("sendMessage", token, world.bob, "t", "m", 0, 30, True)
    await peer.when_requests_seen(seen + 1)
    world.clock.advance(29.9)
    assert not timed.called, "waits exactly its timeout, not the call timeout"
    world.clock.advance(0.2)
    assert await timed == 32000, "IDTIMEOUT"
    forever = c.call("sendMessage", token, world.bob, "t", "m", 0, 0, True)
    await peer.when_requests_seen(seen + 2)
    world.clock.advance(7200)  # far past the call timeout (the token lives 24 h)
    assert not forever.called, "timeout 0: until the user answers"
    peer.hold = False
    peer.release([1])
    assert await forever == 1, "the user's IDOK"
    peer.message_result = 0
    assert await c.call("sendMessage", token, world.bob, "t", "m", 0, 5, True) == 32000, \
        "an answer of 0 means the box timed out"


@pytest_twisted.ensureDeferred
async def test_stand_in_answers_only_what_ogons_rdp_server_answers(world: World) -> None:
    from protocols.errors import IcpNotFoundError
    from protocols.generated import ICP_pb2
    from protocols.icp import MSG_DISCONNECT_USER_SESSION, MSG_PROPERTY_STRING

    link = world.bridge.service.link
    for msg_type, request in [
            (MSG_DISCONNECT_USER_SESSION, ICP_pb2.DisconnectUserSessionRequest(connectionId=1)),
            (MSG_PROPERTY_STRING, ICP_pb2.PropertyStringRequest(connectionId=1, path="x"))]:
        with pytest.raises(IcpNotFoundError):
            await link.call(msg_type, request)
    assert all(name != "DisconnectUserSessionRequest" for name, _ in world.peer.requests_seen), \
        "NOTFOUND: the stand-in has no handler for it, as ogon's RDP server has none"

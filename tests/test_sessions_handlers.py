"""The session registry and the ICP request handlers, without sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from bridge.auth import InMemoryAuthenticator
from bridge.config import Config
from bridge.icp_handlers import ChannelPolicy, RdpRequestHandlers
from bridge.permissions import FULL
from bridge.sessions import ConnectState, SessionEvent, SessionRegistry
from protocols.generated import ICP_pb2


def logon_request(connection_id: int, username: str = "", password: str = "") -> Any:
    return ICP_pb2.LogonUserRequest(
        connectionId=connection_id, username=username, password=password, domain="",
        width=800, height=600, colorDepth=16, clientHostName="h", clientAddress="a",
        clientBuildNumber=1, clientProductId=2, clientHardwareId=3, clientProtocolType=2)


class HandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = SessionRegistry(self.clock)
        self.events: list[tuple[str, int]] = []
        self.registry.observe(lambda e, s: self.events.append((e.value, s.session_id)))
        config = Config(properties={"n": 5, "b": False, "s": "x", "big": 2**33, "neg": -1},
                        user_properties={"alice": {"s": "y"}}, channels_allow=["cliprdr", "rail"],
                        channels_deny=["RAIL"], greeter_endpoint="greet-{session_id}",
                        desktop_endpoint="desk-{session_id}", max_width=1024, max_height=768)
        self.handlers = RdpRequestHandlers(
            self.registry, InMemoryAuthenticator({"alice": ("pw", FULL)}), config,
            make_cookie=lambda: "cookie")

    def logon(self, connection_id: int, username: str = "", password: str = "") -> Any:
        result = self.handlers.logon_user(logon_request(connection_id, username, password))
        return self.successResultOf(result) if hasattr(result, "addCallback") else result

    def test_empty_user_gets_the_greeter_session(self) -> None:
        r = self.logon(3)
        assert (r.serviceEndpoint, r.maxWidth, r.maxHeight) == ("greet-1", 1024, 768)
        session = self.registry.by_connection(3)
        assert session.state is ConnectState.CONNECTED and not session.logged_on
        assert (r.backendCookie, r.ogonCookie) == ("cookie", "cookie")

    def test_bad_password_keeps_the_greeter_then_good_one_logs_on_in_place(self) -> None:
        assert self.logon(3, "alice", "bad").serviceEndpoint == "greet-1"
        assert self.logon(3, "alice", "pw").serviceEndpoint == "desk-1"
        session = self.registry.get(1)
        assert session.state is ConnectState.ACTIVE and session.permission == FULL
        assert self.events == [("created", 1), ("logged-on", 1)]

    def test_reconnect_to_disconnected_session(self) -> None:
        self.logon(1, "alice", "pw")
        assert self.handlers.disconnect_user_session(
            ICP_pb2.DisconnectUserSessionRequest(connectionId=1)).disconnected
        assert self.registry.get(1).state is ConnectState.DISCONNECTED
        self.logon(9)  # a greeter on the new connection first
        assert self.logon(9, "alice", "pw").serviceEndpoint == "desk-1"
        assert self.registry.by_connection(9).session_id == 1
        assert self.registry.get(2) is None, "the greeter session ended"
        assert ("reconnected", 1) in self.events

    def test_session_ids_are_not_reused(self) -> None:
        self.logon(1, "alice", "pw")
        self.handlers.logoff_user_session(ICP_pb2.LogoffUserSessionRequest(connectionId=1))
        self.logon(1, "alice", "pw")
        assert [s.session_id for s in self.registry] == [2]

    def test_unknown_connections(self) -> None:
        assert not self.handlers.disconnect_user_session(
            ICP_pb2.DisconnectUserSessionRequest(connectionId=5)).disconnected
        assert not self.handlers.logoff_user_session(
            ICP_pb2.LogoffUserSessionRequest(connectionId=5)).loggedoff
        assert not self.handlers.remote_control_ended(
            ICP_pb2.RemoteControlEndedRequest(spyId=5, spiedId=6)).success

    def test_greeter_disconnect_ends_it(self) -> None:
        self.logon(4)
        self.handlers.disconnect_user_session(ICP_pb2.DisconnectUserSessionRequest(connectionId=4))
        assert len(self.registry) == 0

    def test_remote_control_ended_clears_the_link(self) -> None:
        self.logon(1, "alice", "pw")
        self.logon(2, "alice", "pw")  # a second session of alice
        spy, target = self.registry.by_connection(1), self.registry.by_connection(2)
        self.registry.set_shadowing(spy, target)
        assert self.handlers.remote_control_ended(
            ICP_pb2.RemoteControlEndedRequest(spyId=1, spiedId=2)).success
        assert spy.shadowing is None

    def test_properties(self) -> None:
        h = self.handlers
        self.logon(1, "alice", "pw")
        assert (h.property_number(ICP_pb2.PropertyNumberRequest(connectionId=7, path="n")).value,
                h.property_number(ICP_pb2.PropertyNumberRequest(connectionId=7, path="n")
                                  ).success) == (5, True)
        for path in ("big", "neg", "b", "missing"):
            assert not h.property_number(
                ICP_pb2.PropertyNumberRequest(connectionId=7, path=path)).success, path
        b = h.property_bool(ICP_pb2.PropertyBoolRequest(connectionId=7, path="b"))
        assert (b.value, b.success) == (False, True)
        assert not h.property_bool(ICP_pb2.PropertyBoolRequest(connectionId=7, path="n")).success
        assert h.property_string(ICP_pb2.PropertyStringRequest(connectionId=7, path="s")
                                 ).value == "x"
        assert h.property_string(ICP_pb2.PropertyStringRequest(connectionId=1, path="s")
                                 ).value == "y", "alice's override"
        bulk = h.property_bulk(ICP_pb2.PropertyBulkRequest(connectionId=1, properties=[
            {"propertyType": 1, "propertyPath": "neg"}, {"propertyType": 1, "propertyPath": "big"},
            {"propertyType": 2, "propertyPath": "s"}]))
        assert [(r.success, r.intValue, r.stringValue) for r in bulk.results] == [
            (True, -1, ""), (False, 0, ""), (True, 0, "y")]

    def test_channel_policy(self) -> None:
        policy = ChannelPolicy(allow=["cliprdr", "rail"], deny=["RAIL"])
        assert policy.allowed("CLIPRDR") and not policy.allowed("rail")
        assert not policy.allowed("rdpdr")
        assert ChannelPolicy([], []).allowed("anything")
        answer = self.handlers.is_channel_allowed(
            ICP_pb2.IsChannelAllowedRequest(channelName="rdpdr"))
        assert answer.channelAllowed is False

    def test_rdp_server_loss_disconnects_users_and_ends_greeters(self) -> None:
        self.logon(1, "alice", "pw")
        self.logon(2)
        self.registry.rdp_server_lost()
        assert [(s.session_id, s.state) for s in self.registry] == [
            (1, ConnectState.DISCONNECTED)]
        assert self.events[-1] == (SessionEvent.ENDED.value, 2)

"""The session lifecycle and the ICP handlers without sockets or processes:
a fake backend launcher and a fake RDP server, time on a Clock."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from bridge.backends.modules import BackendError, LaunchContext, Module
from bridge.lifecycle.facade import SessionLifecycle
from bridge.lifecycle.greeter_login import (
    AUTH_BAD_CREDENTIALS,
    AUTH_SUCCESSFUL,
    AUTH_WRONG_SESSION_STATE,
)
from bridge.rdp.handlers import RdpRequestHandlers
from bridge.security.auth import InMemoryAuthenticator
from bridge.security.permissions import FULL, USER
from bridge.security.token_files import SessionTokenFiles
from bridge.security.tokens import TokenStore
from bridge.sessions.model import BackendRecord, ConnectState
from bridge.sessions.properties import ChannelPolicy, PropertyTable
from bridge.sessions.registry import SessionRegistry
from protocols import icp
from protocols.errors import IcpHandlerError, IcpNotFoundError, IcpTimeoutError
from protocols.generated import ICP_pb2, SBP_pb2


class FakeBackend:
    def __init__(self, module: Module, context: LaunchContext, pid: int) -> None:
        self.module = module
        self.context = context
        self.pid = pid
        endpoint = module.endpoint.format(session_id=context.session_id)
        self.record = BackendRecord(module.name, pid, 1000 + pid, endpoint)
        self.running = True
        self.stopped = False
        self.detached = False
        # ogon's module Connect/Disconnect, in order: "connect", "disconnect".
        self.told: list[str] = []
        self._waiters: list[Deferred[str]] = []

    @property
    def name(self) -> str:
        return self.module.name

    def connected(self) -> None:
        self.told.append("connect")

    def disconnected(self) -> None:
        self.told.append("disconnect")

    def detach(self) -> None:
        self.detached = True

    def when_exited(self) -> Deferred[str]:
        if not self.running:
            return succeed("gone")
        d: Deferred[str] = Deferred()
        self._waiters.append(d)
        return d

    def exit(self, how: str = "exit status 0") -> None:
        self.running = False
        for d in self._waiters:
            d.callback(how)

    def stop(self) -> Deferred[str]:
        self.stopped = True
        d = self.when_exited()
        self.exit("killed by signal 15")
        return d


class FakeLauncher:
    """Starts FakeBackends; ``fail`` names modules that do not start,
    ``hold`` modules whose start waits for ``ready()``."""

    def __init__(self) -> None:
        self.started: list[FakeBackend] = []
        self.fail: set[str] = set()
        self.hold: set[str] = set()
        self.waiting: list[tuple[Deferred[FakeBackend], FakeBackend]] = []
        self.orphans_killed: list[BackendRecord] = []
        self.adoptable: dict[int, bool] = {}
        self._pid = 100

    def start(self, module: Module, context: LaunchContext) -> Deferred[FakeBackend]:
        if module.name in self.fail:
            return fail(BackendError(f"{module.name} exited with status 3 before it was ready",
                                     ["boom"]))
        self._pid += 1
        backend = FakeBackend(module, context, self._pid)
        self.started.append(backend)
        if module.name in self.hold:
            d: Deferred[FakeBackend] = Deferred()
            self.waiting.append((d, backend))
            return d
        return succeed(backend)

    def ready(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, backend in waiting:
            d.callback(backend)

    def adopt(self, session_id: int, module: Module, record: BackendRecord) -> Any:
        if not self.adoptable.get(record.pid):
            return None
        backend = FakeBackend(module, LaunchContext(session_id, "", "", 0, 0, 0, 0, 0, "", "",
                                                    "", ""), record.pid)
        backend.record = record
        self.started.append(backend)
        return backend

    def kill_orphan(self, record: BackendRecord, stop_timeout: float = 5.0,
                    session_id: int = 0, why: str = "") -> None:
        self.orphans_killed.append(record)

    def stop_unowned(self, modules: Any, also_owned: Any = ()) -> None:
        self.unowned_stopped = True

    def close(self) -> None:
        pass


class FakeRdp:
    """The RDP server: answers by ``answers[msg_type](request)`` (a response,
    an exception to fail with, or None to hold the call)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Message, float | None]] = []
        self.held: list[Deferred[Any]] = []
        self.answers: dict[int, Callable[[Any], Any]] = {
            icp.MSG_LOGOFF_USER_SESSION:
                lambda r: ICP_pb2.LogoffUserSessionResponse(loggedoff=True),
            icp.MSG_SWITCH_TO: lambda r: ICP_pb2.SwitchToResponse(success=True),
            icp.MSG_START_REMOTE_CONTROL:
                lambda r: ICP_pb2.OtsApiStartRemoteControlResponse(success=True),
            icp.MSG_STOP_REMOTE_CONTROL:
                lambda r: ICP_pb2.OtsApiStopRemoteControlResponse(success=True),
            icp.MSG_MESSAGE: lambda r: ICP_pb2.MessageResponse(result=6),
        }

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    def call(self, msg_type: int, request: Message, timeout: float | None = None
             ) -> Deferred[Any]:
        self.calls.append((type(request).__name__, request, timeout))
        answer = self.answers.get(msg_type, lambda r: IcpNotFoundError(msg_type))(request)
        if answer is None:
            d: Deferred[Any] = Deferred()
            self.held.append(d)
            return d
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


def client_request(connection_id: int, username: str = "", password: str = "") -> Any:
    return ICP_pb2.LogonUserRequest(
        connectionId=connection_id, username=username, password=password, domain="",
        width=2560, height=1600, colorDepth=24, clientHostName=f"host{connection_id}",
        clientAddress="192.0.2.1", clientBuildNumber=1, clientProductId=2, clientHardwareId=3,
        clientProtocolType=2)


MODULES = {name: Module(name, ("true",), f"ogon_{{session_id}}_{name}")
           for name in ("greeter", "xsession", "kde")}


class LifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.make()

    def make(self, properties: dict[str, Any] | None = None,
             user_properties: dict[str, dict[str, Any]] | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.registry = SessionRegistry(self.clock)
        self.changes: list[tuple[str, int, str | None]] = []
        self.registry.observe(lambda c: self.changes.append(
            (c.event.value, c.session.session_id,
             c.new_state.name if c.new_state is not None else None)))
        self.properties = PropertyTable(
            {"session.timeout": 5, **(properties or {})}, user_properties or {})
        self.tokens = TokenStore(self.clock)
        self.files: list[int] = []
        token_files = SessionTokenFiles.__new__(SessionTokenFiles)
        token_files.tokens = self.tokens
        token_files._write = lambda session, token: self.files.append(  # type: ignore
            session.session_id)
        token_files.remove = lambda session_id: None  # type: ignore
        token_files.attach(self.registry)
        self.launcher = FakeLauncher()
        self.rdp = FakeRdp()
        self.lifecycle = SessionLifecycle(
            self.registry, self.rdp, InMemoryAuthenticator({
                "alice": ("pw", FULL), "bob": ("pw", int(USER))}),
            self.properties, MODULES, self.launcher, token_files, self.clock,
            call_timeout=10.0, cookie=lambda: "c" * 50)
        self.handlers = RdpRequestHandlers(self.registry, self.lifecycle, self.properties,
                                           ChannelPolicy(self.properties, [], ["rdpdr"]))

    # -- helpers ---------------------------------------------------------------

    def logon(self, connection_id: int, username: str = "", password: str = "") -> Any:
        return self.successResultOf(
            self.handlers.logon_user(client_request(connection_id, username, password)))

    def sbp(self, session_id: int, username: str, password: str) -> Any:
        return self.handlers.sbp_authenticate_user(SBP_pb2.AuthenticateUserRequest(
            sessionId=session_id, username=username, password=password, domain=""))

    def backend_of(self, session_id: int) -> FakeBackend:
        return [b for b in self.launcher.started
                if b.context.session_id == session_id and b.running][-1]

    # -- LogonUser -------------------------------------------------------------------

    def test_empty_user_starts_the_greeter_and_answers_its_pipe(self) -> None:
        r = self.logon(3)
        assert r.serviceEndpoint == "\\\\.\\pipe\\ogon_1_greeter"
        assert (r.maxWidth, r.maxHeight) == (1920, 1200), "ogon's session.maxX/YRes"
        assert (r.backendCookie, r.ogonCookie) == ("c" * 50, "c" * 50)
        session = self.registry.by_connection(3)
        assert session.state is ConnectState.CONNECTED and not session.logged_on
        assert session.client.width == 1920 and session.client.initial_width == 2560
        assert [b.module.name for b in self.launcher.started] == ["greeter"]
        assert self.changes == [("created", 1, "INIT"), ("backend-started", 1, "INIT"),
                                ("changed", 1, "CONNECTED")]

    def test_logon_answers_only_once_the_backend_is_ready(self) -> None:
        self.launcher.hold.add("xsession")
        d = self.handlers.logon_user(client_request(1, "alice", "pw"))
        self.assertNoResult(d)
        self.launcher.ready()
        assert self.successResultOf(d).serviceEndpoint == "\\\\.\\pipe\\ogon_1_xsession"
        session = self.registry.get(1)
        assert session.state is ConnectState.ACTIVE and session.username == "alice"
        assert session.permission == FULL and self.files == [1], "token file written"

    def test_the_module_property_chooses_the_desktop(self) -> None:
        self.make(user_properties={"alice": {"module": "kde"}})
        assert self.logon(1, "alice", "pw").serviceEndpoint.endswith("ogon_1_kde")
        assert self.logon(2, "bob", "pw").serviceEndpoint.endswith("ogon_2_xsession")

    def test_bad_password_gets_the_greeter_with_the_typed_name(self) -> None:
        assert self.logon(1, "alice", "bad").serviceEndpoint.endswith("ogon_1_greeter")
        assert self.launcher.started[0].context.typed_user == "alice"

    def test_a_desktop_that_does_not_start_falls_back_to_the_greeter(self) -> None:
        self.launcher.fail.add("xsession")
        r = self.logon(1, "alice", "pw")
        assert r.serviceEndpoint.endswith("_greeter")
        assert [s.session_id for s in self.registry] == [2]
        assert ("ended", 1, None) in self.changes

    def test_a_greeter_that_does_not_start_answers_failed(self) -> None:
        self.launcher.fail.add("greeter")
        failure = self.failureResultOf(self.handlers.logon_user(client_request(1)),
                                       IcpHandlerError)
        assert "greeter" in str(failure.value)
        assert len(self.registry) == 0

    def test_unconfigured_module_is_a_backend_error(self) -> None:
        self.make(properties={"module": "wayland"})
        assert self.logon(1, "alice", "pw").serviceEndpoint.endswith("_greeter")

    def test_reconnect_to_the_disconnected_session(self) -> None:
        first = self.logon(1, "alice", "pw")
        assert self.handlers.disconnect_user_session(
            ICP_pb2.DisconnectUserSessionRequest(connectionId=1)).disconnected
        session = self.registry.get(1)
        assert session.state is ConnectState.DISCONNECTED and session.connection_id is None
        again = self.logon(7, "alice", "pw")
        assert again.serviceEndpoint == first.serviceEndpoint
        assert self.registry.by_connection(7) is session
        assert session.state is ConnectState.ACTIVE
        assert len(self.launcher.started) == 1, "nothing started twice"

    def test_single_session_takes_over_an_active_session(self) -> None:
        self.logon(1, "alice", "pw")
        self.logon(2, "alice", "pw")
        session = self.registry.get(1)
        assert session.connection_id == 2 and len(self.registry) == 1
        assert [(n, r.connectionId) for n, r, _ in self.rdp.calls] == [
            ("LogoffUserSessionRequest", 1)], "the old client is dropped"

    def test_without_single_session_a_second_logon_gets_a_second_session(self) -> None:
        self.make(properties={"session.singleSession": False})
        self.logon(1, "alice", "pw")
        self.logon(2, "alice", "pw")
        assert [s.connection_id for s in self.registry] == [1, 2]

    def test_reconnect_false_and_single_session_ends_the_old_session(self) -> None:
        self.make(properties={"session.reconnect": False})
        self.logon(1, "alice", "pw")
        old = self.backend_of(1)
        self.logon(2, "alice", "pw")
        assert self.registry.get(1) is None and old.stopped
        assert self.registry.by_connection(2).session_id == 2

    def test_reconnect_from_same_client_only(self) -> None:
        self.make(properties={"session.reconnect.fromSameClient": True,
                              "session.singleSession": False})
        self.logon(1, "alice", "pw")
        self.handlers.disconnect_user_session(ICP_pb2.DisconnectUserSessionRequest(
            connectionId=1))
        self.logon(2, "alice", "pw")  # host2: not the same client
        assert len(self.registry) == 2
        r = self.handlers.logon_user(ICP_pb2.LogonUserRequest(
            **{**_fields(client_request(3, "alice", "pw")), "clientHostName": "host1"}))
        assert self.successResultOf(r).serviceEndpoint.endswith("ogon_1_xsession")

    def test_group_black_list_refuses_a_logon(self) -> None:
        self.make(properties={"permission.groups.blackList": "everyone"})
        import bridge.lifecycle.authentication as lifecycle_module

        original = lifecycle_module.logon_allowed
        lifecycle_module.logon_allowed = lambda p, u: original(p, u, lambda name: ["everyone"])
        try:
            assert self.logon(1, "alice", "pw").serviceEndpoint.endswith("_greeter")
        finally:
            lifecycle_module.logon_allowed = original

    # -- the backend's life ---------------------------------------------------------

    def test_a_backend_that_exits_ends_its_session(self) -> None:
        self.logon(4, "alice", "pw")
        self.tokens.issue  # noqa: B018 - the session token exists
        assert any(r.session_id == 1 for r in self.tokens._records.values())
        self.backend_of(1).exit("exit status 1")
        assert self.registry.get(1) is None
        assert [(n, r.connectionId) for n, r, _ in self.rdp.calls] == [
            ("LogoffUserSessionRequest", 4)], "the RDP server drops the client"
        assert not any(r.session_id == 1 for r in self.tokens._records.values())

    def test_logoff_stops_the_backend(self) -> None:
        self.logon(1, "alice", "pw")
        backend = self.backend_of(1)
        session = self.registry.get(1)
        assert self.successResultOf(Deferred.fromCoroutine(
            self.lifecycle.logoff(session, wait=True)))
        assert backend.stopped and self.registry.get(1) is None

    def test_session_timeout_ends_a_disconnected_session(self) -> None:
        self.logon(1, "alice", "pw")
        backend = self.backend_of(1)
        self.handlers.disconnect_user_session(ICP_pb2.DisconnectUserSessionRequest(
            connectionId=1))
        self.clock.advance(5 * 60 - 1)
        assert self.registry.get(1) is not None
        self.clock.advance(1)
        assert self.registry.get(1) is None and backend.stopped

    def test_reconnecting_cancels_the_timeout(self) -> None:
        self.logon(1, "alice", "pw")
        self.handlers.disconnect_user_session(ICP_pb2.DisconnectUserSessionRequest(
            connectionId=1))
        self.clock.advance(60)
        self.logon(2, "alice", "pw")
        self.clock.advance(3600)
        assert self.registry.get(1).state is ConnectState.ACTIVE

    def test_session_timeout_zero_ends_at_disconnect_negative_never(self) -> None:
        self.make(properties={"session.timeout": 0})
        self.logon(1, "alice", "pw")
        self.handlers.disconnect_user_session(ICP_pb2.DisconnectUserSessionRequest(
            connectionId=1))
        assert self.registry.get(1) is None, "ogon: timeout 0 ends it at once"
        self.make(properties={"session.timeout": -1})
        self.logon(1, "alice", "pw")
        self.handlers.disconnect_user_session(ICP_pb2.DisconnectUserSessionRequest(
            connectionId=1))
        self.clock.advance(10**7)
        assert self.registry.get(1).state is ConnectState.DISCONNECTED

    def test_greeter_disconnect_ends_it(self) -> None:
        self.logon(1)
        backend = self.backend_of(1)
        assert self.handlers.disconnect_user_session(
            ICP_pb2.DisconnectUserSessionRequest(connectionId=1)).disconnected
        assert len(self.registry) == 0 and backend.stopped

    def test_rdp_server_loss_disconnects_users_and_ends_greeters(self) -> None:
        self.logon(1, "alice", "pw")
        self.logon(2)
        self.lifecycle.rdp_server_lost()
        assert [(s.session_id, s.state) for s in self.registry] == [
            (1, ConnectState.DISCONNECTED)]

    def test_restart_adopts_live_backends_and_ends_the_rest(self) -> None:
        self.logon(1, "alice", "pw")
        self.logon(2, "bob", "pw")
        kept = [self.registry.get(1), self.registry.get(2)]
        for session in kept:
            self.registry.disconnect(session, "bridge restarted")
        self.launcher.adoptable = {kept[0].backend.pid: True}
        greeter = self.registry.get(1).__class__(
            9, "", "", ConnectState.CONNECTED, backend=BackendRecord("greeter", 77, 1, "g"))
        self.lifecycle.backends.clear()
        self.lifecycle.adopt(kept, [greeter])
        assert self.registry.get(1) is not None and self.registry.get(2) is None
        assert self.launcher.orphans_killed == [greeter.backend]
        self.backend_of(1).exit()
        assert self.registry.get(1) is None, "the adopted backend is watched"

    def test_a_backend_whose_module_is_no_longer_configured_is_adopted_as_it_runs(self) -> None:
        self.logon(1, "alice", "pw")
        session = self.registry.get(1)
        self.registry.disconnect(session, "bridge restarted")
        session.backend.module = "gone"
        self.launcher.adoptable = {session.backend.pid: True}
        self.lifecycle.backends.clear()
        self.lifecycle.adopt([session], [])
        adopted = self.backend_of(1)
        assert (adopted.module.name, adopted.module.command, adopted.module.endpoint) == (
            "gone", (), session.backend.endpoint)
        adopted.exit()
        assert self.registry.get(1) is None, "the adopted backend is watched"

    # -- SBP: the greeter's login -------------------------------------------------

    def test_greeter_login_starts_the_desktop_then_switches(self) -> None:
        self.logon(5)
        greeter_backend = self.backend_of(1)
        version = self.handlers.sbp_version_info(SBP_pb2.VersionInfoRequest(
            sessionId=1, vmajor=1, vminor=1))
        assert (version.vmajor, version.vminor) == (1, 1)
        answer = self.successResultOf(self.sbp(1, "alice", "pw"))
        assert answer.authStatus == AUTH_SUCCESSFUL
        [(name, switch, _)] = self.rdp.calls
        assert name == "SwitchToRequest"
        assert (switch.connectionId, switch.serviceEndpoint, switch.maxWidth,
                switch.maxHeight) == (5, "\\\\.\\pipe\\ogon_1_xsession", 1920, 1200)
        session = self.registry.get(1)
        assert session.username == "alice" and session.state is ConnectState.ACTIVE
        assert session.backend.module == "xsession" and greeter_backend.stopped
        assert self.files == [1]
        assert ("logged-on", 1, "ACTIVE") in self.changes

    def test_greeter_stays_until_the_switch_succeeds(self) -> None:
        self.logon(5)
        greeter_backend = self.backend_of(1)
        self.rdp.answers[icp.MSG_SWITCH_TO] = lambda r: ICP_pb2.SwitchToResponse(success=False)
        self.failureResultOf(self.sbp(1, "alice", "pw"), IcpHandlerError)
        session = self.registry.get(1)
        assert not session.logged_on and session.state is ConnectState.CONNECTED
        assert not greeter_backend.stopped and session.backend.module == "greeter"
        desktop = next(b for b in self.launcher.started if b.module.name == "xsession")
        assert desktop.stopped, "the unused desktop is stopped again"

    def test_greeter_login_bad_credentials_and_wrong_state(self) -> None:
        self.logon(5)
        assert self.successResultOf(self.sbp(1, "alice", "no")).authStatus == \
            AUTH_BAD_CREDENTIALS
        # An unknown session: FAILED without a description, as ogon answers.
        unknown = self.failureResultOf(self.sbp(9, "alice", "pw"), IcpHandlerError)
        assert not unknown.value.on_wire
        self.logon(6, "bob", "pw")
        assert self.successResultOf(self.sbp(2, "alice", "pw")).authStatus == \
            AUTH_WRONG_SESSION_STATE
        assert self.rdp.calls == []

    def test_greeter_login_reconnects_a_disconnected_session(self) -> None:
        self.logon(1, "alice", "pw")
        self.handlers.disconnect_user_session(ICP_pb2.DisconnectUserSessionRequest(
            connectionId=1))
        self.logon(2)
        greeter_backend = self.backend_of(2)
        assert self.successResultOf(self.sbp(2, "alice", "pw")).authStatus == AUTH_SUCCESSFUL
        [(name, switch, _)] = self.rdp.calls
        assert (name, switch.connectionId, switch.serviceEndpoint) == (
            "SwitchToRequest", 2, "\\\\.\\pipe\\ogon_1_xsession")
        assert self.registry.get(2) is None and greeter_backend.stopped
        assert self.registry.by_connection(2).session_id == 1
        assert ("switched", 1, "ACTIVE") in self.changes

    def test_modules_hear_clients_come_and_go_where_ogon_tells_them(self) -> None:
        """ogon's module Connect/Disconnect (startvc, ModuleConnect) follow
        Session::setConnectState: a client arriving or returning, leaving."""
        self.logon(1, "alice", "pw")
        desktop = self.backend_of(1)
        assert desktop.told == ["connect"], "Init -> Connected: the first client"
        self.handlers.disconnect_user_session(ICP_pb2.DisconnectUserSessionRequest(
            connectionId=1))
        assert desktop.told == ["connect", "disconnect"]
        self.logon(2, "alice", "pw")
        assert desktop.told == ["connect", "disconnect", "connect"], "a reconnect"
        self.logon(3, "alice", "pw")
        assert desktop.told[3:] == ["disconnect", "connect"], "a take-over: one goes, one comes"
        self.logon(4)
        greeter = self.backend_of(2)
        assert greeter.told == ["connect"]
        self.successResultOf(self.sbp(2, "bob", "pw"))
        assert self.backend_of(2).told == [], \
            "a desktop started by a greeter login hears no Connect (Connected -> Active)"

    def test_sbp_of_another_major_is_refused(self) -> None:
        self.logon(5)
        self.handlers.sbp_version_info(SBP_pb2.VersionInfoRequest(sessionId=1, vmajor=2,
                                                                  vminor=0))
        self.failureResultOf(self.sbp(1, "alice", "pw"), IcpHandlerError)

    def test_end_session_ends_it(self) -> None:
        self.logon(5, "alice", "pw")
        backend = self.backend_of(1)
        r = self.successResultOf(self.handlers.sbp_end_session(
            SBP_pb2.EndSessionRequest(sessionId=1)))
        assert r.success and backend.stopped and self.registry.get(1) is None
        assert self.rdp.names() == ["LogoffUserSessionRequest"]
        gone = self.failureResultOf(self.handlers.sbp_end_session(
            SBP_pb2.EndSessionRequest(sessionId=1)), IcpHandlerError)
        assert not gone.value.on_wire, "ogon: FAILED, no description"

    # -- OTS API transitions ----------------------------------------------------------

    def test_disconnect_waits_for_the_rdp_server_or_not(self) -> None:
        self.logon(1, "alice", "pw")
        session = self.registry.get(1)
        self.rdp.answers[icp.MSG_LOGOFF_USER_SESSION] = lambda r: None
        waiting = Deferred.fromCoroutine(self.lifecycle.disconnect(session, wait=True))
        self.assertNoResult(waiting)
        assert session.state is ConnectState.ACTIVE
        self.rdp.held[0].callback(ICP_pb2.LogoffUserSessionResponse(loggedoff=True))
        assert self.successResultOf(waiting)
        assert session.state is ConnectState.DISCONNECTED

        self.logon(2, "alice", "pw")
        quick = Deferred.fromCoroutine(self.lifecycle.disconnect(session, wait=False))
        assert self.successResultOf(quick), "no wait: true once sent"
        assert session.state is ConnectState.DISCONNECTED

    def test_disconnect_with_wait_times_out(self) -> None:
        self.logon(1, "alice", "pw")
        session = self.registry.get(1)
        self.rdp.answers[icp.MSG_LOGOFF_USER_SESSION] = lambda r: IcpTimeoutError(5, 10)
        assert not self.successResultOf(Deferred.fromCoroutine(
            self.lifecycle.disconnect(session, wait=True)))
        assert session.state is ConnectState.ACTIVE, "no answer: nothing changed"

    def test_logoff_ends_whatever_the_rdp_server_answers(self) -> None:
        self.logon(1, "alice", "pw")
        self.rdp.answers[icp.MSG_LOGOFF_USER_SESSION] = lambda r: IcpNotFoundError(5)
        assert not self.successResultOf(Deferred.fromCoroutine(
            self.lifecycle.logoff(self.registry.get(1), wait=True)))
        assert self.registry.get(1) is None

    def test_shadowing_sets_the_spy_to_shadow_and_back(self) -> None:
        self.logon(1, "alice", "pw")
        self.logon(2, "bob", "pw")
        spy, target = self.registry.get(1), self.registry.get(2)
        assert self.successResultOf(Deferred.fromCoroutine(
            self.lifecycle.start_shadow(spy, target, 0x47, 2, 0)))
        assert spy.state is ConnectState.SHADOW and spy.shadowing == 2
        assert target.state is ConnectState.ACTIVE
        assert self.lifecycle.remote_control_ended(1)
        assert spy.state is ConnectState.ACTIVE and spy.shadowing is None

    def test_shadowing_needs_an_active_target_and_asks_when_told_to(self) -> None:
        self.make(user_properties={"bob": {"session.remotecontrol.ask": True}})
        self.logon(1, "alice", "pw")
        self.logon(2, "bob", "pw")
        spy, target = self.registry.get(1), self.registry.get(2)
        self.rdp.answers[icp.MSG_MESSAGE] = lambda r: ICP_pb2.MessageResponse(result=7)
        assert not self.successResultOf(Deferred.fromCoroutine(
            self.lifecycle.start_shadow(spy, target, 0, 0, 0))), "IDNO"
        [(name, ask, _)] = self.rdp.calls
        assert (name, ask.type, ask.style, ask.timeout, ask.parameter1, ask.connectionId) == (
            "MessageRequest", 2, 4, 30, "alice", 2)
        self.rdp.answers[icp.MSG_MESSAGE] = lambda r: ICP_pb2.MessageResponse(result=6)
        assert self.successResultOf(Deferred.fromCoroutine(
            self.lifecycle.start_shadow(spy, target, 0, 0, 0))), "IDYES"
        self.handlers.disconnect_user_session(ICP_pb2.DisconnectUserSessionRequest(
            connectionId=2))
        other = self.registry.get(1)
        assert not self.successResultOf(Deferred.fromCoroutine(
            self.lifecycle.start_shadow(other, target, 0, 0, 0))), "target not Active"

    def test_disconnecting_a_shadowing_session_stops_shadowing_first(self) -> None:
        self.logon(1, "alice", "pw")
        self.logon(2, "bob", "pw")
        spy, target = self.registry.get(1), self.registry.get(2)
        self.successResultOf(Deferred.fromCoroutine(
            self.lifecycle.start_shadow(spy, target, 0, 0, 0)))
        self.rdp.calls.clear()
        assert self.successResultOf(Deferred.fromCoroutine(
            self.lifecycle.disconnect(spy, wait=True)))
        assert self.rdp.names() == ["OtsApiStopRemoteControlRequest",
                                    "LogoffUserSessionRequest"]
        assert spy.state is ConnectState.DISCONNECTED and spy.shadowing is None

    # -- properties -----------------------------------------------------------------

    def test_properties_as_the_asking_connection_sees_them(self) -> None:
        self.make(properties={"n": 5, "neg": -1, "s": "x", "big": 2**33 + 7},
                  user_properties={"alice": {"S": "y"}})
        self.logon(1, "alice", "pw")
        number = self.handlers.property_number(ICP_pb2.PropertyNumberRequest(
            connectionId=1, path="N"))
        assert (number.success, number.value) == (True, 5)
        negative = self.handlers.property_number(ICP_pb2.PropertyNumberRequest(
            connectionId=1, path="neg"))
        assert (negative.success, negative.value) == (True, 0xFFFFFFFF), "ogon's long in uint32"
        string = self.handlers.property_string(ICP_pb2.PropertyStringRequest(
            connectionId=1, path="s"))
        assert string.value == "y", "alice's own value"
        other = self.handlers.property_string(ICP_pb2.PropertyStringRequest(
            connectionId=99, path="s"))
        assert other.value == "x"
        assert not self.handlers.property_bool(ICP_pb2.PropertyBoolRequest(
            connectionId=1, path="s")).success, "a property is found under its own type"
        xres = self.handlers.property_number(ICP_pb2.PropertyNumberRequest(
            connectionId=1, path="CURRENT.CONNECTION.XRES"))
        assert (xres.success, xres.value) == (True, 1920)
        initial = self.handlers.property_number(ICP_pb2.PropertyNumberRequest(
            connectionId=1, path="current.connection.initialxres"))
        assert initial.value == 2560
        assert not self.handlers.property_number(ICP_pb2.PropertyNumberRequest(
            connectionId=99, path="current.connection.xres")).success
        bulk = self.handlers.property_bulk(ICP_pb2.PropertyBulkRequest(
            connectionId=1, properties=[
                {"propertyType": 1, "propertyPath": "neg"},
                {"propertyType": 1, "propertyPath": "big"},
                {"propertyType": 0, "propertyPath": "session.reconnect"},
                {"propertyType": 2, "propertyPath": "virtualChannel.whiteList"}]))
        assert [(r.success, r.intValue, r.boolValue, r.stringValue) for r in bulk.results] == [
            (True, -1, False, ""), (True, 7, False, ""), (True, 0, True, ""),
            (True, 0, False, "*")]

    def test_channel_policy(self) -> None:
        self.make(properties={"virtualChannel.whiteList": "cliprdr; RAIL"})
        policy = ChannelPolicy(self.properties, [], ["rail"])
        assert policy.allowed("CLIPRDR") and not policy.allowed("rail")
        assert not policy.allowed("rdpsnd"), "not on the white list"
        star = ChannelPolicy(PropertyTable({}, {}), [], [])
        assert star.allowed("anything"), "ogon's default white list is *"
        none = ChannelPolicy(PropertyTable({"virtualChannel.whiteList": ""}, {}), [], [])
        assert not none.allowed("cliprdr"), "an empty white list allows nothing"

    def test_session_ids_are_not_reused(self) -> None:
        self.logon(1, "alice", "pw")
        self.successResultOf(Deferred.fromCoroutine(
            self.lifecycle.logoff(self.registry.get(1), wait=False)))
        self.logon(2, "alice", "pw")
        assert [s.session_id for s in self.registry] == [2]

    def test_unknown_connections(self) -> None:
        """ogon answers FAILED, with no payload and no description, for a
        connection it does not know (CallIn::putInSessionExecutor_conId)."""
        with pytest.raises(IcpHandlerError) as disconnect:
            self.handlers.disconnect_user_session(
                ICP_pb2.DisconnectUserSessionRequest(connectionId=9))
        with pytest.raises(IcpHandlerError) as ended:
            self.handlers.remote_control_ended(ICP_pb2.RemoteControlEndedRequest(
                spyId=9, spiedId=8))
        assert not disconnect.value.on_wire and not ended.value.on_wire
        # ogon answers LogoffUserSession NOTFOUND; the bridge's answer says no.
        assert not self.successResultOf(self.handlers.logoff_user_session(
            ICP_pb2.LogoffUserSessionRequest(connectionId=9))).loggedoff


def _fields(message: Any) -> dict[str, Any]:
    return {field.name: value for field, value in message.ListFields()}


class FakePamHandle:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def authenticate(self, username: str, password: str, service: str, call_end: bool) -> bool:
        self.log.append(f"authenticate {username} service={service} call_end={call_end}")
        return password == "pw"

    def open_session(self) -> int:
        self.log.append("open_session")
        return 0

    def close_session(self) -> int:
        self.log.append("close_session")
        return 0

    def end(self) -> int:
        self.log.append("end")
        return 0


class PamSessionTests(SynchronousTestCase):
    """With PAM, a desktop runs inside a PAM session (service ogon)."""

    def setUp(self) -> None:
        from bridge.security.pam_auth import PamAuthenticator

        self.pam_log: list[str] = []
        fake = type("pam", (), {"pam": lambda _=None: FakePamHandle(self.pam_log)})
        case = LifecycleTests("test_empty_user_starts_the_greeter_and_answers_its_pipe")
        case.make()
        self.case = case
        pam_dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, pam_dir)
        (pam_dir / "ogon").write_text("auth include common-auth\n")
        case.lifecycle.guard.authenticator = PamAuthenticator(lambda user: FULL,
                                                              pam_module=fake, pam_dir=pam_dir)
        self.pam_dir = pam_dir

    def test_a_desktop_opens_a_pam_session_and_its_end_closes_it(self) -> None:
        case = self.case
        case.logon(1, "alice", "pw")
        assert self.pam_log == ["authenticate alice service=ogon call_end=False",
                                "open_session"]
        case.successResultOf(Deferred.fromCoroutine(
            case.lifecycle.logoff(case.registry.get(1), wait=False)))
        assert self.pam_log[-2:] == ["close_session", "end"]

    def test_a_reconnect_opens_no_second_session(self) -> None:
        case = self.case
        case.logon(1, "alice", "pw")
        case.handlers.disconnect_user_session(ICP_pb2.DisconnectUserSessionRequest(
            connectionId=1))
        self.pam_log.clear()
        case.logon(2, "alice", "pw")
        assert self.pam_log == ["authenticate alice service=ogon call_end=False", "end"]

    def test_wrong_password_ends_the_handle(self) -> None:
        self.case.logon(1, "alice", "no")
        assert self.pam_log == ["authenticate alice service=ogon call_end=False", "end"]


def test_cookies_are_fifty_alphanumerics_each_character_as_likely() -> None:
    from collections import Counter

    from bridge.lifecycle.runtime import make_cookie

    cookies = [make_cookie() for _ in range(2000)]
    assert all(len(c) == 50 and c.isascii() and c.isalnum() for c in cookies)
    assert len(set(cookies)) == len(cookies)
    counts = Counter("".join(cookies))
    assert len(counts) == 62
    # 100,000 characters, 1,613 expected each: no character is favoured
    # (a modulo bias of 256 % 62 would put the first 8 at ~1,950; the
    # bounds are 6 standard deviations).
    assert max(counts.values()) < 1870 and min(counts.values()) > 1360, counts.most_common(3)


def test_a_session_snapshot_is_a_deep_copy_and_its_row_is_asdict() -> None:
    import copy
    import dataclasses
    import json

    from bridge.sessions.model import (
        BackendRecord,
        ClientInfo,
        ConnectState,
        ProcessRecord,
        Session,
        snapshot,
    )
    from bridge.state.rows import session_to_json

    session = Session(
        session_id=3, username="alice", domain="LAB", state=ConnectState.ACTIVE,
        connection_id=9, client=ClientInfo(host_name="pc", width=1024, height=768),
        logon_time=1.5, permission=0x1FF, backend_cookie="c" * 50,
        backend=BackendRecord(module="xsession", pid=42, start_ticks=7, endpoint="ogon_3_X",
                              processes=[ProcessRecord("wm", 43, 8)],
                              details={"display": ":3"}))
    copied = snapshot(session)
    assert copied == copy.deepcopy(session)
    # Nothing mutable is shared: changing the original leaves the copy.
    session.client.width = 1
    session.backend.processes[0].pid = 1
    session.backend.processes.append(ProcessRecord("x", 2, 2))
    session.backend.details["display"] = ":9"
    assert copied.client.width == 1024
    assert copied.backend.processes == [ProcessRecord("wm", 43, 8)]
    assert copied.backend.details == {"display": ":3"}
    # The row is what asdict gave, byte for byte.
    expected = dataclasses.asdict(copied)
    expected["state"] = int(copied.state)
    assert session_to_json(copied) == json.dumps(expected, sort_keys=True)

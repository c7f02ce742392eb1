"""SessionLifecycle: the one object the RDP and OTS API handlers and the
service ask to change a session. It builds the flows, hands each its
neighbours, and sends each request to the flow that does it.

Behaviour follows ogon's session manager (session-manager/common/session,
call and otsapi; WIRE.md sections 2, 4 and 5): the ``session.reconnect``,
``session.reconnect.fromSameClient``, ``session.singleSession`` and
``session.timeout`` properties, LogoffUserSession to the RDP server for a
disconnect or a logoff, SwitchTo after a greeter login.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, DeferredList, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.backends.launcher import BackendLauncher
from bridge.backends.modules import Module, SessionBackend
from bridge.backends.ogon.kinds import OgonModules
from bridge.lifecycle.authentication import LogonAuthentication
from bridge.lifecycle.ending import SessionEnding
from bridge.lifecycle.greeter_login import GreeterLogin
from bridge.lifecycle.logon import Logon
from bridge.lifecycle.policies import SessionPolicies
from bridge.lifecycle.remote_control import RemoteControl
from bridge.lifecycle.runner import BackendRunner, kill_recorded
from bridge.lifecycle.runtime import (
    LogonAnswer,
    RdpCaller,
    RdpPeer,
    SessionRuntime,
    make_cookie,
)
from bridge.security.auth import Authenticator
from bridge.security.throttle import LogonGuard
from bridge.security.token_files import SessionTokenFiles
from bridge.sessions.model import ClientInfo, ConnectState, Session, SessionChange, SessionEvent
from bridge.sessions.properties import PropertyTable
from bridge.sessions.registry import SessionRegistry

#: How long a stop waits for the greeters run by ogon-backend-launcher to go.
SHUTDOWN_WAIT = 20.0


class SessionLifecycle:
    """Every session transition the bridge makes, on the reactor: logon
    (``logon``), the greeter's login (``greeter_login``), ogon's policies
    and disconnects (``policies``), ending (``ending``), remote control
    (``remote_control``), a session's backend (``runner``); after a restart,
    adopting what the last run left; at shutdown, what stays.

    ``backends``, ``modules`` and ``guard`` are the flows' own: the backend
    each session runs, the module tables, the logon guard."""

    log = Logger()

    def __init__(self, registry: SessionRegistry, rdp: RdpCaller,
                 authenticator: Authenticator | LogonGuard,
                 properties: PropertyTable, modules: dict[str, Module],
                 launcher: BackendLauncher, token_files: SessionTokenFiles,
                 clock: IReactorTime, call_timeout: float = 10.0,
                 peer: Callable[[], RdpPeer] = RdpPeer,
                 cookie: Callable[[], str] = make_cookie,
                 ogon: OgonModules | None = None) -> None:
        self.registry = registry
        self.launcher = launcher
        self.modules = modules
        self.clock = clock
        self.guard = LogonGuard.around(authenticator, clock)
        self.runtime = SessionRuntime()
        self.backends = self.runtime.backends
        self.authentication = LogonAuthentication(self.guard, properties)
        self.remote_control = RemoteControl(registry, rdp, properties, call_timeout)
        self.ending = SessionEnding(registry, rdp, self.runtime, self.authentication,
                                    self.remote_control, launcher, call_timeout)
        self.policies = SessionPolicies(registry, properties, clock, self.runtime, self.ending,
                                        self.remote_control, call_timeout)
        self.runner = BackendRunner(registry, properties, modules, launcher, self.runtime,
                                    self.ending.backend_exited, peer, ogon)
        self.logon = Logon(registry, self.runtime, self.authentication, self.policies,
                           self.ending, self.runner, token_files, cookie)
        self.greeter_login = GreeterLogin(registry, rdp, self.runtime, self.authentication,
                                          self.policies, self.ending, self.runner, token_files)
        registry.observe(self._tell_module)
        # Fires once every backend a restart found is adopted or its session ended.
        self.adopted: Deferred[None] = succeed(None)

    def _tell_module(self, change: SessionChange) -> None:
        """ogon's module Connect and Disconnect, where ogon's
        Session::setConnectState calls them: a client arriving (Init ->
        Connected; Disconnected or ConnectQuery -> Active; a take-over is
        the old client leaving and the new one arriving) and leaving
        (Active or Shadow -> Disconnected). A greeter login in the same
        session (Connected -> Active) is neither."""
        backend = self.backends.get(change.session.session_id)
        if backend is None:
            return
        old, new = change.old_state, change.new_state
        if change.event in (SessionEvent.RECONNECTED, SessionEvent.SWITCHED) \
                and old in (ConnectState.ACTIVE, ConnectState.SHADOW):
            backend.disconnected()
            backend.connected()
        elif (new is ConnectState.CONNECTED and old is ConnectState.INIT) or (
                new is ConnectState.ACTIVE and old in (
                    ConnectState.DISCONNECTED, ConnectState.CONNECT_QUERY, ConnectState.INIT)):
            backend.connected()
        elif new is ConnectState.DISCONNECTED and old in (ConnectState.ACTIVE,
                                                          ConnectState.SHADOW):
            backend.disconnected()

    # -- what the RDP server asks (ICP, and SBP from a greeter) -----------------------

    async def logon_user(self, connection_id: int, username: str, password: str,
                         domain: str, client: ClientInfo) -> LogonAnswer:
        return await self.logon.logon_user(connection_id, username, password, domain, client)

    def sbp_version(self, session_id: int, major: int, minor: int) -> tuple[int, int]:
        return self.greeter_login.sbp_version(session_id, major, minor)

    async def authenticate_user(self, session_id: int, username: str, password: str,
                                domain: str) -> int:
        return await self.greeter_login.authenticate_user(session_id, username, password,
                                                          domain)

    async def end_session_request(self, session_id: int) -> bool:
        return await self.greeter_login.end_session_request(session_id)

    def client_disconnected(self, connection_id: int) -> bool:
        return self.policies.client_disconnected(connection_id)

    async def client_logged_off(self, connection_id: int) -> bool:
        return await self.ending.client_logged_off(connection_id)

    def remote_control_ended(self, spy_connection_id: int) -> bool:
        return self.remote_control.remote_control_ended(spy_connection_id)

    def rdp_server_lost(self) -> None:
        self.policies.rdp_server_lost()

    # -- what the OTS API asks ----------------------------------------------------------

    async def disconnect(self, session: Session, wait: bool,
                         reason: str = "disconnected through the OTS API") -> bool:
        return await self.policies.disconnect(session, wait, reason)

    async def logoff(self, session: Session, wait: bool,
                     reason: str = "logged off through the OTS API") -> bool:
        return await self.ending.logoff(session, wait, reason)

    async def start_shadow(self, spy: Session, target: Session, hotkey_vk: int,
                           hotkey_modifiers: int, flags: int) -> bool:
        return await self.remote_control.start_shadow(spy, target, hotkey_vk,
                                                      hotkey_modifiers, flags)

    async def stop_shadowing(self, session: Session) -> bool:
        return await self.remote_control.stop_shadowing(session)

    # -- restart and shutdown -------------------------------------------------------

    def adopt(self, kept: list[Session], dropped: list[Session]) -> None:
        """After a restart: watch each restored session's backend again, or
        end the session when its backend is gone; stop the backends of
        greeter sessions that did not survive, and every other backend the
        last run spawned that no session owns; schedule session.timeout."""
        for session in dropped:
            if session.backend is not None:
                module = self.modules.get(session.backend.module)
                kill_recorded(self.launcher, session.backend, session.session_id,
                              "its session ended with the bridge's restart",
                              module.stop_timeout if module is not None else 5.0)
        self.adopted = gatherResults([Deferred.fromCoroutine(self._adopt(session))
                                      for session in kept]).addCallback(self._stop_unowned)

    def _stop_unowned(self, _: object) -> None:
        """Once the sessions took their backends back: stop what the last run
        spawned that none owns. A session's backend the launcher does not
        track itself (ogon-backend-launcher's, under the keeper) is owned too."""
        self.launcher.stop_unowned(self.modules,
                                   [backend.record for backend in self.backends.values()])

    async def _adopt(self, session: Session) -> None:
        try:
            backend = await self.runner.adopt(session)
        except Exception:
            self.log.failure("session {session_id}: adopting its backend failed",
                             session_id=session.session_id)
            backend = None
        if self.registry.get(session.session_id) is not session:
            if backend is not None:
                backend.detach()
            return
        if backend is None:
            self.log.info("session {session_id}: its backend is gone; ending it",
                          session_id=session.session_id)
            await self.ending.end(session, "backend gone after restart", tell_rdp=False,
                                  backend_gone=True)
            return
        self.runner.watch(session, backend)
        if session.state is ConnectState.DISCONNECTED:
            self.policies.schedule_timeout(session)

    async def shutdown(self) -> None:
        """The bridge stops: greeter sessions end (nothing can resume them);
        user sessions and their backends stay for the next start."""
        self.runtime.shutting_down = True
        launched: list[Deferred[str]] = []
        for session in list(self.registry):
            if not session.logged_on:
                backend = self.backends.get(session.session_id)
                await self.ending.end(session, "bridge stopping", tell_rdp=False)
                if backend is not None and backend.record.launcher:
                    # Its ModuleStop and ModuleExit go out before the bridge does:
                    # the keeper would keep the launcher running otherwise.
                    launched.append(backend.when_exited().addTimeout(SHUTDOWN_WAIT,
                                                                      self.clock))
        if launched:
            await DeferredList(launched, consumeErrors=True)
        # User sessions' backends outlive the bridge: stop watching them.
        running: list[SessionBackend] = list(self.backends.values())
        self.backends.clear()
        for backend in running:
            backend.detach()
        self.runtime.cancel_all_timeouts()
        self.launcher.close()

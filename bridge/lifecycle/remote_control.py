"""Remote control (ogon's shadowing): one session's client watching and
steering another session, as the OTS API's start/stopRemoteControlSession
and the RDP server's RemoteControlEnded ask."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from bridge.lifecycle.runtime import RdpCaller
from bridge.sessions.model import ConnectState, Session, StateWriteError
from bridge.sessions.properties import PropertyTable
from bridge.sessions.registry import SessionRegistry
from protocols import icp
from protocols.errors import IcpError
from protocols.generated import ICP_pb2

MESSAGE_REQUEST_REMOTE_CONTROL = 2
MB_YESNO = 4
IDYES = 6
#: ogon asks the shadowed user for 30 s and waits one more for the answer.
REMOTE_CONTROL_ASK_TIMEOUT = 30


class RemoteControl:
    """Starts shadowing (asking the shadowed user first when
    ``session.remotecontrol.ask`` says so), stops it, and notes when the RDP
    server says it ended. The spy's state is Shadow meanwhile."""

    log = Logger()

    def __init__(self, registry: SessionRegistry, rdp: RdpCaller, properties: PropertyTable,
                 call_timeout: float) -> None:
        self.registry = registry
        self.rdp = rdp
        self.properties = properties
        self.call_timeout = call_timeout

    async def start_shadow(self, spy: Session, target: Session, hotkey_vk: int,
                           hotkey_modifiers: int, flags: int) -> bool:
        """ogon's TaskStartRemoteControl: the spy must not be shadowing
        already, the target must be Active, both need a client; with
        session.remotecontrol.ask the target's user is asked first."""
        if spy.state is ConnectState.SHADOW:
            self.log.info("session {session_id} is already shadowing", session_id=spy.session_id)
            return False
        if target.state is not ConnectState.ACTIVE:
            self.log.info("remote control of session {target} refused: it is {state}, not "
                          "Active", target=target.session_id, state=target.state.name)
            return False
        if spy.connection_id is None or target.connection_id is None:
            self.log.info("remote control {spy} -> {target} refused: a session has no client",
                          spy=spy.session_id, target=target.session_id)
            return False
        if self.properties.bool_or("session.remotecontrol.ask", target.username, False):
            if not await self._ask_remote_control(spy, target):
                return False
        request = ICP_pb2.OtsApiStartRemoteControlRequest(
            connectionId=spy.connection_id, targetConnectionId=target.connection_id,
            hotKeyVk=hotkey_vk & 0xFF, hotKeyModifiers=hotkey_modifiers & 0xFFFF,
            flags=flags & 0xFFFFFFFF)
        try:
            response = await self.rdp.call(icp.MSG_START_REMOTE_CONTROL, request,
                                           self.call_timeout)
        except IcpError as e:
            self.log.warn("remote control {spy} -> {target} failed: {error}",
                          spy=spy.session_id, target=target.session_id, error=str(e))
            return False
        if not response.success:
            return False
        if self.registry.get(spy.session_id) is spy and self.registry.get(
                target.session_id) is target:
            try:
                self.registry.set_shadowing(spy, target)
            except StateWriteError:
                self.stop_shadow_call(spy)
                return False
        return True

    async def _ask_remote_control(self, spy: Session, target: Session) -> bool:
        assert target.connection_id is not None
        request = ICP_pb2.MessageRequest(
            connectionId=target.connection_id, type=MESSAGE_REQUEST_REMOTE_CONTROL,
            style=MB_YESNO, timeout=REMOTE_CONTROL_ASK_TIMEOUT, parameterNum=2,
            parameter1=spy.username, parameter2="")
        try:
            response = await self.rdp.call(icp.MSG_MESSAGE, request,
                                           REMOTE_CONTROL_ASK_TIMEOUT + 1)
        except IcpError as e:
            self.log.info("remote control request to session {target}: {error}",
                          target=target.session_id, error=str(e))
            return False
        if response.result != IDYES:
            self.log.info("user of session {target} did not allow remote control by session "
                          "{spy}", target=target.session_id, spy=spy.session_id)
            return False
        return True

    def stop_shadow_call(self, spy: Session) -> Deferred[bool]:
        """Ask the RDP server to stop the spy's shadowing; fires True once
        it answered (the spy back to Active), False when it failed (logged)."""
        assert spy.connection_id is not None
        d = self.rdp.call(icp.MSG_STOP_REMOTE_CONTROL, ICP_pb2.OtsApiStopRemoteControlRequest(
            connectionId=spy.connection_id), self.call_timeout)

        def answered(response: Any) -> bool:
            if self.registry.get(spy.session_id) is spy and spy.shadowing is not None:
                self.registry.set_shadowing(spy, None, decided=False)
            return True

        def failed(failure: Any) -> bool:
            failure.trap(IcpError)
            self.log.warn("stopping the shadowing of session {session_id}: {error}",
                          session_id=spy.session_id, error=failure.getErrorMessage())
            return False

        return d.addCallbacks(answered, failed)

    async def stop_own_shadowing(self, spy: Session) -> bool:
        if spy.shadowing is None or spy.connection_id is None:
            return True
        return bool(await self.stop_shadow_call(spy))

    async def stop_shadowing(self, session: Session) -> bool:
        """OTS stopRemoteControlSession: stop every session shadowing
        ``session`` (ogon) and ``session``'s own shadowing (WTSAPI's sense)."""
        for spy in [*self.registry.shadowed_by(session),
                    *([session] if session.shadowing is not None else [])]:
            if spy.connection_id is not None:
                await self.stop_shadow_call(spy)
        return True

    def remote_control_ended(self, spy_connection_id: int) -> bool:
        """ICP RemoteControlEnded: the RDP server says a spy stopped."""
        spy = self.registry.by_connection(spy_connection_id)
        if spy is None:
            return False
        self.registry.set_shadowing(spy, None, decided=False)
        return True

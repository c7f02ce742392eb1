"""The OTS API handler: the fourteen ``otsapi`` methods with ogon's semantics.

Methods that need the RDP server send an ICP request and return a Deferred;
every refusal or failure answers the method's failure value (WIRE.md
section 2) and logs one line saying why. Method and argument names are
those of the IDL, since the Thrift server calls them by wire name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from google.protobuf.message import Message
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from bridge.auth import Authenticator, Identity
from bridge.config import Config
from bridge.icp_handlers import ChannelPolicy
from bridge.permissions import Permission
from bridge.sessions import ConnectState, Session, SessionRegistry
from bridge.tokens import TokenRecord, TokenStore
from protocols import icp
from protocols.errors import IcpError
from protocols.generated import ICP_pb2
from protocols.generated.otsapi.ttypes import (
    TWTSINFO,
    TClientDisplay,
    TReturnEnumerateSession,
    TReturnLogonConnection,
    TReturnQuerySessionInformation,
    TReturnVirtualChannelOpen,
    TSessionInfo,
    TSessionInfoValue,
    TVersion,
)

VERSION = (1, 1)
WTS_CURRENT_SESSION = -1
WTS_CHANNEL_OPTION_DYNAMIC = 0x1
MESSAGE_CUSTOM_TYPE = 0
IDASYNC = 32001
# A message box with timeout 0 waits for the user; we still stop waiting at some point.
MAX_MESSAGE_WAIT = 3600.0
_FILETIME_UNIX_EPOCH = 116444736000000000  # 1970-01-01 in 100 ns ticks since 1601


def _vc_open_failed() -> TReturnVirtualChannelOpen:
    return TReturnVirtualChannelOpen(pipeName="", instance=0)


class WtsInfoClass:
    """WTS_INFO_CLASS values the bridge answers (WIRE.md section 3)."""

    SESSION_ID = 4
    USER_NAME = 5
    WIN_STATION_NAME = 6
    DOMAIN_NAME = 7
    CONNECT_STATE = 8
    CLIENT_BUILD_NUMBER = 9
    CLIENT_NAME = 10
    CLIENT_PRODUCT_ID = 12
    CLIENT_HARDWARE_ID = 13
    CLIENT_ADDRESS = 14
    CLIENT_DISPLAY = 15
    CLIENT_PROTOCOL_TYPE = 16
    LOGON_TIME = 18
    SESSION_INFO = 24


class RdpCaller(Protocol):
    def call(self, msg_type: int, request: Message, timeout: float | None = None
             ) -> Deferred[Any]: ...


T = TypeVar("T")


def filetime(unix_seconds: float | None) -> int:
    """Windows FILETIME (100 ns ticks since 1601-01-01 UTC); 0 for never."""
    if unix_seconds is None:
        return 0
    return _FILETIME_UNIX_EPOCH + int(unix_seconds * 10_000_000)


def _signed(value: int, bits: int) -> int:
    """A wire unsigned value in a Thrift signed field of the same width."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


class OtsApiHandler:
    """Implements ``service otsapi``."""

    log = Logger()

    def __init__(self, registry: SessionRegistry, tokens: TokenStore, rdp: RdpCaller,
                 authenticator: Authenticator, config: Config) -> None:
        self.registry = registry
        self.tokens = tokens
        self.rdp = rdp
        self.authenticator = authenticator
        self.config = config
        self.channels = ChannelPolicy(config.channels_allow, config.channels_deny)

    # -- helpers --------------------------------------------------------------

    def _refuse(self, method: str, session_id: int | None, reason: str) -> None:
        self.log.info("{method} for session {session_id} refused: {reason}",
                      method=method, session_id=session_id, reason=reason)

    @staticmethod
    def _owns(record: TokenRecord, session: Session) -> bool:
        if record.session_id is not None:
            return record.session_id == session.session_id
        return (session.logged_on and session.username == record.username
                and session.domain.lower() == record.domain.lower())

    def _authorize(self, method: str, token: str | None, session_id: int | None,
                   flag: Permission) -> tuple[TokenRecord, Session] | None:
        """The token's record and the session it may act on with ``flag``,
        or None (logged) when it may not."""
        record = self.tokens.lookup(token or "")
        if record is None:
            self._refuse(method, session_id, "unknown or expired token")
            return None
        if session_id is None or session_id == WTS_CURRENT_SESSION:
            if record.session_id is None:
                self._refuse(method, session_id,
                             "WTS_CURRENT_SESSION needs a session token")
                return None
            session_id = record.session_id
        session = self.registry.get(session_id)
        if session is None:
            self._refuse(method, session_id, "no such session")
            return None
        if not self._owns(record, session) and (record.permission & flag) != flag:
            self._refuse(method, session_id, f"token lacks {flag.name}")
            return None
        return record, session

    def _bridged(self, method: str, session: Session, msg_type: int, request: Message,
                 on_answer: Callable[[Any], T], failure_value: Callable[[], T] | T,
                 timeout: float | None = None) -> Deferred[T]:
        """Send ``request`` to the RDP server; fires with ``on_answer(response)``
        or, on any ICP failure, with the failure value (logged). A callable
        ``failure_value`` is called for it, so structs are built only when
        needed."""
        d = self.rdp.call(msg_type, request, timeout)
        d.addCallbacks(on_answer, self._bridge_failed,
                       errbackArgs=(method, session.session_id, failure_value))
        return d

    def _bridge_failed(self, failure: Failure, method: str, session_id: int,
                       failure_value: Callable[[], T] | T) -> T:
        failure.trap(IcpError)
        self.log.warn("{method} for session {session_id} failed: {reason}",
                      method=method, session_id=session_id, reason=failure.getErrorMessage())
        return failure_value() if callable(failure_value) else failure_value

    def _connection(self, method: str, session: Session) -> int | None:
        if session.connection_id is None:
            self._refuse(method, session.session_id, "session has no client connection")
        return session.connection_id

    @staticmethod
    def _maybe_wait(d: Deferred[T], wait: bool, immediate: T) -> T | Deferred[T]:
        """With ``wait`` the caller gets the RDP server's answer; without,
        ``immediate`` as soon as the request is sent, unless it already
        failed (no RDP server), in which case the failure value."""
        if wait or d.called:
            return d
        return immediate

    # -- local methods --------------------------------------------------------

    def getVersionInfo(self, versionInfo: TVersion | None) -> TVersion:
        return TVersion(VersionMajor=VERSION[0], VersionMinor=VERSION[1])

    def ping(self, input: int | None) -> int:
        return input or 0

    def logonConnection(self, username: str | None, password: str | None, domain: str | None
                        ) -> TReturnLogonConnection | Deferred[TReturnLogonConnection]:
        username, domain = username or "", domain or ""

        def decided(identity: Identity | None) -> TReturnLogonConnection:
            if identity is None:
                self.log.warn("failed OTS API logon for user {username}", username=username)
                return TReturnLogonConnection(success=False, authToken="")
            token = self.tokens.issue(identity, lifetime=self.config.token_lifetime)
            self.log.info("OTS API logon for user {username}", username=username)
            return TReturnLogonConnection(success=True, authToken=token)

        if not username:
            self.log.warn("OTS API logon without a user name refused")
            return TReturnLogonConnection(success=False, authToken="")
        return self.authenticator.authenticate(username, password or "", domain).addCallback(
            decided
        )

    def getPermissionForToken(self, authToken: str | None) -> int:
        record = self.tokens.lookup(authToken or "")
        return record.permission if record is not None else 0

    def logoffConnection(self, authToken: str | None) -> bool:
        return self.tokens.revoke(authToken or "")

    def enumerateSessions(self, authToken: str | None, Version: int | None
                          ) -> TReturnEnumerateSession:
        record = self.tokens.lookup(authToken or "")
        if record is None:
            self._refuse("enumerateSessions", None, "unknown or expired token")
            return TReturnEnumerateSession(returnValue=False, sessionInfoList=[])
        if not record.permission & Permission.QUERY_INFORMATION:
            self._refuse("enumerateSessions", None, "token lacks QUERY_INFORMATION")
            return TReturnEnumerateSession(returnValue=False, sessionInfoList=[])
        sessions = [
            TSessionInfo(sessionId=s.session_id, winStationName=s.win_station_name,
                         connectState=int(s.state))
            for s in sorted(self.registry, key=lambda s: s.session_id)
        ]
        return TReturnEnumerateSession(returnValue=True, sessionInfoList=sessions)

    def querySessionInformation(self, authToken: str | None, sessionId: int | None,
                                infoClass: int | None) -> TReturnQuerySessionInformation:
        failed = TReturnQuerySessionInformation(returnValue=False)
        auth = self._authorize("querySessionInformation", authToken, sessionId,
                               Permission.QUERY_INFORMATION)
        if auth is None:
            return failed
        value = self._session_info(auth[1], infoClass)
        if value is None:
            self._refuse("querySessionInformation", sessionId,
                         f"info class {infoClass} not available")
            return failed
        return TReturnQuerySessionInformation(returnValue=True, infoValue=value)

    def _session_info(self, session: Session, info_class: int | None) -> TSessionInfoValue | None:
        anonymous = session.state in (ConnectState.CONNECTED, ConnectState.INIT)
        c = WtsInfoClass
        if info_class == c.SESSION_ID:
            return TSessionInfoValue(int32Value=session.session_id)
        if info_class == c.USER_NAME:
            return TSessionInfoValue(stringValue="" if anonymous else session.username)
        if info_class == c.DOMAIN_NAME:
            return TSessionInfoValue(stringValue="" if anonymous else session.domain)
        if info_class == c.WIN_STATION_NAME:
            return TSessionInfoValue(stringValue=session.win_station_name)
        if info_class == c.CONNECT_STATE:
            return TSessionInfoValue(int32Value=int(session.state))
        if info_class == c.LOGON_TIME:
            return TSessionInfoValue(int64Value=filetime(session.logon_time))
        if info_class == c.SESSION_INFO:
            return TSessionInfoValue(WTSINFO=TWTSINFO(
                State=int(session.state), SessionId=session.session_id,
                IncomingBytes=0, OutgoingBytes=0, IncomingFrames=0, OutgoingFrames=0,
                IncomingCompressedBytes=0, OutgoingCompressedBytes=0,
                WinStationName=session.win_station_name,
                Domain="" if anonymous else session.domain,
                UserName="" if anonymous else session.username,
                ConnectTime=filetime(session.connect_time),
                DisconnectTime=filetime(session.disconnect_time),
                LastInputTime=0,
                LogonTime=filetime(session.logon_time),
                CurrentTime=filetime(self.registry.clock.seconds()),
            ))
        if session.connection_id is None:
            return None  # client properties exist only while a client is attached
        client = session.client
        if info_class == c.CLIENT_BUILD_NUMBER:
            return TSessionInfoValue(int32Value=_signed(client.build_number, 32))
        if info_class == c.CLIENT_NAME:
            return TSessionInfoValue(stringValue=client.host_name)
        if info_class == c.CLIENT_PRODUCT_ID:
            return TSessionInfoValue(int16Value=_signed(client.product_id, 16))
        if info_class == c.CLIENT_HARDWARE_ID:
            return TSessionInfoValue(int32Value=_signed(client.hardware_id, 32))
        if info_class == c.CLIENT_ADDRESS:
            return TSessionInfoValue(stringValue=client.address)
        if info_class == c.CLIENT_DISPLAY:
            return TSessionInfoValue(displayValue=TClientDisplay(
                displayWidth=_signed(client.width, 32), displayHeight=_signed(client.height, 32),
                colorDepth=_signed(client.color_depth, 32)))
        if info_class == c.CLIENT_PROTOCOL_TYPE:
            return TSessionInfoValue(int16Value=_signed(client.protocol_type, 16))
        return None

    # -- bridged methods -------------------------------------------------------

    def virtualChannelOpen(self, authToken: str | None, sessionId: int | None,
                           virtualName: str | None, isDynChannel: bool | None,
                           flags: int | None
                           ) -> TReturnVirtualChannelOpen | Deferred[TReturnVirtualChannelOpen]:
        method = "virtualChannelOpen"
        auth = self._authorize(method, authToken, sessionId, Permission.VIRTUAL_CHANNEL)
        if auth is None:
            return _vc_open_failed()
        session = auth[1]
        name = virtualName or ""
        if not self.channels.allowed(name):
            self._refuse(method, session.session_id, f"channel {name} is not allowed")
            return _vc_open_failed()
        connection_id = self._connection(method, session)
        if connection_id is None:
            return _vc_open_failed()
        flags = (flags or 0) & 0xFFFFFFFF
        dynamic = bool(isDynChannel) and bool(flags & WTS_CHANNEL_OPTION_DYNAMIC)
        request = ICP_pb2.OtsApiVirtualChannelOpenRequest(
            connectionId=connection_id, virtualName=name, dynamicChannel=dynamic,
            flags=flags if dynamic else 0,
        )
        return self._bridged(
            method, session, icp.MSG_VIRTUAL_CHANNEL_OPEN, request,
            lambda r: TReturnVirtualChannelOpen(pipeName=r.connectionString,
                                                instance=_signed(r.instance, 32)),
            _vc_open_failed,
        )

    def virtualChannelClose(self, authToken: str | None, sessionId: int | None,
                            virtualName: str | None, instance: int | None
                            ) -> bool | Deferred[bool]:
        method = "virtualChannelClose"
        auth = self._authorize(method, authToken, sessionId, Permission.VIRTUAL_CHANNEL)
        if auth is None:
            return False
        session = auth[1]
        connection_id = self._connection(method, session)
        if connection_id is None:
            return False
        request = ICP_pb2.OtsApiVirtualChannelCloseRequest(
            connectionId=connection_id, virtualName=virtualName or "",
            instance=(instance or 0) & 0xFFFFFFFF,
        )
        return self._bridged(method, session, icp.MSG_VIRTUAL_CHANNEL_CLOSE, request,
                             lambda r: r.success, False)

    def disconnectSession(self, authToken: str | None, sessionId: int | None,
                          wait: bool | None) -> bool | Deferred[bool]:
        method = "disconnectSession"
        auth = self._authorize(method, authToken, sessionId, Permission.DISCONNECT)
        if auth is None:
            return False
        session = auth[1]
        connection_id = session.connection_id
        if connection_id is None:
            return True  # already disconnected
        request = ICP_pb2.DisconnectUserSessionRequest(connectionId=connection_id)

        def answered(response: ICP_pb2.DisconnectUserSessionResponse) -> bool:
            if response.disconnected and session.connection_id == connection_id:
                self.registry.client_gone(session)
            return response.disconnected

        d = self._bridged(method, session, icp.MSG_DISCONNECT_USER_SESSION, request, answered,
                          False)
        return self._maybe_wait(d, bool(wait), True)

    def logoffSession(self, authToken: str | None, sessionId: int | None,
                      wait: bool | None) -> bool | Deferred[bool]:
        method = "logoffSession"
        auth = self._authorize(method, authToken, sessionId, Permission.LOGOFF)
        if auth is None:
            return False
        session = auth[1]
        connection_id = session.connection_id
        if connection_id is None:
            # No client attached: nothing for the RDP server to do.
            self.registry.end(session)
            return True
        request = ICP_pb2.LogoffUserSessionRequest(connectionId=connection_id)

        def answered(response: ICP_pb2.LogoffUserSessionResponse) -> bool:
            if response.loggedoff:
                self.registry.end(session)
            return response.loggedoff

        d = self._bridged(method, session, icp.MSG_LOGOFF_USER_SESSION, request, answered, False)
        return self._maybe_wait(d, bool(wait), True)

    def startRemoteControlSession(self, authToken: str | None, sourceLogonId: int | None,
                                  targetLogonId: int | None, HotkeyVk: int | None,
                                  HotkeyModifiers: int | None, flags: int | None
                                  ) -> bool | Deferred[bool]:
        method = "startRemoteControlSession"
        record = self.tokens.lookup(authToken or "")
        if record is None:
            self._refuse(method, sourceLogonId, "unknown or expired token")
            return False
        source_id = record.session_id if sourceLogonId in (None, WTS_CURRENT_SESSION) \
            else sourceLogonId
        source = self.registry.get(source_id) if source_id is not None else None
        if source is None or not self._owns(record, source):
            self._refuse(method, sourceLogonId, "source must be the caller's own session")
            return False
        if targetLogonId == source.session_id:
            self._refuse(method, sourceLogonId, "a session cannot shadow itself")
            return False
        auth = self._authorize(method, authToken, targetLogonId, Permission.REMOTE_CONTROL)
        if auth is None:
            return False
        target = auth[1]
        if self._connection(method, source) is None or self._connection(method, target) is None:
            return False
        request = ICP_pb2.OtsApiStartRemoteControlRequest(
            connectionId=source.connection_id, targetConnectionId=target.connection_id,
            hotKeyVk=(HotkeyVk or 0) & 0xFF, hotKeyModifiers=(HotkeyModifiers or 0) & 0xFFFF,
            flags=(flags or 0) & 0xFFFFFFFF,
        )

        def answered(response: ICP_pb2.OtsApiStartRemoteControlResponse) -> bool:
            if response.success:
                self.registry.set_shadowing(source, target)
            return response.success

        return self._bridged(method, source, icp.MSG_START_REMOTE_CONTROL, request, answered,
                             False)

    def stopRemoteControlSession(self, authToken: str | None, sourceLogonId: int | None,
                                 targetLogonId: int | None) -> bool | Deferred[bool]:
        """Stops the shadowing that involves ``sourceLogonId``: its own, if
        it is shadowing, and that of every session shadowing it."""
        method = "stopRemoteControlSession"
        auth = self._authorize(method, authToken, sourceLogonId, Permission.REMOTE_CONTROL)
        if auth is None:
            return False
        session = auth[1]
        spies = [s for s in self.registry
                 if s.shadowing == session.session_id
                 or (s is session and s.shadowing is not None)]
        spies = [s for s in spies if s.connection_id is not None]
        if not spies:
            return True
        calls = []
        for spy in spies:
            def answered(response: ICP_pb2.OtsApiStopRemoteControlResponse,
                         spy: Session = spy) -> bool:
                if response.success:
                    self.registry.set_shadowing(spy, None)
                return response.success

            request = ICP_pb2.OtsApiStopRemoteControlRequest(connectionId=spy.connection_id)
            calls.append(self._bridged(method, spy, icp.MSG_STOP_REMOTE_CONTROL, request,
                                       answered, False))
        return gatherResults(calls).addCallback(all)

    def sendMessage(self, authToken: str | None, sessionId: int | None, title: str | None,
                    message: str | None, style: int | None, timeout: int | None,
                    wait: bool | None) -> int | Deferred[int]:
        method = "sendMessage"
        auth = self._authorize(method, authToken, sessionId, Permission.MESSAGE)
        if auth is None:
            return 0
        session = auth[1]
        connection_id = self._connection(method, session)
        if connection_id is None:
            return 0
        seconds = max(timeout or 0, 0)
        request = ICP_pb2.MessageRequest(
            connectionId=connection_id, type=MESSAGE_CUSTOM_TYPE, style=(style or 0) & 0xFFFFFFFF,
            timeout=seconds, parameterNum=2, parameter1=title or "", parameter2=message or "",
        )
        # The RDP server answers when the user clicks or the box times out.
        icp_timeout = (seconds + self.config.call_timeout) if seconds else MAX_MESSAGE_WAIT
        d = self._bridged(method, session, icp.MSG_MESSAGE, request,
                          lambda r: _signed(r.result, 32), 0, timeout=icp_timeout)
        return self._maybe_wait(d, bool(wait), IDASYNC)


"""ogon's D-Bus session notifications: the ``SessionNotification(uint32
reason, uint32 sessionId)`` signal on the system bus, when ogon's session
manager would send it (session-manager/common/session/Session.cpp,
setConnectState).

jeepney provides the D-Bus message layer (authentication, encoding,
parsing); the connection is an ordinary Twisted protocol on the reactor.
Without a bus the bridge logs one line and works on; it tries again now
and then and says when it got through. Signals are best effort, as with
ogon: the event journal is what keeps every change.
"""

from __future__ import annotations

from collections import deque
from itertools import count
from typing import Any

from jeepney import DBusAddress, HeaderFields, MessageType, Parser, new_signal
from jeepney.auth import BEGIN, AuthenticationError, Authenticator
from jeepney.bus import get_bus
from jeepney.bus_messages import message_bus
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from bridge.sessions.model import ConnectState, SessionChange, SessionEvent
from bridge.sessions.registry import SessionRegistry

BUS_NAME = "ogon.SessionManager.session.notification"
OBJECT_PATH = "/ogon/SessionManager/session/notification"
INTERFACE = "ogon.SessionManager.session.notification"
SIGNAL = "SessionNotification"

# WTS session notification reasons (winpr/wnd.h).
WTS_REMOTE_CONNECT = 0x3
WTS_REMOTE_DISCONNECT = 0x4
WTS_SESSION_LOGON = 0x5
WTS_SESSION_LOGOFF = 0x6
WTS_SESSION_REMOTE_CONTROL = 0x9

# DBUS_NAME_FLAG_REPLACE_EXISTING, as ogon asks for the name.
_REPLACE_EXISTING = 0x2
_PRIMARY_OWNER, _ALREADY_OWNER = 1, 4
_RETRY_FIRST, _RETRY_MAX = 5.0, 300.0
# Signals kept while a connection is being made (not while there is no
# bus: stale notifications would mislead); older ones go beyond this.
_QUEUE = 256


def reasons(change: SessionChange) -> list[int]:
    """The notifications ogon sends for this change, in order.

    ogon notifies on connect-state transitions: Init->Connected REMOTE_CONNECT;
    ->Active from Connected SESSION_LOGON, from Disconnected or ConnectQuery
    REMOTE_CONNECT, from Shadow SESSION_REMOTE_CONTROL; ->Disconnected
    REMOTE_DISCONNECT; ->Shadow SESSION_REMOTE_CONTROL; ->Down from Connected
    REMOTE_DISCONNECT, else SESSION_LOGOFF. The bridge's own steps map onto
    those: a session that goes from Init straight to Active (a desktop
    started for a logon) was connected and logged on; a client taking over
    an active session is the old client leaving and the new one arriving;
    an active session that ends is first disconnected, as ogon's
    TaskShutdown takes it Active -> Disconnected -> Down.
    """
    old, new = change.old_state, change.new_state
    if change.event is SessionEvent.ENDED:
        if old is None or old is ConnectState.INIT:
            return []
        if old is ConnectState.CONNECTED:
            return [WTS_REMOTE_DISCONNECT]
        if old in (ConnectState.ACTIVE, ConnectState.SHADOW):
            return [WTS_REMOTE_DISCONNECT, WTS_SESSION_LOGOFF]
        return [WTS_SESSION_LOGOFF]
    if change.event in (SessionEvent.RECONNECTED, SessionEvent.SWITCHED) \
            and old in (ConnectState.ACTIVE, ConnectState.SHADOW):
        return [WTS_REMOTE_DISCONNECT, WTS_REMOTE_CONNECT]
    if old is new:
        return []
    if new is ConnectState.CONNECTED:
        return [WTS_REMOTE_CONNECT] if old is ConnectState.INIT else []
    if new is ConnectState.ACTIVE:
        return {
            ConnectState.CONNECTED: [WTS_SESSION_LOGON],
            ConnectState.DISCONNECTED: [WTS_REMOTE_CONNECT],
            ConnectState.CONNECT_QUERY: [WTS_REMOTE_CONNECT],
            ConnectState.SHADOW: [WTS_SESSION_REMOTE_CONTROL],
            ConnectState.INIT: [WTS_REMOTE_CONNECT, WTS_SESSION_LOGON],
        }.get(old, [])  # type: ignore[arg-type]
    if new is ConnectState.DISCONNECTED:
        return [WTS_REMOTE_DISCONNECT]
    if new is ConnectState.SHADOW:
        return [WTS_SESSION_REMOTE_CONTROL]
    return []


#: How long the bus may take to authenticate us and answer Hello and
#: RequestName (a local daemon answers in milliseconds).
HANDSHAKE_TIMEOUT = 10.0


class _BusProtocol(Protocol):
    """One connection to the bus: authenticate, Hello, RequestName, then
    send signals."""

    def __init__(self, notifier: SessionNotifier) -> None:
        self.notifier = notifier
        self.auth = Authenticator()
        self.parser = Parser()
        self.serials = count(1)
        self.ready = False
        self._name_serial = -1
        self._silent: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.auth.data_to_send())
        # A bus that accepts and never answers (a hung dbus-daemon) is said,
        # and tried again like one that refuses.
        self._silent = self.notifier.clock.callLater(HANDSHAKE_TIMEOUT, self._no_answer)

    def _no_answer(self) -> None:
        self.notifier.failed(f"the bus did not answer within {HANDSHAKE_TIMEOUT:g} s")
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if not self.auth.authenticated:
            try:
                self.auth.feed(data)
            except AuthenticationError as e:
                self.notifier.failed(f"the bus refused authentication ({e.msg})")
                self.transport.loseConnection()
                return
            if not self.auth.authenticated:
                more = self.auth.data_to_send()
                if more:
                    self.transport.write(more)
                return
            self.transport.write(BEGIN)
            self._send(message_bus.Hello())
            self._name_serial = self._send(message_bus.RequestName(BUS_NAME,
                                                                   _REPLACE_EXISTING))
            return
        for message in self.parser.feed(data):
            header = message.header
            if header.fields.get(HeaderFields.reply_serial) != self._name_serial:
                continue
            if header.message_type is MessageType.error:
                self.notifier.name_refused(str(header.fields.get(HeaderFields.error_name, "")),
                                           message.body)
            elif message.body and message.body[0] not in (_PRIMARY_OWNER, _ALREADY_OWNER):
                self.notifier.name_refused("not the primary owner", message.body)
            # Ready once the bus has answered for the name (as ogon, which
            # owns it before it notifies); signals so far waited.
            if not self.ready:
                self.ready = True
                if self._silent is not None and self._silent.active():
                    self._silent.cancel()
                self.notifier.connected_to(self)

    def _send(self, message: Any) -> int:
        serial = next(self.serials)
        self.transport.write(message.serialise(serial))
        return serial

    def signal(self, reason: int, session_id: int) -> None:
        self._send(new_signal(DBusAddress(OBJECT_PATH, interface=INTERFACE), SIGNAL, "uu",
                              (reason, session_id)))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._silent is not None and self._silent.active():
            self._silent.cancel()
        self.ready = False
        self.notifier.lost(self, reason)


class SessionNotifier:
    """Sends ogon's SessionNotification signals for the registry's changes."""

    log = Logger()

    def __init__(self, reactor: Any, clock: IReactorTime, registry: SessionRegistry,
                 address: str) -> None:
        """``address``: "system" (the system bus, as ogon: $DBUS_SYSTEM_BUS_ADDRESS
        or /var/run/dbus/system_bus_socket) or a D-Bus address
        (``unix:path=...``, ``unix:abstract=...``)."""
        self.reactor = reactor
        self.clock = clock
        self.address = address
        self.protocol: _BusProtocol | None = None
        self.queue: deque[tuple[int, int]] = deque(maxlen=_QUEUE)
        self.sent = 0
        self._retry_in = _RETRY_FIRST
        self._retry: IDelayedCall | None = None
        self._complained = False
        self._stopped = False
        self._queueing = False
        self._connecting: Deferred[Any] | None = None
        self._connected_waiters: list[Deferred[None]] = []
        registry.observe(self._changed)

    @property
    def connected(self) -> bool:
        return self.protocol is not None and self.protocol.ready

    def when_connected(self) -> Deferred[None]:
        """Fires once signals can be sent (at once if they can)."""
        d: Deferred[None] = Deferred()
        if self.connected:
            d.callback(None)
        else:
            self._connected_waiters.append(d)
        return d

    def start(self) -> None:
        self._stopped = False
        self._connect()

    def stop(self) -> None:
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        if self.protocol is not None:
            self.protocol.transport.loseConnection()

    def _path(self) -> str:
        return get_bus("SYSTEM" if self.address == "system" else self.address)

    def _connect(self) -> None:
        self._retry = None
        try:
            path = self._path()
        except (ValueError, KeyError, StopIteration, RuntimeError) as e:
            self.log.warn("D-Bus session notifications are off: cannot use bus address "
                          "{address!r} ({error})", address=self.address, error=str(e))
            return
        self._queueing = True
        factory = Factory.forProtocol(lambda: _BusProtocol(self))
        factory.noisy = False
        d = UNIXClientEndpoint(self.reactor, path, timeout=10).connect(factory)
        self._connecting = d

        def done(result: Any) -> None:
            self._connecting = None

        def failed(failure: Failure) -> None:
            if not self._stopped:
                self.failed(f"cannot connect to {path}: {failure.getErrorMessage()}")

        d.addErrback(failed).addBoth(done)

    def failed(self, why: str) -> None:
        self._queueing = False
        self.queue.clear()
        if not self._complained:
            self.log.warn("D-Bus session notifications are off for now: {why}; everything "
                          "else works, and the bridge keeps trying", why=why)
            self._complained = True
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._stopped or self._retry is not None:
            return
        self._retry = self.clock.callLater(self._retry_in, self._connect)
        self._retry_in = min(_RETRY_MAX, self._retry_in * 2)

    def connected_to(self, protocol: _BusProtocol) -> None:
        self.protocol = protocol
        self._queueing = False
        self._retry_in = _RETRY_FIRST
        self.log.info("D-Bus: sending session notifications as {name}{again}", name=BUS_NAME,
                      again=" (connected again)" if self._complained else "")
        self._complained = False
        while self.queue:
            protocol.signal(*self.queue.popleft())
            self.sent += 1
        waiters, self._connected_waiters = self._connected_waiters, []
        for d in waiters:
            d.callback(None)

    def name_refused(self, why: str, body: Any) -> None:
        self.log.warn("D-Bus: the bus did not give us the name {name} ({why}); signals go "
                      "out from our unique name. A policy allowing it is in "
                      "contrib/dbus/icp-bridge.conf", name=BUS_NAME, why=why)

    def lost(self, protocol: _BusProtocol, reason: Failure | None) -> None:
        if protocol is self.protocol:
            self.protocol = None
        elif self.protocol is not None:
            return  # an older connection
        if not self._stopped:
            self.failed(f"lost the bus connection ({reason.getErrorMessage() if reason else ''})")

    def _changed(self, change: SessionChange) -> None:
        for reason in reasons(change):
            if self.connected:
                assert self.protocol is not None
                self.protocol.signal(reason, change.session.session_id)
                self.sent += 1
            elif self._queueing:
                self.queue.append((reason, change.session.session_id))

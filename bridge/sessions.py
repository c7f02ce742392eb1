"""The session registry: who is logged on, over which RDP connection, in
which state. The one place session state changes; observers hear of every
change (state store, token files, metrics)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class ConnectState(enum.IntEnum):
    """WTS_CONNECTSTATE_CLASS (WIRE.md section 3)."""

    ACTIVE = 0
    CONNECTED = 1
    CONNECT_QUERY = 2
    SHADOW = 3
    DISCONNECTED = 4
    IDLE = 5
    LISTEN = 6
    RESET = 7
    DOWN = 8
    INIT = 9


@dataclass
class ClientInfo:
    """What the RDP server told us about the client in LogonUser."""

    host_name: str = ""
    address: str = ""
    build_number: int = 0
    product_id: int = 0
    hardware_id: int = 0
    protocol_type: int = 0
    width: int = 0
    height: int = 0
    color_depth: int = 0


@dataclass
class Session:
    """One session. ``connection_id`` is the RDP server's id for the client
    connection currently attached, None while disconnected."""

    session_id: int
    username: str
    domain: str
    state: ConnectState
    connection_id: int | None = None
    client: ClientInfo = field(default_factory=ClientInfo)
    connect_time: float | None = None
    logon_time: float | None = None
    disconnect_time: float | None = None
    # Flags of the level the user logged on with (0 for a greeter).
    permission: int = 0
    # session_id of the session this one shadows (remote-controls), if any.
    shadowing: int | None = None
    backend_cookie: str = ""
    ogon_cookie: str = ""

    @property
    def logged_on(self) -> bool:
        """A user is authenticated in it (not just a greeter)."""
        return self.logon_time is not None

    @property
    def win_station_name(self) -> str:
        if self.connection_id is None:
            return ""
        return f"RDP-Tcp#{self.connection_id}"


class SessionEvent(enum.Enum):
    CREATED = "created"  # a greeter or new desktop session began
    LOGGED_ON = "logged-on"  # a user authenticated into the session
    DISCONNECTED = "disconnected"
    RECONNECTED = "reconnected"
    CHANGED = "changed"  # anything else (shadowing, client info)
    ENDED = "ended"  # logged off; the session is gone


SessionObserver = Callable[[SessionEvent, Session], None]


class SessionRegistry:
    """All sessions, by session id and by RDP connection id.

    Invariant: ``_by_connection[c] == s.session_id`` exactly for the sessions
    ``s`` with ``s.connection_id == c``. Session ids are never reused while
    the bridge runs (and, with the state store, across restarts).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, first_session_id: int = 1) -> None:
        self.clock = clock
        self._sessions: dict[int, Session] = {}
        self._by_connection: dict[int, int] = {}
        self._next_session_id = first_session_id
        self._observers: list[SessionObserver] = []

    def observe(self, observer: SessionObserver) -> None:
        self._observers.append(observer)

    def _emit(self, event: SessionEvent, session: Session) -> None:
        for observer in list(self._observers):
            try:
                observer(event, session)
            except Exception:
                self.log.failure(
                    "session observer failed on {event} of session {session_id}",
                    event=event.value, session_id=session.session_id,
                )

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: int) -> Session | None:
        return self._sessions.get(session_id)

    def by_connection(self, connection_id: int) -> Session | None:
        session_id = self._by_connection.get(connection_id)
        return None if session_id is None else self._sessions[session_id]

    def disconnected_session_of(self, username: str, domain: str) -> Session | None:
        """The user's oldest disconnected session, to reconnect to."""
        for session in sorted(self._sessions.values(), key=lambda s: s.session_id):
            if (
                session.state is ConnectState.DISCONNECTED
                and session.logged_on
                and session.username == username
                and session.domain.lower() == domain.lower()
            ):
                return session
        return None

    def restore(self, session: Session) -> None:
        """Put back a session read from the state store (no event)."""
        self._sessions[session.session_id] = session
        if session.connection_id is not None:
            self._by_connection[session.connection_id] = session.session_id
        self._next_session_id = max(self._next_session_id, session.session_id + 1)

    def restore_next_session_id(self, next_session_id: int) -> None:
        self._next_session_id = max(self._next_session_id, next_session_id)

    @property
    def next_session_id(self) -> int:
        return self._next_session_id

    def create(self, connection_id: int, client: ClientInfo, username: str = "",
               domain: str = "", permission: int = 0,
               cookies: tuple[str, str] = ("", "")) -> Session:
        """A new session attached to ``connection_id``: Active when a user
        is given, else Connected (a greeter)."""
        self._detach_connection(connection_id)
        now = self.clock.seconds()
        session = Session(
            session_id=self._next_session_id,
            username=username,
            domain=domain,
            state=ConnectState.ACTIVE if username else ConnectState.CONNECTED,
            connection_id=connection_id,
            client=client,
            connect_time=now,
            logon_time=now if username else None,
            permission=permission,
            backend_cookie=cookies[0],
            ogon_cookie=cookies[1],
        )
        self._next_session_id += 1
        self._sessions[session.session_id] = session
        self._by_connection[connection_id] = session.session_id
        self.log.info(
            "session {session_id} created for connection {connection_id} ({who})",
            session_id=session.session_id, connection_id=connection_id,
            who=f"user {username}" if username else "greeter",
        )
        self._emit(SessionEvent.CREATED, session)
        if username:
            self._emit(SessionEvent.LOGGED_ON, session)
        return session

    def log_on(self, session: Session, username: str, domain: str, permission: int) -> None:
        """A greeter session becomes the user's session."""
        session.username = username
        session.domain = domain
        session.permission = permission
        session.state = ConnectState.ACTIVE
        session.logon_time = self.clock.seconds()
        self.log.info("session {session_id}: user {username} logged on",
                      session_id=session.session_id, username=username)
        self._emit(SessionEvent.LOGGED_ON, session)

    def reconnect(self, session: Session, connection_id: int, client: ClientInfo) -> None:
        """Attach a new client connection to a disconnected session."""
        self._detach_connection(connection_id)
        session.connection_id = connection_id
        session.client = client
        session.state = ConnectState.ACTIVE
        session.connect_time = self.clock.seconds()
        self._by_connection[connection_id] = session.session_id
        self.log.info("session {session_id} reconnected on connection {connection_id}",
                      session_id=session.session_id, connection_id=connection_id)
        self._emit(SessionEvent.RECONNECTED, session)

    def disconnect(self, session: Session) -> None:
        """The client went away; the session stays for a reconnect."""
        if session.connection_id is not None:
            self._by_connection.pop(session.connection_id, None)
        session.connection_id = None
        session.state = ConnectState.DISCONNECTED
        session.disconnect_time = self.clock.seconds()
        session.shadowing = None
        self.log.info("session {session_id} disconnected", session_id=session.session_id)
        self._emit(SessionEvent.DISCONNECTED, session)

    def client_gone(self, session: Session) -> None:
        """The session's client went away: a user session waits Disconnected
        for a reconnect; a greeter has nothing to come back to and ends."""
        if session.logged_on:
            self.disconnect(session)
        else:
            self.end(session)

    def end(self, session: Session) -> None:
        """Log the session off: it is gone."""
        if self._sessions.pop(session.session_id, None) is None:
            return
        if session.connection_id is not None:
            self._by_connection.pop(session.connection_id, None)
        for other in self._sessions.values():
            if other.shadowing == session.session_id:
                other.shadowing = None
        self.log.info("session {session_id} ended", session_id=session.session_id)
        self._emit(SessionEvent.ENDED, session)

    def set_shadowing(self, spy: Session, target: Session | None) -> None:
        spy.shadowing = None if target is None else target.session_id
        self._emit(SessionEvent.CHANGED, spy)

    def rdp_server_lost(self) -> None:
        """The RDP server went away, and with it every client connection:
        greeters end, user sessions wait Disconnected for a reconnect."""
        for session in list(self._sessions.values()):
            if session.connection_id is not None:
                self.client_gone(session)

    def _detach_connection(self, connection_id: int) -> None:
        """A connection id being reused means its old session lost it."""
        old = self.by_connection(connection_id)
        if old is not None:
            self.client_gone(old)

"""The session registry: who is logged on, over which RDP connection, in
which state, running which backend. The one place session state changes.

Every change is a :class:`SessionChange`. The registry hands it to its
persister (the state store, which writes the session row and the event
journal in one transaction) before anyone else hears of it, then tells its
observers (token files, D-Bus, metrics, the event stream). A change the
bridge is asked to make (a logon, a reconnect) is undone in memory when it
cannot be stored, and the caller fails: nothing is acknowledged that is not
stored. A change that already happened (a client went away, a backend
died) stays in memory and is written again until the disk takes it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.sessions.model import (
    BackendRecord,
    ClientInfo,
    ConnectState,
    Session,
    SessionChange,
    SessionEvent,
    StateWriteError,
    snapshot,
)


class Persister(Protocol):
    def write(self, changes: list[SessionChange]) -> None:
        """Store ``changes`` in one transaction (setting their event_id) or
        raise StateWriteError having stored none of them."""
        ...


SessionObserver = Callable[[SessionChange], None]


class SessionRegistry:
    """All sessions, by session id and by RDP connection id.

    Invariants: ``_by_connection[c] == s.session_id`` exactly for the sessions
    ``s`` with ``s.connection_id == c``. Session ids are never reused while
    the bridge runs (and, with the state store, across restarts).
    ``_unwritten`` holds, in order, the changes that happened but are not
    stored yet; while it is not empty no new change is stored ahead of them.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, first_session_id: int = 1,
                 persister: Persister | None = None) -> None:
        self.clock = clock
        self.persister = persister
        self._sessions: dict[int, Session] = {}
        self._by_connection: dict[int, int] = {}
        self._next_session_id = first_session_id
        self._observers: list[SessionObserver] = []
        self._unwritten: deque[SessionChange] = deque()

    # -- reading ----------------------------------------------------------------

    def __iter__(self) -> Iterator[Session]:
        return iter(sorted(self._sessions.values(), key=lambda s: s.session_id))

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: int) -> Session | None:
        return self._sessions.get(session_id)

    def by_connection(self, connection_id: int) -> Session | None:
        session_id = self._by_connection.get(connection_id)
        return None if session_id is None else self._sessions[session_id]

    def sessions_of(self, username: str, domain: str) -> list[Session]:
        """The user's logged-on sessions, oldest first."""
        return [s for s in self if s.logged_on and s.username == username
                and s.domain.lower() == domain.lower()]

    def shadowed_by(self, session: Session) -> list[Session]:
        """Sessions currently shadowing ``session``."""
        return [s for s in self if s.shadowing == session.session_id]

    @property
    def next_session_id(self) -> int:
        return self._next_session_id

    @property
    def unwritten(self) -> int:
        """Changes that happened but are not stored yet."""
        return len(self._unwritten)

    # -- observing and storing ------------------------------------------------

    def observe(self, observer: SessionObserver, first: bool = False) -> None:
        """Call ``observer`` with every change; ``first``: before the
        observers already there."""
        if first:
            self._observers.insert(0, observer)
        else:
            self._observers.append(observer)

    def _notify(self, change: SessionChange) -> None:
        for observer in list(self._observers):
            try:
                observer(change)
            except Exception:
                self.log.failure(
                    "session observer failed on {event} of session {session_id}",
                    event=change.event.value, session_id=change.session.session_id,
                )

    def _change(self, event: SessionEvent, session: Session, old_state: ConnectState | None,
                reason: str) -> SessionChange:
        new_state = None if event is SessionEvent.ENDED else session.state
        return SessionChange(event, snapshot(session), old_state, new_state, reason,
                             self.clock.seconds(), self._next_session_id)

    def _commit(self, changes: list[SessionChange], undo: Callable[[], None] | None) -> None:
        """Store ``changes`` (in order, after any still unwritten), then tell
        the observers. If they cannot be stored: with ``undo``, run it and
        raise StateWriteError (the caller's operation fails); without, keep
        them for flush() to write later (they happened regardless)."""
        if self.persister is not None:
            try:
                self._flush_unwritten()
                self.persister.write(changes)
            except StateWriteError as e:
                if undo is not None:
                    undo()
                    self.log.error("state write failed, {event} of session {session_id} "
                                   "undone: {error}", event=changes[0].event.value,
                                   session_id=changes[0].session.session_id, error=str(e))
                    raise
                self.log.error("state write failed, {event} of session {session_id} kept "
                               "and to be written again: {error}", event=changes[0].event.value,
                               session_id=changes[0].session.session_id, error=str(e))
                self._unwritten.extend(changes)
        for change in changes:
            self._notify(change)

    def _flush_unwritten(self) -> None:
        if self._unwritten and self.persister is not None:
            self.persister.write(list(self._unwritten))
            self.log.info("stored {count} session changes that had waited for the disk",
                          count=len(self._unwritten))
            self._unwritten.clear()

    def flush(self) -> bool:
        """Write changes that could not be stored before; True when none wait."""
        try:
            self._flush_unwritten()
        except StateWriteError as e:
            self.log.warn("{count} session changes still wait for the disk: {error}",
                          count=len(self._unwritten), error=str(e))
            return False
        return True

    # -- restoring -------------------------------------------------------------

    def restore(self, session: Session) -> None:
        """Put back a session read from the state store (no event)."""
        self._sessions[session.session_id] = session
        if session.connection_id is not None:
            self._by_connection[session.connection_id] = session.session_id
        self._next_session_id = max(self._next_session_id, session.session_id + 1)

    def restore_next_session_id(self, next_session_id: int) -> None:
        self._next_session_id = max(self._next_session_id, next_session_id)

    # -- changes the bridge decides (undone if they cannot be stored) ----------

    def _require_free(self, connection_id: int, session: Session | None) -> None:
        """The lifecycle detaches a connection from its old session before
        giving it to another; anything else is a bug."""
        holder = self.by_connection(connection_id)
        if holder is not None and holder is not session:
            raise RuntimeError(f"connection {connection_id} still belongs to session "
                               f"{holder.session_id}")

    def create(self, connection_id: int, client: ClientInfo, username: str = "",
               domain: str = "", permission: int = 0, cookies: tuple[str, str] = ("", ""),
               reason: str = "") -> Session:
        """A new session in state Init attached to ``connection_id``, for
        ``username`` or (no user) a greeter. Raises StateWriteError."""
        now = self.clock.seconds()
        session = Session(
            session_id=self._next_session_id, username=username, domain=domain,
            state=ConnectState.INIT, connection_id=connection_id, client=client,
            connect_time=now, permission=permission,
            backend_cookie=cookies[0], ogon_cookie=cookies[1], state_since=now,
        )
        self._require_free(connection_id, None)
        self._next_session_id += 1
        self._sessions[session.session_id] = session
        self._by_connection[connection_id] = session.session_id

        def undo() -> None:
            del self._sessions[session.session_id]
            self._by_connection.pop(connection_id, None)

        self._commit([self._change(SessionEvent.CREATED, session, None,
                                   reason or ("user " + username if username else "greeter"))],
                     undo)
        self.log.info(
            "session {session_id} created for connection {connection_id} ({who})",
            session_id=session.session_id, connection_id=connection_id,
            who=f"user {username}" if username else "greeter",
        )
        return session

    def _mutate(self, session: Session, event: SessionEvent, reason: str,
                apply: Callable[[Session], None], decided: bool = True) -> None:
        """Apply a change to ``session`` and commit it (undoing it if it
        cannot be stored and ``decided``)."""
        before = snapshot(session)
        old_connection = session.connection_id
        apply(session)
        if session.state is not before.state:
            session.state_since = self.clock.seconds()
        if old_connection != session.connection_id:
            if old_connection is not None and \
                    self._by_connection.get(old_connection) == session.session_id:
                del self._by_connection[old_connection]
            if session.connection_id is not None:
                self._by_connection[session.connection_id] = session.session_id

        def undo() -> None:
            if session.connection_id is not None and \
                    self._by_connection.get(session.connection_id) == session.session_id:
                del self._by_connection[session.connection_id]
            session.__dict__.update(snapshot(before).__dict__)
            if session.connection_id is not None:
                self._by_connection[session.connection_id] = session.session_id

        self._commit([self._change(event, session, before.state, reason)],
                     undo if decided else None)

    def set_backend(self, session: Session, backend: BackendRecord | None,
                    decided: bool = True) -> None:
        """Record the backend the session now runs (None: none)."""
        if backend is not None:
            self._mutate(session, SessionEvent.BACKEND_STARTED,
                         f"{backend.module} pid {backend.pid} on {backend.endpoint}",
                         lambda s: setattr(s, "backend", backend), decided)
        else:
            old = session.backend
            self._mutate(session, SessionEvent.BACKEND_EXITED,
                         f"{old.module} pid {old.pid}" if old is not None else "",
                         lambda s: setattr(s, "backend", None), decided)

    def connected(self, session: Session) -> None:
        """Init -> Connected: the greeter (or the new desktop) is running."""
        self._mutate(session, SessionEvent.CHANGED, "backend ready",
                     lambda s: setattr(s, "state", ConnectState.CONNECTED))

    def log_on(self, session: Session, username: str, domain: str, permission: int,
               reason: str = "logon") -> None:
        """The session becomes the user's, Active (a greeter's session on an
        SBP login, or a new desktop once its backend is ready)."""
        now = self.clock.seconds()

        def apply(s: Session) -> None:
            s.username, s.domain, s.permission = username, domain, permission
            s.state = ConnectState.ACTIVE
            s.logon_time = now

        self._mutate(session, SessionEvent.LOGGED_ON, reason, apply)
        self.log.info("session {session_id}: user {username} logged on",
                      session_id=session.session_id, username=username)

    def reconnect(self, session: Session, connection_id: int, client: ClientInfo,
                  reason: str = "reconnect") -> None:
        """Attach a client connection to a disconnected (or taken-over)
        session. Raises StateWriteError."""
        self._attach(session, connection_id, client, SessionEvent.RECONNECTED, reason)
        self.log.info("session {session_id} reconnected on connection {connection_id}",
                      session_id=session.session_id, connection_id=connection_id)

    def switched(self, session: Session, connection_id: int, client: ClientInfo) -> None:
        """After a greeter login: the greeter's connection now shows this
        (existing) session's desktop."""
        self._attach(session, connection_id, client, SessionEvent.SWITCHED, "greeter login")
        self.log.info("connection {connection_id} switched to session {session_id}",
                      connection_id=connection_id, session_id=session.session_id)

    def _attach(self, session: Session, connection_id: int, client: ClientInfo,
                event: SessionEvent, reason: str) -> None:
        """The session, Active, on ``connection_id`` for ``client``."""
        self._require_free(connection_id, session)
        now = self.clock.seconds()

        def apply(s: Session) -> None:
            s.connection_id = connection_id
            s.client = client
            s.state = ConnectState.ACTIVE
            s.connect_time = now

        self._mutate(session, event, reason, apply)

    def set_shadowing(self, spy: Session, target: Session | None, decided: bool = True) -> None:
        """The spy starts (target given: Active -> Shadow) or stops (None:
        Shadow -> Active) remote-controlling another session."""
        if target is not None:
            def apply(s: Session) -> None:
                s.shadowing = target.session_id
                if s.state is ConnectState.ACTIVE:
                    s.state = ConnectState.SHADOW

            self._mutate(spy, SessionEvent.SHADOW_STARTED, f"shadowing {target.session_id}",
                         apply, decided)
        else:
            def apply(s: Session) -> None:
                s.shadowing = None
                if s.state is ConnectState.SHADOW:
                    s.state = ConnectState.ACTIVE

            self._mutate(spy, SessionEvent.SHADOW_STOPPED, "shadowing stopped", apply, decided)

    def note(self, session: Session, reason: str, apply: Callable[[Session], None]) -> None:
        """Any other change worth storing (SBP version, client details)."""
        self._mutate(session, SessionEvent.CHANGED, reason, apply)

    # -- changes that already happened (kept even if they cannot be stored) ---

    def disconnect(self, session: Session, reason: str = "client gone") -> None:
        """The client went away; the session stays for a reconnect."""
        now = self.clock.seconds()

        def apply(s: Session) -> None:
            s.connection_id = None
            s.state = ConnectState.DISCONNECTED
            s.disconnect_time = now
            s.shadowing = None

        self._mutate(session, SessionEvent.DISCONNECTED, reason, apply, decided=False)
        self.log.info("session {session_id} disconnected ({reason})",
                      session_id=session.session_id, reason=reason)

    def end(self, session: Session, reason: str = "logoff") -> None:
        """The session is gone (its backend is stopped by the caller)."""
        if self._sessions.pop(session.session_id, None) is None:
            return
        if session.connection_id is not None and \
                self._by_connection.get(session.connection_id) == session.session_id:
            del self._by_connection[session.connection_id]
        changes = [self._change(SessionEvent.ENDED, session, session.state, reason)]
        for other in self._sessions.values():
            if other.shadowing == session.session_id:
                old = other.state
                other.shadowing = None
                if other.state is ConnectState.SHADOW:
                    other.state = ConnectState.ACTIVE
                    other.state_since = self.clock.seconds()
                changes.append(self._change(SessionEvent.SHADOW_STOPPED, other, old,
                                            f"session {session.session_id} ended"))
        self.log.info("session {session_id} ended ({reason})", session_id=session.session_id,
                      reason=reason)
        self._commit(changes, None)

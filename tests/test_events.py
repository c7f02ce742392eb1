"""The event journal as a stream (bridge.state.journal) and ogon's D-Bus
notification reasons (bridge.watch.dbus.reasons), on a Clock and an in-memory
state database."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from bridge.security.auth import InMemoryAuthenticator
from bridge.security.throttle import OTSAPI, RDP, LogonGuard, ThrottlePolicy
from bridge.sessions.model import ClientInfo, ConnectState, SessionChange, StateWriteError
from bridge.sessions.registry import SessionRegistry
from bridge.state.journal import EventHub, LogonEvents
from bridge.state.store import JournalEvent, StateStore
from bridge.watch import dbus


class Collector:
    def __init__(self) -> None:
        self.events: list[JournalEvent] = []
        self.resyncs: list[tuple[int, int, str]] = []

    def send(self, event: JournalEvent) -> None:
        self.events.append(event)

    def resync(self, requested_after: int, resumed_after: int, reason: str) -> None:
        self.resyncs.append((requested_after, resumed_after, reason))

    @property
    def ids(self) -> list[int]:
        return [e.id for e in self.events]


class FlakyDisk:
    """The store, behind a disk that refuses writes while ``full``."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.full = False

    def write(self, changes: list[SessionChange]) -> None:
        if self.full:
            raise StateWriteError("disk full")
        self.store.write(changes)


class EventHubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = StateStore(":memory:")
        self.disk = FlakyDisk(self.store)
        self.registry = SessionRegistry(self.clock, persister=self.disk)
        self.hub = EventHub(self.store, self.registry, self.clock, keep_recent=4)

    def session_life(self, connection_id: int) -> None:
        """created, connected, logged on, disconnected, ended: 5 events."""
        session = self.registry.create(connection_id, ClientInfo(), "alice", "", 1)
        self.registry.connected(session)
        self.registry.log_on(session, "alice", "", 1)
        self.registry.disconnect(session)
        self.registry.end(session)

    def journal(self) -> list[JournalEvent]:
        return self.store.events_after(0, 10_000)

    def test_from_the_journal_then_live_each_once_in_order(self) -> None:
        self.session_life(1)
        early = Collector()
        self.hub.subscribe(early, 0)
        assert early.ids == [1, 2, 3, 4, 5]
        late = Collector()
        self.hub.subscribe(late, 3)
        assert late.ids == [4, 5], "exactly after the id it asked for"
        self.session_life(2)
        assert early.ids == list(range(1, 11))
        assert late.ids == list(range(4, 11))
        assert early.events == self.journal(), "what the journal holds, field for field"

    def test_a_paused_subscriber_is_caught_up_from_the_journal(self) -> None:
        collector = Collector()
        subscription = self.hub.subscribe(collector, 0)
        subscription.pause()
        for connection_id in range(1, 5):
            self.session_life(connection_id)  # 20 events, more than the 4 kept in memory
        assert collector.ids == []
        subscription.resume()
        assert collector.ids == list(range(1, 21))
        assert collector.events == self.journal()

    def test_changes_the_disk_refused_are_published_once_written_without_a_gap(self) -> None:
        collector = Collector()
        self.hub.subscribe(collector, 0)
        session = self.registry.create(1, ClientInfo(), "alice", "", 1)
        self.registry.connected(session)
        self.disk.full = True
        self.registry.disconnect(session)  # it happened: kept for later, not published
        assert collector.ids == [1, 2]
        self.disk.full = False
        assert self.registry.flush()
        self.hub.poll()  # what the service does after a successful retry
        assert collector.ids == [1, 2, 3]
        assert collector.events[-1].event == "disconnected"
        self.registry.end(session)
        assert collector.ids == [1, 2, 3, 4]

    def test_an_id_from_the_future_or_pruned_past_says_so(self) -> None:
        self.session_life(1)
        ahead = Collector()
        self.hub.subscribe(ahead, 99)
        assert ahead.resyncs == [(99, 5, "unknown id: the journal ends before it")]
        self.store.prune_events(older_than=0, keep_at_most=2)
        behind = Collector()
        self.hub.subscribe(behind, 1)
        assert behind.resyncs[0][:2] == (1, 3)
        assert behind.ids == [4, 5]

    def test_ids_keep_growing_after_pruning(self) -> None:
        self.session_life(1)
        self.store.prune_events(older_than=self.clock.seconds() + 1, keep_at_most=100)
        assert self.journal() == []
        self.session_life(2)
        assert [e.id for e in self.journal()] == [6, 7, 8, 9, 10], "ids are never reused"

    def test_stalled_subscriptions(self) -> None:
        subscription = self.hub.subscribe(Collector(), 0)
        subscription.pause()
        self.clock.advance(61)
        assert self.hub.stalled(60) == [subscription]
        subscription.resume()
        assert self.hub.stalled(60) == []

    def test_events_of_no_session_go_out_in_order_with_session_changes(self) -> None:
        subscriber = Collector()
        self.hub.subscribe(subscriber, 0)
        self.session_life(1)
        events = LogonEvents(self.hub)
        events.logon_failed("bob", "192.0.2.7", "rdp", 3)
        events.locked_out("bob", "192.0.2.7", "source:192.0.2.7", 900, 10)
        self.session_life(2)
        assert subscriber.ids == list(range(1, 13))
        failed, locked = subscriber.events[5], subscriber.events[6]
        assert (failed.session_id, failed.event, failed.username, failed.reason) == (
            0, "logon-failed", "bob", "failed logon from the RDP server from 192.0.2.7, 3 in "
                                      "a row")
        assert (locked.event, locked.reason) == (
            "locked-out", "client address 192.0.2.7 locked out for 900 s after 10 failed "
                          "logons")
        assert failed.old_state is None and failed.new_state is None
        assert events.lockouts == {"source": 1}
        assert [e.id for e in self.store.events_after(0)] == subscriber.ids

    def test_an_event_of_no_session_the_disk_refuses_is_logged_and_dropped(self) -> None:
        subscriber = Collector()
        self.hub.subscribe(subscriber, 0)
        self.store._db.execute("PRAGMA query_only = 1")
        with capturedLogs() as logged:
            assert self.hub.record("logon-failed", "bob", "x") is None
        assert "not journaled" in logged[0]["log_format"]
        self.store._db.execute("PRAGMA query_only = 0")
        self.hub.record("logon-failed", "bob", "y")
        assert [e.reason for e in subscriber.events] == ["y"]


def change(event: str, old: ConnectState | None, new: ConnectState | None) -> Any:
    from bridge.sessions.model import Session, SessionEvent

    session = Session(7, "alice", "", new or ConnectState.DOWN)
    return SessionChange(SessionEvent(event), session, old, new, "", 0.0, 8)


class Recorder:
    """A LogonObserver that notes what it is told."""

    def __init__(self) -> None:
        self.told: list[tuple[Any, ...]] = []

    def logon_failed(self, *args: Any) -> None:
        self.told.append(("logon_failed", *args))

    def locked_out(self, *args: Any) -> None:
        self.told.append(("locked_out", *args))


class Broken:
    def logon_failed(self, *args: Any) -> None:
        raise RuntimeError("observer bug")

    locked_out = logon_failed


class LogonObserverTests(SynchronousTestCase):
    def test_failures_then_lockouts_are_told_and_a_broken_observer_changes_nothing(
            self) -> None:
        clock = Clock()
        guard = LogonGuard(InMemoryAuthenticator({"bob": ("pw", 1)}), clock,
                           ThrottlePolicy(failures_before_delay=5, lockout_failures=2))
        recorder = Recorder()
        guard.observers += [Broken(), recorder]
        for _ in range(2):
            d = Deferred.fromCoroutine(guard.authenticate("bob", "no", "", "192.0.2.7", OTSAPI))
            assert self.successResultOf(d) is None
        assert recorder.told == [
            ("logon_failed", "bob", "192.0.2.7", OTSAPI, 1),
            ("logon_failed", "bob", "192.0.2.7", OTSAPI, 2),
            # bob from that address, and that address for every user (issue 18).
            ("locked_out", "bob", "192.0.2.7", "pair:192.0.2.7|bob", 900.0, 2),
            ("locked_out", "bob", "192.0.2.7", "source:192.0.2.7", 900.0, 2)]
        assert len(self.flushLoggedErrors(RuntimeError)) == 4
        # Locked out now: refused without a check, and no new failure told.
        d = Deferred.fromCoroutine(guard.authenticate("bob", "pw", "", "192.0.2.7", OTSAPI))
        assert self.successResultOf(d) is None and len(recorder.told) == 4

    def test_an_rdp_logon_tells_the_address_as_the_clients_claim(self) -> None:
        # Review finding 2: an RDP client names its own address; it is told
        # as a claim, and only the user is ever locked (past the cap).
        guard = LogonGuard(InMemoryAuthenticator({"bob": ("pw", 1)}), Clock(),
                           ThrottlePolicy(failures_before_delay=5, account_failure_limit=2))
        recorder = Recorder()
        guard.observers.append(recorder)
        for _ in range(2):
            self.successResultOf(Deferred.fromCoroutine(
                guard.authenticate("bob", "no", "", "192.0.2.7", RDP)))
        assert recorder.told == [
            ("logon_failed", "bob", "claimed address 192.0.2.7", RDP, 1),
            ("logon_failed", "bob", "claimed address 192.0.2.7", RDP, 2),
            ("locked_out", "bob", "claimed address 192.0.2.7", "user:bob", 900.0, 2)]


def test_dbus_reasons_follow_ogons_state_transitions() -> None:
    active, connected, disconnected = (ConnectState.ACTIVE, ConnectState.CONNECTED,
                                       ConnectState.DISCONNECTED)
    init, shadow = ConnectState.INIT, ConnectState.SHADOW
    cases = [
        (change("created", None, init), []),
        (change("changed", init, connected), [dbus.WTS_REMOTE_CONNECT]),
        (change("logged-on", connected, active), [dbus.WTS_SESSION_LOGON]),
        (change("logged-on", init, active), [dbus.WTS_REMOTE_CONNECT, dbus.WTS_SESSION_LOGON]),
        (change("disconnected", active, disconnected), [dbus.WTS_REMOTE_DISCONNECT]),
        (change("reconnected", disconnected, active), [dbus.WTS_REMOTE_CONNECT]),
        (change("reconnected", active, active),
         [dbus.WTS_REMOTE_DISCONNECT, dbus.WTS_REMOTE_CONNECT]),
        (change("shadow-started", active, shadow), [dbus.WTS_SESSION_REMOTE_CONTROL]),
        (change("shadow-stopped", shadow, active), [dbus.WTS_SESSION_REMOTE_CONTROL]),
        (change("ended", connected, None), [dbus.WTS_REMOTE_DISCONNECT]),
        (change("ended", disconnected, None), [dbus.WTS_SESSION_LOGOFF]),
        # ogon's TaskShutdown: Active -> Disconnected -> Down.
        (change("ended", active, None), [dbus.WTS_REMOTE_DISCONNECT, dbus.WTS_SESSION_LOGOFF]),
        (change("ended", shadow, None), [dbus.WTS_REMOTE_DISCONNECT, dbus.WTS_SESSION_LOGOFF]),
        (change("ended", init, None), []),
        (change("backend-started", connected, connected), []),
    ]
    for c, expected in cases:
        assert dbus.reasons(c) == expected, (c.event, c.old_state, c.new_state)

"""The session event journal, as a stream that loses nothing.

Every session change is a row of the journal (the ``events`` table),
written in the same transaction as the change (see bridge.state.store). The
journal is the only source of what a subscriber sees: a subscriber asks
for the events after an id, gets them from the journal (or from the
recent ones kept in memory), then the new ones as they are written, in id
order, each once. One that reconnects with the last id it saw resumes
exactly after it, across bridge restarts too (ids are never reused).

A subscriber that stops reading is not buffered for: it is paused (its
position kept), and caught up from the journal when it reads again.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections import Counter, deque
from operator import attrgetter
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.sessions.model import SessionChange, StateWriteError, state_name
from bridge.sessions.registry import SessionRegistry
from bridge.state.store import JournalEvent, StateStore

#: Events read from the journal per step of a catch-up.
PAGE = 500


class Subscriber(Protocol):
    """Where a subscription's events go."""

    def send(self, event: JournalEvent) -> None: ...

    def resync(self, requested_after: int, resumed_after: int, reason: str) -> None:
        """Events after ``requested_after`` cannot all be had (pruned from
        the journal, or the id is unknown to it); the stream goes on after
        ``resumed_after``."""
        ...


def event_json(event: JournalEvent) -> dict[str, object]:
    """What a client of the stream gets for one event."""
    data: dict[str, object] = event.as_dict()
    data["old_state_name"] = state_name(event.old_state)
    data["new_state_name"] = state_name(event.new_state)
    return data


def journal_event(change: SessionChange) -> JournalEvent:
    """The journal row ``change`` was written as (StateStore.write)."""
    assert change.event_id is not None
    return JournalEvent(
        change.event_id, change.time, change.session.session_id, change.session.username,
        change.event.value, None if change.old_state is None else int(change.old_state),
        None if change.new_state is None else int(change.new_state), change.reason[:500])


class Subscription:
    """One subscriber's place in the journal."""

    def __init__(self, hub: EventHub, subscriber: Subscriber, position: int) -> None:
        self.hub = hub
        self.subscriber = subscriber
        self.position = position  # the last id it was sent
        self.paused = False
        self.paused_since: float | None = None
        self.closed = False

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.paused_since = self.hub.clock.seconds()

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.paused_since = None
            self.hub.catch_up(self)

    def close(self) -> None:
        self.closed = True
        self.hub.subscriptions.discard(self)


class EventHub:
    """Fans the journal out to subscribers (the admin endpoint's /events)."""

    log = Logger()

    def __init__(self, store: StateStore, registry: SessionRegistry, clock: IReactorTime,
                 keep_recent: int = 10_000) -> None:
        self.store = store
        self.clock = clock
        self.last_id = store.last_event_id()
        self.recent: deque[JournalEvent] = deque(maxlen=keep_recent)
        self.subscriptions: set[Subscription] = set()
        registry.observe(self._changed)

    # -- in --------------------------------------------------------------------------

    def _changed(self, change: SessionChange) -> None:
        if change.event_id is None:
            return  # not stored yet: it is published once it is (see poll)
        if change.event_id == self.last_id + 1:
            self._publish(journal_event(change))
        elif change.event_id > self.last_id:
            # Changes written late (the disk had refused them) came first.
            self.poll()

    def record(self, event: str, username: str, reason: str) -> JournalEvent | None:
        """Write and publish an event of no session (session_id 0: see
        LogonEvents); None, logged, when the disk refuses it (such events
        are not kept to be written again: they change no state)."""
        try:
            written = self.store.append_event(self.clock.seconds(), username, event, reason)
        except StateWriteError as e:
            self.log.warn("{event} event for {username} not journaled: {error}", event=event,
                          username=username, error=str(e))
            return None
        if written.id == self.last_id + 1:
            self._publish(written)
        else:
            self.poll()
        return written

    def poll(self) -> None:
        """Publish whatever the journal has that was not published yet."""
        while True:
            rows = self.store.events_after(self.last_id, PAGE)
            for event in rows:
                self._publish(event)
            if len(rows) < PAGE:
                return

    def _publish(self, event: JournalEvent) -> None:
        self.last_id = event.id
        self.recent.append(event)
        for subscription in list(self.subscriptions):
            if subscription.position == event.id - 1 and not subscription.paused:
                subscription.position = event.id
                subscription.subscriber.send(event)
            elif not subscription.paused and subscription.position < event.id - 1:
                self.catch_up(subscription)

    # -- out -------------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber, after: int) -> Subscription:
        """Events with ids after ``after`` go to ``subscriber``, in order,
        now from the journal and then as they come."""
        start = after
        oldest = self._oldest_id()
        if after > self.last_id:
            start = self.last_id
            subscriber.resync(after, start, "unknown id: the journal ends before it")
        elif oldest is not None and after < oldest - 1:
            start = oldest - 1
            subscriber.resync(after, start, "pruned: the journal no longer holds those events")
        subscription = Subscription(self, subscriber, start)
        self.subscriptions.add(subscription)
        self.catch_up(subscription)
        return subscription

    def catch_up(self, subscription: Subscription) -> None:
        """Send what ``subscription`` has not had, until it pauses."""
        while not subscription.paused and not subscription.closed \
                and subscription.position < self.last_id:
            events = self._after(subscription.position)
            if not events:
                return
            for event in events:
                if subscription.paused or subscription.closed:
                    return
                subscription.position = event.id
                subscription.subscriber.send(event)

    def _after(self, after: int) -> list[JournalEvent]:
        recent = self.recent
        if recent and recent[0].id <= after + 1:
            index = bisect_right(recent, after, key=attrgetter("id"))
            return list(itertools.islice(recent, index, index + PAGE))
        return self.store.events_after(after, PAGE)

    def _oldest_id(self) -> int | None:
        row = self.store.events_after(0, 1)
        return row[0].id if row else None

    def stalled(self, longer_than: float) -> list[Subscription]:
        """Subscriptions paused for more than ``longer_than`` seconds."""
        now = self.clock.seconds()
        return [s for s in self.subscriptions
                if s.paused_since is not None and now - s.paused_since > longer_than]


#: Journal events of no session (session_id 0), beside SessionEvent's.
LOGON_FAILED = "logon-failed"
LOCKED_OUT = "locked-out"
#: How each kind of logon (bridge.security.throttle) came in, for reasons.
_LOGON_KINDS = {"rdp": "from the RDP server", "otsapi": "through the OTS API"}


class LogonEvents:
    """Failed logons and lockouts as journal events of session 0, so that
    /events, the status page and ``ctl events`` show them (a LogonObserver
    of the logon guard), and lockouts counted for the metrics."""

    def __init__(self, hub: EventHub) -> None:
        self.hub = hub
        #: Lockouts set, by what was locked ("user", "source").
        self.lockouts: Counter[str] = Counter()

    def logon_failed(self, username: str, source: str, kind: str, failures: int) -> None:
        where = _LOGON_KINDS.get(kind, kind)
        address = f" from {source}" if source else ""
        self.hub.record(LOGON_FAILED, username,
                        f"failed logon {where}{address}, {failures} in a row")

    def locked_out(self, username: str, source: str, key: str, seconds: float,
                   failures: int) -> None:
        what, _, name = key.partition(":")
        self.lockouts[what] += 1
        address, _, user = name.partition("|")  # a pair: "ADDRESS|user"
        source = f"local client {name}" if name.startswith("uid:") else f"client address {name}"
        locked = {"user": f"user {name}", "source": source,
                  "pair": f"user {user} from {address}"}.get(what, key)
        self.hub.record(LOCKED_OUT, username,
                        f"{locked} locked out for {seconds:g} s after {failures} failed logons")

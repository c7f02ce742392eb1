"""What an admin sees of the whole farm, from any host: the farm journal as
a stream (``/events?scope=farm``) and the hosts with their sessions
(``/sessions?scope=farm``).

FarmEventHub is the host journal's EventHub for the farm journal: the
same subscriptions, the same resume by id (Last-Event-ID), the same
pausing of readers that do not read. What differs is where events come
from: PostgreSQL, read off the reactor when a NOTIFY says there is more
(or the listener reconnected, or now and then regardless), so a catch-up
from far back is read page by page as the reader takes it.
"""

from __future__ import annotations

import itertools
from bisect import bisect_right
from collections import deque
from operator import attrgetter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.state.engines import DatabaseUnavailableError
from bridge.state.farm_store import FarmEvent, FarmStore
from bridge.state.journal import Subscriber, Subscription

#: Events read from the farm journal per query.
PAGE = 500


class FarmEventHub:
    """Fans the farm journal out to subscribers, in farm id order, each
    event once. Farm ids only grow but may skip (a transaction rolled
    back, PostgreSQL restarted): positions compare, they are not counted.

    Invariants: ``last_id`` is the newest farm id read (published);
    ``recent`` holds every published event with an id above
    ``recent_after``, in id order; a
    subscription in ``_reading`` has a read of the farm journal under way
    for it (at most one each)."""

    log = Logger()

    def __init__(self, farm: FarmStore, clock: IReactorTime, keep_recent: int = 10_000
                 ) -> None:
        self.farm = farm
        self.clock = clock
        self.last_id = 0
        self.oldest_id = 0  # the id before the oldest the farm journal still holds
        self.loaded = False
        self.recent: deque[FarmEvent] = deque(maxlen=keep_recent)
        self.recent_after = 0
        self.subscriptions: set[Subscription] = set()
        self._polling = False
        self._again = False
        self._reading: set[Subscription] = set()

    # -- in -----------------------------------------------------------------------------

    def poll(self) -> None:
        """Read what the farm journal has after ``last_id`` and publish it."""
        if self._polling:
            self._again = True
            return
        Deferred.fromCoroutine(self._poll()).addErrback(self._failed)

    async def _poll(self) -> None:
        self._polling = True
        try:
            while True:
                self._again = False
                if not self.loaded:
                    self.oldest_id, self.last_id = await self.farm.event_bounds()
                    self.recent_after = self.last_id
                    self.loaded = True
                    self.log.info("farm journal: events up to {last_id}", last_id=self.last_id)
                    for subscription in list(self.subscriptions):
                        self.catch_up(subscription)
                rows = await self.farm.events_after(self.last_id, PAGE)
                for event in rows:
                    self._publish(event)
                if len(rows) < PAGE and not self._again:
                    return
        finally:
            self._polling = False

    def _failed(self, failure: Any) -> None:
        if not failure.check(DatabaseUnavailableError):
            self.log.failure("farm journal: reading failed", failure)

    def _publish(self, event: FarmEvent) -> None:
        previous, self.last_id = self.last_id, event.id
        if len(self.recent) == self.recent.maxlen:
            self.recent_after = self.recent[0].id
        self.recent.append(event)
        for subscription in list(self.subscriptions):
            if subscription.paused:
                continue
            if subscription.position == previous:
                subscription.position = event.id
                subscription.subscriber.send(event)  # type: ignore[arg-type]
            elif subscription.position < previous:
                self.catch_up(subscription)

    # -- out ----------------------------------------------------------------------------

    def subscribe(self, subscriber: Subscriber, after: int) -> Subscription:
        """Farm events with ids after ``after`` go to ``subscriber``, in
        order, first what the farm journal has, then as they come."""
        start = after
        if self.loaded and after > self.last_id:
            start = self.last_id
            subscriber.resync(after, start, "unknown id: the farm journal ends before it")
        elif self.loaded and after < self.oldest_id:
            start = self.oldest_id
            subscriber.resync(after, start, "pruned: the farm journal no longer holds "
                                            "those events")
        subscription = Subscription(self, subscriber, start)  # type: ignore[arg-type]
        self.subscriptions.add(subscription)
        self.catch_up(subscription)
        return subscription

    def catch_up(self, subscription: Subscription) -> None:
        """Send what ``subscription`` has not had, until it pauses: from
        ``recent`` when it reaches back far enough, else read from the farm."""
        while not subscription.paused and not subscription.closed \
                and subscription.position < self.last_id:
            recent = self.recent
            if subscription.position < self.recent_after or not self.loaded:
                self._read_for(subscription)
                return
            index = bisect_right(recent, subscription.position, key=attrgetter("id"))
            for event in itertools.islice(recent, index, index + PAGE):
                if subscription.paused or subscription.closed:
                    return
                subscription.position = event.id
                subscription.subscriber.send(event)  # type: ignore[arg-type]

    def _read_for(self, subscription: Subscription) -> None:
        if subscription in self._reading:
            return
        self._reading.add(subscription)

        def read(events: list[FarmEvent]) -> None:
            self._reading.discard(subscription)
            for event in events:
                if subscription.paused or subscription.closed:
                    return
                if event.id > subscription.position:
                    subscription.position = event.id
                    subscription.subscriber.send(event)  # type: ignore[arg-type]
            if events:
                self.catch_up(subscription)

        def failed(failure: Any) -> None:
            self._reading.discard(subscription)
            self._failed(failure)  # tried again at the next poll's publish

        self.farm.events_after(subscription.position, PAGE).addCallbacks(read, failed)

    def stalled(self, longer_than: float) -> list[Subscription]:
        now = self.clock.seconds()
        return [s for s in self.subscriptions
                if s.paused_since is not None and now - s.paused_since > longer_than]


async def farm_sessions(farm: FarmStore, stale_after: float) -> dict[str, Any]:
    """The farm view: each host (stale when its last heartbeat is older
    than ``stale_after`` seconds) with its sessions, as the farm has them."""
    hosts = await farm.hosts()
    sessions = await farm.sessions()
    by_host: dict[str, list[dict[str, Any]]] = {}
    for row in sessions:
        by_host.setdefault(row["host"], []).append(row)
    return {"hosts": [{
        "host": h.host, "stale": h.age > stale_after, "seconds_since_heartbeat": round(h.age, 1),
        "shipped_event_id": h.shipped_event_id, "admin_url": h.admin_url,
        "started_at": h.started_at, "sessions": len(by_host.get(h.host, [])),
    } for h in hosts], "sessions": sessions}

"""Shipping what a host owes the farm, in order, exactly once.

The journal is the outbox for events: the shipper reads it after the last
local id the farm holds (asked of the farm itself at every connect, so a
shipment whose commit was in doubt is neither lost nor doubled: the farm's
unique (host, journal, local id) drops a repeat anyway) and ships a page
at a time, each page in one PostgreSQL transaction with the sessions its
events touched, as they are now. At every connect all of the host's
sessions are shipped and any other farm row of the host removed. Then the
``farm_outbox`` rows: failed-logon counts and command results.

While PostgreSQL is away nothing here touches the host's work: logons,
the OTS API and the journal go on; the shipper tries again (0.25 s
doubling to 2 s) and catches up when it is back. One line says when the
farm went away and one when it came back, with how much waited.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from bridge.sessions.model import Session, SessionChange
from bridge.sessions.registry import SessionRegistry
from bridge.state.engines import DatabaseUnavailableError
from bridge.state.farm_store import FarmStore, Shipment
from bridge.state.outbox import COMMAND_RESULT, FAILURES, FarmOutbox
from bridge.state.store import StateStore

#: Journal events per PostgreSQL transaction.
PAGE = 500
RETRY_FIRST, RETRY_MAX = 0.25, 2.0
#: A failure that repeats is said again at most this often (seconds).
REPEAT_EVERY = 60.0
#: PostgreSQL's SQLSTATE for a write its policies refuse.
INSUFFICIENT_PRIVILEGE = "42501"


def session_row(session: Session) -> dict[str, Any]:
    """A session as the farm keeps it (farm_store.SESSION_COLUMNS)."""
    return {
        "session_id": session.session_id, "username": session.username,
        "domain": session.domain, "state": int(session.state),
        "logged_on": session.logged_on, "connection_id": session.connection_id,
        "client_name": session.client.host_name, "client_address": session.client.address,
        "since": session.state_since, "connect_time": session.connect_time,
        "logon_time": session.logon_time, "disconnect_time": session.disconnect_time,
    }


class FarmShipper:
    """Ships the host's journal, sessions and outbox rows to the farm.

    Invariants: ``shipped`` is the last local event id the farm is known to
    hold (None until a connect asked the farm); at most one pump runs at a
    time (``_pumping``), and a kick during one makes it go round again."""

    log = Logger()

    def __init__(self, farm: FarmStore, outbox: FarmOutbox, state: StateStore,
                 registry: SessionRegistry, clock: IReactorTime, host: str,
                 admin_url: str = "", heartbeat: float = 5.0) -> None:
        self.farm = farm
        self.outbox = outbox
        self.state = state
        self.registry = registry
        self.clock = clock
        self.host = host
        self.admin_url = admin_url
        journal = outbox.get("journal")
        if journal is None:
            journal = uuid.uuid4().hex
            outbox.set("journal", journal)
        self.journal = journal
        self.shipped: int | None = None
        self.connected = False
        self.events_shipped = 0
        self.shipments = 0
        # Called after each connect (the farm was away: re-read what it has).
        self.on_connected: list[Callable[[], object]] = []
        self._pumping = False
        self._again = False
        self._pumped: list[Deferred[None]] = []
        self._retry: IDelayedCall | None = None
        self._delay = RETRY_FIRST
        self._outage_since: float | None = None
        #: The last failure said in full, and when, so that one that repeats
        #: at every retry (every 2 s) is a line a minute, not a traceback each.
        self._said: tuple[str, float] | None = None
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._interval = heartbeat
        self._stopped = False

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        self.registry.observe(self._changed)
        self._heartbeat.start(self._interval, now=True)

    async def drain(self) -> None:
        """Ship what is owed now, once (a clean stop leaves the farm
        current); nothing when the farm is away. Failures are the pump's."""
        if not self.connected:
            return
        if self._pumping:
            self._again = True
            done: Deferred[None] = Deferred()
            self._pumped.append(done)
            await done
        else:
            await self._pump()

    def stop(self) -> None:
        self._stopped = True
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()

    def _changed(self, change: SessionChange) -> None:
        if change.event_id is not None:
            self.kick()

    def _beat(self) -> None:
        if self.connected and not self._pumping:
            self.farm.heartbeat(self.host).addErrback(self._failed)
        self.kick()

    def kick(self) -> None:
        """Something may be owed: ship it (now, or after the running pump)."""
        if self._stopped:
            return
        if self._pumping:
            self._again = True
            return
        if self._retry is not None and self._retry.active():
            return  # an outage: the retry comes
        Deferred.fromCoroutine(self._pump()).addErrback(self._failed)

    @property
    def backlog(self) -> int:
        """Journal events not yet shipped (as far as the host knows)."""
        shipped = self.shipped if self.shipped is not None else self.outbox.shipped_event_id
        return max(0, self.state.last_event_id() - shipped)

    # -- the pump -----------------------------------------------------------------------

    async def _pump(self) -> None:
        self._pumping = True
        try:
            while True:
                self._again = False
                if not self.connected:
                    await self._connect()
                await self._ship_events()
                await self._ship_outbox()
                if not self._again or self._stopped:
                    break
            self._said = None  # all shipped: a failure after this is news
        finally:
            self._pumping = False
            waiting, self._pumped = self._pumped, []
            for done in waiting:
                done.callback(None)

    async def _connect(self) -> None:
        await self.farm.prepare()
        self.shipped = await self.farm.register(self.host, self.journal, self.admin_url)
        oldest = self.state.events_after(0, 1)
        if oldest and oldest[0].id > self.shipped + 1:
            self.log.warn("farm: journal events {first} to {last} were pruned before they "
                          "were shipped", first=self.shipped + 1, last=oldest[0].id - 1)
        # Every session of the host, and none that it no longer has.
        await self._ship_page(all_sessions=True)
        self.connected = True
        self._delay = RETRY_FIRST
        if self._outage_since is not None:
            self.log.info("farm database back after {seconds:.1f} s; {backlog} journal "
                          "events to ship", seconds=self.clock.seconds() - self._outage_since,
                          backlog=self.backlog)
            self._outage_since = None
        else:
            self.log.info("farm: host {host} connected; journal shipped up to event "
                          "{shipped}", host=self.host, shipped=self.shipped)
        for callback in list(self.on_connected):
            callback()

    async def _ship_events(self) -> None:
        while await self._ship_page():
            pass

    async def _ship_page(self, all_sessions: bool = False) -> bool:
        """Ship the next page of events (and the sessions they touched, or
        all of them); True when a full page went (more may follow)."""
        assert self.shipped is not None
        events = self.state.events_after(self.shipped, PAGE)
        if not events and not all_sessions:
            return False
        if all_sessions:
            upserts = [session_row(s) for s in self.registry]
            deletes: list[int] = []
        else:
            touched = sorted({e.session_id for e in events if e.session_id})
            present = [self.registry.get(sid) for sid in touched]
            upserts = [session_row(s) for s in present if s is not None]
            deletes = [sid for sid, s in zip(touched, present, strict=True) if s is None]
        await self.farm.ship(Shipment(self.host, self.journal, events, upserts, deletes,
                                      all_sessions))
        self.shipments += 1
        if events:
            self.shipped = events[-1].id
            self.events_shipped += len(events)
            self.outbox.shipped_event_id = self.shipped
        return len(events) == PAGE

    async def _ship_outbox(self) -> None:
        counts = self.outbox.owed(FAILURES)
        if counts:
            await self.farm.put_failures(self.host, {
                key: (int(payload["failures"]), float(payload["last_failure"]))
                for key, payload, _ in counts})
            self.outbox.delivered(FAILURES, counts)
        results = self.outbox.owed(COMMAND_RESULT)
        if results:
            await self.farm.finish_commands({int(key): payload for key, payload, _ in results})
            self.outbox.delivered(COMMAND_RESULT, results)

    # -- outages ----------------------------------------------------------------------

    def _failed(self, failure: Any) -> None:
        if failure.check(DatabaseUnavailableError):
            if self.connected or self._outage_since is None:
                self.log.warn("farm database unavailable ({error}); sessions and events wait "
                              "in the outbox", error=failure.getErrorMessage())
            if self._outage_since is None:
                self._outage_since = self.clock.seconds()
        else:
            self._say(failure)
        self.connected = False
        if self._stopped or (self._retry is not None and self._retry.active()):
            return
        self._retry = self.clock.callLater(self._delay, self._retry_now)
        self._delay = min(RETRY_MAX, self._delay * 2)

    def _say(self, failure: Any) -> None:
        error = failure.getErrorMessage()
        now = self.clock.seconds()
        if self._said is not None and self._said[0] == error:
            if now - self._said[1] >= REPEAT_EVERY:
                self._said = (error, now)
                self.log.error("farm: shipping still fails: {error}", error=error)
            return
        self._said = (error, now)
        if getattr(failure.value, "sqlstate", None) == INSUFFICIENT_PRIVILEGE:
            # Row-level security (contrib/postgresql/farm-host-roles.sql)
            # lets a role write only rows of the host named as the role.
            self.log.error("farm: PostgreSQL refused a write of host {host} ({error}): with "
                           "a role per host, the role must be named as host_name and be in "
                           "icpbridge_hosts", host=self.host, error=error)
        else:
            self.log.failure("farm: shipping failed", failure)

    def _retry_now(self) -> None:
        self._retry = None
        self.kick()

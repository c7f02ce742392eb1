"""FarmService: the farm's parts, built and wired in one place, started
and stopped with the bridge (a child of its service tree)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from bridge.farm.commands import Actions, CommandRunner, CommandWaiter
from bridge.farm.haproxy import HaproxyMapFeeder
from bridge.farm.policies import FarmFailureBudget, FarmSingleSession
from bridge.farm.shipper import FarmShipper
from bridge.farm.signing import CommandKey
from bridge.farm.view import FarmEventHub
from bridge.sessions.properties import PropertyTable
from bridge.sessions.registry import SessionRegistry
from bridge.state import farm_store
from bridge.state.engines import Engine, PostgresEngine
from bridge.state.farm_store import FarmStore, SkippedRows
from bridge.state.outbox import FarmOutbox
from bridge.state.store import StateStore

#: How often the farm journal is read without a notification (a safety net).
POLL_INTERVAL = 5.0
#: How often the farm journal and finished commands are pruned.
PRUNE_INTERVAL = 3600.0
#: How long a stopping bridge tries to ship its last changes.
DRAIN_TIMEOUT = 3.0


@dataclass(frozen=True)
class FarmSettings:
    """What the farm needs of the configuration."""

    database: str
    password: str | None
    host: str
    heartbeat: float = 5.0
    stale_after: float = 20.0
    command_timeout: float = 10.0
    events_keep: float = 7 * 24 * 3600.0
    haproxy_socket: str = ""
    haproxy_map: Path | None = None
    # The farm's command key (bridge.farm.signing); None: commands are off.
    command_key: bytes | None = field(default=None, repr=False)


def read_password(path: Path | None) -> str | None:
    """The farm database's password from its file (first line), or None:
    then libpq's PGPASSWORD / PGPASSFILE / ~/.pgpass apply. Raises OSError
    or ValueError (a file others may read)."""
    if path is None:
        return None
    if path.stat().st_mode & 0o077:
        raise ValueError(f"farm_password_file {path} may be read by others: chmod 600 it")
    return path.read_text().split("\n", 1)[0]


class FarmService(Service):
    """The host's part of the farm: shipping, commands, the farm view,
    the policies and (where configured) HAProxy's map."""

    log = Logger()
    name = "farm"

    def __init__(self, settings: FarmSettings, reactor: Any, clock: IReactorTime,
                 state: StateStore, state_path: Path | str, registry: SessionRegistry,
                 properties: PropertyTable, actions: Actions, admin_url: str = "",
                 engine: Engine | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.engine = engine or PostgresEngine(reactor, settings.database, settings.password,
                                               application_name=f"icp-bridge {settings.host}")
        self.store = FarmStore(self.engine, SkippedRows(clock.seconds))
        key = CommandKey(settings.command_key) if settings.command_key is not None else None
        self.outbox = FarmOutbox(state_path)
        host = settings.host
        self.shipper = FarmShipper(self.store, self.outbox, state, registry, clock, host,
                                   admin_url, settings.heartbeat)
        self.runner = CommandRunner(self.store, self.outbox, registry, actions, clock, host,
                                    key)
        self.waiter = CommandWaiter(self.store, clock, key)
        self.events = FarmEventHub(self.store, clock)
        self.budget = FarmFailureBudget(self.store, self.outbox, clock, host)
        self.single_session = FarmSingleSession(self.store, self.waiter, properties, host,
                                                settings.command_timeout, settings.stale_after)
        self.router = HaproxyMapFeeder(
            reactor, clock, self.store, settings.haproxy_socket, settings.haproxy_map,
            settings.stale_after, host) if settings.haproxy_map is not None else None
        self.runner.result_owed.append(self.shipper.kick)
        self.budget.owed.append(self.shipper.kick)
        self.shipper.on_connected.append(self._farm_back)
        self.listening = False
        self._readers_started = False
        self._timers = [self._every(POLL_INTERVAL, self.events.poll),
                        self._every(PRUNE_INTERVAL, self._prune)]
        self._handlers: dict[str, Callable[[str], object]] = {
            farm_store.EVENTS_CHANNEL: lambda _: self.events.poll(),
            farm_store.COMMANDS_CHANNEL: self.runner.notified,
            farm_store.RESULTS_CHANNEL: self.waiter.notified,
            farm_store.FAILURES_CHANNEL: lambda _: self.budget.refresh(),
            farm_store.SESSIONS_CHANNEL: lambda _: self.router and self.router.update(),
        }

    def _every(self, interval: float, work: Callable[[], object]) -> tuple[LoopingCall, float]:
        call = LoopingCall(work)
        call.clock = self.clock
        return call, interval

    def startService(self) -> None:
        super().startService()
        self.runner.recover()
        self.shipper.start()
        self._readers_started = False
        self.log.info("farm: host {host}, database {database}", host=self.settings.host,
                      database=_describe(self.settings.database))
        if self.settings.command_key is None:
            self.log.warn("farm: no farm_command_key_file: this host neither issues nor runs "
                          "farm commands (ctl farm logoff, session.farm.singleSession)")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # The last changes (clients gone as the bridge stops) reach the
        # farm, if it answers within a few seconds. One reactor turn first:
        # the RDP server's disconnect reaches the registry just after the
        # link's when_closed() fires, which is what let the bridge stop us.
        await deferLater(self.clock, 0, lambda: None)
        drained = Deferred.fromCoroutine(self.shipper.drain())
        drained.addTimeout(DRAIN_TIMEOUT, self.clock)
        try:
            await drained
        except Exception as e:
            self.log.info("farm: not everything shipped at stop ({error}); shipped at the "
                          "next start", error=str(e) or type(e).__name__)
        self.shipper.stop()
        if self.router is not None:
            self.router.stop()
        for call, _ in self._timers:
            if call.running:
                call.stop()
        try:
            await self.engine.close()
        finally:
            self.outbox.close()

    # -- notifications (wake-ups; the rows are the truth) -------------------------------

    def _notified(self, channel: str, payload: str) -> None:
        handler = self._handlers.get(channel)
        if handler is not None:
            handler(payload)

    def _listening(self) -> None:
        """Listening (again): what was notified while it could not be is read now."""
        self.listening = True
        self.events.poll()
        self.runner.fetch()
        self.waiter.reconnected()
        self.budget.refresh()
        if self.router is not None:
            self.router.update()

    def _not_listening(self, reason: str) -> None:
        if self.listening:
            self.log.warn("farm: notifications stopped ({reason}); listening again when the "
                          "database is back", reason=reason)
        self.listening = False

    def _farm_back(self) -> None:
        """The shipper (re)connected: the tables exist. The readers start
        the first time (so none reads a table not made yet)."""
        if not self._readers_started:
            self._readers_started = True
            self.engine.listen(farm_store.CHANNELS, self._notified, self._listening,
                               self._not_listening)
            if self.router is not None:
                self.router.start()
            for call, interval in self._timers:
                call.start(interval, now=False)
        self.runner.fetch()
        self.events.poll()

    def _prune(self) -> None:
        d = self.store.prune_events(self.clock.seconds() - self.settings.events_keep)
        d.addErrback(lambda failure: None)  # an outage: pruned next time

    # -- for the service and the admin endpoint ----------------------------------------

    def prune_floor(self) -> int:
        """The journal may not be pruned past this local id: the farm does
        not have the events after it yet."""
        return self.shipper.shipped if self.shipper.shipped is not None \
            else self.outbox.shipped_event_id


def _describe(conninfo: str) -> str:
    """The connection string for the log (it holds no password: refused)."""
    return conninfo if len(conninfo) < 200 else conninfo[:200] + "..."

"""Admin commands across hosts: log off, disconnect, message.

A command is a row of ``farm_commands`` for the host that runs the
session, and the row's NOTIFY wakes that host. The host runs it as its
own OTS API would (the session actions: LogoffUserSession to its RDP
server, and so on) and writes the result back, through the outbox, so a
result is never lost either. The caller waits for the result with a
timeout. A host that was down runs its pending commands that have not
expired when it comes back (the rows are the truth; notifications sent
while it was away are gone).

Nothing is run twice: before a command runs, the host records it in its
own state database (``farm_commands_run``); a command recorded there is
never started again, also when its result never reached the farm. One
that was running when the host died is answered "interrupted".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.otsapi.actions import Actor, NoClientError, SessionActions
from bridge.sessions.model import Session
from bridge.sessions.registry import SessionRegistry
from bridge.state.engines import DatabaseUnavailableError
from bridge.state.farm_store import FarmCommand, FarmStore
from bridge.state.outbox import FarmOutbox

ACTIONS = ("logoff", "disconnect", "message")


class Actions(Protocol):
    """What a host does to one of its sessions, as its OTS API does."""

    async def logoff(self, session: Session, wait: bool, why: str) -> bool: ...

    async def disconnect(self, session: Session, wait: bool, why: str) -> bool: ...

    async def message(self, session: Session, title: str, text: str, style: int,
                      timeout: int, wait: bool, why: str) -> int: ...


class SharedActions:
    """The host's own session actions (``bridge.otsapi.actions``: what its
    OTS API methods and its admin endpoint's POST routes call), for farm
    commands: the journal says "logged off through farm command 7 by
    alice on host-c"."""

    def __init__(self, actions: SessionActions) -> None:
        self.actions = actions

    async def logoff(self, session: Session, wait: bool, why: str) -> bool:
        return await self.actions.logoff(session, wait, _actor(why))

    async def disconnect(self, session: Session, wait: bool, why: str) -> bool:
        return await self.actions.disconnect(session, wait, _actor(why))

    async def message(self, session: Session, title: str, text: str, style: int,
                      timeout: int, wait: bool, why: str) -> int:
        try:
            return await maybeDeferred(self.actions.message, session, title, text, style,
                                       timeout, wait, _actor(why))
        except NoClientError:
            return 0


def _actor(why: str) -> Actor:
    """``why`` is "farm command N (alice on host-c)": the way in and who."""
    via, _, who = why.partition(" (")
    return Actor(who.rstrip(")") or "(unknown)", via)


class CommandRunner:
    """The host's side: runs the farm's commands for its sessions."""

    log = Logger()

    def __init__(self, farm: FarmStore, outbox: FarmOutbox, registry: SessionRegistry,
                 actions: Actions, clock: IReactorTime, host: str) -> None:
        self.farm = farm
        self.outbox = outbox
        self.registry = registry
        self.actions = actions
        self.clock = clock
        self.host = host
        self.ran = 0
        self._fetching = False
        self._again = False
        # Told when a result is owed to the farm (the shipper ships it).
        self.result_owed: list[Any] = []

    def recover(self) -> None:
        """At start: commands that were running when the host died are
        answered, not run again."""
        for command_id in self.outbox.interrupted_commands():
            self.log.warn("farm command {command_id} was running when the bridge stopped; "
                          "not run again", command_id=command_id)
            self._finish(command_id, {"ok": False, "error": "interrupted: the host stopped "
                                                            "while running it"})

    def notified(self, payload: str) -> None:
        if payload == self.host:
            self.fetch()

    def fetch(self) -> None:
        """Run whatever is pending for this host."""
        if self._fetching:
            self._again = True
            return
        Deferred.fromCoroutine(self._fetch()).addErrback(self._fetch_failed)

    def _fetch_failed(self, failure: Any) -> None:
        if failure.check(DatabaseUnavailableError):
            return  # fetched again when the farm is back (on_connected)
        self.log.failure("farm: reading commands failed", failure)

    async def _fetch(self) -> None:
        self._fetching = True
        try:
            while True:
                self._again = False
                for command in await self.farm.pending_commands(self.host):
                    if self.outbox.start_command(command.id, self.clock.seconds()):
                        Deferred.fromCoroutine(self._run(command)).addErrback(
                            lambda f, c=command: self._crashed(f, c))
                if not self._again:
                    return
        finally:
            self._fetching = False

    async def _run(self, command: FarmCommand) -> None:
        self.ran += 1
        session = self.registry.get(command.session_id)
        why = f"farm command {command.id} ({command.requested_by})"
        args = command.args or {}
        wait = bool(args.get("wait", True))
        if session is None:
            result: dict[str, Any] = {"ok": False, "error": "no such session"}
        elif command.action == "logoff":
            result = {"ok": await self.actions.logoff(session, wait, why)}
        elif command.action == "disconnect":
            result = {"ok": await self.actions.disconnect(session, wait, why)}
        elif command.action == "message":
            answer = await self.actions.message(
                session, str(args.get("title", "")), str(args.get("text", "")),
                int(args.get("style", 0)), int(args.get("timeout", 0)), wait, why)
            result = {"ok": answer != 0, "answer": answer}
        else:
            result = {"ok": False, "error": f"unknown action {command.action!r}"}
        self.log.info("farm command {command_id}: {action} of session {session_id}: "
                      "{result}", command_id=command.id, action=command.action,
                      session_id=command.session_id, result=result)
        self._finish(command.id, result)

    def _crashed(self, failure: Any, command: FarmCommand) -> None:
        self.log.failure("farm command {command_id} failed", failure, command_id=command.id)
        self._finish(command.id, {"ok": False, "error": "failed on the host (see its log)"})

    def _finish(self, command_id: int, result: dict[str, Any]) -> None:
        try:
            self.outbox.finish_command(command_id, result)
        except Exception as e:  # sqlite3.Error: the disk refused; logged, not retried
            self.log.error("farm command {command_id}: result not stored: {error}",
                           command_id=command_id, error=str(e))
            return
        for owed in self.result_owed:
            owed()


class CommandWaiter:
    """The caller's side: queue commands and wait for their results."""

    log = Logger()

    def __init__(self, farm: FarmStore, clock: IReactorTime) -> None:
        self.farm = farm
        self.clock = clock
        self._waiting: dict[int, Deferred[None]] = {}

    def notified(self, payload: str) -> None:
        try:
            command_id = int(payload)
        except ValueError:
            return
        d = self._waiting.pop(command_id, None)
        if d is not None:
            d.callback(None)

    def reconnected(self) -> None:
        """Results may have come while notifications could not: look again."""
        for command_id in list(self._waiting):
            d = self._waiting.pop(command_id)
            d.callback(None)

    async def run(self, targets: Iterable[tuple[str, int]], action: str,
                  args: dict[str, Any], requested_by: str, timeout: float,
                  expires_in: float) -> list[FarmCommand]:
        """Queue ``action`` for each (host, session id) and wait up to
        ``timeout`` seconds for their results; returns the commands as they
        are then (state "done" with a result, "pending" or "expired").
        Raises DatabaseUnavailableError when the farm is away."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        ids = await self.farm.add_commands(
            [(host, session_id, action, args) for host, session_id in targets],
            requested_by, max(expires_in, timeout))
        deadline = self.clock.seconds() + timeout
        open_ids = set(ids)
        while open_ids:
            # Register first: a result may land while we read.
            woken: list[Deferred[None]] = []
            for command_id in open_ids:
                d: Deferred[None] = Deferred()
                self._waiting[command_id] = d
                woken.append(d)
            for command in await self.farm.commands(sorted(open_ids)):
                if command.state != "pending":
                    open_ids.discard(command.id)
            if not open_ids:
                break
            remaining = deadline - self.clock.seconds()
            if remaining <= 0:
                break
            any_woken = DeferredList(woken, fireOnOneCallback=True, consumeErrors=True)
            any_woken.addTimeout(remaining, self.clock)
            try:
                await any_woken
            except Exception:  # noqa: S110 - the timeout: read the final states below
                pass
            for command_id in ids:
                self._waiting.pop(command_id, None)
        for command_id in ids:
            self._waiting.pop(command_id, None)
        return await self.farm.commands(ids)


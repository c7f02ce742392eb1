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

Commands are signed (``bridge.farm.signing``): the issuing host signs each
row with the farm's command key, the host that runs it checks the
signature before anything else. A command unsigned, with a signature that
does not verify, or on a host without the key is not run: it is answered
state "refused" with the reason, and logged (one line now and then, with
how many, so rows written in bulk do not flood the log).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.farm.signing import CommandKey
from bridge.otsapi.actions import Actor, NoClientError, SessionActions
from bridge.sessions.model import Session
from bridge.sessions.registry import SessionRegistry
from bridge.state.engines import DatabaseUnavailableError
from bridge.state.farm_store import FarmCommand, FarmStore, check_host, check_text
from bridge.state.outbox import FarmOutbox

ACTIONS = ("logoff", "disconnect", "message")
#: Without a command key a host neither issues nor runs farm commands.
NO_KEY = "this host has no farm_command_key_file: farm commands are off"
#: Refused commands are logged at most once per this many seconds.
REFUSAL_LOG_EVERY = 10.0


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
                 actions: Actions, clock: IReactorTime, host: str,
                 key: CommandKey | None) -> None:
        self.farm = farm
        self.outbox = outbox
        self.registry = registry
        self.actions = actions
        self.clock = clock
        self.host = host
        self.key = key
        self.ran = 0
        self.refused = 0
        self._refusals_unlogged = 0
        self._refusal_logged_at: float | None = None
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
                    if not self.outbox.start_command(command.id, self.clock.seconds()):
                        continue
                    refusal = self.refusal(command)
                    if refusal is not None:
                        self._refuse(command, refusal)
                        continue
                    Deferred.fromCoroutine(self._run(command)).addErrback(
                        lambda f, c=command: self._crashed(f, c))
                if not self._again:
                    return
        finally:
            self._fetching = False

    def refusal(self, command: FarmCommand) -> str | None:
        """Why ``command`` may not run here, or None: signed with the
        farm's command key, for this host, with a requested_by fit to log."""
        if self.key is None:
            return NO_KEY
        if not command.signature:
            return "unsigned: not queued by a host with the farm's command key"
        if not self.key.verify(command):
            return "bad signature: not queued by a host with the farm's command key"
        if command.host != self.host or check_text(command.requested_by) is not None:
            return "malformed"
        return None

    def _refuse(self, command: FarmCommand, refusal: str) -> None:
        self.refused += 1
        self._refusals_unlogged += 1
        now = self.clock.seconds()
        if self._refusal_logged_at is None or now - self._refusal_logged_at >= REFUSAL_LOG_EVERY:
            self._refusal_logged_at = now
            self.log.warn("farm: refused {count} command(s), the last {command_id} ({action} "
                          "of session {session_id}, requested_by {requested_by!r}): {refusal}",
                          count=self._refusals_unlogged, command_id=command.id,
                          action=command.action[:40], session_id=command.session_id,
                          requested_by=command.requested_by[:80], refusal=refusal)
            self._refusals_unlogged = 0
        self._finish(command.id, {"ok": False, "refused": refusal})

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

    def __init__(self, farm: FarmStore, clock: IReactorTime, key: CommandKey | None) -> None:
        self.farm = farm
        self.clock = clock
        self.key = key
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
        """Queue ``action`` for each (host, session id), signed, and wait
        up to ``timeout`` seconds for their results; returns the commands
        as they are then (state "done" with a result, "pending", "expired"
        or "refused"). Without the command key, or for a target that is not
        a host name, nothing is queued: the command comes back refused.
        Raises DatabaseUnavailableError when the farm is away."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        targets = list(targets)
        refused = [FarmCommand(0, host, session_id, action, args, requested_by, "refused",
                               {"ok": False, "refused": NO_KEY if self.key is None
                                else f"{host!r} is not a host name"})
                   for host, session_id in targets
                   if self.key is None or check_host(host) is not None]
        if refused:
            self.log.warn("farm: {action} not queued: {refusal}", action=action,
                          refusal=refused[0].result["refused"])  # type: ignore[index]
            targets = [(host, session_id) for host, session_id in targets
                       if self.key is not None and check_host(host) is None]
            if not targets:
                return refused
        assert self.key is not None
        ids = await self.farm.add_commands(
            [(host, session_id, action, args) for host, session_id in targets],
            requested_by, max(expires_in, timeout), self.key.sign)
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
        return refused + await self.farm.commands(ids)


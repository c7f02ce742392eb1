"""Farm policies: one session per user across the farm, and failed-logon
budgets that count guesses spread over hosts together.

``session.farm.singleSession`` (default false): a user who logs on at one
host while holding a session on another gets the other session logged
off (a farm logoff command, as ``ctl farm logoff`` sends). Ended, not
refused: the load balancer, not the user, chooses the host, and a client
that sends no mstshash cookie (saved credentials) lands wherever the
balance puts it: refusing would lock such a user out of the farm for as
long as the old session lives, while ending it is what ogon does on one
host for a single session it cannot take over (``session.reconnect``
false). With reconnect routing (``bridge.farm.haproxy``) a user who sends
the cookie is routed to the old session's host and reconnects instead.
The logon waits for the old host at most ``call_timeout`` (not at all for a
stale host); with the farm database away it goes on (the host stays the authority for its own
sessions) and a host that is away runs the logoff when it is back, if the
command has not expired by then.

Failed-logon budgets: each host ships its own counts (per user+source
key and per user key, as the throttle keeps them) and reads the other
hosts' sums; the throttle adds them to its own. Within the security rules:
only a user+source count can lock out (a guesser cannot lock alice out of
every address by guessing from one), a per-user count only delays.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from bridge.farm.commands import CommandWaiter
from bridge.security.auth import Identity
from bridge.sessions.properties import PropertyTable
from bridge.state.engines import DatabaseUnavailableError
from bridge.state.farm_store import FarmStore
from bridge.state.outbox import FAILURES, FarmOutbox

#: How long a single-session logoff for a host that is away stays pending.
SINGLE_SESSION_EXPIRY = 600.0


class FarmFailureBudget:
    """The other hosts' failed-logon counts (a cache, refreshed when the
    farm says they changed), and this host's counts owed to the farm."""

    log = Logger()

    def __init__(self, farm: FarmStore, outbox: FarmOutbox, clock: IReactorTime, host: str,
                 forget_after: float = 3600.0) -> None:
        self.farm = farm
        self.outbox = outbox
        self.clock = clock
        self.host = host
        self.forget_after = forget_after
        self.elsewhere: dict[str, int] = {}
        # Told when a count is owed (the shipper ships it).
        self.owed: list[Any] = []
        self._refreshing = False
        self._again = False

    def others(self, key: str) -> int:
        """Failures the other hosts counted for ``key`` (recently)."""
        return self.elsewhere.get(key, 0)

    def counted(self, key: str, failures: int, last_failure: float) -> None:
        """This host's count for ``key`` changed (0: cleared)."""
        try:
            self.outbox.put(FAILURES, key, {"failures": failures, "last_failure": last_failure})
        except Exception as e:  # sqlite3.Error: the budget is advisory; logged
            self.log.warn("farm: failed-logon count not stored for the farm: {error}",
                          error=str(e))
            return
        for owed in self.owed:
            owed()

    def refresh(self) -> None:
        if self._refreshing:
            self._again = True
            return
        self._refreshing = True
        since = self.clock.seconds() - self.forget_after

        def got(counts: dict[str, int]) -> None:
            self.elsewhere = counts
            done()

        def failed(failure: Any) -> None:
            if not failure.check(DatabaseUnavailableError):
                self.log.failure("farm: reading failed-logon counts failed", failure)
            done()

        def done() -> None:
            self._refreshing = False
            if self._again:
                self._again = False
                self.refresh()

        self.farm.failures_elsewhere(self.host, since).addCallbacks(got, failed)


class FarmSingleSession:
    """``session.farm.singleSession``: a logon here ends the user's
    sessions on other hosts (see the module's docstring for why ended,
    not refused)."""

    log = Logger()

    def __init__(self, farm: FarmStore, waiter: CommandWaiter, properties: PropertyTable,
                 host: str, timeout: float, stale_after: float) -> None:
        self.farm = farm
        self.waiter = waiter
        self.properties = properties
        self.host = host
        self.timeout = timeout
        self.stale_after = stale_after

    async def before_logon(self, identity: Identity) -> None:
        """Log off ``identity``'s sessions on other hosts, waiting at most
        ``timeout``; never raises (a farm that is away does not stop a logon)."""
        user = identity.username
        if not self.properties.bool_or("session.farm.singlesession", user, False):
            return
        try:
            sessions = await self.farm.sessions(user)
            others = [(row["host"], row["session_id"]) for row in sessions
                      if row["host"] != self.host
                      and row["domain"].lower() == identity.domain.lower()]
            if not others:
                return
            self.log.info("user {username} logs on at {host}: session.farm.singleSession "
                          "logs off {sessions}", username=user, host=self.host,
                          sessions=", ".join(f"{h}/{s}" for h, s in others))
            # A stale host is not waited for: its logoff runs when it is back.
            fresh = {h.host for h in await self.farm.hosts() if h.age <= self.stale_after}
            wait = self.timeout if any(host in fresh for host, _ in others) else 0.001
            commands = await self.waiter.run(
                others, "logoff", {"wait": False}, f"session.farm.singleSession at {self.host}",
                wait, SINGLE_SESSION_EXPIRY)
            for command in commands:
                if command.state == "refused":
                    self.log.warn("user {username}: the logoff of {host}/{session_id} was "
                                  "refused: {refusal}", username=user, host=command.host,
                                  session_id=command.session_id,
                                  refusal=(command.result or {}).get("refused", ""))
            expired = [f"{c.host}/{c.session_id}" for c in commands if c.state == "expired"]
            if expired:
                self.log.warn("user {username}: the logoff of {sessions} expired before its "
                              "host ran it", username=user, sessions=", ".join(expired))
            pending = [f"{c.host}/{c.session_id}" for c in commands if c.state == "pending"]
            if pending:
                self.log.warn("user {username}: the logoff of {sessions} is still pending "
                              "(runs when the host answers)", username=user,
                              sessions=", ".join(pending))
        except DatabaseUnavailableError as e:
            self.log.warn("user {username}: session.farm.singleSession not applied, the farm "
                          "database is away ({error})", username=user, error=str(e))
        except Exception:
            # Never a reason to refuse a logon (a farm not set up yet, a bug).
            self.log.failure("user {username}: session.farm.singleSession not applied",
                             username=user)

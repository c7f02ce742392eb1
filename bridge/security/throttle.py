"""Failed-logon throttling and bounded password checks.

Every logon (ICP LogonUser, the greeter's SBP login, OTS API
logonConnection) goes through a LogonGuard around the authenticator:

- Failures are counted per user name and per client address. After
  ``failures_before_delay`` in a row the next attempt waits first (on the
  reactor's clock, never blocking), 0.5 s doubling up to ``delay_max``;
  after ``lockout_failures`` the user (or address) is locked out for
  ``lockout_time``: attempts fail at once, without a password check. A
  success clears the counts. Lockouts are kept in the state database, so a
  restart does not lift them, and an admin can list and clear them
  (``icp-bridge users lockouts`` / ``users unlock``).
- Password checks run in threads, but at most ``concurrency`` per kind
  (the RDP server's logons, the OTS API's) at a time, with at most
  ``queue_limit`` more waiting; beyond that a check is refused with a log
  line. The two kinds do not share a queue, so guesses through the OTS API
  cannot delay the RDP server's logons.
- The log says how many failures in a row, never the password.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from bridge.security.auth import AuthenticationUnavailable, Authenticator, Identity

#: The kinds of logon that queue apart.
RDP = "rdp"
OTSAPI = "otsapi"

SCHEMA = """
CREATE TABLE IF NOT EXISTS lockouts (
    key TEXT PRIMARY KEY,
    failures INTEGER NOT NULL,
    last_failure REAL NOT NULL,
    locked_until REAL NOT NULL
);
"""


@dataclass
class FailureCount:
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


@dataclass(frozen=True)
class ThrottlePolicy:
    failures_before_delay: int = 3
    delay_max: float = 8.0
    lockout_failures: int = 10
    lockout_time: float = 900.0
    # A count older than this (without a new failure) starts over.
    forget_after: float = 3600.0
    concurrency: int = 2
    queue_limit: int = 32


class LogonObserver(Protocol):
    """Told of each failed logon and each lockout set (the event journal,
    metrics); ``key`` names what is locked ("user:alice", "source:ADDR")."""

    def logon_failed(self, username: str, source: str, kind: str, failures: int) -> None: ...

    def locked_out(self, username: str, source: str, key: str, seconds: float,
                   failures: int) -> None: ...


class FailureBudget(Protocol):
    """Failed logons other hosts of a farm counted (bridge.farm.policies)."""

    def others(self, key: str) -> int:
        """Failures the other hosts counted recently for ``key``."""
        ...

    def counted(self, key: str, failures: int, last_failure: float) -> None:
        """This host's count for ``key`` is now ``failures`` (0: cleared)."""
        ...


class LockoutStore:
    """The lockouts table of the state database (its own connection: the
    CLI reads and clears it while the bridge runs)."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=1.0)
        self._db.executescript(SCHEMA)

    def load(self) -> dict[str, FailureCount]:
        return {key: FailureCount(failures, last, until) for key, failures, last, until in
                self._db.execute("SELECT key, failures, last_failure, locked_until "
                                 "FROM lockouts")}

    def get(self, key: str) -> FailureCount | None:
        row = self._db.execute("SELECT failures, last_failure, locked_until FROM lockouts "
                               "WHERE key = ?", (key,)).fetchone()
        return FailureCount(*row) if row else None

    def put(self, key: str, count: FailureCount) -> None:
        self._db.execute("INSERT OR REPLACE INTO lockouts VALUES (?, ?, ?, ?)",
                         (key, count.failures, count.last_failure, count.locked_until))

    def delete(self, key: str) -> bool:
        return self._db.execute("DELETE FROM lockouts WHERE key = ?", (key,)).rowcount > 0

    def close(self) -> None:
        self._db.close()


def user_key(username: str) -> str:
    return f"user:{username}"


def source_key(source: str) -> str:
    return f"source:{source}"


class LogonGuard:
    """An Authenticator's front door: throttling, lockouts, bounded queues."""

    log = Logger()

    def __init__(self, authenticator: Authenticator, clock: IReactorTime,
                 policy: ThrottlePolicy | None = None, store: LockoutStore | None = None
                 ) -> None:
        self.authenticator = authenticator
        self.clock = clock
        self.policy = policy or ThrottlePolicy()
        self.store = store
        self.counts: dict[str, FailureCount] = store.load() if store is not None else {}
        self._lanes = {kind: DeferredSemaphore(self.policy.concurrency) for kind in (RDP, OTSAPI)}
        self._waiting = {RDP: 0, OTSAPI: 0}
        self._logged: dict[str, float] = {}
        self.refused_full = 0
        # For the metrics: logons by (kind, outcome: ok, failed, locked_out,
        # queue_full, unavailable).
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.observers: list[LogonObserver] = []
        # In a farm: the other hosts' counts add to ours. They delay any key,
        # but lock out only a source (never a user for everyone: a guesser
        # spreading over hosts must not lock alice out of the farm).
        self.farm: FailureBudget | None = None

    @classmethod
    def around(cls, authenticator: Authenticator | LogonGuard, clock: IReactorTime
               ) -> LogonGuard:
        """``authenticator`` if it is a guard already, else a guard with the
        default policy (and no lockout store) around it: what a part that
        authenticates takes, so that tests and tools may hand it either."""
        if isinstance(authenticator, LogonGuard):
            return authenticator
        return cls(authenticator, clock)

    # -- the counts ---------------------------------------------------------------

    def _count(self, key: str) -> FailureCount:
        count = self.counts.get(key)
        now = self.clock.seconds()
        if count is not None and now - count.last_failure > self.policy.forget_after \
                and count.locked_until <= now:
            del self.counts[key]
            count = None
        if count is not None and count.locked_until > now and self.store is not None:
            # An admin may have cleared it (icp-bridge users unlock) meanwhile.
            if self.store.get(key) is None:
                del self.counts[key]
                count = None
        return count or FailureCount()

    def locked(self, key: str) -> float:
        """Seconds the key stays locked out (0: not locked)."""
        return max(0.0, self._count(key).locked_until - self.clock.seconds())

    def delay_for(self, failures: int) -> float:
        over = failures - self.policy.failures_before_delay
        if over < 0:
            return 0.0
        return min(self.policy.delay_max, 0.5 * 2 ** over)

    def _elsewhere(self, key: str, locks: bool = False) -> int:
        """The farm's failures for ``key`` beyond ours (for a lockout: only
        a source's count)."""
        if self.farm is None or (locks and key.startswith("user:")):
            return 0
        return self.farm.others(key)

    def _save(self, key: str, count: FailureCount | None) -> None:
        if self.farm is not None:
            self.farm.counted(key, count.failures if count is not None else 0,
                              count.last_failure if count is not None else 0.0)
        if self.store is None:
            return
        try:
            if count is None:
                self.store.delete(key)
            else:
                self.store.put(key, count)
        except sqlite3.Error as e:
            self.log.warn("failed-logon counts not stored: {error}", error=str(e))

    def _tell(self, what: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, what)(*args)
            except Exception:
                self.log.failure("logon observer failed on {what}", what=what)

    def _failed(self, keys: list[str], username: str, source: str, kind: str) -> None:
        now = self.clock.seconds()
        worst = 0
        locked: list[tuple[str, int]] = []
        for key in keys:
            count = self._count(key)
            count.failures += 1
            count.last_failure = now
            worst = max(worst, count.failures)
            farm_failures = count.failures + self._elsewhere(key, locks=True)
            if farm_failures >= self.policy.lockout_failures and count.locked_until <= now:
                count.locked_until = now + self.policy.lockout_time
                self.log.warn("{key} locked out for {seconds:g} s after {failures} failed "
                              "logons", key=key, seconds=self.policy.lockout_time,
                              failures=count.failures)
                locked.append((key, count.failures))
            self.counts[key] = count
            self._save(key, count)
        self.log.warn("failed logon for user {username} from {source} ({failures} in a row)",
                      username=username, source=source or "unknown", failures=worst)
        self._tell("logon_failed", username, source, kind, worst)
        for key, failures in locked:
            self._tell("locked_out", username, source, key, self.policy.lockout_time, failures)

    def _succeeded(self, keys: list[str]) -> None:
        for key in keys:
            if self.counts.pop(key, None) is not None:
                self._save(key, None)

    def _rate_limited(self, what: str) -> bool:
        """True at most once every 10 s per ``what`` (log lines under attack)."""
        now = self.clock.seconds()
        if now - self._logged.get(what, -1e9) < 10:
            return False
        self._logged[what] = now
        return True

    # -- admin ----------------------------------------------------------------------

    def lockouts(self) -> list[tuple[str, FailureCount]]:
        now = self.clock.seconds()
        return sorted((key, count) for key, count in self.counts.items()
                      if count.locked_until > now)

    def unlock(self, key: str) -> bool:
        had = self.counts.pop(key, None) is not None
        self._save(key, None)
        return had

    # -- checking ---------------------------------------------------------------

    async def authenticate(self, username: str, password: str, domain: str, source: str,
                           kind: str, **options: Any) -> Identity | None:
        """The Identity, or None: wrong credentials, locked out, or too many
        checks waiting. ``source`` is the client's address ("" if unknown)."""
        keys = [user_key(username)] + ([source_key(source)] if source else [])
        for key in keys:
            remaining = self.locked(key)
            if remaining:
                self.outcomes[kind, "locked_out"] += 1
                if self._rate_limited(f"locked {key}"):
                    self.log.warn("logon of user {username} from {source} refused: {key} is "
                                  "locked out for {seconds:.0f} s more", username=username,
                                  source=source or "unknown", key=key, seconds=remaining)
                return None
        delay = max(self.delay_for(self._count(key).failures + self._elsewhere(key))
                    for key in keys)
        if delay:
            await deferLater(self.clock, delay, lambda: None)
        if self._waiting[kind] >= self.policy.concurrency + self.policy.queue_limit:
            self.refused_full += 1
            self.outcomes[kind, "queue_full"] += 1
            if self._rate_limited(f"full {kind}"):
                self.log.warn("refusing a logon: {waiting} {kind} password checks already "
                              "waiting ({count} refused so far)", waiting=self._waiting[kind],
                              kind=kind, count=self.refused_full)
            return None
        self._waiting[kind] += 1
        try:
            identity = await self._lanes[kind].run(
                self._check, username, password, domain, options)
        except AuthenticationUnavailable as e:
            # Not a guess of theirs: no failure is counted toward a lockout.
            self.outcomes[kind, "unavailable"] += 1
            if self._rate_limited(f"unavailable {username}"):
                self.log.warn("logon of user {username} refused: {reason}",
                              username=username, reason=str(e))
            return None
        finally:
            self._waiting[kind] -= 1
        if identity is None:
            self.outcomes[kind, "failed"] += 1
            self._failed(keys, username, source, kind)
        else:
            self.outcomes[kind, "ok"] += 1
            self._succeeded(keys)
        return identity

    def _check(self, username: str, password: str, domain: str,
               options: dict[str, Any]) -> Deferred[Identity | None]:
        return self.authenticator.authenticate(username, password, domain, **options)


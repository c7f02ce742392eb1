"""Failed-logon throttling and bounded password checks.

Every logon (ICP LogonUser, the greeter's SBP login, OTS API
logonConnection) goes through a LogonGuard around the authenticator. The
rules follow NIST SP 800-63B 5.2.2 (limit consecutive failures per
account to at most 100, prefer delays, do not let an attacker lock the
legitimate user out):

- Failures are counted three ways: per user *and* source together (a
  "pair"), per user from any source, and per source for any user. A
  source is the client's address (an IPv6 address counts as its /64), or
  for a local OTS API caller its uid (``uid:N``, which the OTS API finds
  for loopback connections); a loopback address the bridge cannot
  attribute to a uid is no source at all, since every local client would
  share it.
- A pair that failed ``lockout_failures`` times in a row is locked out for
  ``lockout_time``: that source may not try that user. So is a source that
  failed that often for any users (it guesses, or sprays names).
- A user's failures from anywhere only slow down: after
  ``failures_before_delay`` the next attempt waits 0.5 s, doubling up to
  ``delay_max``, on the reactor's clock. They never lock out the right
  password from a source that has not failed; only past
  ``account_failure_limit`` (100) failures in a row may no source that
  failed for that user (nor an unattributable one) try it again, for
  ``lockout_time``.
- A lock that expires starts its count over. A success clears the user's,
  the pair's and the source's counts. The records are capped (the least
  recently failed go first) and expire on a timer (``expire``), in memory
  and in the state database, where lockouts survive a restart and an
  admin lists and clears them (``icp-bridge users lockouts`` / ``unlock``).
- Password checks run in threads, but at most ``concurrency`` per kind
  (the RDP server's logons, the OTS API's) at a time, with at most
  ``queue_limit`` more waiting; beyond that a check is refused with a log
  line. The two kinds do not share a queue, so guesses through the OTS API
  cannot delay the RDP server's logons.
- The log says how many failures in a row, never the password; lines an
  attacker causes per attempt are written once per kind per 10 s, then
  one line with the count.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from bridge.security.auth import AuthenticationUnavailable, Authenticator, Identity
from protocols.loglimit import LogLimiter

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


@dataclass(slots=True)  # up to failure_records_max of them
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
    # NIST SP 800-63B 5.2.2: at most 100 consecutive failures per account.
    account_failure_limit: int = 100
    # Failure records kept (memory and state database); the least recently
    # failed are forgotten first.
    records_max: int = 10_000
    concurrency: int = 2
    queue_limit: int = 32


class LogonObserver(Protocol):
    """Told of each failed logon and each lockout set (the event journal,
    metrics); ``key`` names what is locked ("user:alice", "source:ADDR",
    "pair:ADDR|alice": see describe_key)."""

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


def user_key(username: str) -> str:
    return f"user:{username}"


def source_key(source: str) -> str:
    return f"source:{source}"


def pair_key(username: str, source: str) -> str:
    # A source never holds "|" (source_identity), so the user name follows it.
    return f"pair:{source}|{username}"


def describe_key(key: str) -> str:
    """A record's key as the operator reads it."""
    kind, _, rest = key.partition(":")
    if kind == "pair":
        source, _, username = rest.partition("|")
        return f"user {username} from {source}"
    return f"{kind} {rest}"


def source_identity(source: str) -> str:
    """How a client's ``source`` is counted: "" when it cannot be told apart
    from other clients (unknown, or a loopback address every local client
    shares); ``uid:N`` as given; an IPv6 address as its /64 (one host may
    pick any address in it); an IPv4-mapped one as its IPv4 address."""
    if not source or source.startswith("uid:"):
        return source
    try:
        address = ipaddress.ip_address(source.strip("[]"))
    except ValueError:
        return source[:100].replace("|", "?")  # a name, as the RDP server gave it
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return ""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network(f"{address.exploded.split('%')[0]}/64", strict=False))
    return str(address)


class LockoutStore:
    """The lockouts table of the state database (its own connection: the
    CLI reads and clears it while the bridge runs)."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=1.0)
        # As the state store: a commit survives the process dying; only a
        # power loss may take the last ones back (a lost failure count is
        # harmless), and a failure costs no fsync under a flood of them.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def load(self) -> dict[str, FailureCount]:
        """Every record, the least recently failed first."""
        return {key: FailureCount(failures, last, until) for key, failures, last, until in
                self._db.execute("SELECT key, failures, last_failure, locked_until "
                                 "FROM lockouts ORDER BY last_failure")}

    def get(self, key: str) -> FailureCount | None:
        row = self._db.execute("SELECT failures, last_failure, locked_until FROM lockouts "
                               "WHERE key = ?", (key,)).fetchone()
        return FailureCount(*row) if row else None

    def put(self, key: str, count: FailureCount) -> None:
        self.update([(key, count)], [])

    def update(self, changed: Iterable[tuple[str, FailureCount]], removed: Iterable[str]
               ) -> None:
        """Write ``changed`` and delete ``removed`` in one transaction."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO lockouts VALUES (?, ?, ?, ?)",
                                 [(key, c.failures, c.last_failure, c.locked_until)
                                  for key, c in changed])
            self._db.executemany("DELETE FROM lockouts WHERE key = ?",
                                 [(key,) for key in removed])

    def delete(self, key: str) -> bool:
        return self._db.execute("DELETE FROM lockouts WHERE key = ?", (key,)).rowcount > 0

    def expire(self, now: float, forget_after: float) -> int:
        """Delete what a lock's end or ``forget_after`` made history."""
        return self._db.execute(
            "DELETE FROM lockouts WHERE (locked_until > 0 AND locked_until <= ?) "
            "OR (locked_until <= ? AND last_failure < ?)",
            (now, now, now - forget_after)).rowcount

    def unlock_user(self, username: str) -> int:
        """Clear a user's records: from anywhere and from each source."""
        keys = [key for (key,) in self._db.execute(
            "SELECT key FROM lockouts WHERE key = ? OR key LIKE 'pair:%'", (user_key(username),))
            if key == user_key(username) or key.partition("|")[2] == username]
        self.update([], keys)
        return len(keys)

    def unlock_source(self, source: str) -> int:
        """Clear a source's records: for any user and for each user."""
        source = source_identity(source) or source
        keys = [key for (key,) in self._db.execute(
            "SELECT key FROM lockouts WHERE key = ? OR substr(key, 1, ?) = ?",
            (source_key(source), len(source) + 6, f"pair:{source}|"))]
        self.update([], keys)
        return len(keys)

    def close(self) -> None:
        self._db.close()


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
        self.log_limit = LogLimiter(clock)
        # Least recently failed first: what the cap forgets first.
        self.counts: OrderedDict[str, FailureCount] = OrderedDict(
            store.load() if store is not None else {})
        self._lanes = {kind: DeferredSemaphore(self.policy.concurrency) for kind in (RDP, OTSAPI)}
        self._waiting = {RDP: 0, OTSAPI: 0}
        self.refused_full = 0
        self.forgotten = 0
        # For the metrics: logons by (kind, outcome: ok, failed, locked_out,
        # queue_full, unavailable).
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.observers: list[LogonObserver] = []
        # In a farm: the other hosts' counts add to ours. They delay any key,
        # but lock out only a source (of one user, or of all): never a user
        # for everyone, as a guesser spreading over hosts must not lock alice
        # out of the farm.
        self.farm: FailureBudget | None = None
        self.expire()
        self._save([], [], self._over_cap())

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

    def _over(self, count: FailureCount, now: float) -> bool:
        """Whether a record is history: its lock ended (a lock that expires
        starts the count over), or it has been quiet for forget_after."""
        if count.locked_until:
            return count.locked_until <= now
        return now - count.last_failure > self.policy.forget_after

    def _count(self, key: str) -> FailureCount:
        """The live record of ``key`` (a fresh one if none)."""
        count = self.counts.get(key)
        if count is None:
            return FailureCount()
        now = self.clock.seconds()
        if self._over(count, now):
            del self.counts[key]
            self._save([], [key])
            return FailureCount()
        if count.locked_until > now and self._cleared_by_admin(key):
            del self.counts[key]
            return FailureCount()
        return count

    def _cleared_by_admin(self, key: str) -> bool:
        """Whether ``icp-bridge users unlock`` removed the record meanwhile."""
        if self.store is None:
            return False
        try:
            return self.store.get(key) is None
        except sqlite3.Error:
            return False  # cannot tell: keep what we know

    def locked(self, key: str) -> float:
        """Seconds the key stays locked out (0: not locked)."""
        return max(0.0, self._count(key).locked_until - self.clock.seconds())

    def delay_for(self, failures: int) -> float:
        over = failures - self.policy.failures_before_delay
        if over < 0:
            return 0.0
        return min(self.policy.delay_max, 0.5 * 2 ** over)

    def _elsewhere(self, key: str, locks: bool = False) -> int:
        """The farm's failures for ``key`` beyond ours (for a lockout: not a
        user's count)."""
        if self.farm is None or (locks and key.startswith("user:")):
            return 0
        return self.farm.others(key)

    def _keep(self, key: str, count: FailureCount) -> None:
        self.counts[key] = count
        self.counts.move_to_end(key)

    def _over_cap(self) -> list[str]:
        """Forget the least recently failed records beyond records_max."""
        forgotten = []
        while len(self.counts) > self.policy.records_max:
            key, _ = self.counts.popitem(last=False)
            forgotten.append(key)
        if forgotten:
            self.forgotten += len(forgotten)
            self.log_limit.warn(self.log, "records full",
                                "failed-logon records at failure_records_max ({limit}): the "
                                "least recently failed forgotten ({count} so far)",
                                limit=self.policy.records_max, count=self.forgotten)
        return forgotten

    def _save(self, changed: list[tuple[str, FailureCount]], removed: list[str],
              forgotten: list[str] | None = None) -> None:
        """Store ``changed`` and ``removed`` (and tell the farm); records the
        cap ``forgotten`` are only deleted here (the farm forgets by age, and
        a flood must not ship a clear for each)."""
        if self.farm is not None:
            for key, count in changed:
                self.farm.counted(key, count.failures, count.last_failure)
            for key in removed:
                self.farm.counted(key, 0, 0.0)
        removed = removed + (forgotten or [])
        if self.store is None or not (changed or removed):
            return
        try:
            self.store.update(changed, removed)
        except sqlite3.Error as e:
            self.log_limit.warn(self.log, "not stored", "failed-logon counts not stored: "
                                "{error}", error=str(e))

    def expire(self) -> int:
        """Forget what is history (see _over), in memory and in the state
        database; the service calls this on a timer, so that records an
        attacker made and never touches again do not stay."""
        now = self.clock.seconds()
        over = [key for key, count in self.counts.items() if self._over(count, now)]
        for key in over:
            del self.counts[key]
        if self.store is not None:
            try:
                self.store.expire(now, self.policy.forget_after)
            except sqlite3.Error as e:
                self.log_limit.warn(self.log, "not stored", "failed-logon counts not "
                                    "expired: {error}", error=str(e))
        return len(over)

    def _limits(self, username: str, origin: str) -> list[tuple[str, int]]:
        """The records a failure of ``username`` from ``origin`` counts in,
        with the failures in a row that lock each."""
        limits = [(user_key(username), self.policy.account_failure_limit)]
        if origin:
            limits += [(pair_key(username, origin), self.policy.lockout_failures),
                       (source_key(origin), self.policy.lockout_failures)]
        return limits

    def _tell(self, what: str, *args: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, what)(*args)
            except Exception:
                self.log.failure("logon observer failed on {what}", what=what)

    def _failed(self, username: str, origin: str, kind: str) -> None:
        """The one place a failed logon is counted (and a lock is set)."""
        now = self.clock.seconds()
        changed = []
        locked: list[tuple[str, int]] = []
        for key, limit in self._limits(username, origin):
            count = self._count(key)
            count.failures += 1
            count.last_failure = now
            farm_failures = count.failures + self._elsewhere(key, locks=True)
            if farm_failures >= limit and count.locked_until <= now:
                self._lock(key, count, now)
                locked.append((key, count.failures))
            self._keep(key, count)
            changed.append((key, count))
        self._save(changed, [], self._over_cap())
        failures = changed[0][1].failures  # of the user, in a row, from anywhere
        self.log_limit.warn(self.log, "failed logon",
                            "failed logon for user {username} from {source} ({failures} in a "
                            "row)", username=username, source=origin or "unknown",
                            failures=failures)
        self._tell("logon_failed", username, origin, kind, failures)
        for key, count_failures in locked:
            self._tell("locked_out", username, origin, key, self.policy.lockout_time,
                       count_failures)

    def _lock(self, key: str, count: FailureCount, now: float) -> None:
        """The one place a lock is set (observers are told by _failed)."""
        count.locked_until = now + self.policy.lockout_time
        if key.startswith("user:"):
            what = ("{key}: {failures} failed logons in a row; for {seconds:g} s only sources "
                    "that have not failed for it may try")
        else:
            what = "{key} locked out for {seconds:g} s after {failures} failed logons"
        self.log_limit.warn(self.log, "locked", what, key=describe_key(key),
                            seconds=self.policy.lockout_time, failures=count.failures)

    def _succeeded(self, username: str, origin: str) -> None:
        removed = [key for key, _ in self._limits(username, origin)
                   if self.counts.pop(key, None) is not None]
        self._save([], removed)

    def _refusal(self, username: str, origin: str) -> tuple[str, float] | None:
        """(the record that refuses, seconds left) when an attempt may not
        even be checked."""
        if origin:
            for key in (source_key(origin), pair_key(username, origin)):
                left = self.locked(key)
                if left:
                    return key, left
        left = self.locked(user_key(username))
        if left and (not origin or self._count(pair_key(username, origin)).failures):
            return user_key(username), left  # past account_failure_limit
        return None

    # -- admin ----------------------------------------------------------------------

    def lockouts(self) -> list[tuple[str, FailureCount]]:
        now = self.clock.seconds()
        return sorted((key, count) for key, count in self.counts.items()
                      if count.locked_until > now)

    def unlock(self, key: str) -> bool:
        had = self.counts.pop(key, None) is not None
        self._save([], [key])
        return had

    # -- checking ---------------------------------------------------------------

    async def authenticate(self, username: str, password: str, domain: str, source: str,
                           kind: str, **options: Any) -> Identity | None:
        """The Identity, or None: wrong credentials, locked out, or too many
        checks waiting. ``source`` is the client's address or ``uid:N`` (""
        if unknown)."""
        origin = source_identity(source)
        refusal = self._refusal(username, origin)
        if refusal is not None:
            key, remaining = refusal
            self.outcomes[kind, "locked_out"] += 1
            self.log_limit.warn(self.log, "refused locked",
                                "logon of user {username} from {source} refused: {key} is "
                                "locked out for {seconds:.0f} s more", username=username,
                                source=origin or "unknown", key=describe_key(key),
                                seconds=remaining)
            return None
        failures = [self._count(key).failures + self._elsewhere(key)
                    for key, _ in self._limits(username, origin) if not key.startswith("source:")]
        delay = max(self.delay_for(n) for n in failures)
        if delay:
            await deferLater(self.clock, delay, lambda: None)
        if self._waiting[kind] >= self.policy.concurrency + self.policy.queue_limit:
            self.refused_full += 1
            self.outcomes[kind, "queue_full"] += 1
            self.log_limit.warn(self.log, f"full {kind}",
                                "refusing a logon: {waiting} {lane} password checks already "
                                "waiting ({count} refused so far)", waiting=self._waiting[kind],
                                lane=kind, count=self.refused_full)
            return None
        self._waiting[kind] += 1
        try:
            identity = await self._lanes[kind].run(
                self._check, username, password, domain, options)
        except AuthenticationUnavailable as e:
            # Not a guess of theirs: no failure is counted toward a lockout.
            self.outcomes[kind, "unavailable"] += 1
            self.log_limit.warn(self.log, "unavailable", "logon of user {username} refused: "
                                "{reason}", username=username, reason=str(e))
            return None
        finally:
            self._waiting[kind] -= 1
        if identity is None:
            self.outcomes[kind, "failed"] += 1
            self._failed(username, origin, kind)
        else:
            self.outcomes[kind, "ok"] += 1
            self._succeeded(username, origin)
        return identity

    def _check(self, username: str, password: str, domain: str,
               options: dict[str, Any]) -> Deferred[Identity | None]:
        return self.authenticator.authenticate(username, password, domain, **options)

"""Failed-logon throttling and bounded password checks.

Every logon (ICP LogonUser, the greeter's SBP login, OTS API
logonConnection) goes through a LogonGuard around the authenticator. The
rules follow NIST SP 800-63B 5.2.2 (limit consecutive failures per
account to at most 100, prefer delays, do not let an attacker lock the
legitimate user out).

On the OTS API side a source is one the bridge saw itself: the TCP peer's
address (an IPv6 address counts as its /64), or for a local caller its uid
(``uid:N``, which the OTS API asks of the kernel through sock_diag when it
accepts a loopback connection; ``uid:unknown``, one source shared by every
local caller whose owner the kernel could not name). Failures are counted
three ways:

- per user *and* source together (a "pair"): after ``lockout_failures`` in
  a row that source may not try that user for ``lockout_time``; so is a
  source that failed that often for any users (it guesses, or sprays);
- per user from any source: these only slow down (after
  ``failures_before_delay`` the next attempt waits 0.5 s, doubling up to
  ``delay_max``, on the reactor's clock); only past
  ``account_failure_limit`` (100) failures in a row may no source that
  failed for that user (nor an unattributable one) try it again.

On the RDP side (LogonUser, the greeter's login) the only address is the
one the RDP *client* claims about itself (ogon's RDP server passes
FreeRDP's settings->ClientAddress, read from the client's own info
packet): it is logged as the "claimed address" and never counted, so it
can neither aim a lock at someone else's address nor let a guesser escape
one by claiming fresh addresses (review finding 2). RDP failures count
per user (the same record as above) and RDP-wide:

- a user's RDP attempts are checked one at a time, each after the user's
  delay: parallel guesses wait in turn (at most USER_QUEUE_MAX waiting);
- past ``account_failure_limit`` failures in a row every RDP attempt for
  that user is refused for ``lockout_time`` (NIST's hard cap: with no
  source to tell the attacker apart, the account is what is protected);
- RDP failures for all users together are a budget of
  ``rdp_failures_per_minute``: when it is spent, RDP password checks are
  paced to that rate (slowed, never refused beyond the queue limit), so
  spraying one guess over many names is bounded too.

Common to both: a lock that expires starts its count over; a success
clears the counts it touched. The records are capped (the least recently
failed go first) and expire on a timer (``expire``), in memory and in the
state database, where lockouts survive a restart and an admin lists and
clears them (``icp-bridge users lockouts`` / ``unlock``). Password checks
run in threads, at most ``concurrency`` per kind (the RDP server's, the
OTS API's) at a time with at most ``queue_limit`` more waiting; the two
kinds do not share a queue. The log says how many failures in a row,
never the password; lines an attacker causes per attempt are written
once per kind per 10 s, then one line with the count.
"""

from __future__ import annotations

import sqlite3
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from bridge.security.auth import AuthenticationUnavailable, Authenticator, Identity
from bridge.security.lockouts import (  # the throttle's names for its callers, as before
    FailureCount,
    LockoutStore,
    claimed_address,
    describe_key,
    pair_key,
    source_identity,
    source_key,
    user_key,
)
from protocols.loglimit import LogLimiter

#: The kinds of logon that queue apart.
RDP = "rdp"
OTSAPI = "otsapi"
#: What a check that waited answers when it was not made after all (a lock
#: set meanwhile; an RDP logon the RDP server has given up on): no failure.
_NOT_CHECKED = object()
#: Seconds ogon's RDP server waits for an ICP answer (PBRPC_TIMEOUT): an RDP
#: password check still waiting for a thread after this is not made.
RDP_PATIENCE = 10.0
#: RDP attempts of one user waiting their turn (one is checked at a time);
#: more are refused at once, uncounted. A person has one or two at a time.
USER_QUEUE_MAX = 8


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
    # A burst of good logons (200 users within 2 s) fits; each waiting check is
    # a Deferred, not a thread.
    queue_limit: int = 256
    # Failed RDP logons for all users together: a minute's worth may come at
    # once, then checks are paced to this rate.
    rdp_failures_per_minute: int = 60


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
        # RDP attempts are checked one at a time per user (a lane each, while
        # any waits), and paced RDP-wide once the failure budget is spent.
        self._user_lanes: dict[str, DeferredLock] = {}
        self._user_waiting: Counter[str] = Counter()
        # The rate is read from the policy at each use: a reload replaces it.
        self.rdp_budget = RdpFailureBudget(clock, lambda: self.policy.rdp_failures_per_minute,
                                           self.log, self.log_limit)
        # For the metrics: logons by (kind, outcome: ok, failed, locked_out,
        # queue_full, unavailable).
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.observers: list[LogonObserver] = []
        # In a farm: the other hosts' counts add to ours. They delay any key,
        # but lock out only a source (of one user, or of all): never a user
        # (that takes this host's own account_failure_limit failures), as a
        # guesser spreading over hosts must not lock alice out of the farm.
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

    def _failed(self, username: str, origin: str, kind: str, shown: str) -> None:
        """The one place a failed logon is counted (and a lock is set);
        ``shown`` is where it came from as the log and events say it ("" if
        unknown)."""
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
                            "row)", username=username, source=shown or "unknown",
                            failures=failures)
        self._tell("logon_failed", username, shown, kind, failures)
        for key, count_failures in locked:
            self._tell("locked_out", username, shown, key, self.policy.lockout_time,
                       count_failures)

    def _lock(self, key: str, count: FailureCount, now: float) -> None:
        """The one place a lock is set (observers are told by _failed)."""
        count.locked_until = now + self.policy.lockout_time
        if key.startswith("user:"):
            what = ("{key}: {failures} failed logons in a row; for {seconds:g} s its RDP "
                    "logons are refused, its OTS API logons from sources that failed for it")
        else:
            what = "{key} locked out for {seconds:g} s after {failures} failed logons"
        self.log_limit.warn(self.log, "locked", what, key=describe_key(key),
                            seconds=self.policy.lockout_time, failures=count.failures)

    def _succeeded(self, username: str, origin: str) -> None:
        removed = [key for key, _ in self._limits(username, origin)
                   if self.counts.pop(key, None) is not None]
        self._save([], removed)

    def _refusal(self, username: str, origin: str, kind: str) -> tuple[str, float] | None:
        """(the record that refuses, seconds left) when an attempt may not
        even be checked."""
        if kind == RDP:
            # No source to tell a guesser apart: past account_failure_limit
            # the account itself is closed to RDP logons (NIST's hard cap).
            left = self.locked(user_key(username))
            return (user_key(username), left) if left else None
        if origin:
            for key in (source_key(origin), pair_key(username, origin)):
                left = self.locked(key)
                if left:
                    return key, left
        left = self.locked(user_key(username))
        if left and (not origin or self._count(pair_key(username, origin)).failures):
            return user_key(username), left  # past account_failure_limit
        return None

    def _refused(self, username: str, origin: str, kind: str, shown: str) -> bool:
        """Whether the attempt is refused unchecked (counted and logged)."""
        refusal = self._refusal(username, origin, kind)
        if refusal is None:
            return False
        key, remaining = refusal
        self.outcomes[kind, "locked_out"] += 1
        self.log_limit.warn(self.log, "refused locked",
                            "logon of user {username} from {source} refused: {key} is "
                            "locked out for {seconds:.0f} s more", username=username,
                            source=shown or "unknown", key=describe_key(key),
                            seconds=remaining)
        return True

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
        if unknown); for RDP the address the client claims, never counted."""
        if kind == RDP:
            return await self._authenticate_rdp(username, password, domain, source, options)
        origin = source_identity(source)
        if self._refused(username, origin, kind, origin):
            return None
        failures = [self._count(key).failures + self._elsewhere(key)
                    for key, _ in self._limits(username, origin) if not key.startswith("source:")]
        delay = max(self.delay_for(n) for n in failures)
        if delay:
            await deferLater(self.clock, delay, lambda: None)
        return await self._checked(username, password, domain, origin, kind, origin, options)

    async def _authenticate_rdp(self, username: str, password: str, domain: str,
                                claimed: str, options: dict[str, Any]) -> Identity | None:
        """An RDP logon: counted for the user alone (and RDP-wide), one
        attempt of a user at a time, each after the user's delay."""
        shown = f"claimed address {claimed_address(claimed)}" if claimed else ""
        if self._refused(username, "", RDP, shown):
            return None
        if self._user_waiting[username] >= USER_QUEUE_MAX:
            self.outcomes[RDP, "queue_full"] += 1
            self.log_limit.warn(self.log, "user queue full",
                                "refusing an RDP logon of user {username} from {source}: "
                                "{waiting} of its attempts already wait their turn",
                                username=username, source=shown or "unknown",
                                waiting=self._user_waiting[username])
            return None
        lane = self._user_lanes.setdefault(username, DeferredLock())
        self._user_waiting[username] += 1
        try:
            await lane.acquire()
            try:
                # A lock may have been set while this attempt waited its turn.
                if self._refused(username, "", RDP, shown):
                    return None
                key = user_key(username)
                delay = self.delay_for(self._count(key).failures + self._elsewhere(key))
                if delay:
                    await deferLater(self.clock, delay, lambda: None)
                return await self._checked(username, password, domain, "", RDP, shown, options)
            finally:
                lane.release()
        finally:
            self._user_waiting[username] -= 1
            if not self._user_waiting[username]:
                del self._user_waiting[username]
                del self._user_lanes[username]

    async def _checked(self, username: str, password: str, domain: str, origin: str,
                       kind: str, shown: str, options: dict[str, Any]) -> Identity | None:
        """The password check in the kind's lane, and its outcome counted."""
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
            queued_at = self.clock.seconds()
            admitted = await self._lanes[kind].run(
                lambda: Deferred.fromCoroutine(self._admitted(
                    username, password, domain, origin, kind, shown, options, queued_at)))
            if admitted is _NOT_CHECKED:
                return None
            identity = admitted
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
            self._failed(username, origin, kind, shown)
        else:
            self.outcomes[kind, "ok"] += 1
            self._succeeded(username, origin)
        return identity

    async def _admitted(self, username: str, password: str, domain: str, origin: str,
                        kind: str, shown: str, options: dict[str, Any], queued_at: float
                        ) -> Any:
        """The check, once it holds one of its lane's threads; an RDP check
        spends from the RDP-wide budget (RdpFailureBudget). Not made
        (_NOT_CHECKED, no failure counted) when, while it waited, a lock
        was set on an OTS API attempt (a burst of guesses queued before the
        first failure was counted gets no more checks than lockout_failures
        and the running checks allow), or an RDP logon waited longer than
        the RDP server waits for its answer (RDP_PATIENCE: a spray being
        paced must not leave good logons checked long after their client
        was failed)."""
        if kind == RDP:
            waited = self.clock.seconds() - queued_at
            if waited <= RDP_PATIENCE:
                return await self.rdp_budget.spend(
                    lambda: self._check(username, password, domain, options))
            self.outcomes[RDP, "expired"] += 1
            self.log_limit.warn(self.log, "rdp expired",
                                "RDP logon of user {username} not checked: it waited "
                                "{waited:.0f} s for its turn, and the RDP server waits "
                                "{patience:.0f} s", username=username, waited=waited,
                                patience=RDP_PATIENCE)
        elif not self._refused(username, origin, kind, shown):
            return await self._check(username, password, domain, options)
        # Answered on the next turn: answered at once, it would hand the
        # thread on to the next waiter inside this call, a recursion as
        # deep as the queue is long.
        await deferLater(self.clock, 0, lambda: None)
        return _NOT_CHECKED

    def _check(self, username: str, password: str, domain: str,
               options: dict[str, Any]) -> Deferred[Identity | None]:
        return self.authenticator.authenticate(username, password, domain, **options)


class RdpFailureBudget:
    """Failed RDP logons for all users together: ``per_minute()`` may come
    at once, then checks are paced to that rate (RDP clients name no source
    a guesser could be told apart by, so spraying one guess over many names
    is bounded here)."""

    def __init__(self, clock: IReactorTime, per_minute: Callable[[], int], log: Logger,
                 log_limit: LogLimiter) -> None:
        self.clock = clock
        self.per_minute = per_minute
        self.log = log
        self.log_limit = log_limit
        self._budget = float(per_minute())
        self._budget_at = clock.seconds()
        self._pace = DeferredLock()

    def level(self) -> float:
        """Failures that may come now before checks are paced (the budget
        refills at per_minute, up to a minute's worth)."""
        now = self.clock.seconds()
        per_minute = self.per_minute()
        self._budget = min(float(per_minute),
                           self._budget + (now - self._budget_at) * per_minute / 60)
        self._budget_at = now
        return self._budget

    async def spend(self, check: Callable[[], Deferred[Identity | None]]) -> Identity | None:
        """Run ``check`` (an RDP password check holding one of the lane's
        threads). It takes one failure from the budget while it runs (given
        back if it was no failure), so that the checks running together
        cannot overrun it; checks still waiting for a thread take none (a
        burst of good logons is no spray of guesses). Once it is spent,
        checks go one at a time, each when the budget has one again."""
        paced = self._pace.locked or self.level() < 1
        if paced:
            await self._pace.acquire()
        try:
            if paced:
                wait = (1 - self.level()) * 60 / self.per_minute()
                if wait > 0:
                    self.log_limit.warn(self.log, "rdp paced",
                                        "failed RDP logons past rdp_failures_per_minute "
                                        "({limit}): RDP password checks paced",
                                        limit=self.per_minute())
                    await deferLater(self.clock, wait, lambda: None)
            self.level()
            self._budget -= 1
            try:
                identity = await check()
            except BaseException:
                self._budget += 1  # no guess was checked: given back
                raise
            if identity is not None:
                self._budget += 1  # a success spends nothing
            return identity
        finally:
            if paced:
                self._pace.release()

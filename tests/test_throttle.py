"""Failed-logon throttling that cannot be aimed at others (issue 18, items 4
and 5), on a Clock. Through the OTS API (sources the bridge saw itself):
guesses are counted per user and source together, a user's failures from
anywhere only slow down, a source's may lock that source, loopback is not
one shared source. A lock that expires starts the count over, and the
records are bounded and expire on their own. The RDP side (the address is
the one the client claims) is in test_throttle_rdp."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from bridge.security.auth import InMemoryAuthenticator
from bridge.security.throttle import OTSAPI, LockoutStore, LogonGuard, ThrottlePolicy
from tests.conftest import start_bridge

#: The defaults: a delay after 3 failures in a row, 0.5 s doubling to 8 s;
#: a lockout of 900 s after 10.
POLICY = ThrottlePolicy(failures_before_delay=3, delay_max=8, lockout_failures=10,
                        lockout_time=900)


class GuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.checked: list[str] = []
        inner = InMemoryAuthenticator({"alice": ("alice-pw", 1), "bob": ("bob-pw", 1)})

        def authenticate(username: str, password: str, domain: str) -> Deferred[Any]:
            self.checked.append(username)
            return inner.authenticate(username, password, domain)

        self.authenticator = type("Auth", (), {"authenticate": staticmethod(authenticate)})()
        self.guard = LogonGuard(self.authenticator, self.clock, POLICY)

    def attempt(self, user: str, password: str, source: str) -> tuple[bool, float]:
        """(accepted, seconds it waited on the clock); an attempt refused
        without a check is (False, 0). Through the OTS API, whose sources
        are the TCP peer or the caller's uid."""
        d = Deferred.fromCoroutine(self.guard.authenticate(user, password, "", source, OTSAPI))
        waited = 0.0
        while not d.called:
            self.clock.advance(0.25)
            waited += 0.25
        return self.successResultOf(d) is not None, waited

    def test_guesses_from_many_addresses_never_lock_out_the_right_password(self) -> None:
        # The review: 10 wrong guesses for alice from 10 addresses locked her
        # out everywhere for 900 s, right password included.
        for n in range(150):
            assert self.attempt("alice", "guess", f"198.51.{n // 200}.{n % 200 + 1}")[0] is False
        accepted, waited = self.attempt("alice", "alice-pw", "203.0.113.9")
        assert accepted, "a source that has not failed gets the right password through"
        assert waited <= POLICY.delay_max, "slowed down at most delay_max"
        assert self.attempt("alice", "alice-pw", "203.0.113.10") == (True, 0.0), \
            "and the success cleared the user's count"

    def test_a_source_that_guessed_is_locked_out_not_the_user(self) -> None:
        for _ in range(10):
            self.attempt("alice", "guess", "198.51.100.7")
        checks = len(self.checked)
        assert self.attempt("alice", "alice-pw", "198.51.100.7") == (False, 0.0)
        assert self.attempt("bob", "bob-pw", "198.51.100.7") == (False, 0.0), \
            "the guessing source is locked for every user"
        assert len(self.checked) == checks, "locked out: not even checked"
        assert self.attempt("alice", "alice-pw", "203.0.113.5")[0], "alice from elsewhere: in"

    def test_the_count_starts_over_when_a_lock_expires(self) -> None:
        for _ in range(10):
            self.attempt("alice", "guess", "198.51.100.7")
        assert self.attempt("alice", "alice-pw", "198.51.100.7") == (False, 0.0)
        self.clock.advance(POLICY.lockout_time)
        # The review: the count stayed >= 10 after the lock expired
        # (forget_after 3600 > lockout_time 900), so one more wrong guess
        # locked again.
        checks = len(self.checked)
        assert self.attempt("alice", "guess", "198.51.100.7")[0] is False
        assert len(self.checked) == checks + 1, "checked: one failure after a lock is one"
        accepted, waited = self.attempt("alice", "alice-pw", "198.51.100.7")
        assert accepted and waited <= POLICY.delay_max

    def test_past_the_account_limit_only_sources_that_have_not_failed_may_try(self) -> None:
        # NIST SP 800-63B 5.2.2: at most 100 consecutive failed attempts on
        # one account; beyond, sources that guessed at it may not go on.
        for n in range(100):
            self.attempt("alice", "guess", f"198.51.100.{n + 1}")
        assert self.attempt("alice", "alice-pw", "198.51.100.5") == (False, 0.0), \
            "a source that guessed at alice: refused, even with the right password"
        assert self.attempt("alice", "guess", "") == (False, 0.0), \
            "so is a source the bridge cannot tell apart"
        assert self.attempt("bob", "bob-pw", "198.51.100.5")[0], "bob from there: in"
        assert self.attempt("alice", "alice-pw", "203.0.113.1")[0], "a clean source: in"

    def test_the_account_limit_lifts_after_lockout_time(self) -> None:
        for n in range(100):
            self.attempt("alice", "guess", f"198.51.100.{n + 1}")
        self.clock.advance(POLICY.lockout_time)
        assert self.attempt("alice", "alice-pw", "198.51.100.5") == (True, 0.0)

    def test_loopback_callers_are_not_one_shared_source(self) -> None:
        # The review: 10 junk logons with made-up names from 127.0.0.1 locked
        # every local logon for 900 s. A local OTS API caller is counted by
        # its uid (the OTS API finds it), and a loopback address the bridge
        # cannot attribute (an RDP client on the same host) is no source.
        for n in range(20):
            self.attempt(f"junk{n}", "guess", "uid:2002")
            self.attempt(f"junk{n}", "guess", "127.0.0.1")
        assert self.attempt("bob", "bob-pw", "uid:2002") == (False, 0.0), \
            "the guessing local user is locked out"
        assert self.attempt("alice", "alice-pw", "uid:0") == (True, 0.0), "root is not"
        assert self.attempt("alice", "alice-pw", "127.0.0.1") == (True, 0.0)
        assert self.attempt("alice", "alice-pw", "::1") == (True, 0.0)

    def test_an_ipv6_source_is_its_64_prefix(self) -> None:
        # One host has a whole /64 to pick addresses from.
        for n in range(10):
            self.attempt("alice", "guess", f"2001:db8:0:1::{n + 1:x}")
        assert self.attempt("bob", "bob-pw", "2001:db8:0:1:ffff::1") == (False, 0.0)
        assert self.attempt("bob", "bob-pw", "2001:db8:0:2::1")[0]
        for n in range(10):
            self.attempt("alice", "guess", f"::ffff:192.0.2.{n + 1}")
        assert self.attempt("bob", "bob-pw", "192.0.2.11")[0], "a mapped IPv4 is its IPv4"

    def test_failed_logon_lines_are_rate_limited(self) -> None:
        with capturedLogs() as events:
            for n in range(60):
                self.attempt(f"user{n}", "guess", f"198.51.100.{n + 1}")
            self.clock.advance(10)
        lines = [e for e in events if "failed logon" in e.get("log_format", "")]
        assert 1 <= len(lines) <= 3, len(lines)
        assert any(e.get("log_held") for e in lines), "the rest counted in one line"


class RecordsTests(SynchronousTestCase):
    """Item 5: 20,000 failed logons with distinct names grew the bridge
    without bound (+20.6 MB RSS, +17 MB state DB, 26,668 rows), and nothing
    ever expired them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.base = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.base, True)
        self.path = self.base / "state.sqlite3"
        self.authenticator = InMemoryAuthenticator({"alice": ("alice-pw", 1)})

    def rows(self) -> int:
        with sqlite3.connect(self.path) as db:
            return int(db.execute("SELECT COUNT(*) FROM lockouts").fetchone()[0])

    def fail(self, guard: LogonGuard, count: int) -> None:
        for n in range(count):
            d = Deferred.fromCoroutine(guard.authenticate(
                f"name{n}", "guess", "", f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", OTSAPI))
            self.successResultOf(d)

    def test_the_records_are_capped_in_memory_and_in_the_database(self) -> None:
        guard = LogonGuard(self.authenticator, self.clock, POLICY, LockoutStore(self.path))
        self.addCleanup(guard.store.close)  # type: ignore[union-attr]
        self.fail(guard, 20_000)
        assert len(guard.counts) <= 10_000
        assert self.rows() <= 10_000
        again = LogonGuard(self.authenticator, self.clock, POLICY, LockoutStore(self.path))
        self.addCleanup(again.store.close)  # type: ignore[union-attr]
        assert len(again.counts) <= 10_000, "and when loaded at startup"


@pytest_twisted.ensureDeferred
async def test_the_records_expire_without_being_asked_for(short_dir: Path) -> None:
    clock = Clock()
    bridge = await start_bridge(short_dir, clock=clock)  # its timers run on the Clock
    try:
        guard = bridge.service.guard
        for n in range(300):
            await guard.authenticate(f"name{n}", "guess", "", f"10.0.{n // 256}.{n % 256}",
                                     OTSAPI)
        database = bridge.service.store.path

        def rows() -> int:
            with sqlite3.connect(database) as db:
                return int(db.execute("SELECT COUNT(*) FROM lockouts").fetchone()[0])

        assert len(guard.counts) > 0 and rows() > 0
        clock.advance(guard.policy.forget_after + 120)
        assert len(guard.counts) == 0, "forgotten in memory"
        assert rows() == 0, "and in the state database"
    finally:
        await bridge.stop()

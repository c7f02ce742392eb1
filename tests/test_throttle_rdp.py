"""The RDP side's throttle when the client names its own address (review
finding 2). LogonUserRequest.clientAddress is what the RDP *client* says
about itself (ogon's RDP server passes FreeRDP's settings->ClientAddress,
read from the client's own info packet), so it must never create a lock
against an address nor let a guesser escape one: RDP failures count per
user (one attempt of a user checked at a time, each after the user's
delay; a hard cap of account_failure_limit in a row) and RDP-wide (a
failure budget, then pacing). The review's reproduction is re-run twice:
on a Clock against the guard, and end to end with a stand-in RDP server
sending the spoofed addresses."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from bridge.backends.modules import Module
from bridge.security.auth import AuthenticationUnavailable, Identity, InMemoryAuthenticator
from bridge.security.throttle import (
    OTSAPI,
    RDP,
    RDP_PATIENCE,
    USER_QUEUE_MAX,
    LogonGuard,
    ThrottlePolicy,
    user_key,
)
from protocols.errors import IcpRemoteError
from tests.conftest import start_bridge

POLICY = ThrottlePolicy()  # the defaults: 3, 8 s, 10, 900 s, 100, 60 per minute
#: What one password check takes on the clock (scrypt's tens of ms).
CHECK_TIME = 0.05


class RdpGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.checking: dict[str, int] = {}
        self.most_at_once: dict[str, int] = {}
        self.checks = 0
        inner = InMemoryAuthenticator({"alice": ("alice-pw", 1), "bob": ("bob-pw", 1)})

        def authenticate(username: str, password: str, domain: str) -> Deferred[Any]:
            # A check takes time on the clock, so that overlapping checks of
            # one user would show.
            self.checks += 1
            self.checking[username] = self.checking.get(username, 0) + 1
            self.most_at_once[username] = max(self.most_at_once.get(username, 0),
                                              self.checking[username])

            def done() -> Deferred[Identity | None]:
                self.checking[username] -= 1
                return inner.authenticate(username, password, domain)

            return deferLater(self.clock, CHECK_TIME, done)

        self.authenticator = type("Auth", (), {"authenticate": staticmethod(authenticate)})()
        self.guard = LogonGuard(self.authenticator, self.clock, POLICY)

    def start(self, user: str, password: str, claimed: str, kind: str = RDP
              ) -> Deferred[Identity | None]:
        return Deferred.fromCoroutine(self.guard.authenticate(user, password, "", claimed, kind))

    def settle(self, attempts: list[Deferred[Any]]) -> float:
        """Advance the clock until every attempt is answered; the seconds."""
        waited = 0.0
        while not all(d.called for d in attempts):
            self.clock.advance(0.05)
            waited += 0.05
        return waited

    def attempt(self, user: str, password: str, claimed: str, kind: str = RDP
                ) -> tuple[bool, float]:
        d = self.start(user, password, claimed, kind)
        waited = self.settle([d])
        return self.successResultOf(d) is not None, waited

    def test_a_spoofed_address_locks_no_one_out_of_their_own_address(self) -> None:
        # The review (a): 10 wrong guesses claiming alice's address locked
        # her out of it (a "pair" lock).
        for _ in range(10):
            assert self.attempt("alice", "guess", "203.0.113.7")[0] is False
        accepted, waited = self.attempt("alice", "alice-pw", "203.0.113.7")
        assert accepted, "alice from her own address: in"
        assert waited <= POLICY.delay_max + CHECK_TIME + 0.1, "slowed down at most delay_max"
        assert not [key for key in self.guard.counts if not key.startswith("user:")], \
            "no record of any address"

    def test_junk_logons_claiming_an_address_do_not_lock_it(self) -> None:
        # The review (b): 10 junk names claiming 192.168.1.20 locked that
        # "source" for every user.
        for n in range(10):
            self.attempt(f"nosuchuser{n}", "x", "192.168.1.20")
        accepted, waited = self.attempt("bob", "bob-pw", "192.168.1.20")
        assert accepted and waited <= CHECK_TIME + 0.05, "bob from there: in, not even delayed"

    def test_an_ots_api_source_lock_is_no_lock_on_an_rdp_claim(self) -> None:
        for n in range(10):
            self.attempt(f"junk{n}", "x", "198.51.100.7", OTSAPI)
        assert self.attempt("bob", "bob-pw", "198.51.100.7", OTSAPI) == (False, 0.0), \
            "the OTS API's own peer address is a source, and locked"
        assert self.attempt("bob", "bob-pw", "198.51.100.7")[0], \
            "an RDP client claiming it is not that source"

    def test_guesses_from_fresh_claimed_addresses_hit_the_per_user_cap(self) -> None:
        # The review (c): 120 guesses at bob from 120 claimed addresses, in
        # batches of 30 at once, all went through the password check; then
        # the right password from a 121st address gave a desktop. Here in
        # batches as large as a user's queue takes (see the next test).
        checks = self.checks
        address = iter(f"198.51.{n // 250}.{n % 250 + 1}" for n in range(200))
        answered: list[Identity | None] = []
        took = 0.0
        for _batch in range(120 // USER_QUEUE_MAX):
            batch = [self.start("bob", f"guess{n}", next(address)) for n in range(USER_QUEUE_MAX)]
            took += self.settle(batch)
            answered += [self.successResultOf(d) for d in batch]
        assert not any(answered)
        assert self.most_at_once["bob"] == 1, "bob's attempts were checked one at a time"
        assert self.checks - checks == POLICY.account_failure_limit, \
            "the password was checked 100 times, no more"
        assert self.guard.locked(user_key("bob")) > 0
        accepted, waited = self.attempt("bob", "bob-pw", next(address))
        assert (accepted, waited) == (False, 0.0), "refused unchecked from any claimed address"
        assert self.attempt("alice", "alice-pw", next(address))[0], "alice is not bob"
        # 100 guesses that waited in turn: 3 undelayed, then 0.5, 1, 2, 4 and
        # 8 s for each of the rest.
        assert took >= 0.5 + 1 + 2 + 4 + 8 * (POLICY.account_failure_limit - 8), took
        self.clock.advance(POLICY.lockout_time)
        assert self.attempt("bob", "bob-pw", next(address))[0], "the cap lifts after lockout_time"

    def test_parallel_guesses_wait_in_turn_and_a_full_queue_is_refused(self) -> None:
        for _ in range(3):
            self.attempt("alice", "guess", "203.0.113.1")
        checks = self.checks
        batch = [self.start("alice", "guess", f"198.51.100.{n + 1}") for n in range(30)]
        refused = [d for d in batch if d.called]
        assert len(refused) == 30 - USER_QUEUE_MAX, "beyond the queue: refused at once"
        assert self.checks == checks, "and not checked"
        took = self.settle(batch)
        assert self.checks - checks == USER_QUEUE_MAX
        assert took >= 0.5 + 1 + 2 + 4 + 8 * (USER_QUEUE_MAX - 4), "each waited its delay in turn"
        assert self.guard.counts[user_key("alice")].failures == 3 + USER_QUEUE_MAX, \
            "refused ones are not counted"

    def test_spraying_many_names_is_paced_rdp_wide(self) -> None:
        per_minute = POLICY.rdp_failures_per_minute
        for n in range(per_minute):
            assert self.attempt(f"name{n}", "guess", "198.51.100.1")[1] <= CHECK_TIME + 0.05
        # The budget is spent: the next failures come at its rate, and those
        # left waiting past the RDP server's patience are not checked at all.
        checks = self.checks
        with capturedLogs() as events:
            batch = [self.start(f"more{n}", "guess", "198.51.100.1") for n in range(30)]
            took = self.settle(batch)
        made = self.checks - checks
        # (What the clock took for the first ones refilled a few.)
        assert made >= 5 and made <= took * per_minute / 60 + 3, (made, took)
        assert made + self.guard.outcomes[RDP, "expired"] == 30
        assert all(d.result is None for d in batch)
        assert any("paced" in e.get("log_format", "") for e in events)
        # A success spends nothing, and the budget refills.
        self.clock.advance(60)
        accepted, waited = self.attempt("alice", "alice-pw", "203.0.113.9")
        assert accepted and waited <= CHECK_TIME + 0.05

    def test_a_burst_of_good_logons_is_neither_paced_nor_refused(self) -> None:
        # A logon storm: more users at once, each with the right password,
        # than a minute's failure budget. Checks waiting for a thread are no
        # guesses yet: they must not spend the budget and slow everyone down.
        policy = ThrottlePolicy(queue_limit=200)
        count = policy.concurrency + policy.queue_limit
        assert count > policy.rdp_failures_per_minute
        inner = InMemoryAuthenticator({f"user{n}": ("pw", 1) for n in range(count)})
        checked = type("Auth", (), {"authenticate": staticmethod(
            lambda u, p, d: deferLater(self.clock, CHECK_TIME,
                                       lambda: inner.authenticate(u, p, d)))})()
        self.guard = LogonGuard(checked, self.clock, policy)
        with capturedLogs() as events:
            batch = [self.start(f"user{n}", "pw", "198.51.100.1") for n in range(count)]
            took = self.settle(batch)
        assert all(d.result is not None for d in batch), "every one logged on"
        # Two at a time, CHECK_TIME each, and no wait beyond that.
        assert took <= count / policy.concurrency * CHECK_TIME + 0.1, took
        assert not any("paced" in e.get("log_format", "") for e in events)
        assert self.guard.rdp_budget.level() == policy.rdp_failures_per_minute
        # A reload replaces the policy: the budget follows its rate.
        self.guard.policy = dataclasses.replace(policy, rdp_failures_per_minute=5)
        assert self.guard.rdp_budget.level() == 5

    def test_a_check_waiting_past_the_rdp_servers_patience_is_not_made(self) -> None:
        per_minute = POLICY.rdp_failures_per_minute
        for n in range(per_minute):
            self.attempt(f"name{n}", "guess", "198.51.100.1")
        # The budget is spent: the next guesses go one per second, and a good
        # logon queued behind 20 of them would be answered after the RDP
        # server stopped waiting (RDP_PATIENCE).
        spray = [self.start(f"more{n}", "guess", "198.51.100.1") for n in range(20)]
        good = self.start("alice", "alice-pw", "203.0.113.9")
        with capturedLogs() as events:
            self.settle([*spray, good])
        assert good.result is None and self.guard.outcomes[RDP, "expired"] >= 1
        assert user_key("alice") not in self.guard.counts, "not counted as a failure"
        assert any("not checked" in e.get("log_format", "") for e in events)
        assert RDP_PATIENCE == 10.0, "ogon's PBRPC_TIMEOUT"

    def test_a_check_that_could_not_run_spends_no_rdp_budget(self) -> None:
        def unavailable(username: str, password: str, domain: str) -> Deferred[Any]:
            return fail(AuthenticationUnavailable("users file unreadable"))

        self.guard.authenticator = type("Auth", (), {"authenticate": staticmethod(unavailable)})()
        for n in range(2 * POLICY.rdp_failures_per_minute):
            assert self.attempt(f"name{n}", "guess", "198.51.100.1") == (False, 0.0)
        assert self.guard.outcomes[RDP, "unavailable"] == 2 * POLICY.rdp_failures_per_minute
        assert self.guard.rdp_budget.level() == POLICY.rdp_failures_per_minute, "all given back"

    def test_the_log_names_the_claimed_address_as_a_claim(self) -> None:
        with capturedLogs() as events:
            self.attempt("alice", "guess", "192.0.2.9\n[bridge.endpoints] forged")
            self.clock.advance(11)  # past the failed-logon line's rate limit
            self.attempt("alice", "guess", "::ffff:192.0.2.9")
        text = [e["log_format"].format(**e) for e in events if "failed logon" in e["log_format"]]
        assert "from claimed address 192.0.2.9\\n[bridge.endpoints] forged (1 in a row)" in \
            text[0], text
        assert "from claimed address 192.0.2.9 (2 in a row)" in text[1], text


# -- end to end: a stand-in RDP server sending spoofed addresses -----------------------


@pytest_twisted.ensureDeferred
async def test_spoofed_client_addresses_end_to_end(short_dir: Path) -> None:
    # As the review's rdp_source_spoof.py: a greeter that cannot start,
    # so a refused logon answers FAILED (no greeter per guess). Short delays
    # and no RDP-wide pacing keep it fast; the rules are the defaults'.
    greeter = Module(name="greeter", command=(str(short_dir / "no-greeter"),),
                     endpoint="ogon_{session_id}_Qt",
                     ready_timeout=5)
    bridge = await start_bridge(short_dir, users={"alice": ("alice-pw", 1), "bob": ("bob-pw", 1)},
                                logon_delay_max=0.001, rdp_failures_per_minute=100_000,
                                modules={**_modules(short_dir), "greeter": greeter})
    try:
        peer = await bridge.peer()
        connection = iter(range(1, 1000))

        async def outcome(user: str, password: str, address: str) -> str:
            try:
                answer = await peer.logon(next(connection), user, password, address=address)
            except IcpRemoteError:
                return "FAILED"
            return "desktop" if answer.serviceEndpoint.endswith("_xsession") else "greeter"

        for _ in range(10):
            assert await outcome("alice", "wrong", "203.0.113.7") == "FAILED"
        assert await outcome("alice", "alice-pw", "203.0.113.7") == "desktop", \
            "(a) alice from her own address after 10 spoofed guesses"
        for n in range(10):
            await outcome(f"nosuchuser{n}", "x", "192.168.1.20")
        assert await outcome("bob", "bob-pw", "192.168.1.20") == "desktop", \
            "(b) bob from 192.168.1.20 after 10 junk logons claiming it"
        guesses = [outcome("bob", f"guess{n}", f"198.51.{n // 250}.{n % 250 + 1}")
                   for n in range(120)]
        for guess in guesses:
            assert await guess == "FAILED"
        assert await outcome("bob", "bob-pw", "198.51.100.250") == "FAILED", \
            "(c) past 100 guesses from 120 claimed addresses, bob is refused from a 121st"
        outcomes = bridge.service.guard.outcomes
        assert outcomes[RDP, "failed"] == 10 + 10 + 100
        assert outcomes[RDP, "locked_out"] >= 1
        assert not [key for key in bridge.service.guard.counts if not key.startswith("user:")]
    finally:
        await bridge.stop()


def _modules(base: Path) -> dict[str, Module]:
    from tests.conftest import make_config

    return dict(make_config(base).modules)

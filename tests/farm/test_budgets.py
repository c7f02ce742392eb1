"""Farm-wide failed-logon budgets: guesses spread over hosts count
together; a source that guessed is locked out farm-wide, a user never is
(their failures elsewhere only delay). Sources are OTS API clients' (the
bridge saw them); an RDP client's address is its own claim and counts
nowhere, so RDP failures ship user counts only."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from bridge.security.throttle import OTSAPI, RDP
from tests.farm.pg import FarmDatabase
from tests.farm.test_haproxy import until
from tests.farm.test_shipping import farm_bridge

GUESSER = "198.51.100.7"


@pytest_twisted.ensureDeferred
async def test_guesses_over_two_hosts_count_together_and_lock_only_the_source(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    limits = {"lockout_failures": 4, "logon_failures_before_delay": 100}
    a = await farm_bridge(short_dir / "a", farm_db, "host-a", **limits)
    b = await farm_bridge(short_dir / "b", farm_db, "host-b", **limits)
    try:
        for _ in range(2):
            assert await a.service.guard.authenticate("alice", "guess", "", GUESSER, OTSAPI) is None

        async def counted_at_b() -> bool:
            assert b.service.farm is not None
            return b.service.farm.budget.others(f"source:{GUESSER}") == 2
        await until(counted_at_b, "host-a's counts in host-b's budget")
        assert b.service.farm.budget.others("user:alice") == 2
        for _ in range(2):
            assert await b.service.guard.authenticate("alice", "guess", "", GUESSER, OTSAPI) is None
        assert b.service.guard.locked(f"source:{GUESSER}") > 0, \
            "two guesses here and two on host-a: the source is locked out"
        assert b.service.guard.locked("user:alice") == 0, "alice is not locked out for all"
        identity = await b.service.guard.authenticate("alice", "alice-pw", "", "203.0.113.5",
                                                      OTSAPI)
        assert identity is not None and identity.username == "alice"
        assert await b.service.guard.authenticate("alice", "alice-pw", "", GUESSER,
                                                  OTSAPI) is None, "the guesser's source is not"
        # An RDP guess claiming that address ships bob's count, no source's.
        assert await a.service.guard.authenticate("bob", "guess", "", "192.0.2.99", RDP) is None

        async def bob_counted_at_b() -> bool:
            assert b.service.farm is not None
            return b.service.farm.budget.others("user:bob") == 1
        await until(bob_counted_at_b, "host-a's RDP count for bob in host-b's budget")
        assert b.service.farm.budget.others("source:192.0.2.99") == 0
    finally:
        await a.stop()
        await b.stop()

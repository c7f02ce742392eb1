"""Shipping a host's journal and sessions to the farm: in order, exactly
once, across PostgreSQL going away and coming back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from tests.conftest import BridgeUnderTest, start_bridge
from tests.farm.pg import FarmDatabase


def farm_overrides(db: FarmDatabase, host: str, **extra: Any) -> dict[str, Any]:
    return {"farm_database": db.conninfo, "farm_password_file": db.password_file,
            "host_name": host, "farm_heartbeat": 0.2, "farm_stale_after": 1.5, **extra}


async def farm_bridge(base: Path, db: FarmDatabase, host: str, **extra: Any
                      ) -> BridgeUnderTest:
    base.mkdir(exist_ok=True)
    return await start_bridge(base, **farm_overrides(db, host, **extra))


def local_journal(bridge: BridgeUnderTest) -> list[tuple[Any, ...]]:
    return [(e.id, e.session_id, e.event) for e in bridge.service.store.events_after(0, 100_000)]


async def farm_journal(db: FarmDatabase, host: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in await db.query(
        "SELECT local_id, session_id, event FROM farm_events WHERE host = %s ORDER BY id",
        (host,))]


@pytest_twisted.ensureDeferred
async def test_a_hosts_journal_and_sessions_reach_the_farm(short_dir: Path,
                                                           farm_db: FarmDatabase) -> None:
    bridge = await farm_bridge(short_dir / "a", farm_db, "host-a")
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        expected = local_journal(bridge)
        await farm_db.until("SELECT count(*) FROM farm_events WHERE host = 'host-a'", (),
                            lambda rows: rows[0][0] >= len(expected))
        assert await farm_journal(farm_db, "host-a") == expected
        sessions = await farm_db.query(
            "SELECT session_id, username, state FROM farm_sessions WHERE host = 'host-a' "
            "ORDER BY session_id")
        assert [tuple(r) for r in sessions] == [
            (s.session_id, s.username, int(s.state)) for s in bridge.service.registry]
    finally:
        await bridge.stop()

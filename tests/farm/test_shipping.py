"""Shipping a host's journal and sessions to the farm: in order, exactly
once, across PostgreSQL going away and coming back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BridgeUnderTest, start_bridge
from tests.e2e.sse import get
from tests.farm.pg import FarmDatabase


def farm_overrides(db: FarmDatabase, host: str, **extra: Any) -> dict[str, Any]:
    return {"farm_database": db.conninfo, "farm_password_file": db.password_file,
            "farm_command_key_file": db.command_key_file, "host_name": host,
            "farm_heartbeat": 0.2, "farm_stale_after": 1.5, **extra}


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
        code, body, _ = await get(bridge.admin_port, "/metrics")
        assert code == 200
        metrics = {sample.name: sample.value
                   for family in text_string_to_metric_families(body.decode())
                   for sample in family.samples}
        assert metrics["icp_bridge_farm_connected"] == 1
        assert metrics["icp_bridge_farm_events_shipped_total"] >= len(expected)
        assert metrics["icp_bridge_farm_backlog_events"] == 0
    finally:
        await bridge.stop()


def churn(bridge: BridgeUnderTest, lives: int, first_connection: int) -> None:
    """Session lives straight through the registry (5 journal events each)."""
    from bridge.sessions.model import ClientInfo

    registry = bridge.service.registry
    for n in range(lives):
        session = registry.create(first_connection + n, ClientInfo(), "carol", "", 1)
        registry.connected(session)
        registry.log_on(session, "carol", "", 1)
        registry.disconnect(session)
        registry.end(session)


async def farm_matches(db: FarmDatabase, bridge: BridgeUnderTest, host: str) -> None:
    """The farm holds exactly the host's journal (each event once, in
    order) and exactly its sessions."""
    expected = local_journal(bridge)
    await db.until("SELECT count(*), max(local_id) FROM farm_events WHERE host = %s", (host,),
                   lambda rows: rows[0][0] >= len(expected) and rows[0][1] == expected[-1][0],
                   what=f"{host}'s journal in the farm")
    assert await farm_journal(db, host) == expected
    (distinct,) = await db.query("SELECT count(DISTINCT local_id) = count(*) FROM farm_events "
                                 "WHERE host = %s", (host,))
    assert distinct[0], "no event twice"
    sessions = await db.query("SELECT session_id, username, state FROM farm_sessions "
                              "WHERE host = %s ORDER BY session_id", (host,))
    assert [tuple(r) for r in sessions] == [
        (s.session_id, s.username, int(s.state)) for s in bridge.service.registry]


@pytest_twisted.ensureDeferred
async def test_postgresql_stopped_under_logon_load_loses_and_doubles_nothing(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    from twisted.internet.defer import Deferred, gatherResults

    a = await farm_bridge(short_dir / "a", farm_db, "host-a")
    b = await farm_bridge(short_dir / "b", farm_db, "host-b")
    try:
        peers = {a: await a.peer(), b: await b.peer()}
        for bridge, peer in peers.items():
            await peer.logon(1, "alice" if bridge is a else "bob",
                             "alice-pw" if bridge is a else "bob-pw")
        await farm_matches(farm_db, a, "host-a")
        # Logons in flight while PostgreSQL goes away; more while it is away.
        in_flight = [Deferred.fromCoroutine(peer.logon(10 + n, "guest", "guest-pw"))
                     for peer in peers.values() for n in range(4)]
        await farm_db.cluster.stop_async()
        acknowledged = await gatherResults(in_flight)
        assert all(answer.serviceEndpoint for answer in acknowledged)
        more = [Deferred.fromCoroutine(peer.logon(20 + n, "guest", "guest-pw"))
                for peer in peers.values() for n in range(4)]
        churn(a, 50, 1000)
        churn(b, 50, 1000)
        await gatherResults(more)
        await peers[a].client_disconnected(1)
        assert a.service.farm.shipper.backlog > 0, "the farm is away: events wait"
        await farm_db.cluster.start_async()
        for bridge, host in ((a, "host-a"), (b, "host-b")):
            await farm_matches(farm_db, bridge, host)
    finally:
        await a.stop()
        await b.stop()

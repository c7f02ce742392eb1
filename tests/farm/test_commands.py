"""Commands across hosts: a row and a NOTIFY to the owning host, which runs
it as its own OTS API would; pending ones run when a host comes back;
nothing runs twice."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from tests.farm.pg import FarmDatabase
from tests.farm.test_shipping import farm_bridge


@pytest_twisted.ensureDeferred
async def test_a_logoff_from_another_host_reaches_the_rdp_server(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    a = await farm_bridge(short_dir / "a", farm_db, "host-a")
    c = await farm_bridge(short_dir / "c", farm_db, "host-c")
    try:
        peer = await a.peer()
        await peer.logon(1, "alice", "alice-pw")
        session_id = a.service.registry.by_connection(1).session_id
        await farm_db.until("SELECT count(*) FROM farm_sessions WHERE host = 'host-a'", (),
                            lambda rows: rows[0][0] == 1)
        assert c.service.farm is not None
        [command] = await c.service.farm.waiter.run(
            [("host-a", session_id)], "logoff", {"wait": True}, "alice on host-c", 10, 60)
        assert (command.state, command.result) == ("done", {"ok": True})
        assert [name for name, _ in peer.requests_seen][-1] == "LogoffUserSessionRequest"
        assert a.service.registry.get(session_id) is None
        [again] = await c.service.farm.waiter.run(
            [("host-a", session_id)], "logoff", {}, "alice on host-c", 10, 60)
        assert again.result == {"ok": False, "error": "no such session"}
    finally:
        await a.stop()
        await c.stop()


@pytest_twisted.ensureDeferred
async def test_a_host_that_was_down_runs_its_pending_commands_once(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    a = await farm_bridge(short_dir / "a", farm_db, "host-a")
    c = await farm_bridge(short_dir / "c", farm_db, "host-c")
    try:
        peer = await a.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        alice = a.service.registry.by_connection(1).session_id
        bob = a.service.registry.by_connection(2).session_id
        await farm_db.until("SELECT count(*) FROM farm_sessions WHERE host = 'host-a'", (),
                            lambda rows: rows[0][0] == 2)
        await a.stop(kill_backends=False)
        assert c.service.farm is not None
        waiter = c.service.farm.waiter
        [pending] = await waiter.run([("host-a", alice)], "logoff", {}, "admin", 0.3, 60)
        assert pending.state == "pending", "host-a is down: it waits for it"
        [expired] = await waiter.run([("host-a", bob)], "logoff", {}, "admin", 0.2, 0.2)
        await farm_db.until("SELECT count(*) FROM farm_commands WHERE expires_at < now()", (),
                            lambda rows: rows[0][0] == 1)

        a = await farm_bridge(short_dir / "a", farm_db, "host-a")
        assert a.service.farm is not None
        rows = await farm_db.until("SELECT state, result FROM farm_commands ORDER BY id", (),
                                   lambda rows: rows[0][0] == "done")
        assert rows == [("done", {"ok": True}), ("pending", None)], \
            "the pending one ran; the expired one did not"
        assert a.service.registry.get(alice) is None
        assert a.service.registry.get(bob) is not None
        ran = a.service.farm.runner.ran
        assert ran == 1
        # Told again (a repeated notification, a reconnect): not run again.
        await farm_db.query("UPDATE farm_commands SET state = 'pending' WHERE id = %s",
                            (pending.id,))
        await a.service.farm.runner._fetch()
        assert a.service.farm.runner.ran == ran
        assert expired.state == "expired", "the caller is told it expired"
    finally:
        await a.stop()
        await c.stop()


@pytest_twisted.ensureDeferred
async def test_farm_single_session_logs_off_the_session_on_the_other_host(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    """session.farm.singleSession: alice logs on at B while holding a session
    at A: A's session is logged off (not B's logon refused); bob, for whom
    it is off, keeps both."""
    properties = {"session.timeout": 30, "session.farm.singleSession": True}
    users = {"bob": {"session.farm.singleSession": False}}
    a = await farm_bridge(short_dir / "a", farm_db, "host-a", properties=properties,
                          user_properties=users)
    b = await farm_bridge(short_dir / "b", farm_db, "host-b", properties=properties,
                          user_properties=users)
    try:
        peer_a, peer_b = await a.peer(), await b.peer()
        await peer_a.logon(1, "alice", "alice-pw")
        await peer_a.logon(2, "bob", "bob-pw")
        await farm_db.until("SELECT count(*) FROM farm_sessions WHERE host = 'host-a'", (),
                            lambda rows: rows[0][0] == 2)
        answer = await peer_b.logon(1, "alice", "alice-pw")
        assert answer.serviceEndpoint, "the logon at B goes on"
        assert a.service.registry.sessions_of("alice", "") == [], "A's session was ended"
        assert [name for name, _ in peer_a.requests_seen][-1] == "LogoffUserSessionRequest"
        await peer_b.logon(2, "bob", "bob-pw")
        assert len(a.service.registry.sessions_of("bob", "")) == 1, "off for bob"
    finally:
        await a.stop()
        await b.stop()

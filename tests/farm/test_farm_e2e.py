"""The farm end to end: three bridges and one PostgreSQL. Logons on A and B
appear in C's farm view and farm event stream, in order; ``ctl farm
logoff`` from C reaches A's RDP server as LogoffUserSession; PostgreSQL
stopped under logon load loses and doubles nothing, and C's stream resumes
without a gap; a host killed with ``kill -9`` shows stale, then comes back
and catches up."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.utils import getProcessOutputAndValue

from bridge.rdp.standin import StandInRdpServer
from bridge.security.auth import Identity
from bridge.security.permissions import FULL, USER
from tests.conftest import BridgeUnderTest
from tests.e2e.sse import SseReader, get, open_events
from tests.e2e.test_twistd import RUNNING, free_port, start_twistd, write_config
from tests.e2e.test_twistd import _kill_leftover_twistd as _kill_leftover_twistd
from tests.farm.pg import FarmDatabase
from tests.farm.test_haproxy import until
from tests.farm.test_shipping import churn, farm_bridge, farm_matches, local_journal

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def full_token(bridge: BridgeUnderTest) -> str:
    return bridge.service.tokens.issue(Identity("admin", "", FULL))


async def ctl(*argv: str, token: str) -> tuple[int, str]:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "bridge.cli", "ctl", *argv],
        env={**ENV, "ICP_BRIDGE_TOKEN": token}, path=str(ROOT))
    return code, out.decode() + err.decode()


def host_events(reader: SseReader, host: str) -> list[tuple[int, int, str]]:
    return [(e.data["local_id"], e.data["session_id"], e.data["event"])
            for e in reader.sessions if e.data["host"] == host]


def stream_is_farm_ordered(reader: SseReader) -> None:
    ids = reader.ids
    assert ids == sorted(set(ids)), "farm ids only grow, none twice"


@pytest_twisted.ensureDeferred
async def test_logons_on_a_and_b_in_cs_farm_view_and_stream_and_logoff_from_c(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    a = await farm_bridge(short_dir / "a", farm_db, "host-a")
    b = await farm_bridge(short_dir / "b", farm_db, "host-b")
    c = await farm_bridge(short_dir / "c", farm_db, "host-c")
    try:
        token = full_token(c)
        stream = await open_events(c.admin_port, token, "?scope=farm&after=0")
        peer_a, peer_b = await a.peer(), await b.peer()
        await peer_a.logon(1, "alice", "alice-pw")
        await peer_b.logon(1, "bob", "bob-pw")
        await peer_a.logon(2, "guest", "guest-pw")
        expected = {"host-a": local_journal(a), "host-b": local_journal(b)}
        await stream.wait_for(lambda events: all(
            host_events(stream, host) == journal for host, journal in expected.items()))
        stream_is_farm_ordered(stream)
        logged_on = [(e.data["host"], e.data["username"]) for e in stream.sessions
                     if e.data["event"] == "logged-on"]
        assert logged_on == [("host-a", "alice"), ("host-b", "bob"), ("host-a", "guest")]

        code, body, _ = await get(c.admin_port, "/sessions?scope=farm", token)
        view = json.loads(body)
        assert code == 200
        assert {(h["host"], h["stale"], h["sessions"]) for h in view["hosts"]} == {
            ("host-a", False, 2), ("host-b", False, 1), ("host-c", False, 0)}
        assert [(s["host"], s["username"], s["state"]) for s in view["sessions"]] == [
            ("host-a", "alice", 0), ("host-a", "guest", 0), ("host-b", "bob", 0)]

        # bob's session token (USER) on C: his own events and client only.
        bobs = c.service.tokens.issue(Identity("bob", "", USER))
        code, body, _ = await get(c.admin_port, "/sessions?scope=farm", bobs)
        assert code == 200
        assert [(s["username"], s["client_address"]) for s in json.loads(body)["sessions"]] \
            == [("alice", None), ("guest", None),
                ("bob", view["sessions"][2]["client_address"])]
        code, body, _ = await get(c.admin_port, "/events?scope=farm&after=0&once=1", bobs)
        seen = [json.loads(line[6:]) for line in body.decode().splitlines()
                if line.startswith("data: ")]
        assert code == 200 and seen
        assert [(e["host"], e["local_id"]) for e in seen] == [
            (e.data["host"], e.data["local_id"]) for e in stream.sessions
            if e.data["username"] == "bob"]

        alice = a.service.registry.sessions_of("alice", "")[0].session_id
        guest = a.service.registry.sessions_of("guest", "")[0].session_id
        admin = f"http://127.0.0.1:{c.admin_port}"
        code, out = await ctl("farm", "--admin", admin, "message", "host-a", str(guest),
                              "--title", "Maintenance", "--text", "at noon", token=token)
        assert (code, out.strip()) == (0, f"host-a session {guest}: message ok (answer 1)"), out
        [request] = [r for kind, r in peer_a.requests_seen if kind == "MessageRequest"]
        assert (request.parameter1, request.parameter2) == ("Maintenance", "at noon")
        code, out = await ctl("farm", "--admin", admin, "logoff", "host-a", str(alice),
                              token=token)
        assert (code, out.strip()) == (0, f"host-a session {alice}: logoff ok"), out
        assert [name for name, _ in peer_a.requests_seen][-1] == "LogoffUserSessionRequest"
        assert a.service.registry.get(alice) is None
        code, out = await ctl("farm", "--admin", admin, "disconnect", "--user", "bob",
                              token=token)
        assert code == 0 and "host-b session 1: disconnect ok" in out, out
        code, out = await ctl("farm", "--admin", admin, "sessions", token=token)
        assert code == 0 and "host-a  live  1 sessions" in out, out
        await stream.wait_for(lambda events: any(
            e.data["host"] == "host-b" and e.data["event"] == "disconnected" for e in events))
        code, out = await ctl("events", "--admin", admin, "--farm", "--after", "0",
                              token=token)
        lines = out.strip().splitlines()
        assert code == 0 and len(lines) >= len(stream.sessions), out
        # Each host's events in its own order (which host shipped first varies).
        for host in ("host-a", "host-b"):
            local_ids = [int(line.split(f" {host}#")[1].split()[0]) for line in lines
                         if f" {host}#" in line]
            assert local_ids[0] == 1 and local_ids == sorted(local_ids), (host, out)
        # Without a FULL token: no command.
        user_token = c.service.tokens.issue(Identity("bob", "", 0x049))
        code, out = await ctl("farm", "--admin", admin, "logoff", "host-a", "2",
                              token=user_token)
        assert code != 0 and "401" in out
        stream.drop()
    finally:
        for bridge in (a, b, c):
            await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_postgresql_stopped_under_logon_load_and_cs_stream_resumes(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    a = await farm_bridge(short_dir / "a", farm_db, "host-a")
    b = await farm_bridge(short_dir / "b", farm_db, "host-b")
    c = await farm_bridge(short_dir / "c", farm_db, "host-c")
    try:
        token = full_token(c)
        stream = await open_events(c.admin_port, token, "?scope=farm&after=0")
        peers = [await a.peer(), await b.peer()]
        await peers[0].logon(1, "alice", "alice-pw")
        await peers[1].logon(1, "bob", "bob-pw")
        in_flight = [Deferred.fromCoroutine(peer.logon(10 + n, "guest", "guest-pw"))
                     for peer in peers for n in range(3)]
        await farm_db.cluster.stop_async()
        await gatherResults(in_flight)
        more = [Deferred.fromCoroutine(peer.logon(20 + n, "guest", "guest-pw"))
                for peer in peers for n in range(3)]
        churn(a, 40, 1000)
        churn(b, 40, 1000)
        await gatherResults(more)
        await peers[0].client_disconnected(1)
        await farm_db.cluster.start_async()
        for bridge, host in ((a, "host-a"), (b, "host-b")):
            await farm_matches(farm_db, bridge, host)
        expected = {"host-a": local_journal(a), "host-b": local_journal(b)}
        await stream.wait_for(lambda events: all(
            host_events(stream, host) == journal for host, journal in expected.items()))
        stream_is_farm_ordered(stream)
        stream.drop()
    finally:
        for bridge in (a, b, c):
            await bridge.stop()


def farm_config(base: Path, db: FarmDatabase, host: str) -> Path:
    config = write_config(base, free_port())
    config.write_text(f"""farm_database = "{db.conninfo}"
farm_password_file = "{db.password_file}"
farm_command_key_file = "{db.command_key_file}"
host_name = "{host}"
farm_heartbeat = 0.2
farm_stale_after = 1.5
""" + config.read_text())
    return config


def sqlite_journal(base: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{base}/state/state.sqlite3?mode=ro", uri=True)
    try:
        return [tuple(r) for r in db.execute("SELECT id, session_id, event FROM events "
                                             "ORDER BY id")]
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_a_host_killed_shows_stale_then_comes_back_and_catches_up(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    c = await farm_bridge(short_dir / "c", farm_db, "host-c")
    base = short_dir / "a"
    base.mkdir()
    config = farm_config(base, farm_db, "host-a")
    (base / "users").write_text("")
    _, transport = await start_twistd(base, config)
    token = full_token(c)
    peer = StandInRdpServer(reactor, pipe_dir=base / "pipes")
    try:
        await peer.connect(f"unix:{base}/icp.sock")
        await peer.logon(1, "", "")  # a greeter session
        await peer.logon(2, "", "")

        async def view() -> dict[str, Any]:
            code, body, _ = await get(c.admin_port, "/sessions?scope=farm", token)
            assert code == 200, body
            return json.loads(body)

        def host_a(v: dict[str, Any]) -> dict[str, Any]:
            return next(h for h in v["hosts"] if h["host"] == "host-a")

        async def until_view(done: Any, what: str) -> dict[str, Any]:
            async def check() -> Any:
                v = await view()
                return v if any(h["host"] == "host-a" for h in v["hosts"]) and done(v) \
                    else None
            return await until(check, what)

        await until_view(lambda v: host_a(v)["sessions"] == 2 and not host_a(v)["stale"],
                         "host-a live with its two sessions")
        transport.signalProcess(signal.SIGKILL)
        RUNNING.remove(transport)
        peer.close()
        v = await until_view(lambda v: host_a(v)["stale"], "host-a marked stale")
        assert host_a(v)["sessions"] == 2, "its sessions stay in the view, under a stale host"
        # It comes back: live again, and the farm has its whole journal,
        # with what the restart itself wrote (its greeters ended).
        _, transport = await start_twistd(base, config)

        async def caught_up() -> bool:
            journal = sqlite_journal(base)
            rows = await farm_db.query("SELECT local_id, session_id, event FROM farm_events "
                                       "WHERE host = 'host-a' ORDER BY id")
            return bool(journal) and [tuple(r) for r in rows] == journal \
                and any(e == "ended" for _, _, e in journal)
        await until(caught_up, "host-a's journal caught up in the farm")
        v = await until_view(lambda v: not host_a(v)["stale"] and host_a(v)["sessions"] == 0,
                             "host-a live again, its greeter sessions ended")
    finally:
        peer.close()
        await c.stop()

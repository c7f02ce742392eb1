"""What a farm member (anyone holding the shared PostgreSQL role) can no
longer do: put text of its choosing into HAProxy's runtime API or map
file through a host name, or have a host run a command it wrote itself.
The "attacker" here is plain SQL with the farm's role, as in the red
team's reproduction (review finding 3)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher

from bridge.farm.commands import NO_KEY
from bridge.farm.haproxy import RuntimeApi, UnsafeLineError
from tests.conftest import BridgeUnderTest
from tests.farm.pg import FarmDatabase
from tests.farm.test_haproxy import (  # noqa: F401 - a fixture
    admin_socket,
    haproxy_binary,
    haproxy_config,
    haproxy_listening,
    spawn_haproxy,
    until,
)
from tests.farm.test_shipping import farm_bridge

#: The red team's host names: ';' adds admin commands to a runtime API
#: line, a newline adds a map file entry.
EVIL = ("host-b;set server farm/host-a addr 127.0.0.66 port 6666;set server host-a/host-a "
        "addr 127.0.0.66 port 6666")
EVIL_NL = "host-c\nadministrator host-c"


class LogLines:
    """Log events of the bridge, by their format, while a test runs."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def __enter__(self) -> LogLines:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)

    def starting(self, text: str) -> list[dict[str, Any]]:
        return [e for e in self.events if str(e.get("log_format", "")).startswith(text)]


async def insert_session(db: FarmDatabase, host: str, session_id: int, user: str) -> None:
    """A farm member's session row: disconnected, so it would be routed."""
    await db.query(
        "INSERT INTO farm_sessions (host, session_id, username, domain, state, logged_on, "
        "client_name, client_address, since, logon_time, disconnect_time) VALUES "
        "(%s, %s, %s, '', 4, true, 'c', '192.0.2.1', 0, 0, extract(epoch from now()))",
        (host, session_id, user))


@pytest_twisted.ensureDeferred
async def test_injected_host_names_never_reach_haproxy_nor_the_map_file(
        short_dir: Path, farm_db: FarmDatabase, haproxy_binary: str) -> None:  # noqa: F811
    listeners = {name: reactor.listenTCP(0, Factory(), interface="127.0.0.1")
                 for name in ("host-a", "host-b")}
    ports = {name: port.getHost().port for name, port in listeners.items()}
    probe = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    frontend = probe.getHost().port
    await probe.stopListening()
    map_path, socket = short_dir / "users.map", short_dir / "haproxy.sock"
    map_path.write_text("")
    a = await farm_bridge(short_dir / "a", farm_db, "host-a", haproxy_socket=f"unix:{socket}",
                          haproxy_map=map_path)
    proc, transport = spawn_haproxy(
        haproxy_binary, haproxy_config(short_dir, frontend, ports, map_path, socket))
    admin = RuntimeApi(reactor, f"unix:{admin_socket(socket)}")
    try:
        await haproxy_listening(proc, admin_socket(socket))
        servers_before = await admin.send(["show servers state"])
        await farm_db.until("SELECT count(*) FROM farm_hosts", (), lambda rows: rows[0][0] >= 1)
        with LogLines() as log:
            # Hosts that stay fresh (a heartbeat an hour ahead), each with a
            # disconnected session: what the map would route to them.
            for host, user in ((EVIL, "bob"), (EVIL_NL, "carol"), ("host-b", "dave;x")):
                await farm_db.query("INSERT INTO farm_hosts (host, journal, last_seen) VALUES "
                                    "(%s, 'x', now() + interval '1 hour') ON CONFLICT DO "
                                    "NOTHING", (host,))
                await insert_session(farm_db, host, 1, user)
            # A route of the farm's own, after them: when it is in HAProxy's
            # map, the feeder has read the rows above.
            await insert_session(farm_db, "host-b", 2, "erin")

            async def routed() -> str:
                shown = await admin.send([f"show map {map_path}"])
                return shown if "erin host-b" in shown else ""
            shown = await until(routed, "erin's route in HAProxy's map")
        assert [line.split()[1:] for line in shown.splitlines() if line.strip()] \
            == [["erin", "host-b"]], "only the farm's own route"
        assert map_path.read_text().splitlines()[1:] == ["erin host-b"]
        servers_after = await admin.send(["show servers state"])
        assert "127.0.0.66" not in servers_after
        assert _addresses(servers_after) == _addresses(servers_before)
        assert len(_addresses(servers_before)) == 4, servers_before
        # The rows were skipped where they were read, and said so (rate-limited).
        assert a.service.farm is not None
        store = a.service.farm.store
        assert {h.host for h in await store.hosts()} == {"host-a", "host-b"}
        assert {s["username"] for s in await store.sessions()} == {"dave;x", "erin"}, \
            "in the farm view, a name of any printable characters; not in HAProxy's map"
        skipped = log.starting("farm: skipped")
        assert {e["table"] for e in skipped} == {"farm_hosts", "farm_sessions"}
        assert len(skipped) == 2, "one line per table, not one per row or read"
        assert not [e for e in log.events if e.get("log_level") is not None
                    and e["log_level"].name == "critical"]
        # The bridge's socket is level operator: an admin command that got
        # past every check would still be refused by HAProxy itself.
        bridge_api = RuntimeApi(reactor, f"unix:{socket}")
        answer = await bridge_api.send([f"set server farm/host-a addr 127.0.0.66 port "
                                        f"{ports['host-a']}"])
        assert "Permission denied" in answer
    finally:
        transport.signalProcess("KILL")
        await proc.ended
        await a.stop()
        for port in listeners.values():
            await port.stopListening()


def _addresses(servers_state: str) -> list[tuple[str, ...]]:
    """(backend, server, address, port) of ``show servers state``."""
    rows = []
    for line in servers_state.splitlines():
        words = line.split()
        if len(words) > 18 and words[0].isdigit():
            rows.append((words[1], words[3], words[4], words[18]))
    return sorted(rows)


def test_lines_for_haproxy_refuse_what_it_would_obey(tmp_path: Path) -> None:
    from bridge.farm.haproxy import _line, route_map, write_map_file

    assert _line("add", "map", "/etc/m.map", "alice", "host-a") == \
        "add map /etc/m.map alice host-a"
    for bad in ("a;b", "a b", "a\\b", "a#b", "a\nb", "a\rb", "a\tb", "a\x00b", "a\x85b",
                "a'b", 'a"b', ""):
        for key, value in ((bad, "host-a"), ("alice", bad)):
            with pytest.raises(UnsafeLineError):
                _line("set", "map", "/m.map", key, value)
            with pytest.raises(UnsafeLineError):
                write_map_file(tmp_path / "m.map", {key: value}, "test")
    assert not (tmp_path / "m.map").exists(), "nothing half written"
    rows = [{"host": host, "username": user, "logged_on": True, "state": 4,
             "disconnect_time": 1.0, "logon_time": 0.0}
            for host, user in ((EVIL, "bob"), (EVIL_NL, "carol"), ("host-b", "dave;x"),
                               ("host-b", "erin"))]
    routes, left_out = route_map(rows, {EVIL, EVIL_NL, "host-b"})
    assert routes == {"erin": "host-b"}
    assert left_out == ["bob", "carol", "dave;x"]


@pytest_twisted.ensureDeferred
async def test_the_runtime_api_sends_nothing_unchecked(short_dir: Path) -> None:
    api = RuntimeApi(reactor, f"unix:{short_dir}/nobody.sock")
    with pytest.raises(UnsafeLineError):
        await api.send(["show map /m.map", "add map /m.map bob host-b;shutdown sessions"])


async def logged_on(bridge: BridgeUnderTest, db: FarmDatabase, connection: int, user: str
                    ) -> int:
    """``user``'s session on ``bridge`` (through its one stand-in RDP server), in the farm."""
    peer = bridge.peers[0] if bridge.peers else await bridge.peer()
    await peer.logon(connection, user, f"{user}-pw")
    session_id = bridge.service.registry.by_connection(connection).session_id
    await db.until("SELECT count(*) FROM farm_sessions WHERE session_id = %s AND username = %s "
                   "AND logged_on", (session_id, user), lambda rows: rows[0][0] == 1)
    return session_id


def forged_signature(command: dict[str, Any], key: bytes) -> str:
    """What a forger without the farm's key would compute (with its own)."""
    fields = [command["id"], command["host"], command["session_id"], command["action"],
              command["args"], command["requested_by"], command["expires_us"]]
    message = b"icp-bridge farm command v1\n" + json.dumps(
        fields, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


@pytest_twisted.ensureDeferred
async def test_forged_and_unsigned_commands_are_refused_and_the_session_survives(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    a = await farm_bridge(short_dir / "a", farm_db, "host-a")
    c = await farm_bridge(short_dir / "c", farm_db, "host-c")
    try:
        alice = await logged_on(a, farm_db, 1, "alice")
        bob = await logged_on(a, farm_db, 2, "bob")
        assert a.service.farm is not None and c.service.farm is not None
        # A command of the farm's (signed by host-c): bob's session is logged off.
        [real] = await c.service.farm.waiter.run([("host-a", bob)], "logoff", {"wait": False},
                                                 "root on host-c", 10, 60)
        assert (real.state, real.result) == ("done", {"ok": True})
        [(signature, expires_at)] = await farm_db.query(
            "SELECT signature, expires_at FROM farm_commands WHERE id = %s", (real.id,))
        assert len(signature) == 64

        phishing = {"title": "IT department", "text": "Your password expired. Reply with it "
                    "to it-support@evil.example", "wait": False}
        forged = [
            # unsigned, as the red team's rows
            ("message", phishing, ""),
            ("logoff", {"wait": False}, ""),
            # the real command's signature on another row (another session)
            ("logoff", {"wait": False}, signature),
            # junk, and a signature with a key that is not the farm's
            ("disconnect", {"wait": False}, "00" * 32),
            ("logoff", {"wait": False}, "\u00e9" * 64),
        ]
        with LogLines() as log:
            for action, args, forged_with in forged:
                await farm_db.query(
                    "INSERT INTO farm_commands (host, session_id, action, args, requested_by, "
                    "expires_at, signature) VALUES ('host-a', %s, %s, %s, 'root on host-z', "
                    "%s, %s)", (alice, action, json.dumps(args), expires_at, forged_with))
            # A forger who knows the format and takes the next id itself.
            [(next_id, expires_us)] = await farm_db.query(
                "SELECT nextval(pg_get_serial_sequence('farm_commands', 'id')), "
                "(extract(epoch FROM %s::timestamptz) * 1000000)::bigint", (expires_at,))
            row = {"id": next_id, "host": "host-a", "session_id": alice,
                   "action": "logoff", "args": {"wait": False}, "requested_by": "root on host-z",
                   "expires_us": expires_us}
            await farm_db.query(
                "INSERT INTO farm_commands (id, host, session_id, action, args, requested_by, "
                "expires_at, signature) VALUES (%s, 'host-a', %s, 'logoff', %s, "
                "'root on host-z', %s, %s)",
                (next_id, alice, json.dumps(row["args"]), expires_at,
                 forged_signature(row, b"not the farm's key, 32 characters or more")))
            rows = await farm_db.until(
                "SELECT state, result FROM farm_commands WHERE id > %s ORDER BY id", (real.id,),
                lambda rows: len(rows) == 6 and all(r[0] != "pending" for r in rows))
        assert [state for state, _ in rows] == ["refused"] * 6
        reasons = [result["refused"].split(":")[0] for _, result in rows]
        assert reasons == ["unsigned", "unsigned"] + ["bad signature"] * 4
        assert all(result["ok"] is False for _, result in rows)
        assert a.service.farm.runner.refused == 6
        refusals = log.starting("farm: refused")
        assert len(refusals) == 1 and refusals[0]["count"] == 1, \
            "the first refusal is logged; the ones just after it wait (rate-limited)"
        # alice's session survives; her RDP server saw no message, no logoff.
        assert a.service.registry.get(alice) is not None
        peer = a.peers[0]
        assert peer.seen("MessageRequest") == []
        assert len(peer.seen("LogoffUserSessionRequest")) == 1, "bob's, the real one"
        assert not [e for e in a.service.store.events_after(0, 1000)
                    if "host-z" in e.reason]
        # And a signed command still works end to end.
        [logoff] = await c.service.farm.waiter.run([("host-a", alice)], "logoff",
                                                   {"wait": True}, "root on host-c", 10, 60)
        assert (logoff.state, logoff.result) == ("done", {"ok": True})
        assert a.service.registry.get(alice) is None
        assert len(peer.seen("LogoffUserSessionRequest")) == 2
        reasons = [e.reason for e in a.service.store.events_after(0, 1000)]
        assert f"logged off through farm command {logoff.id} by root on host-c" in reasons
    finally:
        await a.stop()
        await c.stop()


@pytest_twisted.ensureDeferred
async def test_without_the_command_key_a_host_neither_issues_nor_runs_commands(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    single = {"session.timeout": 30, "session.farm.singleSession": True}
    a = await farm_bridge(short_dir / "a", farm_db, "host-a", farm_command_key_file=None,
                          properties=single)
    c = await farm_bridge(short_dir / "c", farm_db, "host-c", properties=single)
    try:
        alice = await logged_on(a, farm_db, 1, "alice")
        assert a.service.farm is not None and c.service.farm is not None
        [command] = await c.service.farm.waiter.run([("host-a", alice)], "logoff", {},
                                                    "root on host-c", 10, 60)
        assert command.state == "refused"
        assert command.result == {"ok": False, "refused": NO_KEY}
        assert a.service.registry.get(alice) is not None
        # Issued at a host without the key: nothing is queued at all.
        [here] = await a.service.farm.waiter.run([("host-c", 1)], "logoff", {}, "x", 1, 60)
        assert (here.id, here.state, here.result) == (0, "refused",
                                                      {"ok": False, "refused": NO_KEY})
        # A target that is no host name is never queued either.
        [bad] = await c.service.farm.waiter.run([("host-a;x", 1)], "logoff", {}, "x", 1, 60)
        assert bad.state == "refused" and "not a host name" in bad.result["refused"]  # type: ignore
        assert (await farm_db.query("SELECT count(*) FROM farm_commands"))[0][0] == 1
        # session.farm.singleSession at a host without the key: the logon goes
        # on, the other session stays, and the log says why.
        await logged_on(c, farm_db, 1, "bob")
        with LogLines() as log:
            await logged_on(a, farm_db, 2, "bob")
        assert len(c.service.registry.sessions_of("bob", "")) == 1
        [line] = log.starting("user {username}: the logoff of")
        assert line["refusal"] == NO_KEY
    finally:
        await a.stop()
        await c.stop()


@pytest_twisted.ensureDeferred
async def test_rows_that_fail_the_checks_are_skipped_in_every_table(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    a = await farm_bridge(short_dir / "a", farm_db, "host-a")
    try:
        alice = await logged_on(a, farm_db, 1, "alice")
        assert a.service.farm is not None
        store = a.service.farm.store
        await farm_db.until("SELECT count(*) FROM farm_events", (), lambda rows: rows[0][0] > 0)
        log = LogLines().__enter__()  # the bridge reads events and counts as they come
        for host in (EVIL, EVIL_NL, "-leading-dash", "x" * 64, ""):
            await farm_db.query("INSERT INTO farm_hosts (host, journal) VALUES (%s, 'x')",
                                (host,))
            await insert_session(farm_db, host, 1, "bob")
            await farm_db.query(
                "INSERT INTO farm_events (host, journal, local_id, time, session_id, username, "
                "event, reason) VALUES (%s, 'x', 1, 0, 1, 'bob', 'logon', '')", (host,))
            await farm_db.query("INSERT INTO farm_failures VALUES (%s, 'bob', 9, %s)",
                                (host, 4e9))
        await insert_session(farm_db, "host-b", 7, "bob\x1b[2J")
        await farm_db.query("INSERT INTO farm_failures VALUES ('host-b', 'bob\nx', 9, %s), "
                            "('host-b', 'carol', 2, %s)", (4e9, 4e9))
        try:
            assert [h.host for h in await store.hosts()] == ["host-a"]
            assert [(s["host"], s["session_id"]) for s in await store.sessions()] \
                == [("host-a", alice)]
            assert {e.host for e in await store.events_after(0)} == {"host-a"}
            assert await store.failures_elsewhere("host-a", 0) == {"carol": 2}
            for _ in range(3):  # read again: not logged again (rate-limited)
                await store.sessions()
        finally:
            log.__exit__()
        lines = log.starting("farm: skipped")
        assert sorted(e["table"] for e in lines) == ["farm_events", "farm_failures",
                                                      "farm_hosts", "farm_sessions"]
        assert {e["table"]: e["count"] for e in lines}["farm_sessions"] == 6
        assert all("\n" not in e["row"] and "\x1b" not in e["row"] for e in lines), \
            "the row is named with its characters escaped"
    finally:
        await a.stop()

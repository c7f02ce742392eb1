"""A PostgreSQL role per host with row-level security
(contrib/postgresql/farm-host-roles.sql), against the suite's PostgreSQL:
the farm works as with one shared role, and a host's role writes only its
own rows (the attacker is host-b's role, as plain SQL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from bridge.state.farm_store import _prepare
from tests.farm.pg import PASSWORD, FarmDatabase
from tests.farm.test_farm_security import EVIL, logged_on
from tests.farm.test_shipping import farm_bridge

ROOT = Path(__file__).resolve().parents[2]
SQL = ROOT / "contrib" / "postgresql" / "farm-host-roles.sql"
HOSTS = ("host-a", "host-b")


def set_up_roles(db: FarmDatabase) -> None:
    """As the tables' owner: the schema (as a host's first start makes
    it), contrib's policies, a login role per host (blocking: in a thread)."""
    with db.cluster.connect(db.name) as connection:
        _prepare(connection)
        connection.execute(SQL.read_text())
        for host in HOSTS:
            exists = connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                        (host,)).fetchone()
            if exists is None:
                connection.execute(f'CREATE ROLE "{host}" LOGIN IN ROLE icpbridge_hosts')
            connection.execute(f"ALTER ROLE \"{host}\" PASSWORD '{PASSWORD}'")


def as_host(db: FarmDatabase, host: str, sql: str, args: tuple[Any, ...] = ()) -> int:
    """``sql`` as ``host``'s role (its own transaction): the rows it touched."""
    import psycopg

    conninfo = db.conninfo.replace("user=farm", f"user={host}")
    with psycopg.connect(conninfo, password=PASSWORD, autocommit=True) as connection:
        return connection.execute(sql, args).rowcount


@pytest_twisted.ensureDeferred
async def test_a_host_role_writes_only_its_own_rows(short_dir: Path,
                                                    farm_db: FarmDatabase) -> None:
    import psycopg

    await deferToThread(set_up_roles, farm_db)
    bridges = {host: await farm_bridge(
        short_dir / host, farm_db, host,
        farm_database=farm_db.conninfo.replace("user=farm", f"user={host}"))
        for host in HOSTS}
    a, b = bridges["host-a"], bridges["host-b"]
    try:
        alice = await logged_on(a, farm_db, 1, "alice")
        await logged_on(b, farm_db, 1, "bob")
        assert a.service.farm is not None and b.service.farm is not None
        # The farm works: each host sees the whole farm, commands cross hosts.
        seen = {(s["host"], s["username"]) for s in await b.service.farm.store.sessions()}
        assert seen == {("host-a", "alice"), ("host-b", "bob")}
        assert {h.host for h in await b.service.farm.store.hosts()} == set(HOSTS)
        [logoff] = await b.service.farm.waiter.run([("host-a", alice)], "logoff", {},
                                                   "root on host-b", 10, 60)
        assert (logoff.state, logoff.result) == ("done", {"ok": True})
        assert a.service.registry.get(alice) is None

        # host-b's role against host-a's rows: refused, or no row touched.
        def attack(sql: str, args: tuple[Any, ...] = ()) -> int | str:
            try:
                return as_host(farm_db, "host-b", sql, args)
            except psycopg.errors.InsufficientPrivilege as e:
                return "refused" if "row-level security" in str(e) else str(e)
        attempts = {
            "a host of its choosing": ("INSERT INTO farm_hosts (host, journal) VALUES (%s, 'x')",
                                       (EVIL,)),
            "a session on host-a": (
                "INSERT INTO farm_sessions (host, session_id, username, domain, state, "
                "logged_on, client_name, client_address) VALUES ('host-a', 99, 'administrator', "
                "'', 4, true, '', '')", ()),
            "host-a's sessions changed": ("UPDATE farm_sessions SET username = 'mallory' "
                                          "WHERE host = 'host-a'", ()),
            "host-a made stale": ("UPDATE farm_hosts SET last_seen = now() - interval '1 day' "
                                  "WHERE host = 'host-a'", ()),
            "host-a's events removed": ("DELETE FROM farm_events WHERE host = 'host-a'", ()),
            "failures counted for host-a": ("INSERT INTO farm_failures VALUES ('host-a', "
                                            "'alice', 99, 4e9)", ()),
            "a command answered before it ran": (
                "INSERT INTO farm_commands (host, session_id, action, expires_at, state) "
                "VALUES ('host-a', 1, 'logoff', now() + interval '1 hour', 'done')", ()),
            "host-a's results changed": ("UPDATE farm_commands SET result = '{}' "
                                         "WHERE host = 'host-a'", ()),
            "the schema changed": ("DROP TABLE farm_sessions", ()),
        }
        results = {what: await deferToThread(attack, *sql) for what, sql in attempts.items()}
        results["the schema changed"] = "refused" \
            if "must be owner" in str(results["the schema changed"]) else \
            results["the schema changed"]
        expected = {what: "refused" for what in attempts}
        expected.update({"host-a's sessions changed": 0, "host-a made stale": 0,
                         "host-a's events removed": 0, "host-a's results changed": 0})
        assert results == expected
        # Its own rows it writes, and pruning removes only its own old events.
        assert await deferToThread(as_host, farm_db, "host-b", "UPDATE farm_hosts SET "
                                   "last_seen = now() WHERE host = 'host-b'") == 1
        await b.service.farm.store.prune_events(4e9)
        left = await farm_db.query("SELECT DISTINCT host FROM farm_events")
        assert [row[0] for row in left] == ["host-a"]
    finally:
        for bridge in bridges.values():
            await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_a_host_whose_role_is_another_hosts_is_told_why_once(
        short_dir: Path, farm_db: FarmDatabase) -> None:
    """host-c connecting as host-a's role: every write of its own rows is
    refused by the policies. One line says why; the retries (every 2 s) do
    not repeat it, nor a traceback, more than once a minute."""
    import psycopg
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher
    from twisted.python.failure import Failure

    await deferToThread(set_up_roles, farm_db)
    lines: list[str] = []
    told: Deferred[None] = Deferred()

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("bridge.farm.shipper") and \
                event.get("log_level") is not None and event["log_level"].name == "error":
            lines.append(event["log_format"].format(**event))
            if not told.called:
                told.callback(None)

    globalLogPublisher.addObserver(observe)
    bridge = None
    try:
        bridge = await farm_bridge(short_dir / "host-c", farm_db, "host-c",
                                   farm_database=farm_db.conninfo.replace("user=farm",
                                                                          "user=host-a"))
        await told
        assert len(lines) == 1 and lines[0].startswith("farm: PostgreSQL refused a write of "
                                                       "host host-c (")
        assert lines[0].endswith("with a role per host, the role must be named as host_name "
                                 "and be in icpbridge_hosts")
        assert "row-level security" in lines[0]
        # The same failure again at each retry: quiet, then one line a minute.
        shipper = bridge.service.farm.shipper  # type: ignore[union-attr]
        shipper.clock = clock = Clock()
        error = lines[0].split("host host-c (", 1)[1].rsplit("): with a role", 1)[0]
        shipper._said = (error, 0.0)
        again = Failure(psycopg.errors.InsufficientPrivilege(error))
        for _ in range(3):
            shipper._say(again)
        assert len(lines) == 1
        clock.advance(60)
        shipper._say(again)
        assert lines[1:] == [f"farm: shipping still fails: {error}"]
    finally:
        globalLogPublisher.removeObserver(observe)
        if bridge is not None:
            await bridge.stop()

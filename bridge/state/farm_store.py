"""The farm store: what every host of a farm shares, in PostgreSQL.

Tables (created on first use, under an advisory lock so that ten hosts
starting at once do not race):

- ``farm_hosts``: one row per host: its journal's identity, when it was
  last seen (PostgreSQL's clock, so hosts' clocks do not matter), how far
  its journal is shipped, its admin endpoint.
- ``farm_events``: every host's journal, one farm-wide ordered ``id``;
  unique on (host, journal, local id), so an event shipped twice is stored
  once. ``journal`` is the identity of the host's state database: a host
  whose database was replaced starts local ids at 1 again without
  colliding with its old events. Ids become visible in id order: the
  transactions that insert events take one advisory lock, so a reader that
  has seen id N has seen every id below it (a bare sequence would let a
  later id commit first, and a resuming reader skip the earlier one).
- ``farm_sessions``: each host's sessions, upserted as they change.
- ``farm_commands``: admin commands for a host's sessions, and results;
  each signed by the host that queued it (``signature``, see
  ``bridge.farm.signing``), refused by the host it names if not.
- ``farm_failures``: each host's failed-logon counts, per key.

What is read back is checked row by row (``check_host``, ``check_text``):
every member of the farm can write these tables, so a host name or a user
name is never passed on unchecked. A row that fails is skipped, with one
log line per table now and then (``SkippedRows``), never passed on.

Triggers NOTIFY on insert: ``icp_farm_events``, ``icp_farm_sessions``,
``icp_farm_commands`` (payload: the host), ``icp_farm_results`` (payload:
the command id) and ``icp_farm_failures``. A notification is only a
wake-up: readers then read the rows, which are the truth.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from bridge.state.engines import Engine
from bridge.state.store import JournalEvent

#: 2: farm_commands.signature (bridge.farm.signing); a host of version 1
#: would run commands unsigned, so it may not start on a farm of version 2.
SCHEMA_VERSION = 2
#: pg_advisory_xact_lock keys: creating the schema; inserting farm events.
SCHEMA_LOCK = 0x1CB0_0001
ORDER_LOCK = 0x1CB0_0002

EVENTS_CHANNEL = "icp_farm_events"
SESSIONS_CHANNEL = "icp_farm_sessions"
COMMANDS_CHANNEL = "icp_farm_commands"
RESULTS_CHANNEL = "icp_farm_results"
FAILURES_CHANNEL = "icp_farm_failures"
CHANNELS = [EVENTS_CHANNEL, SESSIONS_CHANNEL, COMMANDS_CHANNEL, RESULTS_CHANNEL,
            FAILURES_CHANNEL]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS farm_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS farm_hosts (
    host text PRIMARY KEY,
    journal text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    shipped_event_id bigint NOT NULL DEFAULT 0,
    admin_url text NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS farm_events (
    id bigserial PRIMARY KEY,
    host text NOT NULL,
    journal text NOT NULL,
    local_id bigint NOT NULL,
    time double precision NOT NULL,
    session_id bigint NOT NULL,
    username text NOT NULL,
    event text NOT NULL,
    old_state integer,
    new_state integer,
    reason text NOT NULL,
    UNIQUE (host, journal, local_id)
);
CREATE INDEX IF NOT EXISTS farm_events_time ON farm_events (time);
CREATE TABLE IF NOT EXISTS farm_sessions (
    host text NOT NULL,
    session_id bigint NOT NULL,
    username text NOT NULL,
    domain text NOT NULL,
    state integer NOT NULL,
    logged_on boolean NOT NULL,
    connection_id bigint,
    client_name text NOT NULL,
    client_address text NOT NULL,
    since double precision,
    connect_time double precision,
    logon_time double precision,
    disconnect_time double precision,
    PRIMARY KEY (host, session_id)
);
CREATE INDEX IF NOT EXISTS farm_sessions_user ON farm_sessions (username);
CREATE TABLE IF NOT EXISTS farm_commands (
    id bigserial PRIMARY KEY,
    host text NOT NULL,
    session_id bigint NOT NULL,
    action text NOT NULL,
    args jsonb NOT NULL DEFAULT '{{}}',
    requested_by text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    state text NOT NULL DEFAULT 'pending',
    result jsonb,
    finished_at timestamptz
);
-- Version 2.
ALTER TABLE farm_commands ADD COLUMN IF NOT EXISTS signature text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS farm_commands_pending ON farm_commands (host) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS farm_failures (
    host text NOT NULL,
    key text NOT NULL,
    failures integer NOT NULL,
    last_failure double precision NOT NULL,
    PRIMARY KEY (host, key)
);

CREATE OR REPLACE FUNCTION icp_farm_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END $$;
CREATE OR REPLACE FUNCTION icp_farm_command_wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('{COMMANDS_CHANNEL}', NEW.host);
    ELSIF NEW.state <> OLD.state THEN
        PERFORM pg_notify('{RESULTS_CHANNEL}', NEW.id::text);
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER farm_events_wake AFTER INSERT ON farm_events
    FOR EACH STATEMENT EXECUTE FUNCTION icp_farm_wake('{EVENTS_CHANNEL}');
CREATE OR REPLACE TRIGGER farm_sessions_wake AFTER INSERT OR UPDATE OR DELETE ON farm_sessions
    FOR EACH STATEMENT EXECUTE FUNCTION icp_farm_wake('{SESSIONS_CHANNEL}');
CREATE OR REPLACE TRIGGER farm_failures_wake AFTER INSERT OR UPDATE ON farm_failures
    FOR EACH STATEMENT EXECUTE FUNCTION icp_farm_wake('{FAILURES_CHANNEL}');
CREATE OR REPLACE TRIGGER farm_commands_wake AFTER INSERT OR UPDATE ON farm_commands
    FOR EACH ROW EXECUTE FUNCTION icp_farm_command_wake();
"""


class FarmSchemaError(Exception):
    """The farm database was made by a newer icp-bridge."""


#: A host's name: what HAProxy backend and server names and map values
#: carry safely (and what config's host_name accepts).
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: Control characters (C0, DEL, C1): never in a name or key read from the farm.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: The longest user name, failed-logon key or requested_by read from the farm.
MAX_TEXT = 512


def check_host(value: object) -> str | None:
    """Why ``value`` is not a host name, or None."""
    if not isinstance(value, str) or not HOST_NAME.fullmatch(value):
        return "not a host name"
    return None


def check_text(value: object, empty: bool = True) -> str | None:
    """Why ``value`` is no user name / key (control characters, too long,
    empty where it may not be), or None."""
    if not isinstance(value, str):
        return "not text"
    if not value and not empty:
        return "empty"
    if len(value) > MAX_TEXT or _CONTROL.search(value):
        return "too long or with control characters"
    return None


class SkippedRows:
    """Rows of the farm that failed the checks: each is skipped; one log
    line per table at most every ``every`` seconds (a flood of bad rows is
    not a flood of log lines), naming the last row and how many."""

    log = Logger()

    def __init__(self, now: Callable[[], float] = time.monotonic, every: float = 60.0) -> None:
        self.now = now
        self.every = every
        self.total = 0
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def report(self, skipped: list[tuple[str, str, str]]) -> None:
        """``skipped``: (table, row id, why) of one read; on the reactor."""
        last: dict[str, tuple[str, str]] = {}
        for table, row, why in skipped:
            self.total += 1
            self._unlogged[table] = self._unlogged.get(table, 0) + 1
            last[table] = (row, why)
        now = self.now()
        for table, (row, why) in last.items():
            logged = self._last_logged.get(table)
            if logged is not None and now - logged < self.every:
                continue
            self._last_logged[table] = now
            self.log.warn("farm: skipped {count} row(s) of {table} that fail the checks, the "
                          "last {row} ({why}); a farm member wrote them (see README, A farm)",
                          count=self._unlogged.pop(table), table=table, row=row, why=why)


def _row_id(*parts: object) -> str:
    """A row's id for the log: repr() escapes what a terminal would obey."""
    return "/".join(repr(part[:60] if isinstance(part, str) else part) for part in parts)


@dataclass(frozen=True)
class FarmEvent:
    """One event of the farm journal: a host's journal event with its
    farm-wide id (``id``) and its id on that host (``local_id``)."""

    id: int
    host: str
    local_id: int
    time: float
    session_id: int
    username: str
    event: str
    old_state: int | None
    new_state: int | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FarmHost:
    host: str
    age: float  # seconds since its last heartbeat (PostgreSQL's clock)
    shipped_event_id: int
    admin_url: str
    started_at: float


@dataclass(frozen=True)
class FarmCommand:
    id: int
    host: str
    session_id: int
    action: str
    args: dict[str, Any]
    requested_by: str
    state: str = "pending"
    result: dict[str, Any] | None = None
    # Signed with the id, these make a command: expires_at in µs since
    # the epoch (PostgreSQL's clock), and the issuer's signature.
    expires_us: int = 0
    signature: str = ""


#: A signer: the signature of a command (bridge.farm.signing).
Signer = Callable[[FarmCommand], str]
_COMMAND_COLUMNS = "id, host, session_id, action, args, requested_by"
_EXPIRES_US = "(extract(epoch FROM expires_at) * 1000000)::bigint"


SESSION_COLUMNS = ("session_id", "username", "domain", "state", "logged_on", "connection_id",
                   "client_name", "client_address", "since", "connect_time", "logon_time",
                   "disconnect_time")
_EVENT_COLUMNS = "id, host, local_id, time, session_id, username, event, old_state, " \
                 "new_state, reason"


@dataclass(frozen=True)
class Shipment:
    """What one host ships in one transaction: journal events (in local id
    order), sessions to upsert (rows of SESSION_COLUMNS) and to delete;
    with ``all_sessions`` the upserts are every session the host has and
    any other row of the host goes."""

    host: str
    journal: str
    events: list[JournalEvent]
    upserts: list[dict[str, Any]]
    deletes: list[int]
    all_sessions: bool = False


class FarmStore:
    """The farm's tables, each method one transaction off the reactor
    (a Deferred; DatabaseUnavailableError while PostgreSQL is away)."""

    def __init__(self, engine: Engine, skipped: SkippedRows | None = None) -> None:
        self.engine = engine
        self.skipped = skipped or SkippedRows()

    def _checked(self, work: Callable[[Any, list[tuple[str, str, str]]], Any]) -> Deferred[Any]:
        """``work`` off the reactor, told where to note rows it skipped;
        they are logged on the reactor when it is done."""
        skipped: list[tuple[str, str, str]] = []

        def report(result: Any) -> Any:
            if skipped:
                self.skipped.report(skipped)
            return result
        return self.engine.run(lambda connection: work(connection, skipped)).addCallback(report)

    # -- schema ---------------------------------------------------------------------

    def prepare(self) -> Deferred[None]:
        """Create the tables if missing; refuse a newer schema."""
        return self.engine.run(_prepare)

    # -- one host's side ---------------------------------------------------------------

    def register(self, host: str, journal: str, admin_url: str) -> Deferred[int]:
        """The host is here (a heartbeat); fires with the last local id of
        this journal the farm holds, where shipping resumes."""
        def work(connection: Any) -> int:
            connection.execute(
                "INSERT INTO farm_hosts (host, journal, admin_url) VALUES (%s, %s, %s) "
                "ON CONFLICT (host) DO UPDATE SET journal = EXCLUDED.journal, "
                "admin_url = EXCLUDED.admin_url, last_seen = now(), started_at = now()",
                (host, journal, admin_url))
            row = connection.execute(
                "SELECT coalesce(max(local_id), 0) FROM farm_events "
                "WHERE host = %s AND journal = %s", (host, journal)).fetchone()
            shipped = int(row[0])
            connection.execute("UPDATE farm_hosts SET shipped_event_id = %s WHERE host = %s",
                               (shipped, host))
            return shipped
        return self.engine.run(work)

    def heartbeat(self, host: str) -> Deferred[None]:
        def work(connection: Any) -> None:
            connection.execute("UPDATE farm_hosts SET last_seen = now() WHERE host = %s",
                               (host,))
        return self.engine.run(work)

    def ship(self, shipment: Shipment) -> Deferred[None]:
        return self.engine.run(lambda connection: _ship(connection, shipment))

    def put_failures(self, host: str, counts: dict[str, tuple[int, float]]) -> Deferred[None]:
        """The host's failed-logon counts: key -> (failures, last failure);
        a count of 0 removes the key."""
        def work(connection: Any) -> None:
            gone = [key for key, (failures, _) in counts.items() if failures <= 0]
            kept = [(host, key, failures, last) for key, (failures, last) in counts.items()
                    if failures > 0]
            if gone:
                connection.execute("DELETE FROM farm_failures WHERE host = %s AND key = ANY(%s)",
                                   (host, gone))
            if kept:
                with connection.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO farm_failures (host, key, failures, last_failure) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT (host, key) DO UPDATE SET "
                        "failures = EXCLUDED.failures, last_failure = EXCLUDED.last_failure",
                        kept)
        return self.engine.run(work)

    def failures_elsewhere(self, host: str, since: float) -> Deferred[dict[str, int]]:
        """Failed logons per key counted by the other hosts, each counting
        failures after ``since`` (unix time)."""
        def work(connection: Any, skipped: list[tuple[str, str, str]]) -> dict[str, int]:
            rows = connection.execute(
                "SELECT host, key, failures FROM farm_failures WHERE host <> %s "
                "AND last_failure > %s", (host, since)).fetchall()
            counts: dict[str, int] = {}
            for other, key, failures in rows:
                why = check_host(other) or check_text(key, empty=False)
                if why is not None:
                    skipped.append(("farm_failures", _row_id(other, key), why))
                    continue
                counts[key] = counts.get(key, 0) + max(0, int(failures))
            return counts
        return self._checked(work)

    def pending_commands(self, host: str) -> Deferred[list[FarmCommand]]:
        """The host's commands still pending and not expired, oldest first."""
        def work(connection: Any, skipped: list[tuple[str, str, str]]) -> list[FarmCommand]:
            rows = connection.execute(
                f"SELECT {_COMMAND_COLUMNS}, {_EXPIRES_US}, signature "  # noqa: S608
                "FROM farm_commands WHERE host = %s AND state = 'pending' "
                "AND expires_at > now() ORDER BY id", (host,)).fetchall()
            commands = []
            for (command_id, on, session_id, action, args, requested_by, expires_us,
                 signature) in rows:
                # Not skipped: a command that fails is refused (answered), by the runner.
                commands.append(FarmCommand(
                    command_id, on, session_id, action, args if isinstance(args, dict) else {},
                    requested_by, expires_us=int(expires_us), signature=signature))
            return commands
        return self._checked(work)

    def finish_commands(self, results: dict[int, dict[str, Any]]) -> Deferred[None]:
        def work(connection: Any) -> None:
            with connection.cursor() as cursor:
                # A result with "refused" (the command failed the host's
                # checks: unsigned, forged) is state 'refused', not 'done'.
                cursor.executemany(
                    "UPDATE farm_commands SET state = %s, result = %s, finished_at = now() "
                    "WHERE id = %s AND state NOT IN ('done', 'refused')",
                    [("refused" if "refused" in result else "done", json.dumps(result),
                      command_id) for command_id, result in sorted(results.items())])
        return self.engine.run(work)

    def prune_events(self, older_than: float) -> Deferred[int]:
        def work(connection: Any) -> int:
            cursor = connection.execute("DELETE FROM farm_events WHERE time < %s",
                                        (older_than,))
            connection.execute("DELETE FROM farm_commands WHERE expires_at < now() - "
                               "interval '1 day'")
            return int(cursor.rowcount)
        return self.engine.run(work)

    # -- the farm's view ---------------------------------------------------------------

    def events_after(self, after: int, limit: int = 500) -> Deferred[list[FarmEvent]]:
        def work(connection: Any, skipped: list[tuple[str, str, str]]) -> list[FarmEvent]:
            rows = connection.execute(
                f"SELECT {_EVENT_COLUMNS} FROM farm_events WHERE id > %s ORDER BY id "  # noqa: S608
                "LIMIT %s", (after, limit)).fetchall()
            events = []
            for row in rows:
                why = check_host(row[1]) or check_text(row[5])
                if why is not None:
                    skipped.append(("farm_events", _row_id(row[0]), why))
                    continue
                events.append(FarmEvent(*row))
            return events
        return self._checked(work)

    def event_bounds(self) -> Deferred[tuple[int, int]]:
        """(oldest id - 1, newest id) of the farm journal; (0, 0) if empty."""
        def work(connection: Any) -> tuple[int, int]:
            low, high = connection.execute(
                "SELECT min(id), max(id) FROM farm_events").fetchone()
            return (int(low) - 1 if low is not None else 0, int(high or 0))
        return self.engine.run(work)

    def hosts(self) -> Deferred[list[FarmHost]]:
        def work(connection: Any, skipped: list[tuple[str, str, str]]) -> list[FarmHost]:
            rows = connection.execute(
                "SELECT host, extract(epoch FROM now() - last_seen), shipped_event_id, "
                "admin_url, extract(epoch FROM started_at) FROM farm_hosts ORDER BY host"
            ).fetchall()
            hosts = []
            for host, age, shipped, url, started in rows:
                why = check_host(host) or check_text(url)
                if why is not None:
                    skipped.append(("farm_hosts", _row_id(host), why))
                    continue
                hosts.append(FarmHost(host, float(age), int(shipped), url, float(started)))
            return hosts
        return self._checked(work)

    def sessions(self, username: str | None = None) -> Deferred[list[dict[str, Any]]]:
        """Every host's sessions (or one user's logged-on ones), by host."""
        def work(connection: Any, skipped: list[tuple[str, str, str]]
                 ) -> list[dict[str, Any]]:
            columns = ", ".join(("host", *SESSION_COLUMNS))
            if username is None:
                rows = connection.execute(
                    f"SELECT {columns} FROM farm_sessions "  # noqa: S608
                    "ORDER BY host, session_id").fetchall()
            else:
                rows = connection.execute(
                    f"SELECT {columns} FROM farm_sessions WHERE username = %s "  # noqa: S608
                    "AND logged_on ORDER BY host, session_id", (username,)).fetchall()
            sessions = []
            for row in rows:
                why = check_host(row[0]) or check_text(row[2]) or check_text(row[3])
                if why is not None:
                    skipped.append(("farm_sessions", _row_id(row[0], row[1]), why))
                    continue
                sessions.append(dict(zip(("host", *SESSION_COLUMNS), row, strict=True)))
            return sessions
        return self._checked(work)

    def add_commands(self, commands: Iterable[tuple[str, int, str, dict[str, Any]]],
                     requested_by: str, expires_in: float, sign: Signer) -> Deferred[list[int]]:
        """Queue (host, session id, action, args) commands, each signed by
        ``sign`` over its id and expiry too: both are taken from PostgreSQL
        first (and args as jsonb gives them back), so that the row goes in
        whole, signed (an issuer never updates a row of another host's:
        with per-host roles it may not, see contrib/postgresql/); fires
        with their ids."""
        def work(connection: Any) -> list[int]:
            ids = []
            for host, session_id, action, args in commands:
                command_id, expires_at, expires_us, stored_args = connection.execute(
                    "SELECT nextval(pg_get_serial_sequence('farm_commands', 'id')), e, "
                    "(extract(epoch FROM e) * 1000000)::bigint, %s::jsonb FROM "
                    "(SELECT now() + make_interval(secs => %s) AS e) AS expiry",
                    (json.dumps(args), expires_in)).fetchone()
                command = FarmCommand(int(command_id), host, session_id, action, stored_args,
                                      requested_by, expires_us=int(expires_us))
                connection.execute(
                    "INSERT INTO farm_commands (id, host, session_id, action, args, "
                    "requested_by, expires_at, signature) VALUES (%s, %s, %s, %s, %s, %s, %s, "
                    "%s)", (command.id, host, session_id, action, json.dumps(stored_args),
                            requested_by, expires_at, sign(command)))
                ids.append(command.id)
            return ids
        return self.engine.run(work)

    def commands(self, ids: list[int]) -> Deferred[list[FarmCommand]]:
        def work(connection: Any, skipped: list[tuple[str, str, str]]) -> list[FarmCommand]:
            rows = connection.execute(
                f"SELECT {_COMMAND_COLUMNS}, "  # noqa: S608
                "CASE WHEN state = 'pending' AND expires_at <= now() THEN 'expired' "
                "ELSE state END, result FROM farm_commands WHERE id = ANY(%s) ORDER BY id",
                (ids,)).fetchall()
            commands = []
            for row in rows:
                why = check_host(row[1]) or check_text(row[5])
                if why is not None:
                    skipped.append(("farm_commands", _row_id(row[0]), why))
                    continue
                result = row[7] if isinstance(row[7], dict) or row[7] is None else None
                commands.append(FarmCommand(*row[:7], result))
            return commands
        return self._checked(work)


def _prepare(connection: Any) -> None:
    connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
    exists = connection.execute("SELECT to_regclass('farm_meta')").fetchone()[0]
    if exists is not None:
        row = connection.execute(
            "SELECT value FROM farm_meta WHERE key = 'schema_version'").fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise FarmSchemaError(f"the farm database has schema version {row[0]}; this "
                                  f"icp-bridge knows {SCHEMA_VERSION}: upgrade it")
        if row is not None and int(row[0]) == SCHEMA_VERSION:
            # Nothing to make: also what lets a host with a role of its own
            # (not the tables' owner: contrib/postgresql/) start.
            return
    connection.execute(SCHEMA)
    connection.execute("INSERT INTO farm_meta VALUES ('schema_version', %s) ON CONFLICT (key) "
                       "DO UPDATE SET value = EXCLUDED.value", (str(SCHEMA_VERSION),))


def _ship(connection: Any, shipment: Shipment) -> None:
    host = shipment.host
    with connection.cursor() as cursor:
        if shipment.events:
            # Farm ids commit in id order (see the module's docstring).
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (ORDER_LOCK,))
            cursor.executemany(
                "INSERT INTO farm_events (host, journal, local_id, time, session_id, username, "
                "event, old_state, new_state, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, "
                "%s, %s) ON CONFLICT (host, journal, local_id) DO NOTHING",
                [(host, shipment.journal, e.id, e.time, e.session_id, e.username, e.event,
                  e.old_state, e.new_state, e.reason) for e in shipment.events])
        if shipment.all_sessions:
            cursor.execute("DELETE FROM farm_sessions WHERE host = %s AND NOT "
                           "(session_id = ANY(%s))",
                           (host, [row["session_id"] for row in shipment.upserts]))
        if shipment.deletes:
            cursor.execute("DELETE FROM farm_sessions WHERE host = %s AND session_id = ANY(%s)",
                           (host, shipment.deletes))
        if shipment.upserts:
            columns = ", ".join(SESSION_COLUMNS)
            marks = ", ".join(["%s"] * (len(SESSION_COLUMNS) + 1))
            updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in SESSION_COLUMNS[1:])
            cursor.executemany(
                f"INSERT INTO farm_sessions (host, {columns}) VALUES ({marks}) "  # noqa: S608
                f"ON CONFLICT (host, session_id) DO UPDATE SET {updates}",
                [(host, *(row[c] for c in SESSION_COLUMNS)) for row in shipment.upserts])
        if shipment.events:
            cursor.execute("UPDATE farm_hosts SET shipped_event_id = greatest("
                           "shipped_event_id, %s), last_seen = now() WHERE host = %s",
                           (shipment.events[-1].id, host))

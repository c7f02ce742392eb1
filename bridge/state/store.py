"""Durable state in SQLite: sessions, the connection map, token digests and
the session event journal, so a restarted bridge (even after kill -9)
knows them and a client of the event stream misses nothing.

Each session change is written with its journal row in one transaction,
so the journal holds exactly the changes the state holds. WAL mode with
synchronous=NORMAL: a commit survives the process dying at any point; only
an OS crash or power loss may lose the last commits. Writes happen on
session changes and token issue/revoke, not per OTS API call; checkpoints
run in a worker thread (bench/state_writes.py measures what writes cost).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from bridge.endpoints import StartupError
from bridge.security.tokens import TokenRecord
from bridge.sessions.model import (
    BackendRecord,
    ConnectState,
    Session,
    SessionChange,
    SessionEvent,
    StateWriteError,
    process_start_ticks,
)
from bridge.sessions.registry import SessionRegistry
from bridge.state.rows import RowReading, read_row, session_to_json
from bridge.state.schema import migrate
from bridge.state.trust import check_state_dir, file_problem

#: The tables ``icp-bridge state check`` expects (``bridge.state.schema`` makes them).
TABLES = ("meta", "sessions", "tokens", "events", "lockouts", "backends")
#: The meta row a running bridge keeps ("<pid>:<process start ticks>"),
#: removed when it closes the database: a copy that has it was taken while a
#: bridge ran.
OPENED_BY = "opened_by"


def state_database(state_dir: Path) -> Path:
    """The state database in ``state_dir``: sessions, tokens, the journal,
    and the failed-logon counts (``bridge.security.throttle``)."""
    return state_dir / "state.sqlite3"


@dataclass(frozen=True)
class JournalEvent:
    """One row of the event journal, as the event stream sends it."""

    id: int
    time: float
    session_id: int
    username: str
    event: str
    old_state: int | None
    new_state: int | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _private(path: Path) -> None:
    """The database mode 0600 before SQLite opens it, so that the -wal and
    -shm files it makes beside it get that mode too (SQLite gives them the
    database's); those of an older run are made 0600 as well."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    for suffix in ("", "-wal", "-shm"):
        try:
            os.chmod(f"{path}{suffix}", 0o600, follow_symlinks=False)
        except FileNotFoundError:
            pass


def _describe(error: sqlite3.Error) -> str:
    return str(error) or type(error).__name__


class StateStore:
    """One SQLite database file; every write method is one transaction and
    raises StateWriteError (having written nothing) when the disk refuses."""

    log = Logger()

    def __init__(self, path: Path | str) -> None:
        self.path = path
        # For the metrics: each transaction's seconds, and how many failed.
        self.observe_write: Callable[[float], None] | None = None
        self.write_failures = 0
        memory = path == ":memory:"
        try:
            if not memory:
                # Refused when others could write it: it is root's word to itself.
                check_state_dir(Path(path).parent)
                for name in (str(path), f"{path}-wal", f"{path}-shm"):
                    problem = file_problem(Path(name), missing_ok=True)
                    if problem is not None:
                        raise StartupError(f"state database: {problem}")
                _private(Path(path))
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints fsync; left to SQLite they would run inside a commit
            # on the reactor thread now and then (~20 ms here). The service
            # calls checkpoint() from a worker thread instead.
            self._db.execute("PRAGMA wal_autocheckpoint=0")
            migrate(self._db, path)
            if not memory:
                os.chmod(path, 0o600)
                self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                 (OPENED_BY, f"{os.getpid()}:{process_start_ticks(os.getpid())}"))
        except sqlite3.DatabaseError as e:
            raise StartupError(
                f"state database {path} cannot be used ({_describe(e)}): move it aside to start "
                f"with no saved sessions, or restore it from a backup "
                f"(`icp-bridge state check {path}` tells what is wrong)") from None
        except OSError as e:
            raise StartupError(f"state directory for {path} cannot be used: "
                               f"{e.strerror or e}") from None
        self._checkpointer: sqlite3.Connection | None = None

    def checkpoint(self) -> None:
        """Copy the write-ahead log into the database. Blocks: call it from
        a worker thread, one call at a time. PASSIVE takes no lock the
        reactor's commits wait on (the disk itself may still slow them)."""
        if self.path == ":memory:":
            return
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(str(self.path), isolation_level=None,
                                                 check_same_thread=False)
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        """Close; the last connection to close checkpoints what is left."""
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        try:
            self._db.execute("DELETE FROM meta WHERE key = ?", (OPENED_BY,))
        except sqlite3.Error as e:
            self.log.warn("state database {path}: not marked closed: {error}",
                          path=str(self.path), error=_describe(e))
        self._db.close()

    def _transaction(self, statements: Iterable[tuple[str, tuple[Any, ...]]]) -> list[int]:
        """Run the statements in one transaction; returns each one's lastrowid."""
        rowids = []
        started = time.perf_counter()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    rowids.append(self._db.execute(sql, args).lastrowid or 0)
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite rolls back by itself on some errors (a full disk at commit).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            self.write_failures += 1
            raise StateWriteError(f"{self.path}: {_describe(e)}") from None
        finally:
            if self.observe_write is not None:
                self.observe_write(time.perf_counter() - started)
        return rowids

    # -- sessions and their journal -------------------------------------------

    def load_rows(self) -> list[RowReading]:
        """Every stored session row, read as well as it can be (a row that
        does not parse still gives its backend: ``bridge.state.rows``)."""
        return [read_row(session_id, data) for session_id, data in self._db.execute(
            "SELECT session_id, data FROM sessions ORDER BY session_id")]

    def load_sessions(self) -> list[Session]:
        """Every stored session that can be restored."""
        return [row.session for row in self.load_rows() if row.session is not None]

    def next_session_id(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='next_session_id'").fetchone()
        try:
            return int(row[0]) if row else 1
        except ValueError:
            return 1

    def write(self, changes: list[SessionChange]) -> None:
        """Persister: each change's session row and journal row, and the next
        session id, in one transaction."""
        statements: list[tuple[str, tuple[Any, ...]]] = []
        journal_rows = []
        for change in changes:
            session = change.session
            if change.event is SessionEvent.ENDED:
                statements.append(("DELETE FROM sessions WHERE session_id = ?",
                                   (session.session_id,)))
                statements.append(("DELETE FROM tokens WHERE session_id = ?",
                                   (session.session_id,)))
            else:
                statements.append(("INSERT OR REPLACE INTO sessions (session_id, data) "
                                   "VALUES (?, ?)", (session.session_id,
                                                     session_to_json(session))))
            journal_rows.append(len(statements))
            statements.append((
                "INSERT INTO events (time, session_id, username, event, old_state, new_state,"
                " reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (change.time, session.session_id, session.username, change.event.value,
                 None if change.old_state is None else int(change.old_state),
                 None if change.new_state is None else int(change.new_state),
                 change.reason[:500])))
        statements.append(("INSERT OR REPLACE INTO meta (key, value) VALUES "
                           "('next_session_id', ?)", (str(changes[-1].next_session_id),)))
        rowids = self._transaction(statements)
        for change, index in zip(changes, journal_rows, strict=True):
            change.event_id = rowids[index]

    def append_event(self, time: float, username: str, event: str, reason: str,
                     session_id: int = 0) -> JournalEvent:
        """A journal row that is no session change (a failed logon, a
        lockout): session_id 0, no states. Raises StateWriteError."""
        [rowid] = self._transaction([(
            "INSERT INTO events (time, session_id, username, event, old_state, new_state, "
            "reason) VALUES (?, ?, ?, ?, NULL, NULL, ?)",
            (time, session_id, username, event, reason[:500]))])
        return JournalEvent(rowid, time, session_id, username, event, None, None, reason[:500])

    def events_after(self, after: int, limit: int = 1000) -> list[JournalEvent]:
        rows = self._db.execute(
            "SELECT id, time, session_id, username, event, old_state, new_state, reason "
            "FROM events WHERE id > ? ORDER BY id LIMIT ?", (after, limit)).fetchall()
        return [JournalEvent(*row) for row in rows]

    def last_event_id(self) -> int:
        row = self._db.execute("SELECT MAX(id) FROM events").fetchone()
        return int(row[0] or 0)

    def prune_events(self, older_than: float, keep_at_most: int,
                     keep_after: int | None = None) -> int:
        """Drop journal rows older than ``older_than`` (unix time) and any
        beyond the newest ``keep_at_most``, but none after ``keep_after``
        (the farm has not had those yet); returns how many went."""
        before = self._db.total_changes
        floor = keep_after if keep_after is not None else 2 ** 62
        self._transaction([
            ("DELETE FROM events WHERE time < ? AND id <= ?", (older_than, floor)),
            ("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ? AND id <= ?",
             (keep_at_most, floor)),
        ])
        return self._db.total_changes - before

    # -- tokens ---------------------------------------------------------------

    def load_tokens(self) -> list[TokenRecord]:
        records = []
        for row in self._db.execute(
                "SELECT digest, username, domain, permission, session_id, expires_at, lifetime "
                "FROM tokens"):
            try:
                records.append(TokenRecord(*row))
            except TypeError as e:  # pragma: no cover - the schema fixes the columns
                self.log.error("skipping unreadable token row: {error}", error=str(e))
        return records

    def token_changed(self, digest: str, record: TokenRecord | None) -> None:
        if record is None:
            self._transaction([("DELETE FROM tokens WHERE digest = ?", (digest,))])
        else:
            self._transaction([(
                "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.digest, record.username, record.domain, record.permission,
                 record.session_id, record.expires_at, record.lifetime))])


class SpawnRecords:
    """The SpawnLedger of ``bridge.backends.ledger`` in the state database:
    a row per backend process spawned and not seen exit."""

    log = Logger()

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def spawned(self, session_id: int, record: BackendRecord) -> None:
        self.store._transaction([(
            "INSERT OR REPLACE INTO backends (pid, start_ticks, session_id, data) "
            "VALUES (?, ?, ?, ?)", (record.pid, record.start_ticks, session_id,
                                    json.dumps(dataclasses.asdict(record), sort_keys=True)))])

    def gone(self, record: BackendRecord) -> None:
        try:
            self.store._transaction([("DELETE FROM backends WHERE pid = ? AND start_ticks = ?",
                                      (record.pid, record.start_ticks))])
        except StateWriteError as e:
            self.log.warn("backend pid {pid} exited, not recorded yet ({error}); the next start "
                          "will find it gone", pid=record.pid, error=str(e))

    def recorded(self) -> list[tuple[int, BackendRecord]]:
        found = []
        for pid, start_ticks, session_id, data in self.store._db.execute(
                "SELECT pid, start_ticks, session_id, data FROM backends ORDER BY pid"):
            try:
                record = BackendRecord.from_dict(json.loads(data))
            except (ValueError, TypeError) as e:
                # The process is still known by its columns: it is stopped
                # like any other, never left running for want of its details.
                self.log.error("backend row (pid {pid}) in {path} does not parse: {error}",
                               pid=pid, path=str(self.store.path), error=str(e)[:200])
                record = BackendRecord("unknown", int(pid), int(start_ticks), "")
            found.append((int(session_id), record))
        return found


def restore(store: StateStore, registry: SessionRegistry, now: float,
            ) -> tuple[list[Session], list[Session], list[TokenRecord]]:
    """Load what the last run left into ``registry`` (whose persister is
    ``store``). User sessions that had a client come back Disconnected until
    the RDP server reconnects them; greeter sessions, which had no user, end.
    Both are journaled like any change. Returns (user sessions restored,
    greeter sessions ended -- their backends are the caller's to stop, live
    tokens)."""
    log = Logger(namespace="bridge.state.store")
    # Before any write below: ids of ended sessions stay used.
    registry.restore_next_session_id(store.next_session_id())
    rows = store.load_rows()
    loaded = [row.session for row in rows if row.session is not None]
    for session in loaded:
        registry.restore(session)
    kept, dropped, unreadable = [], [], 0
    for row in rows:
        session = row.session or row.stray
        if row.note and session is not None:
            backend = session.backend
            log.error("state database {path}: session {session_id}'s row does not parse "
                      "({note}); {what}", path=str(store.path), session_id=session.session_id,
                      note=row.note, what="restored with what could be read" if row.session
                      else f"ended; its backend (pid {backend.pid}) is stopped if still "
                      f"running" if backend is not None else "ended; no backend found in it")
        if row.stray is not None:
            # Journaled like any end; the caller stops its backend (same process only).
            registry.restore(row.stray)
            registry.end(row.stray, "its state row could not be read")
            dropped.append(row.stray)
            unreadable += 1
    for session in loaded:
        if not session.logged_on:
            registry.end(session, "bridge restarted")
            dropped.append(session)
            continue
        if session.connection_id is not None or session.state is not ConnectState.DISCONNECTED:
            registry.disconnect(session, "bridge restarted")
        kept.append(session)
    tokens = []
    for record in store.load_tokens():
        expired = record.expires_at is not None and record.expires_at <= now
        orphan = record.session_id is not None and registry.get(record.session_id) is None
        if expired or orphan:
            store.token_changed(record.digest, None)
        else:
            tokens.append(record)
    if kept or tokens or dropped:
        log.info("restored {sessions} sessions and {tokens} tokens from {path} "
                 "({greeters} greeter sessions ended{unreadable})", sessions=len(kept),
                 tokens=len(tokens), greeters=len(dropped) - unreadable, path=str(store.path),
                 unreadable=f", {unreadable} sessions whose rows could not be read ended"
                 if unreadable else "")
    return kept, dropped, tokens

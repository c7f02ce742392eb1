"""Durable state in SQLite: sessions, the connection map and token digests,
so a restarted bridge (even after kill -9) knows them.

WAL mode with synchronous=NORMAL: a commit survives the process dying at
any point; only an OS crash or power loss may lose the last commits. Writes
happen on session events and token issue/revoke, not per OTS API call; each
is one small transaction (bench/state_writes.py measures what it costs);
checkpoints run in a worker thread.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

from twisted.logger import Logger

from bridge.sessions import ClientInfo, ConnectState, Session, SessionEvent, SessionRegistry
from bridge.tokens import TokenRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (session_id INTEGER PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    digest TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    domain TEXT NOT NULL,
    permission INTEGER NOT NULL,
    session_id INTEGER,
    expires_at REAL,
    lifetime REAL
);
"""


def _session_to_json(session: Session) -> str:
    data = dataclasses.asdict(session)
    data["state"] = int(session.state)
    return json.dumps(data, sort_keys=True)


def _session_from_json(text: str) -> Session:
    data = json.loads(text)
    data["state"] = ConnectState(data["state"])
    data["client"] = ClientInfo(**data["client"])
    return Session(**data)


class StateStore:
    """One SQLite database file; every method is one transaction."""

    log = Logger()

    def __init__(self, path: Path | str) -> None:
        self.path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Checkpoints fsync; left to SQLite they would run inside a commit on
        # the reactor thread now and then (~20 ms here). The service calls
        # checkpoint() from a worker thread instead.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(SCHEMA)
        if path != ":memory:":
            Path(path).chmod(0o600)
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
        self._db.close()

    # -- sessions -------------------------------------------------------------

    def load_sessions(self) -> list[Session]:
        rows = self._db.execute("SELECT data FROM sessions ORDER BY session_id").fetchall()
        return [_session_from_json(data) for (data,) in rows]

    def next_session_id(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='next_session_id'").fetchone()
        return int(row[0]) if row else 1

    def save_session(self, session: Session, next_session_id: int) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO sessions (session_id, data) VALUES (?, ?)",
                (session.session_id, _session_to_json(session)),
            )
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_session_id', ?)",
                (str(next_session_id),),
            )

    def delete_session(self, session_id: int) -> None:
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            self._db.execute("DELETE FROM tokens WHERE session_id = ?", (session_id,))

    def attach(self, registry: SessionRegistry) -> None:
        """Persist every change the registry makes from now on."""

        def changed(event: SessionEvent, session: Session) -> None:
            if event is SessionEvent.ENDED:
                self.delete_session(session.session_id)
            else:
                self.save_session(session, registry.next_session_id)

        registry.observe(changed)

    # -- tokens ---------------------------------------------------------------

    def load_tokens(self) -> list[TokenRecord]:
        rows = self._db.execute(
            "SELECT digest, username, domain, permission, session_id, expires_at, lifetime "
            "FROM tokens"
        ).fetchall()
        return [TokenRecord(*row) for row in rows]

    def token_changed(self, digest: str, record: TokenRecord | None) -> None:
        with self._db:
            self._db.execute("BEGIN")
            if record is None:
                self._db.execute("DELETE FROM tokens WHERE digest = ?", (digest,))
            else:
                self._db.execute(
                    "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (record.digest, record.username, record.domain, record.permission,
                     record.session_id, record.expires_at, record.lifetime),
                )


def restore(store: StateStore, registry: SessionRegistry, now: float) -> list[TokenRecord]:
    """Load what the last run left: sessions come back Disconnected until the
    RDP server reconnects them (greeters, which had no user, are dropped);
    returns the live tokens of live sessions and of logons."""
    log = Logger(namespace="bridge.state")
    # Before any save below rewrites it: ids of ended sessions stay used.
    registry.restore_next_session_id(store.next_session_id())
    kept = 0
    for session in store.load_sessions():
        if not session.logged_on:
            store.delete_session(session.session_id)
            continue
        if session.connection_id is not None:
            session.connection_id = None
            session.state = ConnectState.DISCONNECTED
            session.disconnect_time = now
            session.shadowing = None
        registry.restore(session)
        store.save_session(session, registry.next_session_id)
        kept += 1
    tokens = []
    for record in store.load_tokens():
        expired = record.expires_at is not None and record.expires_at <= now
        orphan = record.session_id is not None and registry.get(record.session_id) is None
        if expired or orphan:
            store.token_changed(record.digest, None)
        else:
            tokens.append(record)
    if kept or tokens:
        log.info("restored {sessions} sessions and {tokens} tokens from {path}",
                 sessions=kept, tokens=len(tokens), path=str(store.path))
    return tokens

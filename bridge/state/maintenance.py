"""The state database from outside the bridge: check it, back it up while
the bridge runs, restore a backup while it does not (``icp-bridge state``).

A ``cp`` of a running bridge's database is not a backup: the last changes
sit in the write-ahead log (``state.sqlite3-wal``) beside it, and a copy
taken during a checkpoint may be torn. ``backup`` uses SQLite's online
backup API instead: one consistent snapshot, read beside the running
bridge's writes, made a single self-contained file (rollback journal mode).
``check`` tells a copy taken from a running bridge (the bridge marks its
database open and unmarks it when it closes it) from a backup.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from bridge.endpoints import StartupError
from bridge.sessions.model import process_start_ticks
from bridge.state.lock import RESTORE, StateDirectoryBusyError, StateDirectoryLock
from bridge.state.rows import session_from_json
from bridge.state.schema import latest, version_of
from bridge.state.store import OPENED_BY, TABLES
from bridge.state.trust import backup_problem

#: meta rows a backup carries: when it was taken, and of which file.
BACKUP_TIME = "backup_time"
BACKUP_OF = "backup_of"
#: meta rows a restored database carries instead: from what, and when.
RESTORED_FROM = "restored_from"
RESTORED_TIME = "restored_time"


class MaintenanceError(Exception):
    """One line for the operator."""


def _describe(error: sqlite3.Error) -> str:
    return str(error) or type(error).__name__


def _wal(path: Path) -> Path:
    return Path(f"{path}-wal")


def opened_by(db: sqlite3.Connection) -> tuple[int, int] | None:
    """(pid, start ticks) of the bridge that has the database open, as its
    meta row says (None when no bridge has it open)."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (OPENED_BY,)).fetchone()
    except sqlite3.Error:
        return None
    if row is None:
        return None
    pid, _, ticks = str(row[0]).partition(":")
    try:
        return int(pid), int(ticks)
    except ValueError:
        return None


def running_bridge(path: Path) -> int | None:
    """The pid of a bridge that has the database at ``path`` open now, if
    any: the pid of its meta row, alive and the same process (its start
    time), so that a pid reused after a kill -9 does not count."""
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        owner = opened_by(db)
    finally:
        db.close()
    if owner is None or process_start_ticks(owner[0]) != owner[1]:
        return None
    return owner[0]


@dataclass
class Inspection:
    """``problems``: why the file is not sound (empty: sound); ``notes``:
    what else an operator wants to know about it."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def inspect(path: Path) -> Inspection:
    """Check the state database at ``path`` read-only: integrity, tables,
    rows, schema version, and whether it is a copy taken from a running
    bridge without its write-ahead log."""
    found = Inspection()
    if not path.exists():
        found.problems.append(f"{path} does not exist")
        return found
    # Before opening: opening a WAL database makes a -wal file.
    had_wal = _wal(path).exists()
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        found.problems.append(f"cannot open {path}: {_describe(e)}")
        return found
    try:
        _inspect(db, path, had_wal, found)
    except sqlite3.DatabaseError as e:
        found.problems.append(f"{path} is not a usable SQLite database: {_describe(e)}")
    finally:
        db.close()
    return found


def _inspect(db: sqlite3.Connection, path: Path, had_wal: bool, found: Inspection) -> None:
    result = [row[0] for row in db.execute("PRAGMA integrity_check")]
    if result != ["ok"]:
        found.problems += [f"integrity: {line}" for line in result[:20]]
    version = version_of(db)
    if version > latest():
        found.problems.append(f"schema version {version} is newer than this icp-bridge knows "
                              f"({latest()})")
    elif version < latest():
        found.notes.append(f"schema version {version}: the bridge migrates it to {latest()} "
                           f"when it starts")
    else:
        found.notes.append(f"schema version {version} (this icp-bridge's)")
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    # A database from before schema versions had its lockouts made later.
    expected = TABLES if version >= 1 else [t for t in TABLES if t != "lockouts"]
    found.problems += [f"table {name} is missing" for name in expected if name not in tables]
    if "sessions" in tables:
        for session_id, data in db.execute("SELECT session_id, data FROM sessions"):
            try:
                session_from_json(data)
            except (ValueError, TypeError, KeyError) as e:
                found.problems.append(f"session row {session_id} does not parse: "
                                      f"{str(e)[:100]} (a bridge keeps what it can read of it "
                                      f"and stops its backend)")
    if "meta" not in tables:
        return
    meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN (?, ?, ?, ?)",
                           (BACKUP_TIME, BACKUP_OF, RESTORED_FROM, RESTORED_TIME)).fetchall())
    if BACKUP_TIME in meta:
        found.notes.append(_backup_note(meta))
    if RESTORED_FROM in meta:
        found.notes.append(f"restored from {meta[RESTORED_FROM]} on "
                           f"{_local_time(meta.get(RESTORED_TIME))}")
    owner = opened_by(db)
    if owner is None:
        return
    alive = process_start_ticks(owner[0]) == owner[1]
    if had_wal:
        found.notes.append(
            f"in use by the running bridge (pid {owner[0]})" if alive else
            f"left open by a bridge that did not stop cleanly (pid {owner[0]}): read with its "
            f"write-ahead log {_wal(path).name}, as the next start will")
    else:
        found.problems.append(
            f"copied while a bridge had it open (pid {owner[0]}), without its write-ahead "
            f"log: its last changes may be missing or the copy torn; take copies with "
            f"`icp-bridge state backup`")


def _local_time(stamp: str | None) -> str:
    if stamp is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(stamp)))


def _backup_note(meta: dict[str, str]) -> str:
    return f"a backup of {meta.get(BACKUP_OF, '?')} taken {_local_time(meta.get(BACKUP_TIME))}"


def check(path: Path) -> list[str]:
    """What is wrong with the state database at ``path`` (empty: sound)."""
    return inspect(path).problems


def _private_temp(directory: Path, name: str) -> Path:
    """A new empty file, mode 0600, in ``directory``."""
    temp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    os.close(fd)
    return temp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(source: sqlite3.Connection, temp: Path, stamp: dict[str, str]) -> None:
    """One consistent snapshot of ``source`` into the file ``temp``, made a
    self-contained rollback-journal database whose meta rows say what it is
    (``stamp``: a backup's, or a restored database's), not what the source
    was."""
    target = sqlite3.connect(str(temp), isolation_level=None)
    try:
        source.backup(target)  # all pages in one step: one read transaction
        target.execute("PRAGMA journal_mode=DELETE")
        target.execute("DELETE FROM meta WHERE key IN (?, ?, ?, ?, ?)",
                       (OPENED_BY, BACKUP_TIME, BACKUP_OF, RESTORED_FROM, RESTORED_TIME))
        target.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", stamp.items())
    finally:
        target.close()


def backup(source: Path, target: Path, force: bool = False) -> Path | None:
    """Copy the state database at ``source`` to ``target`` (mode 0600) with
    SQLite's online backup API, consistent while a bridge writes to it.
    Refuses to replace an existing ``target`` unless ``force``. A missing
    directory for it is made (0700, as the state directory: a backup holds
    token digests and the journal), and returned; else None."""
    if not source.exists():
        raise MaintenanceError(f"no state database at {source}")
    if target.exists() and not force:
        raise MaintenanceError(f"{target} exists; --force replaces it")
    if target.is_dir():
        raise MaintenanceError(f"{target} is a directory; name a file")
    made = None
    try:
        if not target.parent.exists():
            target.parent.mkdir(parents=True, mode=0o700)
            made = target.parent
        temp = _private_temp(target.parent, target.name)
    except OSError as e:
        raise MaintenanceError(f"cannot write in {target.parent}: {e.strerror}") from None
    try:
        db = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            _copy(db, temp, {BACKUP_TIME: repr(time.time()), BACKUP_OF: str(source)})
        finally:
            db.close()
        _fsync(temp)
        if force:
            os.replace(temp, target)
        else:
            os.link(temp, target)  # fails, rather than replaces, if it appeared meanwhile
    except sqlite3.Error as e:
        raise MaintenanceError(f"backup of {source} failed: {_describe(e)}") from None
    except FileExistsError:
        raise MaintenanceError(f"{target} exists; --force replaces it") from None
    finally:
        temp.unlink(missing_ok=True)
    return made


def restore(backup_file: Path, live: Path) -> Path | None:
    """Put ``backup_file`` in place of the state database ``live`` while no
    bridge runs: checked first; the database it replaces (with its
    write-ahead log, which must not be applied to the restored file) is kept
    as ``<live>.before-restore``. Returns that path (None if there was no
    database)."""
    # Held while the file is replaced: a bridge starting meanwhile is refused.
    try:
        lock = StateDirectoryLock.claim(live.parent, RESTORE)
    except StateDirectoryBusyError as e:
        who = f" (pid {e.holder_pid})" if e.holder_pid is not None else ""
        raise MaintenanceError(f"a bridge{who} has {live} open (it holds {e.lock}): stop it "
                               f"first (systemctl stop icp-bridge)") from None
    except StartupError as e:
        raise MaintenanceError(str(e)) from None
    try:
        return _restore(backup_file, live)
    finally:
        lock.release()


def _restore(backup_file: Path, live: Path) -> Path | None:
    pid = running_bridge(live)  # a bridge of a version before the state directory's lock
    if pid is not None:
        raise MaintenanceError(f"a bridge (pid {pid}) has {live} open: stop it first "
                               f"(systemctl stop icp-bridge)")
    # Checked before it is read: a backup another user could write (or swap
    # in its directory) would become root's word on what to signal and remove.
    problem = backup_problem(backup_file)
    if problem is not None:
        raise MaintenanceError(f"not restoring {backup_file}: {problem}")
    found = inspect(backup_file)
    if found.problems:
        raise MaintenanceError(f"{backup_file} is not sound: {found.problems[0]}")
    temp = _private_temp(live.parent, live.name)
    try:
        db = sqlite3.connect(f"file:{backup_file}?mode=ro", uri=True)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN (?, ?)",
                                   (BACKUP_TIME, BACKUP_OF)).fetchall())
            origin = f"{backup_file} ({_backup_note(meta)})" if BACKUP_TIME in meta \
                else str(backup_file)
            # The live database is no backup any more: it says it was restored.
            _copy(db, temp, {RESTORED_FROM: origin, RESTORED_TIME: repr(time.time())})
        finally:
            db.close()
        _fsync(temp)
        kept = None
        if live.exists():
            kept = Path(f"{live}.before-restore")
            # The old database with its -wal, so that the log cannot meet the new file.
            stale = sqlite3.connect(f"file:{live}?mode=ro", uri=True)
            try:
                target = sqlite3.connect(str(kept))
                try:
                    stale.backup(target)
                finally:
                    target.close()
            finally:
                stale.close()
            os.chmod(kept, 0o600)
        for leftover in (_wal(live), Path(f"{live}-shm")):
            leftover.unlink(missing_ok=True)
        os.replace(temp, live)
    except sqlite3.Error as e:
        raise MaintenanceError(f"restore of {backup_file} failed: {_describe(e)}") from None
    finally:
        temp.unlink(missing_ok=True)
    return kept

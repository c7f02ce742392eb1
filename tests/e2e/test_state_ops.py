"""The state database as an operator keeps it: a schema version with
ordered migrations, ``state backup`` consistent while the bridge runs,
``state check`` telling a ``cp`` of a running database from a backup,
``state restore`` refused while a bridge has the database open, and rows
that do not parse never orphaning a desktop."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs

from bridge.endpoints import StartupError
from bridge.security.auth import InMemoryAuthenticator
from bridge.service import BridgeService
from bridge.sessions.model import ConnectState
from bridge.state import schema
from bridge.state.lock import RESTORE, StateDirectoryBusyError, StateDirectoryLock
from bridge.state.maintenance import MaintenanceError, backup, inspect, restore
from bridge.state.store import StateStore
from tests.conftest import alive, kill_process_groups, make_config, start_bridge

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=60)


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def exited(pid: int) -> Deferred[None]:
    """Fires when process ``pid`` has exited (a pidfd turns readable)."""
    d: Deferred[None] = Deferred()
    fd = os.pidfd_open(pid)

    class Reader:
        def fileno(self) -> int:
            return fd

        def doRead(self) -> None:
            reactor.removeReader(self)
            os.close(fd)
            d.callback(None)

        def connectionLost(self, reason: Any) -> None:
            pass

        def logPrefix(self) -> str:
            return "exited"

    reactor.addReader(Reader())
    return d


# -- schema -----------------------------------------------------------------------------

def test_a_new_database_gets_the_latest_schema_with_a_log_line(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with capturedLogs() as events:
        StateStore(path).close()
    assert user_version(path) == schema.latest() >= 1
    assert any(e.get("version") == 1 and "schema" in e["log_format"] for e in events)
    with capturedLogs() as events:
        StateStore(path).close()
    assert not any("schema" in e["log_format"] for e in events), "nothing to migrate"


def test_a_database_of_0_1_is_stamped_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE sessions (session_id INTEGER PRIMARY KEY, data TEXT NOT NULL);
        INSERT INTO meta VALUES ('next_session_id', '8');
    """)
    db.close()
    assert user_version(path) == 0
    store = StateStore(path)
    assert store.next_session_id() == 8
    store.close()
    assert user_version(path) == schema.latest()
    assert not Path(f"{path}.schema-0").exists(), "version 0 is only stamped"


def test_migrations_run_in_order_after_a_copy_and_a_failed_one_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.sqlite3"
    StateStore(path).close()
    applied: list[int] = []

    def step(version: int, sql: str) -> schema.Migration:
        def apply(db: sqlite3.Connection) -> None:
            applied.append(version)
            db.execute(sql)
        return schema.Migration(version, f"step {version}", apply)

    # The steps come after the shipped migrations (the farm's outbox is 2).
    n = schema.latest()
    monkeypatch.setattr(schema, "MIGRATIONS", [
        *schema.MIGRATIONS, step(n + 1, "CREATE TABLE two (x)"),
        step(n + 2, "CREATE TABLE three (x)")])
    StateStore(path).close()
    assert applied == [n + 1, n + 2] and user_version(path) == n + 2
    assert user_version(Path(f"{path}.schema-{n}")) == n, "the version before, kept"
    monkeypatch.setattr(schema, "MIGRATIONS", [
        *schema.MIGRATIONS, step(n + 3, "CREATE TABLE four (x)"),
        step(n + 4, "NOT SQL AT ALL")])
    with pytest.raises(StartupError, match=rf"migration to schema {n + 4} \(step {n + 4}\) "
                                           r"failed \(near"):
        StateStore(path)
    assert user_version(path) == n + 3, "each migration is its own transaction"
    db = sqlite3.connect(path)
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert "four" in tables


def test_a_newer_schema_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    StateStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StartupError) as raised:
        StateStore(path)
    text = str(raised.value)
    assert "\n" not in text and "schema version 99, newer than this icp-bridge knows" in text
    assert "schema version 99 is newer" in inspect(path).problems[0]


# -- backup, check, restore -------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_backup_while_running_check_tells_it_from_a_cp_and_restore(
        short_dir: Path) -> None:
    live = short_dir / "state" / "state.sqlite3"
    bridge = await start_bridge(short_dir)
    pids: list[int] = []
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        pids = bridge.backend_pids()
        assert Path(f"{live}-wal").exists(), "the running bridge's changes are in its WAL"
        # What an operator might do: cp the file. The copy is marked open, has no WAL.
        shutil.copy(live, short_dir / "cp.sqlite3")
        copied = cli("state", "check", str(short_dir / "cp.sqlite3"))
        assert copied.returncode == 1
        assert "copied while a bridge had it open" in copied.stdout
        # The right way, while the bridge keeps writing.
        target = short_dir / "backups" / "backup.sqlite3"  # a directory made for it
        result = cli("state", "backup", str(target), "--state", str(live.parent))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == f"created {target.parent} (mode 0700)"
        assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
        await peer.logon(3, "guest", "guest-pw")  # after the backup: not in it
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        checked = cli("state", "check", str(target))
        assert checked.returncode == 0, checked.stdout
        assert f"a backup of {live} taken" in checked.stdout and "sound" in checked.stdout
        assert not Path(f"{target}-wal").exists(), "a self-contained file"
        saved = StateStore(target)  # (a copy of the backup, to read it)
        assert sorted(s.username for s in saved.load_sessions()) == ["alice", "bob"]
        saved.close()
        shutil.copy(target, short_dir / "backup2.sqlite3")  # the backup's own copy, sound
        assert cli("state", "backup", str(short_dir / "backup2.sqlite3"), "--state",
                   str(live.parent)).returncode == 1, "no overwrite without --force"
        assert cli("state", "backup", str(short_dir / "backup2.sqlite3"), "--force",
                   "--state", str(live.parent)).returncode == 0
        # The live database, with its WAL, is sound and says who has it open.
        running = cli("state", "check", str(live))
        assert running.returncode == 0 and f"in use by the running bridge (pid {os.getpid()})" \
            in running.stdout
        refused = cli("state", "restore", str(short_dir / "backup2.sqlite3"), "--state",
                      str(live.parent))
        assert refused.returncode == 1 and f"a bridge (pid {os.getpid()}) has" in refused.stderr
    finally:
        await bridge.stop(kill_backends=False)
    kept = restore(short_dir / "backup2.sqlite3", live)
    assert kept == Path(f"{live}.before-restore") and not Path(f"{live}-wal").exists()
    # The live database says it was restored (from what), not that it is a backup.
    checked = cli("state", "check", "--state", str(live.parent))
    assert checked.returncode == 0, checked.stdout
    notes = checked.stdout.splitlines()
    assert notes[0] == f"{live}: schema version {schema.latest()} (this icp-bridge's)"
    assert notes[1].startswith(f"{live}: restored from {short_dir}/backup2.sqlite3 (a backup "
                               f"of {live} taken ")
    assert not any(": a backup of" in note for note in notes)
    again = await start_bridge(short_dir)
    try:
        # backup2 was taken again (--force) after guest's logon.
        assert sorted(s.username for s in again.service.registry) == ["alice", "bob", "guest"]
    finally:
        await again.stop()
        kill_process_groups(pids)


def test_backup_and_restore_say_why_they_refuse(tmp_path: Path) -> None:
    with pytest.raises(MaintenanceError, match="no state database"):
        backup(tmp_path / "none.sqlite3", tmp_path / "b.sqlite3")
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"x" * 4096)
    with pytest.raises(MaintenanceError, match="is not sound"):
        restore(bad, tmp_path / "live.sqlite3")
    assert not (tmp_path / "live.sqlite3").exists()


# -- rows that do not parse -------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_unreadable_row_never_orphans_a_desktop(short_dir: Path) -> None:
    first = await start_bridge(short_dir)
    peer = await first.peer()
    await peer.logon(1, "alice", "alice-pw")
    await peer.logon(2, "bob", "bob-pw")
    alice = first.service.registry.by_connection(1)
    bob = first.service.registry.by_connection(2)
    pids = first.backend_pids()
    await first.stop(kill_backends=False)
    db = sqlite3.connect(short_dir / "state" / "state.sqlite3")
    rows = dict(db.execute("SELECT session_id, data FROM sessions"))
    # alice's row: fields that do not matter are damaged; bob's: cut short, no JSON any more.
    damaged = json.loads(rows[alice.session_id])
    damaged["client"] = "garbage"
    damaged["domain"] = 5
    db.execute("UPDATE sessions SET data = ? WHERE session_id = ?",
               (json.dumps(damaged), alice.session_id))
    text = rows[bob.session_id]
    cut = text[:text.index('"start_ticks"')] + text[text.index('"start_ticks"'):].split(",")[0]
    assert json.loads(text)["backend"]["pid"] == bob.backend.pid and '"pid"' in cut
    db.execute("UPDATE sessions SET data = ? WHERE session_id = ?", (cut, bob.session_id))
    db.commit()
    db.close()
    bob_gone = exited(bob.backend.pid)
    with capturedLogs() as events:
        second = await start_bridge(short_dir)
    try:
        registry = second.service.registry
        restored = registry.get(alice.session_id)
        assert restored is not None and restored.state is ConnectState.DISCONNECTED
        assert restored.backend.pid == alice.backend.pid and restored.domain == ""
        assert alice.backend.pid in [b.pid for b in second.service.launcher.running()]
        assert registry.get(bob.session_id) is None
        await bob_gone  # stopped: no orphan
        assert alive(alice.backend.pid)
        logged = [e["log_format"].format(**e) for e in events
                  if "does not parse" in e.get("log_format", "")]
        assert len(logged) == 2
        assert "restored with what could be read" in logged[0]
        assert f"its backend (pid {bob.backend.pid}) is stopped" in logged[1]
        ended = [e for e in second.service.store.events_after(0)
                 if e.session_id == bob.session_id and e.event == "ended"]
        assert ended[-1].reason == "its state row could not be read"
        summary = [e["log_format"].format(**e) for e in events
                   if e.get("log_format", "").startswith("restored {sessions}")]
        assert summary and summary[0].endswith(
            "(0 greeter sessions ended, 1 sessions whose rows could not be read ended)")
    finally:
        await second.stop()
        kill_process_groups(pids)


def test_the_state_directory_is_held_by_one_at_a_time(short_dir: Path) -> None:
    """A bridge made while ``state restore`` holds the directory is refused
    before it opens the database, naming the restore; released, the
    directory is the next one's. (Two real bridges: test_twistd.py.)"""
    state = short_dir / "state"
    restoring = StateDirectoryLock.claim(state, RESTORE)
    assert (state / "state.lock").read_text() == f"{os.getpid()} {RESTORE}\n"
    with pytest.raises(StateDirectoryBusyError) as refused:
        BridgeService(make_config(short_dir), reactor, authenticator=InMemoryAuthenticator({}))
    assert str(refused.value) == (
        f"state_dir: {state} is in use by {RESTORE} (pid {os.getpid()}), which holds "
        f"{state}/state.lock; each bridge needs a state_dir of its own")
    assert not (state / "state.sqlite3").exists(), "refused before the database was opened"
    restoring.release()
    held = StateDirectoryLock.claim(state)
    assert held.held and (state / "state.lock").read_text() == f"{os.getpid()} icp-bridge\n"
    held.release()

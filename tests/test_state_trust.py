"""The state database is root's word on what to signal and remove (red-team
finding 12): a state_dir, a database file or a backup another user could
write is refused; a ledger record names only the bridge's own output files
and only a process of the uid it was spawned as, with a start time.

Real directories, files and processes; the other user is the suite's
``icpbtest`` account (created when missing, as the e2e tests do)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs

from bridge.backends.launcher import BackendLauncher
from bridge.backends.ledger import MemoryLedger
from bridge.backends.logs import BackendLogs
from bridge.backends.orphans import Orphans, process_uid, same_process
from bridge.config import Config
from bridge.endpoints import StartupError
from bridge.preflight import preflight
from bridge.sessions.model import BackendRecord, process_start_ticks
from bridge.state.maintenance import MaintenanceError, backup, restore
from bridge.state.store import StateStore
from tests.conftest import STANDIN_BACKEND
from tests.e2e.test_backends import ensure_test_account, module
from tests.test_ogon_helpers import context

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another user's files)")


@pytest.fixture
def other() -> pwd.struct_passwd:
    return pwd.getpwnam(ensure_test_account())


def config_for(tmp_path: Path, state: Path) -> Config:
    return Config(state_dir=state, users_file=tmp_path / "users", pipe_dir=tmp_path / "pipes",
                  backend_log_dir=tmp_path / "logs",
                  thrift_endpoint="ssl:9091:interface=127.0.0.1",
                  properties={"ssl.certificate": str(tmp_path / "c.crt"),
                              "ssl.key": str(tmp_path / "c.key")})


def state_dir_errors(tmp_path: Path, state: Path) -> list[str]:
    found = preflight(config_for(tmp_path, state), as_root=True)
    return [str(p) for p in found.errors if "state_dir" in str(p)]


# -- state_dir -------------------------------------------------------------------------------

def test_a_state_dir_others_could_write_is_refused_at_start_and_by_config_check(
        tmp_path: Path, other: pwd.struct_passwd) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)  # the review's mis-set directory
    with pytest.raises(StartupError, match=r"state_dir: directory .* mode 0777\) may be written"):
        StateStore(state / "state.sqlite3")
    assert not (state / "state.sqlite3").exists(), "refused before anything is opened"
    assert len(state_dir_errors(tmp_path, state)) == 1
    # Another user's, even 0700: they could chmod it or swap the database.
    state.chmod(0o700)
    os.chown(state, other.pw_uid, other.pw_gid)
    with pytest.raises(StartupError, match=f"uid {other.pw_uid}"):
        StateStore(state / "state.sqlite3")
    assert len(state_dir_errors(tmp_path, state)) == 1
    # A symlink to a sound directory: refused (it can be pointed elsewhere).
    os.chown(state, 0, 0)
    link = tmp_path / "link"
    link.symlink_to(state)
    with pytest.raises(StartupError, match="is not a directory"):
        StateStore(link / "state.sqlite3")
    # Sound: root's, 0700; then a database file another user owns is refused.
    store = StateStore(state / "state.sqlite3")
    store.close()
    assert state_dir_errors(tmp_path, state) == []
    os.chown(state / "state.sqlite3", other.pw_uid, other.pw_gid)
    with pytest.raises(StartupError, match=r"state.sqlite3 .* may be written by others"):
        StateStore(state / "state.sqlite3")
    assert len(state_dir_errors(tmp_path, state)) == 1


def test_a_state_dir_under_a_directory_another_user_owns_is_refused(
        tmp_path: Path, other: pwd.struct_passwd) -> None:
    """They could rename the sound directory away and put theirs in its place."""
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chown(home, other.pw_uid, other.pw_gid)
    with pytest.raises(StartupError, match=f"{home} \\(uid {other.pw_uid}.* above it"):
        StateStore(home / "state" / "state.sqlite3")
    assert len(state_dir_errors(tmp_path, home / "state")) == 1
    # A sticky world-writable directory above it (/tmp) is fine: only the
    # owner of an entry may rename it there.
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    store = StateStore(sticky / "state" / "state.sqlite3")
    store.close()
    assert (sticky / "state").stat().st_mode & 0o7777 == 0o700, "made 0700"


def test_a_missing_state_dir_is_made_0700_and_config_check_says_nothing(tmp_path: Path) -> None:
    state = tmp_path / "a" / "state"
    assert state_dir_errors(tmp_path, state) == []
    store = StateStore(state / "state.sqlite3")
    store.close()
    assert state.stat().st_mode & 0o7777 == 0o700


# -- state restore ---------------------------------------------------------------------------

@pytest.fixture
def a_backup(tmp_path: Path) -> Path:
    live = tmp_path / "made" / "state.sqlite3"
    StateStore(live).close()
    target = tmp_path / "backup.sqlite3"
    backup(live, target)
    return target


def test_restore_refuses_a_backup_others_could_write_or_swap(
        tmp_path: Path, a_backup: Path, other: pwd.struct_passwd) -> None:
    live = tmp_path / "state" / "state.sqlite3"
    a_backup.chmod(0o666)
    with pytest.raises(MaintenanceError, match=r"not restoring .* mode 0666"):
        restore(a_backup, live)
    a_backup.chmod(0o600)
    os.chown(a_backup, other.pw_uid, other.pw_gid)
    with pytest.raises(MaintenanceError, match=f"uid {other.pw_uid}"):
        restore(a_backup, live)
    os.chown(a_backup, 0, 0)
    # In a directory others may write to (no sticky bit): it could be swapped.
    drop = tmp_path / "drop"
    drop.mkdir()
    drop.chmod(0o777)
    shutil.copy2(a_backup, drop / "backup.sqlite3")
    with pytest.raises(MaintenanceError, match=f"the directory {drop} .* may be written by"):
        restore(drop / "backup.sqlite3", live)
    assert not live.exists()
    # The command says the same and exits 1.
    result = subprocess.run([sys.executable, "-m", "bridge.cli", "state", "restore",
                             str(drop / "backup.sqlite3"), "--state", str(live.parent)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not restoring" in result.stderr, result
    # Sticky (as /tmp), a root-owned 0600 file: restored.
    drop.chmod(0o1777)
    assert restore(drop / "backup.sqlite3", live) is None and live.exists()


# -- the spawn ledger's records --------------------------------------------------------------

@pytest.fixture
def root_sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process of root's, leading its own group, that nothing should stop."""
    child = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield child
    if child.poll() is None:
        child.kill()
    child.wait()


async def settle(orphans: Orphans, d: Deferred[None]) -> None:
    await d
    # A turn for a signal sent, if any was (none should be).
    await deferLater(reactor, 0.05)


@pytest_twisted.ensureDeferred
async def test_a_record_naming_root_s_process_under_another_uid_is_not_signalled(
        tmp_path: Path, root_sleeper: subprocess.Popen[bytes],
        other: pwd.struct_passwd) -> None:
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir(mode=0o700)
    ticks = process_start_ticks(root_sleeper.pid)
    assert ticks
    ledger = MemoryLedger()
    logs = BackendLogs(reactor, reactor, logs_dir)
    orphans = Orphans(reactor, reactor, ledger, logs)
    try:
        # As a desktop of icpbtest's it was recorded; root's process has its pid now.
        record = BackendRecord("xsession", root_sleeper.pid, ticks, "", uid=other.pw_uid)
        ledger.spawned(7, record)
        assert process_uid(root_sleeper.pid) == 0 and not same_process(record)
        with capturedLogs() as events:
            await settle(orphans, orphans.stop(7, record, 0.1, "no session owns it"))
        assert root_sleeper.poll() is None, "root's process still runs"
        assert ledger.recorded() == [], "the record is forgotten"
        said = [e for e in events if "not stopping pid" in e.get("log_format", "")]
        assert said and said[0]["found"] == 0 and said[0]["uid"] == other.pw_uid
        # No start time: never a match, whatever the pid.
        no_ticks = BackendRecord("xsession", root_sleeper.pid, 0, "", uid=0)
        assert not same_process(no_ticks)
        await settle(orphans, orphans.stop(7, no_ticks, 0.1, "no session owns it"))
        assert root_sleeper.poll() is None
        # A ledger row that does not say whose (an older version's, or forged
        # without it) never makes root signal root's process.
        unknown = BackendRecord("xsession", root_sleeper.pid, ticks, "")
        ledger.spawned(7, unknown)
        with capturedLogs() as events:
            await settle(orphans, orphans.stop(7, unknown, 0.1, "no session owns it",
                                               from_ledger=True))
        assert root_sleeper.poll() is None and ledger.recorded() == []
        assert any("does not say whose" in e.get("log_format", "") for e in events)
        # Recorded as root's (as the bridge records a greeter it runs as root): stopped.
        mine = BackendRecord("greeter", root_sleeper.pid, ticks, "", uid=0)
        assert same_process(mine)
        await orphans.stop(7, mine, 5.0, "no session owns it")
        assert root_sleeper.wait(5) == -signal.SIGTERM
    finally:
        orphans.close()
        logs.close()


@pytest_twisted.ensureDeferred
async def test_a_record_s_log_path_outside_backend_log_dir_is_never_removed(
        tmp_path: Path, root_sleeper: subprocess.Popen[bytes]) -> None:
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir(mode=0o700)
    victims = [tmp_path / "victim-root-file", logs_dir / "not-a-backend-log",
               logs_dir / ".." / "logs-neighbour.log"]
    for victim in victims:
        victim.write_text("root's data\n")
        victim.chmod(0o600)
    ledger = MemoryLedger()
    logs = BackendLogs(reactor, reactor, logs_dir)
    orphans = Orphans(reactor, reactor, ledger, logs)
    try:
        with capturedLogs() as events:
            for victim in victims:
                # A process that is gone: its record's file is released at once.
                orphans.stop(3, BackendRecord("xsession", 999_999_999, 1, "", str(victim),
                                              uid=0), 0.1, "gone")
            ticks = process_start_ticks(root_sleeper.pid)
            assert ticks
            await orphans.stop(3, BackendRecord("xsession", root_sleeper.pid, ticks, "",
                                                str(victims[0]), uid=0), 5.0, "no session")
        assert all(victim.read_text() == "root's data\n" for victim in victims)
        assert logs.files() == [], "none of them is bounded (truncated) either"
        refused = [e for e in events if "not following or removing" in e.get("log_format", "")]
        assert {e["path"] for e in refused} == {str(v) for v in victims}
        # The bridge's own file in that directory still goes.
        own, fd = logs.create(3, "xsession")
        os.close(fd)
        logs.release_path(str(own))
        assert not own.exists()
    finally:
        orphans.close()
        logs.close()


@pytest_twisted.ensureDeferred
async def test_a_spawned_backend_is_recorded_with_its_uid_and_adopted_only_under_it(
        other: pwd.struct_passwd) -> None:
    # A directory the account can reach, with a stand-in backend it can read.
    open_dir = Path(tempfile.mkdtemp(prefix="ib-", dir="/tmp"))
    open_dir.chmod(0o755)
    shutil.copy(STANDIN_BACKEND, open_dir / "standin_backend.py")
    (open_dir / "standin_backend.py").chmod(0o644)
    logs_dir = open_dir / "logs"
    logs_dir.mkdir(mode=0o700)
    pipes = open_dir / "pipes"
    pipes.mkdir()
    pipes.chmod(0o1777)
    launcher = BackendLauncher(reactor, reactor, pipes, logs_dir, as_root=True)
    desktop = module(open_dir, "desktop", user=other.pw_name)
    try:
        backend = await launcher.start(desktop, context(other.pw_name))  # ready: it runs as them
        try:
            assert backend.record.uid == other.pw_uid == process_uid(backend.pid)
            assert same_process(backend.record)
            claimed_root = BackendRecord("desktop", backend.pid, backend.record.start_ticks,
                                         "", uid=0)
            assert launcher.adopt(4, desktop, claimed_root) is None, "another uid: not adopted"
        finally:
            os.killpg(backend.pid, signal.SIGKILL)
            await backend.when_exited()
    finally:
        launcher.close()
        shutil.rmtree(open_dir, ignore_errors=True)

"""Bad days: a stale lock after kill -9, a corrupt or unwritable state
database, things planted at token paths, a full state disk, and password
checks that must not tell known users from unknown ones."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import capturedLogs

from bridge.endpoints import StartupError
from bridge.security.auth import UserEntry, UsersFileAuthenticator, hash_password, write_users
from bridge.sessions.model import ConnectState
from bridge.state.maintenance import check
from bridge.state.store import StateStore
from tests.conftest import TWISTD, make_config, plugin_args, start_bridge
from tests.e2e.otsapi_client import BlockingClient

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- the ICP socket's lock ------------------------------------------------------

def test_a_lock_left_by_kill_9_or_a_reused_pid_does_not_block(short_dir: Path) -> None:
    from bridge.endpoints import claim_unix_socket, lock_file_for

    sock = short_dir / "icp.sock"
    lock = lock_file_for(sock, short_dir)
    # A bridge killed with -9: its flock died with it, its socket file stays.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, socket, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"s = socket.socket(socket.AF_UNIX); s.bind({str(sock)!r}); s.listen(1)\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(StartupError, match="another icp-bridge is listening"):
        claim_unix_socket(sock, short_dir)
    holder.send_signal(signal.SIGKILL)
    os.waitid(os.P_PID, holder.pid, os.WEXITED | os.WNOWAIT)  # dead, and left unreaped
    # Claimed while the dead process is still a zombie: no pid is consulted.
    fd = claim_unix_socket(sock, short_dir)
    os.close(fd)
    holder.wait()
    # A pid left in the lock file that now belongs to another program (init).
    lock.write_text("1\n")
    os.close(claim_unix_socket(sock, short_dir))
    # Twisted's own pid-symlink lock from an older bridge is replaced.
    lock.unlink()
    lock.symlink_to("1")
    os.close(claim_unix_socket(sock, short_dir))
    assert not lock.is_symlink()


# -- the state database -----------------------------------------------------------

def test_a_corrupt_database_is_one_line_and_state_check_says_so(short_dir: Path) -> None:
    state = short_dir / "state"
    state.mkdir()
    (state / "state.sqlite3").write_bytes(os.urandom(8192))
    with pytest.raises(StartupError) as raised:
        make_service(short_dir)
    text = str(raised.value)
    assert "\n" not in text and "state.sqlite3" in text and "move it aside" in text
    result = cli("state", "check", str(state / "state.sqlite3"))
    assert result.returncode == 1 and "not a usable SQLite database" in result.stdout


def make_service(base: Path, **overrides: object) -> object:
    from twisted.internet import reactor

    from bridge.security.auth import InMemoryAuthenticator
    from bridge.service import BridgeService

    return BridgeService(make_config(base, **overrides), reactor,
                         authenticator=InMemoryAuthenticator({}))


def test_twistd_with_a_corrupt_database_prints_one_line(short_dir: Path) -> None:
    state = short_dir / "state"
    state.mkdir()
    (state / "state.sqlite3").write_bytes(b"not a database" * 100)
    result = subprocess.run(
        [*TWISTD, "-n", "--pidfile=",
         *plugin_args(short_dir / "bridge.toml", "--icp", f"unix:{short_dir}/icp.sock",
                      "--thrift", "tcp:0:interface=127.0.0.1", "--admin", "", "--state",
                      str(state))],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "state database" in result.stdout + result.stderr


def test_state_check_names_rows_that_do_not_parse(short_dir: Path) -> None:
    """(What a restart does with such rows: tests/e2e/test_state_ops.py.)"""
    store = StateStore(short_dir / "state.sqlite3")
    store._db.execute("INSERT INTO sessions VALUES (7, '{\"not\": \"a session\"}')")
    store._db.execute("INSERT INTO sessions VALUES (8, 'garbage')")
    assert store.load_sessions() == []
    store.close()
    problems = check(short_dir / "state.sqlite3")
    assert len(problems) == 2 and "session row 7 does not parse" in problems[0]
    fine = StateStore(short_dir / "fine.sqlite3")
    fine.close()
    assert check(short_dir / "fine.sqlite3") == []


def test_an_unusable_state_directory_is_one_line(short_dir: Path) -> None:
    (short_dir / "a-file").write_text("not a directory")
    with pytest.raises(StartupError) as raised:
        make_service(short_dir, state_dir=short_dir / "a-file" / "state")
    text = str(raised.value)
    assert "\n" not in text and "a-file" in text


# -- token files planted by a local user --------------------------------------------

@pytest_twisted.ensureDeferred
async def test_planted_token_files_are_replaced_without_hanging(short_dir: Path) -> None:
    first = await start_bridge(short_dir)
    peer = await first.peer()
    for connection_id, user in enumerate(["alice", "bob", "guest"], 1):
        await peer.logon(connection_id, user, f"{user}-pw")
    await peer.logon(4, "alice", "alice-pw")  # takes alice's session over
    ids = [s.session_id for s in first.service.registry]
    await first.stop(kill_backends=False)
    tokens = short_dir / "tokens"
    for path in tokens.glob("ogon.session.*"):
        path.unlink()  # /tmp cleaned at boot
    os.mkfifo(tokens / f"ogon.session.{ids[0]}")  # would hang a blocking read
    with open(tokens / f"ogon.session.{ids[1]}", "wb") as f:
        f.truncate(8 * 1024**3)  # a sparse 8 GB file
    (tokens / f"ogon.session.{ids[2]}").mkdir()  # a directory in the way
    (tokens / f"ogon.session.{ids[2]}" / "x").write_text("keep")
    started = time.monotonic()
    second = await start_bridge(short_dir)
    try:
        assert time.monotonic() - started < 10, "no hang"
        for session_id in ids:
            path = tokens / f"ogon.session.{session_id}"
            assert path.is_file() and not path.is_symlink() and path.stat().st_size == 44
            token = path.read_text().strip()
            assert second.service.tokens.lookup(token).session_id == session_id
        assert [p.name for p in tokens.glob("*.planted-*")] != [], \
            "the planted directory was moved aside, not deleted"
    finally:
        await second.stop()


# -- a full state disk ---------------------------------------------------------------

@pytest.fixture
def tiny_disk() -> object:
    """A 1 MiB tmpfs to fill (root only: mounting needs it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = Path(f"/tmp/ib-disk-{os.getpid()}")
    mount.mkdir(exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
    shutil.rmtree(mount, ignore_errors=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest_twisted.ensureDeferred
async def test_a_full_disk_fails_the_logon_and_acknowledges_nothing_lost(
        short_dir: Path, tiny_disk: Path) -> None:
    state = tiny_disk / "state"
    bridge = await start_bridge(short_dir, state_dir=state)
    acknowledged = []
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        acknowledged.append(bridge.service.registry.by_connection(1).session_id)
        filler = fill(tiny_disk)
        refused = 0
        with capturedLogs() as events:
            for connection_id in range(2, 8):
                try:
                    r = await peer.logon(connection_id, "bob" if connection_id % 2 else "guest",
                                         "bob-pw" if connection_id % 2 else "guest-pw")
                except Exception as e:
                    assert "FAILED" in type(e).__name__ or "failed" in str(e)
                    refused += 1
                    continue
                session = bridge.service.registry.by_connection(connection_id)
                if session is not None and session.logged_on:
                    acknowledged.append(session.session_id)
                else:
                    assert r.serviceEndpoint.endswith("_greeter")
            client = BlockingClient(bridge.thrift_port)
            tokens = []
            for _ in range(5):
                r = await client.call("logonConnection", "alice", "alice-pw", "")
                assert r.success == bool(r.authToken)
                if r.success:
                    tokens.append(r.authToken)  # given only once stored
            assert await client.call("ping", 1) == 1, "and the bridge keeps serving"
            client.close()
        assert refused > 0, "logons that could not be stored failed"
        assert any("state write failed" in e.get("log_format", "") for e in events)
        filler.unlink()  # space again: writes succeed again
        r = await peer.logon(9, "guest", "guest-pw")
        acknowledged.append(bridge.service.registry.by_connection(9).session_id)
    finally:
        pids = bridge.backend_pids()
        await bridge.stop(kill_backends=False)
    again = await start_bridge(short_dir, state_dir=state)
    try:
        restored = {s.session_id for s in again.service.registry}
        assert set(acknowledged) <= restored, "every acknowledged session survived"
        assert all(s.state is ConnectState.DISCONNECTED for s in again.service.registry)
        assert all(again.service.tokens.lookup(t) is not None for t in tokens), \
            "every token given out survived"
    finally:
        await again.stop()
        from tests.conftest import kill_process_groups

        kill_process_groups(pids)


# -- password checks ------------------------------------------------------------------

def test_unknown_users_take_as_long_as_wrong_passwords(tmp_path: Path) -> None:
    users = tmp_path / "users"
    write_users(users, [UserEntry("alice", 0x1FF, hash_password("right", n=2**13))])
    auth = UsersFileAuthenticator(users)

    def timed(name: str) -> float:
        started = time.perf_counter()
        result: list[object] = []
        auth.authenticate(name, "wrong", "").addBoth(result.append)
        assert result == [None]
        return time.perf_counter() - started

    for _ in range(3):  # warm up
        timed("alice")
        timed("nobody")
    # Interleaved: a burst of load from elsewhere on the machine slows both alike.
    pairs = [(timed("alice"), timed("nobody")) for _ in range(25)]
    known = statistics.median(k for k, _ in pairs)
    unknown = statistics.median(u for _, u in pairs)
    assert 0.6 < unknown / known < 1.6, (known, unknown)


def test_sqlite_errors_become_state_write_errors(tmp_path: Path) -> None:
    from bridge.sessions.model import StateWriteError

    store = StateStore(tmp_path / "state.sqlite3")
    store._db.close()
    store._db = sqlite3.connect(f"file:{tmp_path / 'state.sqlite3'}?mode=ro", uri=True,
                                isolation_level=None)
    with pytest.raises(StateWriteError, match="readonly"):
        store.token_changed("d" * 64, None)

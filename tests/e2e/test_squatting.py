"""The ICP socket's path in a world-writable directory (issue 18, item 2):
what another local user plants there while the bridge is down is taken
back, never deferred to. The squatter is a real unprivileged process
(``icpbtest``), as the kernel's ownership rules are the point."""

from __future__ import annotations

import fcntl
import os
import pwd
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.logger import capturedLogs

from bridge.endpoints import StartupError
from tests.conftest import start_bridge
from tests.e2e.test_backends import TEST_USER, ensure_test_account

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: the squatter runs as another user")

#: Debian's python3: the squatter runs as another user, who may not read our venv.
PYTHON = "/usr/bin/python3"


@pytest.fixture
def sticky_dir(short_dir: Path) -> Iterator[Path]:
    """``short_dir`` as winpr makes /tmp/.pipe: mode 1777, owned by root."""
    ensure_test_account()
    short_dir.chmod(0o1777)
    yield short_dir


class Squatter:
    """A process of the test account: listens at ``path`` (and holds an
    flock on ``lock``, when given) until it is ended."""

    def __init__(self, path: Path, lock: Path | None = None, listen: bool = True) -> None:
        account = pwd.getpwnam(TEST_USER)
        code = ("import fcntl, os, socket, sys, time\n"
                "path, lock, listen = sys.argv[1], sys.argv[2], sys.argv[3] == '1'\n"
                "if lock:\n"
                "    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)\n"
                "    fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "if listen:\n"
                "    s = socket.socket(socket.AF_UNIX); s.bind(path); os.chmod(path, 0o777)\n"
                "    s.listen(8)\n"
                "print('ready', flush=True)\n"
                "if listen:\n"
                "    while True:\n"
                "        c, _ = s.accept(); c.sendall(b'squatter'); c.close()\n"
                "time.sleep(120)\n")
        self.process = subprocess.Popen(
            [PYTHON, "-c", code, str(path), str(lock or ""), "1" if listen else "0"],
            user=account.pw_uid, group=account.pw_gid, extra_groups=[], cwd="/",
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"
        self.uid = account.pw_uid

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def who_answers(path: Path) -> bytes:
    """What a client connecting to ``path`` reads first (the squatter
    greets)."""
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(0.5)
    try:
        client.connect(str(path))
        try:
            return client.recv(64)
        except TimeoutError:
            return b""
    finally:
        client.close()


@needs_root
@pytest_twisted.ensureDeferred
async def test_a_listener_of_another_user_at_the_icp_path_is_taken_back(sticky_dir: Path
                                                                         ) -> None:
    path = sticky_dir / "icp.sock"
    squatter = Squatter(path)
    try:
        assert who_answers(path) == b"squatter"
        with capturedLogs() as events:
            bridge = await start_bridge(sticky_dir)
        try:
            info = path.lstat()
            assert stat.S_ISSOCK(info.st_mode) and info.st_uid == 0, "the bridge's socket now"
            peer = await bridge.peer()  # the RDP server reaches the bridge, not the squatter
            await peer.logon(1, "alice", "alice-pw")
            assert bridge.service.registry.by_connection(1).logged_on
            lines = [e for e in events if e.get("log_level") is not None
                     and e["log_level"].name == "error" and "squatter_uid" in e]
            assert len(lines) == 1 and lines[0]["squatter_uid"] == squatter.uid, \
                "logged loudly, naming the owner's uid"
        finally:
            await bridge.stop()
    finally:
        squatter.stop()


@needs_root
@pytest_twisted.ensureDeferred
async def test_a_lock_file_of_another_user_does_not_stop_the_bridge(sticky_dir: Path) -> None:
    # Before the first start another user creates and holds the lock file
    # where the bridge used to keep it: next to the socket.
    path = sticky_dir / "icp.sock"
    squatter = Squatter(path, lock=Path(f"{path}.lock"), listen=False)
    try:
        bridge = await start_bridge(sticky_dir)
        try:
            from bridge.endpoints import lock_file_for

            assert bridge.service.icp_listener.port is not None
            lock = lock_file_for(path, sticky_dir / "run")
            assert lock.parent == sticky_dir / "run" and lock.stat().st_uid == 0
            assert stat.S_IMODE(lock.parent.stat().st_mode) == 0o755
        finally:
            await bridge.stop()
    finally:
        squatter.stop()


@needs_root
def test_a_lock_of_another_user_in_the_lock_dir_is_taken_back(sticky_dir: Path) -> None:
    """Should another user's lock file get into the lock directory (made
    0755 by an older setup, say), it is replaced, not deferred to."""
    from bridge.endpoints import claim_unix_socket, lock_file_for

    lock_dir = sticky_dir / "run"
    lock_dir.mkdir(mode=0o755)
    path = sticky_dir / "icp.sock"
    lock = lock_file_for(path, lock_dir)
    lock.write_text("")
    account = pwd.getpwnam(TEST_USER)
    os.chown(lock, account.pw_uid, account.pw_gid)
    with capturedLogs() as events:
        fd = claim_unix_socket(path, lock_dir)
    try:
        assert lock.stat().st_uid == 0
        assert any(e.get("owner_uid") == account.pw_uid for e in events)
        probe = os.open(lock, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(probe)
    finally:
        os.close(fd)


@needs_root
def test_a_live_socket_of_root_is_still_another_session_manager(sticky_dir: Path) -> None:
    """Root's (or the bridge's own user's) live socket is not a squatter:
    another session manager, refused as before."""
    from bridge.endpoints import claim_unix_socket

    path = sticky_dir / "icp.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    try:
        with pytest.raises(StartupError, match="another process is listening"):
            os.close(claim_unix_socket(path, sticky_dir / "run"))
        held = claim_unix_socket(sticky_dir / "other.sock", sticky_dir / "run")
        try:
            with pytest.raises(StartupError, match="another icp-bridge is listening"):
                claim_unix_socket(sticky_dir / "other.sock", sticky_dir / "run")
        finally:
            os.close(held)
    finally:
        listener.close()


def test_the_lock_lives_away_from_the_world_writable_directory(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    from bridge import config
    from bridge.endpoints import lock_file_for

    monkeypatch.setattr(config, "_running_as_root", lambda: True)
    assert config.default_lock_dir(tmp_path) == Path("/run/icp-bridge")
    monkeypatch.setattr(config, "_running_as_root", lambda: False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert config.default_lock_dir(tmp_path) == Path("/run/user/1000/icp-bridge")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert config.default_lock_dir(tmp_path) == tmp_path
    # Named after the socket's whole path, as systemd-escape --path names it.
    assert lock_file_for(Path("/tmp/.pipe/ogon_SessionManager"), Path("/run/icp-bridge")) == \
        Path("/run/icp-bridge/tmp-.pipe-ogon_SessionManager.lock")
    assert lock_file_for(Path("/tmp/a-b/x y"), Path("/r")).name == "tmp-a\\x2db-x\\x20y.lock"


@needs_root
def test_a_filled_directory_at_the_icp_path_is_moved_aside_unguessably(
        sticky_dir: Path) -> None:
    """The second review: a directory of another user at the ICP path was
    renamed to a name one could guess (``.squatted-<uid>-<pid>``), where a
    filled directory planted first made the rename fail and the bridge stop.
    Now it goes to a name no one can guess."""
    from bridge.endpoints import claim_unix_socket

    account = pwd.getpwnam(TEST_USER)
    path = sticky_dir / "icp.sock"
    planted = [path, *(path.with_name(f"{path.name}.squatted-{account.pw_uid}-{pid}")
                       for pid in (os.getpid(), *range(1, 50)))]
    for directory in planted:
        (directory / "inside").mkdir(parents=True)
        for made in (directory, directory / "inside"):
            os.chown(made, account.pw_uid, account.pw_gid)
    with capturedLogs() as events:
        fd = claim_unix_socket(path, sticky_dir / "run")
    try:
        assert not path.exists(), "the name is free for the bridge's socket"
        aside = [p.name for p in sticky_dir.iterdir() if ".aside-" in p.name]
        assert len(aside) == 1 and aside[0].startswith(".icp.sock.aside-")
        assert any(e.get("squatter_uid") == account.pw_uid for e in events)
    finally:
        os.close(fd)

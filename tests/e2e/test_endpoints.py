"""A backend's endpoint: ready when the backend's own socket appears, decided
from the file and never by connecting (ogon's Qt greeter accepts exactly
one connection), and never fooled by what another local user puts at the
next session's name in the world-writable pipe directory."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import capturedLogs

from bridge.backends.endpoint import (
    FOREIGN,
    LISTEN_RECHECK,
    MISSING,
    READY,
    UNLISTED_GRACE,
    EndpointClaim,
    clear,
    listen_wait,
    listening,
    start_mark,
)
from tests.conftest import ME, BridgeUnderTest, start_bridge
from tests.e2e.test_backends import ensure_test_account, interpreter, module, open_dir

__all__ = ["open_dir"]  # the fixture, used below

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: files of another (unprivileged) user")


@pytest_twisted.async_yield_fixture
async def bridge_with(open_dir: Path) -> AsyncIterator[Any]:
    started: list[BridgeUnderTest] = []

    async def start(**modules: Any) -> BridgeUnderTest:
        running = await start_bridge(open_dir, modules=modules)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


def stand_in(base: Path, name: str, *extra: str, **kwargs: Any) -> Any:
    return module(base, name, *extra, user=kwargs.pop("user", ME), **kwargs)


@pytest_twisted.ensureDeferred
async def test_readiness_does_not_spend_a_one_connection_greeter(bridge_with: Any,
                                                                  open_dir: Path) -> None:
    """ogon's Qt platform plugin stops listening after its first connection:
    the RDP server's must be that one."""
    running = await bridge_with(greeter=stand_in(open_dir, "greeter", "--accept-once"),
                                xsession=stand_in(open_dir, "xsession"))
    peer = await running.peer()
    answer = await peer.logon(1, "", "")
    session = running.service.registry.by_connection(1)
    assert answer.serviceEndpoint == f"\\\\.\\pipe\\ogon_{session.session_id}_greeter"
    assert peer.connections[1].backend_session == session.session_id, \
        "the RDP server got the greeter's one connection"
    backend = running.service.lifecycle.backends[session.session_id]
    backend._output.read()
    assert [line for line in backend.last_lines if "accepted connection" in line] == [
        f"standin-backend[{backend.pid}]: accepted connection 1"]


def _squatter(path: Path, uid: int, log: Path) -> subprocess.Popen[bytes]:
    """Another local user listening at ``path``, writing each connection it
    gets to ``log``."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)\n"
        "print('listening', flush=True)\n"
        "while True:\n"
        "    c, _ = s.accept(); open(sys.argv[2], 'a').write('connected\\n'); c.close()\n")
    proc = subprocess.Popen([interpreter(), "-c", code, str(path), str(log)], user=uid,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"listening\n"
    return proc


@needs_root
@pytest_twisted.ensureDeferred
async def test_a_squatters_socket_is_removed_not_answered(bridge_with: Any,
                                                           open_dir: Path) -> None:
    """The review's attack: an unprivileged user listens at the next
    sessions' endpoints before they start."""
    squatter = pwd.getpwnam(ensure_test_account())
    running = await bridge_with(greeter=stand_in(open_dir, "greeter"),
                                xsession=stand_in(open_dir, "xsession"))
    pipes = running.service.config.pipe_dir
    assert pipes.stat().st_mode & 0o1777 == 0o1777, "world-writable, sticky: as WinPR makes it"
    log = open_dir / "squatter.log"
    log.touch()
    os.chmod(log, 0o666)
    squatters = [_squatter(pipes / f"ogon_{n}_{kind}", squatter.pw_uid, log)
                 for n in (1, 2) for kind in ("greeter", "xsession")]
    try:
        peer = await running.peer()
        with capturedLogs() as events:
            await peer.logon(1, "", "")
            await peer.logon(2, "alice", "alice-pw")
        for connection_id in (1, 2):
            session = running.service.registry.by_connection(connection_id)
            assert peer.connections[connection_id].backend_session == session.session_id, \
                "the RDP server reached the real backend"
            kind = "greeter" if connection_id == 1 else "xsession"
            path = pipes / f"ogon_{session.session_id}_{kind}"
            assert path.lstat().st_uid == os.geteuid(), "the backend's own socket"
        assert log.read_text() == "", "the squatter got no connection"
        removed = [e["found"] for e in events if "removed {found}" in e.get("log_format", "")]
        assert removed == [f"a socket of uid {squatter.pw_uid}"] * 2, "logged, with the owner"
    finally:
        for proc in squatters:
            proc.kill()
            proc.wait()


@needs_root
@pytest_twisted.ensureDeferred
async def test_planted_files_do_not_keep_a_user_from_a_desktop(bridge_with: Any,
                                                               open_dir: Path) -> None:
    """Files another user planted at the next names: the desktop, running
    as its user, could not remove them in the sticky directory."""
    account = ensure_test_account()
    running = await bridge_with(greeter=stand_in(open_dir, "greeter"),
                                xsession=stand_in(open_dir, "xsession", user=account))
    pipes = running.service.config.pipe_dir
    target = open_dir / "precious"
    target.write_text("keep me")
    (pipes / "ogon_1_xsession").write_text("planted")
    os.mkfifo(pipes / "ogon_2_xsession")
    (pipes / "ogon_3_xsession").symlink_to(target)
    peer = await running.peer()
    for connection_id, user in ((1, "alice"), (2, "bob"), (3, "guest")):
        answer = await peer.logon(connection_id, user, f"{user}-pw")
        session = running.service.registry.by_connection(connection_id)
        assert session.logged_on and session.session_id == connection_id
        assert answer.serviceEndpoint == f"\\\\.\\pipe\\ogon_{connection_id}_xsession"
        assert peer.connections[connection_id].backend_session == session.session_id
        assert (pipes / f"ogon_{connection_id}_xsession").lstat().st_uid == \
            pwd.getpwnam(account).pw_uid
    assert target.read_text() == "keep me", "a symlink is removed, never followed"


@pytest_twisted.ensureDeferred
async def test_a_name_that_cannot_be_cleared_gets_another(bridge_with: Any,
                                                          open_dir: Path) -> None:
    running = await bridge_with(greeter=stand_in(open_dir, "greeter"),
                                xsession=stand_in(open_dir, "xsession"))
    pipes = running.service.config.pipe_dir
    (pipes / "ogon_1_xsession").mkdir()
    (pipes / "ogon_1_xsession" / "inside").write_text("a directory that is not empty")
    peer = await running.peer()
    with capturedLogs() as events:
        answer = await peer.logon(1, "alice", "alice-pw")
    assert answer.serviceEndpoint == "\\\\.\\pipe\\ogon_1_xsession-2"
    assert peer.connections[1].backend_session == 1, "the desktop listens at the other name"
    assert running.service.registry.get(1).backend.endpoint == "ogon_1_xsession-2"
    assert any("cannot clear endpoint" in str(e.get("log_format", "")) for e in events)


@needs_root
@pytest_twisted.ensureDeferred
async def test_a_socket_planted_during_the_start_is_taken_back(bridge_with: Any,
                                                                open_dir: Path) -> None:
    """After the name is cleared and before the (slow) backend makes its
    socket, another user's socket appears there: it is not the backend's."""
    squatter = pwd.getpwnam(ensure_test_account())
    running = await bridge_with(greeter=stand_in(open_dir, "greeter"),
                                xsession=stand_in(open_dir, "xsession", "--delay", "0.5"))
    pipes = running.service.config.pipe_dir
    planted: list[socket.socket] = []

    def plant(event: dict[str, Any]) -> None:
        if event.get("module") == "xsession" and "started" in event.get("log_format", "") \
                and not planted:
            path = pipes / f"ogon_{event['session_id']}_xsession"
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(path))
            sock.listen(1)
            os.chown(path, squatter.pw_uid, squatter.pw_gid)
            planted.append(sock)

    peer = await running.peer()
    with capturedLogs() as events:
        from twisted.logger import globalLogPublisher
        globalLogPublisher.addObserver(plant)
        try:
            await peer.logon(1, "alice", "alice-pw")
        finally:
            globalLogPublisher.removeObserver(plant)
    assert planted, "the socket was planted"
    session = running.service.registry.by_connection(1)
    assert session.logged_on and peer.connections[1].backend_session == session.session_id
    assert any("taken by someone else" in str(e.get("log_format", "")) for e in events)
    planted[0].close()


def test_what_counts_as_the_backends_socket(tmp_path: Path) -> None:
    path = tmp_path / "ep"
    claim = EndpointClaim(path, os.geteuid(), start_mark())
    assert claim.check()[0] == MISSING
    path.write_text("x")
    assert claim.check() == (FOREIGN, f"{path} is a file, not a socket")
    path.unlink()
    real = tmp_path / "real"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(real))
    path.symlink_to(real)
    assert claim.check() == (FOREIGN, f"{path} is a symlink, not a socket")
    path.unlink()
    os.rename(real, path)
    assert claim.check() == (READY, "")
    assert EndpointClaim(path, os.geteuid() + 1, claim.not_before_ns).check()[0] == FOREIGN
    later = EndpointClaim(path, os.geteuid(), time.time_ns() + 10**10)
    assert later.check() == (FOREIGN, f"{path} is older than the backend's start")
    assert clear(path) == (f"a socket of uid {os.geteuid()}", None) and not path.exists()
    assert clear(path) == ("", None)
    sock.close()


@pytest_twisted.ensureDeferred
async def test_a_socket_bound_but_not_listening_yet_is_not_ready(bridge_with: Any,
                                                                 open_dir: Path) -> None:
    """The socket file appears at bind(); inotify sees it at once. The RDP
    server must not be told before the backend listens, or it is refused
    (ogon's Qt greeter binds, then listens)."""
    running = await bridge_with(greeter=stand_in(open_dir, "greeter", "--listen-delay", "0.4"),
                                xsession=stand_in(open_dir, "xsession"))
    peer = await running.peer()
    await peer.logon(1, "", "")
    session = running.service.registry.by_connection(1)
    assert peer.connections[1].backend_session == session.session_id, \
        "the RDP server connected at the first try, after listen()"
    assert listening(running.service.config.pipe_dir / "ogon_1_greeter") is True


def test_listening_is_read_from_the_kernels_table(tmp_path: Path) -> None:
    bound, listener = tmp_path / "bound", tmp_path / "listener"
    a, b = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    a.bind(str(bound))
    b.bind(str(listener))
    b.listen(1)
    try:
        assert listening(bound) is False and listening(listener) is True
        assert listening(tmp_path / "other") is None
        assert listen_wait(listener, 0.0, 0.0) == 0.0
        assert listen_wait(bound, 0.0, 0.0) == LISTEN_RECHECK
        assert listen_wait(tmp_path / "other", 10.0, 10.004) == pytest.approx(
            UNLISTED_GRACE - 0.004)
        assert listen_wait(tmp_path / "other", 10.0, 11.0) == 0.0
        table = tmp_path / "unix"
        table.write_text("Num RefCount Protocol Flags Type St Inode Path\n"
                         f"0: 00000002 00000000 00010000 0001 01 1 {tmp_path}/with space\n")
        assert listening(tmp_path / "with space", str(table)) is True
    finally:
        a.close()
        b.close()

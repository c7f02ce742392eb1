"""A backend's endpoint: ready when the backend's own socket appears, decided
from the file and never by connecting (ogon's Qt greeter accepts exactly
one connection), and never fooled by what another local user puts at the
next session's name in the world-writable pipe directory."""

from __future__ import annotations

import os
import pwd
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
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
            name = session.backend.endpoint
            assert re.fullmatch(rf"ogon_{session.session_id}_{kind}-[0-9a-f]{{8}}", name), \
                "a name the squatter took: the backend gets one no one can guess"
            assert (pipes / name).lstat().st_uid == os.geteuid(), "the backend's own socket"
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
async def test_a_name_that_cannot_be_cleared_gets_another(bridge_with: Any, open_dir: Path,
                                                          monkeypatch: Any) -> None:
    """A name the bridge cannot clear (another user's file, with the bridge
    not root) gets a name no one can guess instead, which the backend learns
    through {endpoint}."""
    import bridge.backends.endpoint as endpoint_module

    running = await bridge_with(greeter=stand_in(open_dir, "greeter"),
                                xsession=stand_in(open_dir, "xsession"))
    pipes = running.service.config.pipe_dir
    real_clear = endpoint_module.clear

    def refusing(path: Path) -> tuple[str, str | None]:
        if path.name == "ogon_1_xsession":
            return "a file of uid 65534", "Operation not permitted"
        return real_clear(path)

    monkeypatch.setattr(endpoint_module, "clear", refusing)
    peer = await running.peer()
    with capturedLogs() as events:
        answer = await peer.logon(1, "alice", "alice-pw")
    name = answer.serviceEndpoint.rpartition("\\")[2]
    assert re.fullmatch(r"ogon_1_xsession-[0-9a-f]{8}", name), name
    assert peer.connections[1].backend_session == 1, "the desktop listens at the other name"
    assert running.service.registry.get(1).backend.endpoint == name
    assert (pipes / name).lstat().st_uid == os.geteuid()
    assert any("cannot clear endpoint" in str(e.get("log_format", "")) for e in events)


@needs_root
@pytest_twisted.ensureDeferred
async def test_filled_directories_at_the_next_names_are_moved_aside(bridge_with: Any,
                                                                   open_dir: Path) -> None:
    """The second review's attack: another user plants non-empty directories
    at the next sessions' names (and at every name the bridge used to try
    next), which not even root can rmdir."""
    squatter = pwd.getpwnam(ensure_test_account())
    running = await bridge_with(greeter=stand_in(open_dir, "greeter"),
                                xsession=stand_in(open_dir, "xsession"))
    pipes = running.service.config.pipe_dir
    for n in (1, 2):
        for kind in ("greeter", "xsession"):
            for suffix in ("", *(f"-{k}" for k in range(2, 10))):
                planted = pipes / f"ogon_{n}_{kind}{suffix}"
                (planted / "inside").mkdir(parents=True)
                for path in (planted, planted / "inside"):
                    os.chown(path, squatter.pw_uid, squatter.pw_gid)
    peer = await running.peer()
    with capturedLogs() as events:
        greeter = await peer.logon(1, "", "")
        desktop = await peer.logon(2, "alice", "alice-pw")
    for answer, connection_id, kind in ((greeter, 1, "greeter"), (desktop, 2, "xsession")):
        session = running.service.registry.by_connection(connection_id)
        assert peer.connections[connection_id].backend_session == session.session_id
        assert re.fullmatch(rf"ogon_{connection_id}_{kind}-[0-9a-f]{{8}}",
                            answer.serviceEndpoint.rpartition("\\")[2])
    aside = [p.name for p in pipes.iterdir() if ".aside-" in p.name]
    assert len(aside) == 2, aside
    assert all(re.fullmatch(r"\.ogon_[12]_(greeter|xsession)\.aside-[0-9a-f]{16}", a)
               for a in aside)
    assert any("moved aside" in str(e.get("found", "")) for e in events)


@contextmanager
def socket_planted_at_start(pipes: Path, owner: tuple[int, int], listen: bool
                            ) -> Iterator[list[socket.socket]]:
    """While inside: the moment the bridge logs that it started an xsession,
    another user's socket (``owner``; listening with ``listen``) is bound at
    that backend's endpoint. Yields the planted sockets, closed on leaving."""
    from twisted.logger import globalLogPublisher

    planted: list[socket.socket] = []

    def plant(event: dict[str, Any]) -> None:
        if event.get("module") == "xsession" and "started" in event.get("log_format", "") \
                and not planted:
            path = pipes / f"ogon_{event['session_id']}_xsession"
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(path))
            if listen:
                sock.listen(1)
            os.chown(path, *owner)
            planted.append(sock)

    globalLogPublisher.addObserver(plant)
    try:
        yield planted
    finally:
        globalLogPublisher.removeObserver(plant)
        for sock in planted:
            sock.close()


@needs_root
@pytest_twisted.ensureDeferred
async def test_a_name_taken_during_the_start_is_started_again_unguessably(
        bridge_with: Any, open_dir: Path, monkeypatch: Any) -> None:
    """A squatter that binds the name again the moment the bridge clears it
    (the second review's re-binding squatter): the desktop, running as its
    user, cannot remove the squatter's socket and dies; it is started again
    under a name no one can guess."""
    import bridge.backends.launcher as launcher_module

    account = ensure_test_account()
    running = await bridge_with(
        greeter=stand_in(open_dir, "greeter"),
        xsession=stand_in(open_dir, "xsession", "--delay", "0.3", user=account))
    # The squatter wins every race for the name: the bridge's take-back fails.
    monkeypatch.setattr(launcher_module, "clear",
                        lambda path: ("a socket of uid 65534", "Operation not permitted"))
    peer = await running.peer()
    # nobody's socket: neither the bridge's nor the user's
    with socket_planted_at_start(running.service.config.pipe_dir, (65534, 65534), False), \
            capturedLogs() as events:
        answer = await peer.logon(1, "alice", "alice-pw")
    name = answer.serviceEndpoint.rpartition("\\")[2]
    assert re.fullmatch(r"ogon_1_xsession-[0-9a-f]{8}", name), name
    session = running.service.registry.by_connection(1)
    assert session.logged_on and peer.connections[1].backend_session == session.session_id
    assert any("starting it again under a name no one can guess" in
               str(e.get("log_format", "")) for e in events)


@needs_root
@pytest_twisted.ensureDeferred
async def test_a_socket_planted_during_the_start_is_taken_back(bridge_with: Any,
                                                                open_dir: Path) -> None:
    """After the name is cleared and before the (slow) backend makes its
    socket, another user's socket appears there: it is not the backend's."""
    squatter = pwd.getpwnam(ensure_test_account())
    running = await bridge_with(greeter=stand_in(open_dir, "greeter"),
                                xsession=stand_in(open_dir, "xsession", "--delay", "0.5"))
    peer = await running.peer()
    with socket_planted_at_start(running.service.config.pipe_dir,
                                 (squatter.pw_uid, squatter.pw_gid), True) as planted, \
            capturedLogs() as events:
        await peer.logon(1, "alice", "alice-pw")
    assert planted, "the socket was planted"
    session = running.service.registry.by_connection(1)
    assert session.logged_on and peer.connections[1].backend_session == session.session_id
    assert any("taken by someone else" in str(e.get("log_format", "")) for e in events)


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


def test_listening_is_asked_of_the_kernel_for_that_very_file(tmp_path: Path) -> None:
    bound, listener, renamed = tmp_path / "bound", tmp_path / "listener", tmp_path / "renamed"
    a, b, c = (socket.socket(socket.AF_UNIX) for _ in range(3))
    try:
        a.bind(str(bound))
        b.bind(str(listener))
        b.listen(1)
        c.bind(str(tmp_path / "temporary"))
        c.listen(1)
        os.rename(tmp_path / "temporary", renamed)
        assert listening(bound) is False and listening(listener) is True
        assert listening(renamed) is True, "found by its file, not the name it was bound under"
        assert listening(tmp_path / "missing") is False
        # Another socket once bound to the name listens on, its file gone; a
        # new socket bound there does not listen yet (the review's readiness
        # fake): the name alone would say "listening".
        os.unlink(listener)
        d = socket.socket(socket.AF_UNIX)
        d.bind(str(listener))
        assert listening(listener) is False
        d.close()
        assert listen_wait(renamed, 0.0, 0.0) == 0.0
        assert listen_wait(bound, 0.0, 0.0) == LISTEN_RECHECK
        with pytest.MonkeyPatch.context() as patch:  # a kernel that cannot be asked
            patch.setattr("bridge.backends.endpoint.listening_unix_files", lambda: None)
            assert listening(bound) is None
            assert listen_wait(bound, 10.0, 10.004) == pytest.approx(UNLISTED_GRACE - 0.004)
            assert listen_wait(bound, 10.0, 11.0) == 0.0
    finally:
        for sock in (a, b, c):
            sock.close()

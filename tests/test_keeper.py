"""The launcher keeper (bridge/backends/ogon/keeper.py): the parent of
ogon-backend-launchers that outlives the bridge, holding their channels
so that a restarted bridge can take them back. Driven here with ``cat``
as the launcher: what the bridge writes on its end comes back."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.backends.ogon import keeper as keeper_module
from bridge.backends.ogon.keeper_client import KeeperUnavailableError, exchange


@pytest.fixture
def keeper(short_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    path = str(short_dir / "keeper.sock")
    process = subprocess.Popen([sys.executable, keeper_module.__file__, "--socket", path,
                                "--linger", "0.2"], stderr=subprocess.PIPE)
    assert process.stderr is not None
    line = process.stderr.readline().decode()  # waits for its first line
    assert f"listening on {path}" in line
    yield path, process
    if process.poll() is None:
        process.kill()
    process.wait()
    process.stderr.close()


def roundtrip(write_fd: int, read_fd: int, data: bytes) -> bytes:
    os.write(write_fd, data)
    got = b""
    while len(got) < len(data):
        got += os.read(read_fd, 100)
    return got


def test_a_launcher_channel_outlives_the_bridges_end(keeper: tuple[str, subprocess.Popen[bytes]],
                                                    short_dir: Path) -> None:
    path, process = keeper
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    errors = os.open(short_dir / "errors.log", os.O_WRONLY | os.O_CREAT, 0o600)
    answer, _ = exchange(path, {"op": "spawn", "executable": "/bin/cat", "argv": ["cat"],
                                "env": {"PATH": "/bin"}, "cwd": "/"},
                         [stdin_read, stdout_write, stdin_write, stdout_read, errors])
    for fd in (stdin_read, stdout_write, errors):
        os.close(fd)
    assert answer["ok"] and answer["pid"] > 0 and answer["start_ticks"] > 0
    pid, ticks = answer["pid"], answer["start_ticks"]
    assert roundtrip(stdin_write, stdout_read, b"hello") == b"hello"
    os.close(stdin_write)  # the bridge goes away (kill -9 closes its descriptors)
    os.close(stdout_read)

    answer, fds = exchange(path, {"op": "attach", "pid": pid, "start_ticks": ticks})
    assert answer == {"ok": True} and len(fds) == 2
    assert roundtrip(fds[0], fds[1], b"again") == b"again", "the same channel, never closed"
    answer, none = exchange(path, {"op": "attach", "pid": pid, "start_ticks": ticks + 1})
    assert not answer["ok"] and none == [], "a reused pid is not taken for the launcher"
    assert exchange(path, {"op": "list"})[0]["launchers"] == [{"pid": pid,
                                                                "start_ticks": ticks}]
    assert exchange(path, {"op": "status", "pid": pid})[0]["running"] is True

    pidfd = os.pidfd_open(pid)
    os.kill(pid, signal.SIGKILL)
    select.select([pidfd], [], [], 10)  # asked once it has exited, as the bridge asks
    os.close(pidfd)
    status, _ = exchange(path, {"op": "status", "pid": pid})
    assert status == {"ok": True, "running": False, "returncode": -9}
    assert os.read(fds[1], 10) == b"", "its channel closes with it"
    for fd in fds:
        os.close(fd)
    assert process.wait(10) == 0, "no launcher left: the keeper exits"
    assert not Path(path).exists()
    with pytest.raises(KeeperUnavailableError):
        exchange(path, {"op": "list"})


def test_a_second_keeper_leaves_the_socket_to_the_first(
        keeper: tuple[str, subprocess.Popen[bytes]]) -> None:
    path, _ = keeper
    second = subprocess.run([sys.executable, keeper_module.__file__, "--socket", path],
                            capture_output=True, text=True, timeout=30)
    assert second.returncode == 0 and "another keeper holds" in second.stderr
    assert exchange(path, {"op": "list"})[0] == {"ok": True, "launchers": []}


def test_bad_requests(keeper: tuple[str, subprocess.Popen[bytes]]) -> None:
    path, _ = keeper
    assert exchange(path, {"op": "spawn", "executable": "/bin/cat", "argv": ["cat"],
                           "env": {}})[0] == {"ok": False,
                                              "error": "spawn needs five descriptors"}
    assert exchange(path, {"op": "nothing"})[0]["ok"] is False
    a, b = os.pipe()
    answer, _ = exchange(path, {"op": "spawn", "executable": "/nonexistent", "argv": ["x"],
                                "env": {}}, [a, b, b, a, b])
    assert not answer["ok"] and "cannot start /nonexistent" in answer["error"]
    os.close(a)
    os.close(b)


def test_a_socket_path_too_long_for_af_unix(short_dir: Path) -> None:
    """A state directory deep enough that its socket path does not fit a
    sockaddr_un: both sides go through /proc/self/fd/<directory>/."""
    deep = short_dir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "launcher-keeper.sock")
    assert len(path) > 108
    process = subprocess.Popen([sys.executable, keeper_module.__file__, "--socket", path,
                                "--linger", "0.2"], stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        assert "listening on" in process.stderr.readline().decode()
        assert Path(path).is_socket()
        assert exchange(path, {"op": "list"})[0] == {"ok": True, "launchers": []}
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()

"""A desktop that reserves space with fallocate() on its output (red-team
finding 7): its file is cut back in the event that reports it, counted by
the space it takes (st_blocks), not its size; and preflight (startup,
``icp-bridge config check``) warns while backend_log_dir shares its
filesystem with /, /run or the state directory, and not on a tmpfs of its
own as contrib/systemd's mount unit makes it.

Real processes, real files; the tmpfs is really mounted (root only, as
tests/e2e/test_faults.py's tiny disk)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from bridge.backends.logs import BackendLogs
from bridge.config import Config
from bridge.preflight import preflight
from tests.test_config_check import good_config, run_check

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "systemd" / \
    "run-icp\\x2dbridge-backends.mount"
MiB = 1024 * 1024

#: A desktop's trick: clear O_APPEND on its stdout, then reserve space on it
#: (mode 1: FALLOC_FL_KEEP_SIZE, the size stays 0; mode 0 grows it too).
FALLOCATOR = r"""
import ctypes, fcntl, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) & ~os.O_APPEND)
if libc.fallocate(1, int(sys.argv[1]), 0, int(sys.argv[2])) != 0:
    print("fallocate failed", os.strerror(ctypes.get_errno()), file=sys.stderr, flush=True)
else:
    info = os.fstat(1)
    print(info.st_size, info.st_blocks * 512, file=sys.stderr, flush=True)
sys.stdin.read()
"""


def over_cap_warning(label: str) -> Deferred[dict[str, Any]]:
    """Fires with the bridge's "output over its cap" event for ``label``."""
    d: Deferred[dict[str, Any]] = Deferred()

    def observe(event: dict[str, Any]) -> None:
        if event.get("label") == label and event.get("what") == "its cap" and not d.called:
            globalLogPublisher.removeObserver(observe)
            d.callback(event)

    globalLogPublisher.addObserver(observe)
    return d


@pytest.mark.parametrize("mode", [1, 0], ids=["keep_size", "grow"])
@pytest_twisted.ensureDeferred
async def test_space_reserved_on_its_output_is_cut_back_in_the_event(
        tmp_path: Path, mode: int) -> None:
    polls = Clock()  # never advanced: only inotify's event can cut it back
    logs = BackendLogs(reactor, polls, tmp_path, per_session=1 * MiB, total=1 << 40)
    path, fd = logs.create(5, "xsession")
    logs.attach(path, "session 5 xsession")
    said = over_cap_warning("session 5 xsession").addTimeout(30, reactor)
    desktop = subprocess.Popen([sys.executable, "-c", FALLOCATOR, str(mode), str(64 * MiB)],
                               stdin=subprocess.PIPE, stdout=fd, stderr=subprocess.PIPE,
                               text=True)
    os.close(fd)
    try:
        assert desktop.stderr is not None
        size, reserved = (int(n) for n in desktop.stderr.readline().split())
        assert reserved >= 64 * MiB and size == (0 if mode == 1 else 64 * MiB), \
            "the desktop did reserve the space"
        event = await said
        info = path.stat()
        assert info.st_blocks * 512 <= 1 * MiB and info.st_size == 0, "cut back"
        assert event["used"] >= 64 * MiB, "counted by the space it took, not its size"
        assert polls.seconds() == 0 and polls.getDelayedCalls(), "no poll has run"
    finally:
        assert desktop.stdin is not None
        desktop.stdin.close()
        desktop.wait(10)
        logs.close()


# -- preflight: a filesystem of its own -------------------------------------------------------

def config_for(tmp_path: Path, logs: Path) -> Config:
    return Config(state_dir=tmp_path / "state", users_file=tmp_path / "users",
                  pipe_dir=tmp_path / "pipes", backend_log_dir=logs,
                  thrift_endpoint="ssl:9091:interface=127.0.0.1",
                  properties={"ssl.certificate": str(tmp_path / "c.crt"),
                              "ssl.key": str(tmp_path / "c.key")})


def log_dir_warnings(config: Config, as_root: bool = True) -> list[str]:
    return [str(w) for w in preflight(config, as_root=as_root).warnings
            if "backend_log_dir" in str(w)]


def test_preflight_warns_while_backend_log_dir_shares_a_filesystem(tmp_path: Path) -> None:
    """A directory (made at startup) beside the state directory: on its
    filesystem, and on / or /run's too on most machines."""
    (tmp_path / "state").mkdir(mode=0o700)
    warnings = log_dir_warnings(config_for(tmp_path, tmp_path / "logs"))
    assert len(warnings) == 1
    assert f"{tmp_path / 'logs'} is on the filesystem of" in warnings[0]
    assert str(tmp_path / "state") in warnings[0], "the state directory's filesystem is named"
    assert "fallocate()" in warnings[0] and "size-limited tmpfs" in warnings[0] \
        and "run-icp\\x2dbridge-backends.mount" in warnings[0], "the risk and the fix"
    # Not root: backends run as the bridge's own user, on their own quota.
    assert log_dir_warnings(config_for(tmp_path, tmp_path / "logs"), as_root=False) == []


def test_config_check_prints_the_warning(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("backends run as others only when the bridge is root")
    result = run_check(str(good_config(tmp_path, f'backend_log_dir = "{tmp_path}/logs"')))
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(f"backend_log_dir: {tmp_path}/logs is on the filesystem of" in line
               for line in result.stdout.splitlines()), result.stdout


def unit_options() -> str:
    found = re.search(r"^Options=(.*)$", UNIT.read_text(), re.MULTILINE)
    assert found is not None
    return found.group(1)


@pytest.fixture
def own_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """The mount unit's tmpfs, at a test path (a smaller size=)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "backends"
    mount.mkdir()
    options = re.sub(r"size=[^,]+", "size=4M", unit_options())
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_no_warning_on_a_tmpfs_of_its_own_and_a_desktop_fills_only_that(
        tmp_path: Path, own_tmpfs: Path) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    assert own_tmpfs.stat().st_dev != tmp_path.stat().st_dev, "a filesystem of its own"
    assert log_dir_warnings(config_for(tmp_path, own_tmpfs)) == []
    assert log_dir_warnings(config_for(tmp_path, own_tmpfs / "sub")) == [], \
        "a directory in it (made at startup) too"
    # The unit's options are what the bridge accepts as backend_log_dir.
    logs = BackendLogs(reactor, Clock(), own_tmpfs)
    logs.prepare()
    path, fd = logs.create(6, "xsession")
    try:
        with pytest.raises(OSError) as refused:
            os.posix_fallocate(fd, 0, 64 * MiB)
        assert refused.value.errno == 28, "ENOSPC on its own filesystem"  # errno.ENOSPC
        free = os.statvfs(tmp_path)
        assert free.f_bavail * free.f_frsize > 0, "the state directory's filesystem has room"
    finally:
        os.close(fd)
        path.unlink()
        logs.close()

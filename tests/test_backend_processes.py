"""The mechanics under every backend, whatever kind of module starts it:
output files bounded by size and removed once nothing writes to them, the
ledger of spawned processes and the stopping of those no session owns, the
check of a command line before exec, and where the output goes by default."""

from __future__ import annotations

import errno
import json
import os
import pwd
import signal
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
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from bridge import config as config_module
from bridge.backends.environment import MAX_ARG_STRLEN, exec_problem
from bridge.backends.ledger import MemoryLedger
from bridge.backends.logs import POLL_INTERVAL, BackendLogs
from bridge.backends.orphans import Orphans, process_start_ticks, same_process
from bridge.backends.spawning import SpawnedProcess, start_process
from bridge.config import Config, ConfigError, backend_log_directory, config_from_mapping
from bridge.endpoints import StartupError
from bridge.sessions.model import BackendRecord
from bridge.state.store import SpawnRecords, StateStore

KiB = 1024


def write(fd: int, n: int) -> None:
    os.write(fd, b"x" * n)


def test_a_file_past_its_cap_starts_over(tmp_path: Path) -> None:
    clock = Clock()
    logs = BackendLogs(reactor, clock, tmp_path, per_session=100 * KiB, total=150 * KiB)
    a_path, a = logs.create(1, "xsession")
    b_path, b = logs.create(2, "xsession")
    assert a_path.name.startswith("session-1-xsession.") and a_path.suffix == ".log"
    assert stat.S_IMODE(a_path.stat().st_mode) == 0o600
    a_log, b_log = logs.attach(a_path, "session 1 xsession"), logs.attach(b_path, "session 2")
    with capturedLogs() as events:
        write(a, 120 * KiB)
        clock.advance(POLL_INTERVAL)
        assert a_path.stat().st_size == 0, "past its cap: started over"
        assert logs.dropped_bytes == 120 * KiB
        write(a, 10 * KiB)  # the writer appends: it goes on at the start
        assert a_path.stat().st_size == 10 * KiB
        a_log.read(1 << 20)
        write(a, 60 * KiB)
        write(b, 90 * KiB)
        clock.advance(POLL_INTERVAL)
    assert (a_path.stat().st_size, b_path.stat().st_size) == (70 * KiB, 0), \
        "past the total cap: the largest started over"
    assert logs.dropped_bytes == 120 * KiB + 90 * KiB
    assert [e["what"] for e in events if "what" in e] == [
        "its cap", "the total cap of all backend logs"]
    assert a_log.size >= 70 * KiB and b_log.size == 0  # (blocks: 4 KiB each)
    for fd in (a, b):
        os.close(fd)
    logs.close()


def test_space_kept_with_fallocate_counts(tmp_path: Path) -> None:
    clock = Clock()
    logs = BackendLogs(reactor, clock, tmp_path, per_session=100 * KiB, total=1 << 30)
    path, fd = logs.create(1, "m")
    logs.attach(path, "session 1 m")
    os.posix_fallocate(fd, 0, 1 << 20)
    clock.advance(POLL_INTERVAL)
    assert path.stat().st_blocks == 0 and path.stat().st_size == 0
    os.close(fd)
    logs.close()


def test_a_file_goes_once_no_one_writes_to_it(tmp_path: Path) -> None:
    """Not before: a process the backend left behind still writes to it,
    and an unlinked file would be bounded by no one."""
    clock = Clock()
    logs = BackendLogs(reactor, clock, tmp_path, per_session=100 * KiB)
    path, fd = logs.create(1, "m")
    log = logs.attach(path, "session 1 m")
    assert log is not None and log.has_writers()
    logs.release(log)
    assert path.exists(), "still written to"
    write(fd, 200 * KiB)
    clock.advance(POLL_INTERVAL)
    assert path.stat().st_size == 0, "still bounded"
    os.close(fd)
    assert not log.has_writers()
    clock.advance(POLL_INTERVAL)
    assert not path.exists() and logs.files() == []
    logs.close()


def test_leftovers_of_a_previous_run_are_swept(tmp_path: Path) -> None:
    clock = Clock()
    logs = BackendLogs(reactor, clock, tmp_path, per_session=100 * KiB)
    stale = tmp_path / "session-3-xsession.0000.log"
    stale.write_text("old output")
    busy = tmp_path / "session-4-xsession.0000.log"
    writer = os.open(busy, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    other = tmp_path / "notes.txt"
    other.write_text("not ours")
    known = tmp_path / "session-5-xsession.0000.log"
    known.write_text("an adopted backend's")
    logs.sweep({known})
    assert not stale.exists() and busy.exists() and other.exists() and known.exists()
    write(writer, 200 * KiB)
    clock.advance(POLL_INTERVAL)
    assert busy.stat().st_size == 0, "bounded until its writer is gone"
    os.close(writer)
    clock.advance(POLL_INTERVAL)
    assert not busy.exists()
    logs.close()


def test_the_directory_must_be_the_bridges_alone(tmp_path: Path) -> None:
    clock = Clock()
    directory = tmp_path / "a" / "backends"
    BackendLogs(reactor, clock, directory).prepare()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    directory.chmod(0o777)
    with pytest.raises(StartupError, match="writable by no one else"):
        BackendLogs(reactor, clock, directory).prepare()


def test_backend_logs_default_off_the_state_filesystem(monkeypatch: Any) -> None:
    config = Config(state_dir=Path("/srv/state"))
    monkeypatch.setattr(config_module, "_running_as_root", lambda: True)
    assert backend_log_directory(config) == Path("/run/icp-bridge/backends")
    monkeypatch.setattr(config_module, "_running_as_root", lambda: False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert backend_log_directory(config) == Path("/run/user/1000/icp-bridge/backends")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert backend_log_directory(config) == Path("/srv/state/backends")
    config.backend_log_dir = Path("/var/log/icp-bridge")
    assert backend_log_directory(config) == Path("/var/log/icp-bridge")


def test_the_new_keys_are_checked() -> None:
    config = config_from_mapping({"allow_root_desktops": True, "backend_log_dir": "/x",
                                  "backend_log_max_per_session": 1024,
                                  "backend_log_max_total": 4096, "min_free_disk": 0})
    assert config.allow_root_desktops and config.backend_log_dir == Path("/x")
    for bad, message in [({"allow_root_desktops": "yes"}, "expected true or false"),
                         ({"backend_log_max_per_session": 0}, "must be positive"),
                         ({"backend_log_max_total": 10}, "at least backend_log_max_per"),
                         ({"min_free_disk": -1}, "min_free_disk")]:
        with pytest.raises(ConfigError, match=message):
            config_from_mapping(bad)


def test_what_exec_would_refuse_is_said_before() -> None:
    assert exec_problem(["/bin/true"], {"A": "b"}) is None
    assert exec_problem(["/bin/true", "a\0b"], {}) == "argument 1 holds a NUL character"
    assert exec_problem(["/bin/true"], {"OGON_USER": "alice\0root"}) == \
        "environment variable 'OGON_USER' holds a NUL character"
    assert "bytes (at most" in exec_problem(["/bin/true"], {"OGON_USER": "x" * MAX_ARG_STRLEN})
    assert exec_problem(["/bin/true"], {"A=B": "c"}) == "environment variable 'A=B' is not a name"
    assert exec_problem(["/bin/true"], {"X": "\udc80\ud800"}) is not None


def test_spawned_backends_are_recorded_in_the_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    records = SpawnRecords(store)
    first = BackendRecord("xsession", 4242, 77, "ogon_1_X11", "/run/x.log")
    records.spawned(1, first)
    records.spawned(2, BackendRecord("greeter", 4243, 78, "ogon_2_Qt"))
    assert [(sid, r.pid) for sid, r in records.recorded()] == [(1, 4242), (2, 4243)]
    records.gone(first)
    store.close()
    # A row that does not parse still names its process: it is stopped, not left.
    db = sqlite3.connect(tmp_path / "state.sqlite3")
    db.execute("UPDATE backends SET data = 'not json'")
    db.commit()
    db.close()
    store = StateStore(tmp_path / "state.sqlite3")
    with capturedLogs() as events:
        [(session_id, record)] = SpawnRecords(store).recorded()
    assert (session_id, record.pid, record.start_ticks) == (2, 4243, 78)
    assert any("does not parse" in e.get("log_format", "") for e in events)
    store.close()


@pytest_twisted.ensureDeferred
async def test_an_orphan_is_stopped_and_forgotten(tmp_path: Path) -> None:
    """SIGTERM, then SIGKILL after its stop timeout for one that ignores it;
    once gone its row and its output file go too."""
    output = tmp_path / "session-9-xsession.0000.log"
    with open(output, "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", "import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "sys.stderr.write('ready\\n'); sys.stderr.flush(); time.sleep(60)"],
            start_new_session=True, stdout=out, stderr=subprocess.PIPE, text=True)
    assert child.stderr is not None and child.stderr.readline() == "ready\n"
    ticks = process_start_ticks(child.pid)
    assert ticks is not None
    record = BackendRecord("xsession", child.pid, ticks, "ogon_9_X11", str(output),
                           uid=os.getuid())
    ledger = MemoryLedger()
    ledger.spawned(9, record)
    logs = BackendLogs(reactor, reactor, tmp_path)
    orphans = Orphans(reactor, reactor, ledger, logs)
    try:
        with capturedLogs() as events:
            gone = orphans.stop(9, record, 0.2, "no session owns it")
            again = orphans.stop(9, record, 0.2, "named twice")
            await gone
            await again
        child.wait(5)
        assert child.returncode == -signal.SIGKILL
        assert not same_process(record) and ledger.recorded() == []
        assert not output.exists()
        [line] = [e for e in events if "stopping" in e.get("log_format", "")]
        assert (line["pid"], line["why"]) == (child.pid, "no session owns it")
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        logs.close()


class _Ended(ProcessProtocol):
    """Collects what a started process tells its protocol."""

    def __init__(self) -> None:
        self.ended: Deferred[Any] = Deferred()
        self.data: dict[int, bytes] = {}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.data[fd] = self.data.get(fd, b"") + data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


def _start(tmp_path: Path, code: str, uid: int | None = None, gid: int | None = None,
           **fds: Any) -> tuple[Any, _Ended, Path]:
    out = tmp_path / "out"
    out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    protocol = _Ended()
    try:
        # Another account cannot run the venv's python (it may live under /root).
        python = "/usr/bin/python3" if uid is not None else sys.executable
        child = start_process(reactor, protocol, python, ["backend-x", "-c", code],
                              {"PATH": "/usr/bin:/bin"}, "/", uid, gid,
                              {0: null_fd, 1: out_fd, 2: out_fd,
                               **{int(k[2:]): v for k, v in fds.items()}})
    finally:
        os.close(out_fd)
        os.close(null_fd)
    return child, protocol, out


WHO = ("import os, sys; print(os.getsid(0) == os.getpid(), sys.argv[0], os.getuid(), "
       "os.getgid(), sorted(os.getgroups())); sys.exit({code})")


@pytest_twisted.ensureDeferred
async def test_a_backend_process_runs_in_its_own_session_and_its_end_is_told(
        tmp_path: Path) -> None:
    child, protocol, out = _start(tmp_path, WHO.format(code=3))
    assert isinstance(child, SpawnedProcess), "0, 1 and 2 only: started by subprocess"
    ended = await protocol.ended
    assert isinstance(ended, ProcessTerminated) and (ended.exitCode, ended.signal) == (3, None)
    own_session, argv0, *_ = out.read_text().split(" ", 2)
    assert (own_session, argv0) == ("True", "-c")  # python's argv[0] for -c
    child, protocol, _ = _start(tmp_path, "import time; time.sleep(60)")
    os.killpg(child.pid, signal.SIGTERM)  # its process group is its own
    ended = await protocol.ended
    assert (ended.exitCode, ended.signal) == (None, signal.SIGTERM)
    _, protocol, _ = _start(tmp_path, "pass")
    assert isinstance(await protocol.ended, ProcessDone)
    with pytest.raises(OSError):
        start_process(reactor, _Ended(), "/nonexistent/backend", ["backend"], {}, "/", None,
                      None, {0: 0, 1: 1, 2: 2})


@pytest.mark.skipif(os.geteuid() != 0, reason="switching accounts needs root (CI is root)")
@pytest_twisted.ensureDeferred
async def test_a_backend_process_runs_as_its_account_with_the_accounts_groups(
        tmp_path: Path) -> None:
    from tests.e2e.test_backends import ensure_test_account

    account = pwd.getpwnam(ensure_test_account())
    tmp_path.chmod(0o777)
    _, protocol, out = _start(tmp_path, WHO.format(code=0), account.pw_uid, account.pw_gid)
    assert isinstance(await protocol.ended, ProcessDone)
    words = out.read_text().split(" ", 4)
    assert (int(words[2]), int(words[3])) == (account.pw_uid, account.pw_gid)
    assert eval(words[4]) == sorted(set(os.getgrouplist(account.pw_name, account.pw_gid)))


def _start_as(account: Any, code: str, env: dict[str, str], tmp_path: Path
              ) -> tuple[Any, _Ended, Path]:
    """``python3 -c code "an arg"`` as ``account``, argv[0] its path."""
    out = tmp_path / "out"
    out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    protocol = _Ended()
    try:
        child = start_process(reactor, protocol, "/usr/bin/python3",
                              ["/usr/bin/python3", "-c", code, "an arg"], env, "/",
                              account.pw_uid, account.pw_gid, {0: 0, 1: out_fd, 2: out_fd})
    finally:
        os.close(out_fd)
    return child, protocol, out


@pytest.mark.skipif(os.geteuid() != 0, reason="switching accounts needs root (CI is root)")
@pytest_twisted.ensureDeferred
async def test_another_accounts_backend_is_started_through_setpriv_with_the_same_switch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The usual backend (argv[0] is its path) as another account: setpriv
    # makes the switch, so that subprocess may vfork. What the process ends
    # up as must be exactly what subprocess's own switch gave.
    from bridge.backends import spawning
    from tests.e2e.test_backends import ensure_test_account

    setpriv = spawning.trusted_setpriv()
    assert setpriv is not None, "util-linux's setpriv (Debian: essential) is missing"
    started: list[list[str]] = []
    real_popen = subprocess.Popen

    def popen(args: list[str], **kwargs: Any) -> Any:
        started.append(list(args))
        return real_popen(args, **kwargs)

    monkeypatch.setattr(spawning.subprocess, "Popen", popen)
    account = pwd.getpwnam(ensure_test_account())
    tmp_path.chmod(0o777)
    code = ("import json, os, sys; s = open('/proc/self/status').read().splitlines(); "
            "print(json.dumps([os.getsid(0) == os.getpid(), sys.argv, "
            "[l.split()[1:] for l in s if l.split(':')[0] in ('Uid', 'Gid', 'CapEff')], "
            "sorted(os.getgroups())]))")
    child, protocol, out = _start_as(account, code, {"PATH": "/usr/bin:/bin"}, tmp_path)
    assert isinstance(child, SpawnedProcess)
    assert isinstance(await protocol.ended, ProcessDone), out.read_text()
    assert started[0][0] == setpriv and started[0][-4:] == [
        "/usr/bin/python3", "-c", code, "an arg"]
    leader, argv, ids, groups = json.loads(out.read_text())
    assert leader and argv == ["-c", "an arg"]
    uid, gid = str(account.pw_uid), str(account.pw_gid)
    assert ids == [[uid] * 4, [gid] * 4, ["0000000000000000"]], "real, effective, saved, fs"
    assert groups == sorted(set(os.getgrouplist(account.pw_name, account.pw_gid)))
    # An environment the loader acts on (LD_PRELOAD meant for the backend)
    # must not reach setpriv, which runs as root: subprocess switches then.
    _, protocol, _ = _start_as(account, code, {"PATH": "/usr/bin:/bin", "LD_PRELOAD": ""},
                               tmp_path)
    assert isinstance(await protocol.ended, ProcessDone)
    assert started[-1][0] == "/usr/bin/python3"
    for env in ({"PATH": "/usr/bin:/bin", "LANGUAGE": "../../tmp/x"},
                {"PATH": "/usr/bin:/bin", "LC_MESSAGES": "/tmp/x"}):
        _, protocol, _ = _start_as(account, code, env, tmp_path)
        assert isinstance(await protocol.ended, ProcessDone)
        assert started[-1][0] == "/usr/bin/python3", env
    # What exec as the account would refuse fails the start itself, as
    # subprocess's own switch made it fail: a program that is not there,
    # one the account may not execute, one that is no script or binary.
    no_shebang = tmp_path / "no-shebang"
    no_shebang.write_text("echo hi\n")
    no_shebang.chmod(0o755)
    root_only = tmp_path / "root-only"
    root_only.write_text("#!/bin/sh\nexit 0\n")
    root_only.chmod(0o700)
    for program, error in ((no_shebang, OSError), (root_only, PermissionError)):
        with pytest.raises(error) as raised:
            start_process(reactor, _Ended(), str(program), [str(program)], {}, "/",
                          account.pw_uid, account.pw_gid, {0: 0, 1: 1, 2: 2})
        assert raised.value.errno in (errno.ENOEXEC, errno.EACCES)
    # A program that is not there fails the start itself, as before.
    with pytest.raises(FileNotFoundError):
        start_process(reactor, _Ended(), "/nonexistent/backend", ["/nonexistent/backend"], {},
                      "/", account.pw_uid, account.pw_gid, {0: 0, 1: 1, 2: 2})
    with pytest.raises(PermissionError):
        start_process(reactor, _Ended(), str(tmp_path), [str(tmp_path)], {},
                      "/", account.pw_uid, account.pw_gid, {0: 0, 1: 1, 2: 2})


@pytest_twisted.ensureDeferred
async def test_a_backend_process_with_a_pipe_to_read_goes_through_twisted(
        tmp_path: Path) -> None:
    child, protocol, _ = _start(tmp_path, "import os; os.write(3, b'12\\n')", fd3="r")
    assert not isinstance(child, SpawnedProcess)
    assert isinstance(await protocol.ended, ProcessDone)
    assert protocol.data[3] == b"12\n"


def test_setpriv_is_trusted_only_where_only_root_can_change_it(tmp_path: Path) -> None:
    from bridge.backends.spawning import _loader_sensitive, _only_root_can_change

    assert _only_root_can_change("/usr/bin/setpriv"), "Debian's, root's own"
    copy = tmp_path / "setpriv"
    copy.write_bytes(Path("/usr/bin/setpriv").read_bytes())
    copy.chmod(0o755)
    assert not _only_root_can_change(str(copy)), "a directory above it (/tmp) is everyone's"
    assert not _loader_sensitive({"PATH": "/usr/bin", "LANG": "C.UTF-8", "TZ": "UTC",
                                  "OGON_USER": "../LD_PRELOAD=/x"})
    for env in ({"LD_PRELOAD": ""}, {"GLIBC_TUNABLES": "x"}, {"TMPDIR": "/tmp"},
                {"LANGUAGE": "de"}, {"LC_ALL": "/home/u/x"}, {"TZ": "/home/u/zone"}):
        assert _loader_sensitive(env), env

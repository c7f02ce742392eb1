"""Backends as real processes: started as the session's user with ogon's
environment, ready when their endpoint accepts, watched, stopped with their
process group; failures at start and backends that die."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs

from bridge.sessions.model import ConnectState, SessionChange, SessionEvent
from tests.conftest import (
    ME,
    STANDIN_BACKEND,
    BridgeUnderTest,
    alive,
    standin_module,
    start_bridge,
)

TEST_USER = "icpbtest"


def ensure_test_account() -> str:
    """A real non-root account to run backends as: created when we are
    root (as CI is), else ourselves."""
    if os.geteuid() != 0:
        return ME
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--user-group",
                        TEST_USER], check=True, capture_output=True)
    return TEST_USER


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A short temp dir others may traverse: a backend running as another
    user creates its endpoint in <dir>/pipes and runs a copy of the
    stand-in from here."""
    path = Path(tempfile.mkdtemp(prefix="ib-", dir="/tmp"))
    path.chmod(0o755)
    shutil.copy(STANDIN_BACKEND, path / "standin_backend.py")
    (path / "standin_backend.py").chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def interpreter() -> str:
    """A Python another user can run: the venv's may live under /root."""
    return "/usr/bin/python3" if os.geteuid() == 0 else sys.executable


def module(base: Path, name: str, *extra: str, **kwargs: Any) -> Any:
    kwargs.setdefault("user", "session")
    m = standin_module(name, *extra, python=interpreter(), **kwargs)
    return type(m)(**{**m.__dict__, "command": (m.command[0], str(base / "standin_backend.py"),
                                                *m.command[2:])})


def event(bridge: BridgeUnderTest, kind: SessionEvent, session_id: int | None = None
          ) -> Deferred[SessionChange]:
    """Fires with the next change of that kind (for that session)."""
    d: Deferred[SessionChange] = Deferred()

    def seen(change: SessionChange) -> None:
        if not d.called and change.event is kind and session_id in (
                None, change.session.session_id):
            d.callback(change)

    bridge.service.registry.observe(seen)
    return d


@pytest_twisted.async_yield_fixture
async def running(open_dir: Path) -> AsyncIterator[BridgeUnderTest]:
    account = ensure_test_account()
    reports = open_dir / "reports"
    reports.mkdir(mode=0o1777)
    reports.chmod(0o1777)  # the backend, as another user, writes its report here
    report = reports / "report.json"
    bridge = await start_bridge(
        open_dir, modules={
            "greeter": module(open_dir, "greeter", user=ME),
            "xsession": module(open_dir, "xsession", "--report", str(report), "--child"),
            "crash": module(open_dir, "crash", "--crash", user=ME),
            "slow": module(open_dir, "slow", "--delay", "30", ready_timeout=0.5, user=ME),
            "short": module(open_dir, "short", "--exit-after", "0.3", "--exit-status", "4",
                            user=ME),
            "stubborn": module(open_dir, "stubborn", "--ignore-term", stop_timeout=0.3,
                               user=ME),
        },
        properties={"session.timeout": 30, "environment.add": "EXTRA:yes;OTHER:1",
                    "environment.filter": "ICPB_PASSED"},
        user_properties={"bob": {"module": "crash"}, "guest": {"module": "slow"}},
        users={"alice": ("alice-pw", 0x1FF), "bob": ("bob-pw", 0x49),
               "guest": ("guest-pw", 8), account: ("pw", 0x49)})
    bridge.account = account  # type: ignore[attr-defined]
    bridge.report = report  # type: ignore[attr-defined]
    yield bridge
    await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_desktop_runs_as_the_user_with_ogons_environment(running: BridgeUnderTest,
                                                                monkeypatch: Any) -> None:
    monkeypatch.setenv("ICPB_PASSED", "through")
    account = running.account  # type: ignore[attr-defined]
    peer = await running.peer()
    answer = await peer.logon(1, account, "pw", width=2560, height=1440)
    session = running.service.registry.by_connection(1)
    assert answer.serviceEndpoint == f"\\\\.\\pipe\\ogon_{session.session_id}_xsession"
    assert peer.connections[1].backend_session == session.session_id, "its endpoint is real"
    info = json.loads(running.report.read_text())  # type: ignore[attr-defined]
    entry = pwd.getpwnam(account)
    assert (info["uid"], info["gid"]) == (entry.pw_uid, entry.pw_gid)
    assert sorted(os.getgrouplist(account, entry.pw_gid)) == info["groups"]
    assert info["pgid"] == info["pid"] == info["sid"], "its own session and process group"
    assert info["cwd"] == entry.pw_dir
    env = info["env"]
    assert (env["USER"], env["HOME"], env["SHELL"], env["UID"]) == (
        account, entry.pw_dir, entry.pw_shell, str(entry.pw_uid))
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert env["OGON_SID"] == str(session.session_id)
    # As ogon's generateEnvBlockAndModify: no LOGNAME, and OGON_USER only for greeters.
    assert "OGON_USER" not in env and "OGON_DOMAIN" not in env and "LOGNAME" not in env
    assert env["OGON_UID"] == str(os.getuid()), "the RDP server's uid (SO_PEERCRED)"
    assert (env["OGON_COOKIE"], env["OGON_BACKEND_COOKIE"]) == (
        answer.ogonCookie, answer.backendCookie)
    assert env["OGON_SESSION_CLIENT_NAME"] == "client1"
    assert env["OGON_SESSION_CLIENT_ADDRESS"] == "192.0.2.10"
    assert (env["OGON_CONNECTION_BPP"], env["OGON_SMAX"]) == ("32", "1920x1200")
    assert (env["EXTRA"], env["OTHER"]) == ("yes", "1"), "environment.add"
    assert env["ICPB_PASSED"] == "through", "environment.filter passes ours through"
    assert "PYTHONPATH" not in env and "TERM" not in env, "otherwise a fresh environment"
    token_file = running.base / "tokens" / f"ogon.session.{session.session_id}"
    assert token_file.stat().st_uid == (entry.pw_uid if os.geteuid() == 0 else os.geteuid())

    # Logoff stops the whole process group, the backend's child included.
    pid = session.backend.pid
    backend = running.service.lifecycle.backends[session.session_id]
    child_pids = [int(line.split("started child ")[1]) for line in backend.last_lines
                  if "started child" in line]
    exited = backend.when_exited()
    registry = running.service.registry
    assert await running.service.lifecycle.logoff(registry.get(session.session_id), True)
    assert "signal 15" in await exited or "status 0" in await exited
    assert not alive(pid)
    assert [cpid for cpid in child_pids if alive(cpid)] == []


@pytest_twisted.ensureDeferred
async def test_a_backend_that_dies_ends_its_session(running: BridgeUnderTest) -> None:
    lifecycle = running.service.lifecycle
    lifecycle.modules["xsession"] = lifecycle.modules["short"]
    peer = await running.peer()
    ended = event(running, SessionEvent.ENDED)
    with capturedLogs() as events:
        await peer.logon(1, "alice", "alice-pw")
        session_id = running.service.registry.by_connection(1).session_id
        token_file = running.base / "tokens" / f"ogon.session.{session_id}"
        assert token_file.exists()
        change = await ended
    assert change.session.session_id == session_id
    assert "exited with status 4" in change.reason
    assert peer.seen("LogoffUserSessionRequest")[-1].connectionId == 1
    assert 1 not in peer.connections, "the RDP server dropped the client"
    assert not token_file.exists()
    assert any("exiting by itself" in str(e.get("line")) for e in events), "its output, logged"


@pytest_twisted.ensureDeferred
async def test_start_failures_give_the_greeter(running: BridgeUnderTest) -> None:
    peer = await running.peer()
    with capturedLogs() as events:
        crashed = await peer.logon(1, "bob", "bob-pw")
        slow = await peer.logon(2, "guest", "guest-pw")
    assert crashed.serviceEndpoint.endswith("_greeter") and slow.serviceEndpoint.endswith(
        "_greeter")
    text = " ".join(str(e.get("error", "")) for e in events)
    assert "crash exited with status 3 before it was ready" in text
    assert "crashing at start as asked" in text, "its last output is in the log line"
    assert "slow not ready within 0.5 s" in text
    assert [s.logged_on for s in running.service.registry] == [False, False]


@pytest_twisted.ensureDeferred
async def test_stop_timeout_kills(running: BridgeUnderTest) -> None:
    lifecycle = running.service.lifecycle
    lifecycle.modules["xsession"] = lifecycle.modules["stubborn"]
    peer = await running.peer()
    await peer.logon(1, "alice", "alice-pw")
    session = running.service.registry.by_connection(1)
    backend = lifecycle.backends[session.session_id]
    exited = backend.when_exited()
    assert await lifecycle.logoff(session, False)
    assert "signal 9" in await exited


@pytest_twisted.ensureDeferred
async def test_greeter_login_switches_to_the_desktop(running: BridgeUnderTest) -> None:
    account = running.account  # type: ignore[attr-defined]
    peer = await running.peer()
    greeter = await peer.logon(1, "", "")
    session_id = peer.connections[1].backend_session
    assert greeter.serviceEndpoint == f"\\\\.\\pipe\\ogon_{session_id}_greeter"
    greeter_pid = running.service.registry.get(session_id).backend.pid
    greeter_exit = running.service.lifecycle.backends[session_id].when_exited()
    assert await peer.greeter_login(1, account, "nope") == 1, "AUTH_BAD_CREDENTIALS"
    assert alive(greeter_pid), "the greeter stays"
    assert await peer.greeter_login(1, account, "pw") == 0
    [switch] = peer.seen("SwitchToRequest")
    assert switch.serviceEndpoint == f"\\\\.\\pipe\\ogon_{session_id}_xsession"
    assert peer.connections[1].backend_session == session_id, "connected to the desktop"
    session = running.service.registry.get(session_id)
    assert (session.username, session.state) == (account, ConnectState.ACTIVE)
    await greeter_exit
    assert not alive(greeter_pid), "stopped once the switch succeeded"


def test_output_is_rate_limited(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    from bridge.backends.launcher import Backend, BackendLauncher
    from bridge.backends.modules import Module
    from bridge.backends.output import OUTPUT_BURST
    from bridge.sessions.model import BackendRecord

    clock = Clock()
    launcher = BackendLauncher(reactor, clock, tmp_path, tmp_path, as_root=False)
    path, fd = launcher.logs.create(3, "m")
    backend = Backend(launcher, 3, Module("m", ("x",), "e"), BackendRecord("m", 1, 1, "e"))
    backend.follow_output(launcher.logs.attach(path, "session 3 m"), from_end=True)
    with capturedLogs() as events, open(fd, "w") as out:
        out.write("".join(f"line {n}\n" for n in range(100)))
        out.flush()
        clock.advance(1)
        clock.advance(10)
        out.write("later\n")
        out.flush()
        clock.advance(1)
    lines = [e["line"] for e in events if "line" in e]
    assert lines[:OUTPUT_BURST] == [f"line {n}" for n in range(OUTPUT_BURST)]
    assert lines[-1] == "later" and len(lines) == OUTPUT_BURST + 1
    assert any(e.get("count") == 100 - OUTPUT_BURST for e in events), "drops are counted"
    assert list(backend.last_lines)[-1] == "later"
    launcher.close()

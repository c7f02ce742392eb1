"""kill -9 during a start (issue 18, item 6): a backend is recorded the
moment it is spawned, so a restarted bridge stops every backend the last
run started and no session owns, instead of leaving it running, unowned,
holding its endpoint, while the user's next logon starts a second one."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from bridge.rdp.standin import StandInRdpServer
from tests.conftest import ME, STANDIN_BACKEND, alive, kill_process_groups
from tests.e2e.test_twistd import (
    _kill_leftover_twistd,
    cli,
    free_port,
    start_twistd,
    write_config,
)

__all__ = ["_kill_leftover_twistd"]  # the fixture: twistd is killed even when a test fails

#: How long the half-started desktop takes to make its socket: longer than the test.
SLOW = "600"


def slow_desktop_config(base: Path) -> Path:
    """The operator's config of test_twistd, with a desktop that is slow to
    start and only stops for SIGKILL while it starts."""
    config = write_config(base, free_port())
    slow = [sys.executable, str(STANDIN_BACKEND), "--socket", "{pipe_dir}/{endpoint}",
            "--delay", SLOW, "--ignore-term"]
    text = config.read_text()
    head, _, _ = text.partition("[modules.xsession]")
    config.write_text(head + f"""[modules.xsession]
command = {json.dumps(slow)}
endpoint = "ogon_{{session_id}}_X11"
user = "{ME}"
ready_timeout = 600
stop_timeout = 1
""")
    return config


def started_pids(output: str, module: str) -> list[int]:
    return [int(part.split(")")[0]) for part in output.split(f"started {module} (pid ")[1:]]


async def gone(pid: int, seconds: float) -> bool:
    for _ in range(int(seconds / 0.05)):
        if not alive(pid):
            return True
        await deferLater(reactor, 0.05)
    return not alive(pid)


@pytest_twisted.ensureDeferred
async def test_kill_9_during_starts_leaves_no_backend_behind(short_dir: Path) -> None:
    for user in ("alice", "bob"):
        _, err, code = await cli("users", "add", user, "--permission", "full", "--users",
                                 str(short_dir / "users"), "--scrypt-n", "1024",
                                 stdin=f"{user}-pw\n")
        assert code == 0, err
    config = slow_desktop_config(short_dir)
    seen: list[int] = []
    try:
        await _kill_during_starts(short_dir, config, seen)
    finally:
        kill_process_groups(seen)


async def _kill_during_starts(base: Path, config: Path, seen: list[int]) -> None:
    proc, transport = await start_twistd(base, config)
    peer = StandInRdpServer(reactor, pipe_dir=base / "pipes")
    await peer.connect(f"unix:{base}/icp.sock")
    # Connection 1: a greeter, then alice's login in it, whose desktop starts
    # (the greeter's session is alice's only once the desktop is ready).
    await peer.logon(1, "", "")
    [greeter] = started_pids(proc.output, "greeter")
    login = Deferred.fromCoroutine(peer.greeter_login(1, "alice", "alice-pw"))
    login.addErrback(lambda _: None)  # the bridge dies before it answers
    # Connection 2: bob's LogonUser, answered once his desktop is ready.
    logon = Deferred.fromCoroutine(peer.logon(2, "bob", "bob-pw"))
    logon.addErrback(lambda _: None)
    await proc.wait_for("session 1: started xsession (pid ")
    await proc.wait_for("session 2: started xsession (pid ")
    desktops = started_pids(proc.output, "xsession")
    seen += [greeter, *desktops]
    assert len(desktops) == 2

    closed = peer.protocol.when_closed()
    transport.signalProcess(signal.SIGKILL)
    await proc.ended
    await closed
    assert all(alive(pid) for pid in seen), "backends outlive the bridge"

    proc, transport = await start_twistd(base, config)
    for pid in seen:
        assert await gone(pid, 10), f"backend {pid} left running by the restarted bridge"
    for pid in desktops:
        assert f"stopping xsession backend (pid {pid})" in proc.output, "the stop is logged"

    # What the next logon finds: bob's new desktop is the only one.
    peer = StandInRdpServer(reactor, pipe_dir=base / "pipes")
    await peer.connect(f"unix:{base}/icp.sock")
    again = Deferred.fromCoroutine(peer.logon(3, "bob", "bob-pw"))
    again.addErrback(lambda _: None)
    await proc.wait_for("session 3: started xsession (pid ")
    [new] = started_pids(proc.output, "xsession")
    seen.append(new)
    assert [pid for pid in desktops if alive(pid)] == [] and alive(new)

    # Killed again while that one starts: the next run stops it too.
    closed = peer.protocol.when_closed()
    transport.signalProcess(signal.SIGKILL)
    await proc.ended
    await closed
    proc, transport = await start_twistd(base, config)
    assert await gone(new, 10)
    transport.signalProcess(signal.SIGTERM)
    await proc.ended

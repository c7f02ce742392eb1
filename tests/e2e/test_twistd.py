"""The real thing: ``twistd -n icp-bridge`` in a subprocess, the stand-in RDP
server and ``icp-bridge ctl``; kill -9 and a restart keep the sessions."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from bridge.rdp.standin import StandInRdpServer
from tests.conftest import ME, STANDIN_BACKEND, alive, kill_process_groups, plugin_args
from tests.e2e.sse import open_events

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


class Twistd(ProcessProtocol):
    """A twistd child whose log we watch for a line."""

    def __init__(self) -> None:
        self.output = ""
        self.waiting: list[tuple[str, Deferred[None]]] = []
        self.ended: Deferred[Any] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode(errors="replace")
        for text, d in list(self.waiting):
            if text in self.output:
                self.waiting.remove((text, d))
                d.callback(None)

    errReceived = outReceived

    def wait_for(self, text: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiting.append((text, d))
        self.outReceived(b"")
        return d

    def processEnded(self, reason: Any) -> None:
        for _, d in self.waiting:
            d.errback(RuntimeError(f"twistd ended:\n{self.output}"))
        self.waiting = []
        self.ended.callback(reason.value)  # an exit status, not an error here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(base: Path, port: int, admin_port: int = 0) -> Path:
    """What an operator would write: TLS on a port of ours, the TLS pair
    and the backends' pipes in the test's directory, stand-in backends."""
    backend = [sys.executable, str(STANDIN_BACKEND), "--socket", "{pipe_dir}/{endpoint}"]
    config = base / "bridge.toml"
    config.write_text(f"""
icp_endpoint = "unix:{base}/icp.sock:mode=600"
thrift_endpoint = "ssl:{port}:interface=127.0.0.1"
admin_endpoint = "tcp:{admin_port}:interface=127.0.0.1"
dbus_address = ""
state_dir = "{base}/state"
users_file = "{base}/users"
token_dir = "{base}/tokens"
pipe_dir = "{base}/pipes"
backend_log_dir = "{base}/logs"

[properties]
"ssl.certificate" = "{base}/tls/ogon.crt"
"ssl.key" = "{base}/tls/ogon.key"

[modules.greeter]
command = {json.dumps(backend)}
endpoint = "ogon_{{session_id}}_Qt"
user = "{ME}"

[modules.xsession]
command = {json.dumps(backend)}
endpoint = "ogon_{{session_id}}_X11"
user = "{ME}"
""")
    return config


# twistd children of the running test, killed at its end even when it fails.
RUNNING: list[Any] = []


@pytest.fixture(autouse=True)
def _kill_leftover_twistd() -> Iterator[None]:
    yield
    while RUNNING:
        transport = RUNNING.pop()
        if transport.pid is not None:
            try:
                os.kill(transport.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


#: twistd in the foreground without a pid file, as the systemd unit runs it.
TWISTD_ARGS = ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]


async def start_twistd(base: Path, config: Path) -> tuple[Twistd, Any]:
    proc = Twistd()
    args = [sys.executable, *TWISTD_ARGS, *plugin_args(config)]
    transport = reactor.spawnProcess(proc, sys.executable, args, env=ENV, path=str(ROOT))
    RUNNING.append(transport)
    await proc.wait_for("OTS API listening on")
    return proc, transport


def assert_journal_matches_state(path: Path) -> None:
    """Each stored session is where its last journal event left it; each
    session whose last event is its end is gone: the journal holds exactly
    the changes the state holds."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        stored = {sid: json.loads(data)["state"]
                  for sid, data in db.execute("SELECT session_id, data FROM sessions")}
        last: dict[int, tuple[str, int | None]] = {}
        for sid, event, new_state in db.execute(
                "SELECT session_id, event, new_state FROM events ORDER BY id"):
            last[sid] = (event, new_state)
    finally:
        db.close()
    assert set(stored) <= set(last), "no session without its events"
    for sid, (event, new_state) in last.items():
        if event == "ended":
            assert sid not in stored, sid
        else:
            assert stored.get(sid) == new_state, (sid, event)


async def cli(*args: str, stdin: str = "") -> tuple[str, str, int]:
    if stdin:
        args = ("-c", f"import sys, io; sys.stdin = io.StringIO({stdin!r}); "
                "from bridge.cli import main; sys.exit(main(sys.argv[1:]))", *args)
    else:
        args = ("-m", "bridge.cli", *args)
    out, err, code = await getProcessOutputAndValue(sys.executable, args, env=ENV,
                                                    path=str(ROOT))
    return out.decode(), err.decode(), code


@pytest_twisted.ensureDeferred
async def test_demo_and_kill_9_restart(short_dir: Path) -> None:
    _, err, code = await cli("users", "add", "alice", "--permission", "full", "--users",
                             str(short_dir / "users"), "--scrypt-n", "1024",
                             stdin="alice-pw\n")
    assert code == 0, err
    port = free_port()
    admin_port = free_port()
    config = write_config(short_dir, port, admin_port)
    proc, transport = await start_twistd(short_dir, config)
    assert f"ICP (RDP server) listening on unix:{short_dir}/icp.sock" in proc.output
    assert "BridgeReactor)" in proc.output  # twistd without --reactor runs ours
    assert "generated a self-signed TLS certificate" in proc.output
    certificate = short_dir / "tls" / "ogon.crt"
    assert stat.S_IMODE((short_dir / "tls" / "ogon.key").stat().st_mode) == 0o600

    # The demo: a client connects, the greeter starts, the user logs on in it.
    peer = StandInRdpServer(reactor, pipe_dir=short_dir / "pipes")
    await peer.connect(f"unix:{short_dir}/icp.sock")
    greeter = await peer.logon(1, "", "")
    assert greeter.serviceEndpoint == "\\\\.\\pipe\\ogon_1_Qt"
    assert await peer.greeter_login(1, "alice", "alice-pw") == 0
    assert peer.connections[1].service_endpoint == "\\\\.\\pipe\\ogon_1_X11"
    assert peer.connections[1].backend_session == 1, "connected to the desktop"
    await proc.wait_for("session 1 xsession: standin-backend")  # its output, in our log

    ctl = ("ctl", "--port", str(port), "--cafile", str(certificate))
    out, err, code = await cli(*ctl, "logon", "alice", stdin="alice-pw\n")
    assert code == 0, err
    token = out.strip()
    # A client of the event stream, from the first event on.
    events = await open_events(admin_port, token, "?after=0")
    await events.wait_for(lambda seen: any(e.data["event"] == "logged-on" for e in seen))
    out, err, code = await cli(*ctl, "--token", token, "sessions")
    assert code == 0, err
    assert "Active" in out and "alice" in out and "client1" in out
    out, err, code = await cli(*ctl, "--token", token, "--json", "vc-open", "1", "CLIPRDR")
    assert code == 0, err
    assert json.loads(out)["pipe"].endswith("_svc_CLIPRDR_1")
    token_file = short_dir / "tokens" / "ogon.session.1"
    assert token_file.stat().st_mode & 0o777 == 0o600
    backend_pid = int(proc.output.split("started xsession (pid ")[1].split(")")[0])

    closed = peer.protocol.when_closed()
    transport.signalProcess(signal.SIGKILL)
    await proc.ended
    await closed
    await events.closed
    assert alive(backend_pid), "the desktop outlives the bridge"
    assert_journal_matches_state(short_dir / "state" / "state.sqlite3")
    seen = events.ids

    proc, transport = await start_twistd(short_dir, config)
    await proc.wait_for(f"adopted xsession backend (pid {backend_pid})")
    assert_journal_matches_state(short_dir / "state" / "state.sqlite3")
    events = await open_events(admin_port, token, last_event_id=seen[-1])
    assert "started xsession" not in proc.output, "nothing started twice"
    out, err, code = await cli(*ctl, "--token", token, "sessions")
    assert code == 0, err
    assert "Disconnected" in out and "alice" in out
    out, err, code = await cli(*ctl, "--token", token, "query", "1", "UserName")
    assert "UserName: alice" in out.splitlines()
    out, err, code = await cli(*ctl, "--token", token, "logoff", "1")
    assert code == 0, err
    assert not token_file.exists()
    await proc.wait_for("session 1 ended")
    await events.wait_for(lambda later: any(e.data["event"] == "ended" for e in later))
    both = seen + events.ids
    assert both == list(range(1, len(both) + 1)), "no gap and nothing twice across kill -9"
    assert events.sessions[0].data["reason"] == "bridge restarted"
    events.drop()
    transport.signalProcess(signal.SIGTERM)
    await proc.ended
    assert "Server Shut Down" in proc.output
    for _ in range(100):  # SIGTERM was sent; the process group is reaped by init
        if not alive(backend_pid):
            break
        await deferLater(reactor, 0.05)
    assert not alive(backend_pid), "logoff stopped the backend"


@pytest_twisted.ensureDeferred
async def test_bad_config_is_one_line(short_dir: Path) -> None:
    config = short_dir / "bridge.toml"
    config.write_text("call_timeout = 'soon'\n")
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-c", "from twisted.scripts.twistd import run; run()", "-n",
                         *plugin_args(config)], env=ENV, path=str(ROOT))
    assert code != 0
    text = (out + err).decode()
    assert "call_timeout: expected a number, got str" in text
    assert "Traceback" not in text


@pytest_twisted.ensureDeferred
async def test_a_second_bridge_on_the_same_state_directory_is_refused(short_dir: Path) -> None:
    """Two real bridges, each with its own socket and ports, one state_dir:
    the second says whose it is in one line and has written nothing (no TLS
    pair of its own, no session of the first marked Disconnected); the
    state tools that read go on working beside the first; once the first
    is killed (-9: the kernel drops its lock) the second starts."""
    _, err, code = await cli("users", "add", "alice", "--permission", "full", "--users",
                             str(short_dir / "users"), "--scrypt-n", "1024",
                             stdin="alice-pw\n")
    assert code == 0, err
    first_config = write_config(short_dir, free_port())
    second_config = short_dir / "second.toml"
    second_config.write_text(
        write_config(short_dir, free_port()).read_text()
        .replace("icp.sock", "icp2.sock").replace(f"{short_dir}/tls", f"{short_dir}/tls2")
        .replace(f"{short_dir}/pipes", f"{short_dir}/pipes2"))
    first_config.write_text(write_config(short_dir, free_port()).read_text())
    first, first_transport = await start_twistd(short_dir, first_config)
    peer = StandInRdpServer(reactor, pipe_dir=short_dir / "pipes")
    await peer.connect(f"unix:{short_dir}/icp.sock")
    await peer.logon(1, "alice", "alice-pw")
    await first.wait_for("session 1: user alice logged on")

    out, err, code = await getProcessOutputAndValue(
        sys.executable, [*TWISTD_ARGS, *plugin_args(second_config)], env=ENV, path=str(ROOT))
    state = short_dir / "state"
    assert code == 1 and out == b""
    assert err.decode().splitlines() == [
        f"icp-bridge: state_dir: {state} is in use by icp-bridge (pid {first_transport.pid}), "
        f"which holds {state}/state.lock; each bridge needs a state_dir of its own"]
    assert not (short_dir / "tls2").exists(), "refused before it made a TLS pair"
    assert not (short_dir / "icp2.sock").exists()
    database = state / "state.sqlite3"
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        reasons = [reason for (reason,) in db.execute("SELECT reason FROM events")]
        (data,) = db.execute("SELECT data FROM sessions WHERE session_id = 1").fetchone()
    finally:
        db.close()
    assert "bridge restarted" not in reasons
    assert json.loads(data)["state"] == 0, "alice's session is still Active"

    # Readers of the database need no lock; a restore does, and names the holder.
    _, err, code = await cli("state", "backup", str(short_dir / "b.sqlite3"), "--state",
                             str(state))
    assert code == 0, err
    out, _, code = await cli("state", "check", "--state", str(state))
    assert code == 0 and f"in use by the running bridge (pid {first_transport.pid})" in out
    _, err, code = await cli("state", "restore", str(short_dir / "b.sqlite3"), "--state",
                             str(state))
    assert code == 1 and f"a bridge (pid {first_transport.pid}) has {database} open" in err

    backend_pid = int(first.output.split("started xsession (pid ")[1].split(")")[0])
    try:
        closed = peer.protocol.when_closed()
        first_transport.signalProcess(signal.SIGKILL)
        await first.ended
        await closed
        second, second_transport = await start_twistd(short_dir, second_config)
        await second.wait_for(f"adopted xsession backend (pid {backend_pid})")
        second_transport.signalProcess(signal.SIGTERM)
        await second.ended
    finally:
        kill_process_groups([backend_pid])

"""An operator's day with a real ``twistd -n icp-bridge``: started by
``systemd-socket-activate`` on its ICP socket (socket activation as the
.socket unit does it) and telling a NOTIFY_SOCKET of ours READY, WATCHDOG,
RELOADING and STOPPING; SIGHUP reloading (and refusing a bad file) with the
sessions untouched; SIGUSR1 starting a new --logfile after a ``mv``; the
journal's line format; startup errors as one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import inotify, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath

from bridge.rdp.standin import StandInRdpServer
from tests.conftest import ME, STANDIN_BACKEND, kill_process_groups, plugin_args
from tests.e2e.test_ogon_install import ask

# Its twistd children are killed at the end of each test, as test_twistd's.
from tests.e2e.test_twistd import RUNNING, TWISTD_ARGS, Twistd
from tests.e2e.test_twistd import _kill_leftover_twistd as _kill_leftover_twistd

ROOT = Path(__file__).resolve().parents[2]
TWISTD = [sys.executable, *TWISTD_ARGS]
BACKEND = [sys.executable, str(STANDIN_BACKEND), "--socket", "{pipe_dir}/{endpoint}"]


class Systemd(DatagramProtocol):
    """Where systemd listens for a service's notifications."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.waiting: list[tuple[str, int, Deferred[dict[str, str]]]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        self._check()

    def when(self, field: str, count: int = 1) -> Deferred[dict[str, str]]:
        """Fires with the ``count``-th message that has ``field``."""
        d: Deferred[dict[str, str]] = Deferred()
        self.waiting.append((field, count, d))
        self._check()
        return d

    def _check(self) -> None:
        for field, count, d in list(self.waiting):
            having = [m for m in self.messages if field in m]
            if len(having) >= count:
                self.waiting.remove((field, count, d))
                d.callback(having[count - 1])

    def kinds(self) -> list[str]:
        """The messages in order, watchdog keep-alives left out."""
        return [next(iter(m)) for m in self.messages if "WATCHDOG" not in m]


class LogWatcher:
    """Fires when a log file (whichever file has its path now) holds a text:
    inotify on its directory, so no polling."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.waiting: list[tuple[str, Deferred[None]]] = []
        self.notifier = inotify.INotify()
        self.notifier.startReading()
        self.notifier.watch(FilePath(str(path.parent)),
                            inotify.IN_MODIFY | inotify.IN_CREATE | inotify.IN_MOVED_TO,
                            callbacks=[lambda *_: self._check()])

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, text: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiting.append((text, d))
        self._check()
        return d

    def _check(self) -> None:
        current = self.text()
        for text, d in list(self.waiting):
            if text in current:
                self.waiting.remove((text, d))
                d.callback(None)

    def close(self) -> None:
        self.notifier.loseConnection()


def write_config(base: Path, icp_endpoint: str, properties: str = "",
                 log_level: str = "info", top: str = "") -> Path:
    """``top``: more top-level keys (TOML lines)."""
    path = base / "bridge.toml"
    path.write_text(f"""{top}
icp_endpoint = "{icp_endpoint}"
thrift_endpoint = "tcp:0:interface=127.0.0.1"
admin_endpoint = ""
dbus_address = ""
state_dir = "{base}/state"
users_file = "{base}/users"
token_dir = "{base}/tokens"
pipe_dir = "{base}/pipes"
log_level = "{log_level}"
[properties]
"session.timeout" = 30
{properties}
[modules.greeter]
command = {json.dumps(BACKEND)}
endpoint = "ogon_{{session_id}}_Qt"
user = "{ME}"
[modules.xsession]
command = {json.dumps(BACKEND)}
endpoint = "ogon_{{session_id}}_X11"
user = "{ME}"
""")
    return path


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package systemd; .ci/run installs it)")
    return path


@pytest_twisted.ensureDeferred
async def test_socket_activation_and_the_notify_protocol(short_dir: Path) -> None:
    systemd = Systemd()
    notify = reactor.listenUNIXDatagram(str(short_dir / "notify"), systemd)
    socket_path = short_dir / "icp.sock"
    config = write_config(short_dir, "systemd:domain=UNIX:name=icp")
    proc = Twistd()
    # As the .socket unit does: the socket is made first; the bridge is
    # started (and handed it) when the RDP server connects.
    transport = reactor.spawnProcess(proc, tool("systemd-socket-activate"), [
        "systemd-socket-activate", "-l", str(socket_path), "--fdname=icp",
        "-E", f"PYTHONPATH={ROOT}", "-E", "PYTHONUNBUFFERED=1",
        "-E", f"NOTIFY_SOCKET={short_dir}/notify", "-E", "WATCHDOG_USEC=400000",
        *TWISTD, *plugin_args(config)], env=dict(os.environ), path=str(ROOT))
    RUNNING.append(transport)
    pids: list[int] = []
    try:
        await proc.wait_for(f"Listening on {socket_path}")
        mode = stat.S_IMODE(socket_path.stat().st_mode)
        peer = StandInRdpServer(reactor, pipe_dir=short_dir / "pipes")
        await peer.connect(f"unix:{socket_path}")  # starts the bridge; waits in the queue
        ready = await systemd.when("READY")
        assert ready["STATUS"] == "0 sessions"
        assert "socket handed over by systemd: systemd:domain=UNIX:name=icp" in proc.output
        assert "another icp-bridge" not in proc.output and "stale" not in proc.output
        assert not Path(f"{socket_path}.lock").exists(), "no lock for a socket it was handed"
        assert stat.S_IMODE(socket_path.stat().st_mode) == mode, "its mode is systemd's"
        await systemd.when("WATCHDOG", 3)  # a keep-alive every 0.2 s
        greeter = await peer.logon(1, "", "")
        assert greeter.serviceEndpoint.endswith("ogon_1_Qt")
        pids = [int(proc.output.split("started greeter (pid ")[1].split(")")[0])]

        write_config(short_dir, "systemd:domain=UNIX:name=icp",
                     properties='"session.singleSession" = false\n')
        transport.signalProcess(signal.SIGHUP)
        reloading = await systemd.when("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        await systemd.when("READY", 2)
        assert "reload: properties.session.singleSession: (unset) -> False" in proc.output
        assert peer.protocol is not None and peer.protocol.transport is not None
        assert (await peer.logon(2, "", "")).serviceEndpoint.endswith("ogon_2_Qt"), \
            "the same RDP server connection goes on"
        pids.append(int(proc.output.split("started greeter (pid ")[2].split(")")[0]))

        closed = peer.protocol.when_closed()
        transport.signalProcess(signal.SIGTERM)
        await systemd.when("STOPPING")
        await proc.ended
        await closed
        assert systemd.kinds() == ["READY", "RELOADING", "READY", "STOPPING"]
        assert socket_path.exists(), "the socket is systemd's: still there after the stop"
    finally:
        await notify.stopListening()
        kill_process_groups(pids)


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_or_refuses_and_sigusr1_starts_a_new_logfile(
        short_dir: Path) -> None:
    config = write_config(short_dir, f"unix:{short_dir}/icp.sock:mode=600")
    logfile = short_dir / "bridge.log"
    proc = Twistd()
    done: Deferred[Any] = Deferred()
    transport = reactor.spawnProcess(
        proc, sys.executable, [*TWISTD, f"--logfile={logfile}", *plugin_args(config)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, path=str(ROOT))
    RUNNING.append(transport)
    proc.ended.addBoth(done.callback)

    watcher = LogWatcher(logfile)
    logged = watcher.wait_for

    await logged("OTS API listening on")
    peer = StandInRdpServer(reactor, pipe_dir=short_dir / "pipes")
    await peer.connect(f"unix:{short_dir}/icp.sock")
    await peer.logon(1, "", "")
    pids = [int(logfile.read_text().split("started greeter (pid ")[1].split(")")[0])]
    try:
        # A file that does not check: refused, one line; the bridge goes on.
        config.write_text(config.read_text().replace("[properties]",
                                                     "[properties]\n\"session.timeout\" = \"5\"")
                          .replace('"session.timeout" = 30\n', ""))
        transport.signalProcess(signal.SIGHUP)
        await logged("configuration not reloaded")
        line = next(li for li in logfile.read_text().splitlines()
                    if "configuration not reloaded" in li)
        assert line.endswith(f"configuration not reloaded, the running one stays: {config}: "
                             f"properties.session.timeout: ogon reads session.timeout as an "
                             f"integer, not the string '5' (write 5 without quotes); a value "
                             f"of another type is never found")
        assert not done.called and "Traceback" not in logfile.read_text()
        write_config(short_dir, f"unix:{short_dir}/icp.sock:mode=600",
                     properties='"session.reconnect" = false\n')
        transport.signalProcess(signal.SIGHUP)
        await logged("configuration reloaded from")
        assert "reload: properties.session.reconnect: (unset) -> False" in logfile.read_text()
        assert (await peer.logon(2, "", "")).serviceEndpoint.endswith("ogon_2_Qt")
        pids.append(int(logfile.read_text().split("started greeter (pid ")[2].split(")")[0]))
        # logrotate's way: mv, then SIGUSR1; the bridge starts a new file.
        logfile.rename(short_dir / "bridge.log.1")
        transport.signalProcess(signal.SIGUSR1)
        await logged("SIGUSR1: log file reopened")
        assert "SIGUSR1" not in (short_dir / "bridge.log.1").read_text()
        assert "configuration reloaded" in (short_dir / "bridge.log.1").read_text()
        closed = peer.protocol.when_closed()
        transport.signalProcess(signal.SIGTERM)
        await done
        await closed
        assert "Server Shut Down" in logfile.read_text()
    finally:
        watcher.close()
        kill_process_groups(pids)


@pytest_twisted.ensureDeferred
async def test_sighup_reads_ogons_config_ini_again(short_dir: Path) -> None:
    """As ogon's session manager on SIGHUP: a changed config.ini is served
    over ICP after the reload; one that cannot be used is refused with its
    file and line, and the running values stay."""
    ini = short_dir / "config.ini"
    ini.write_text("[global]\nsession_maxXRes_number=1600\n")
    config = write_config(short_dir, f"unix:{short_dir}/icp.sock:mode=600",
                          top=f'ogon_config = "{ini}"\nauthenticator = "users-file"')
    logfile = short_dir / "bridge.log"
    proc = Twistd()
    done: Deferred[Any] = Deferred()
    transport = reactor.spawnProcess(
        proc, sys.executable, [*TWISTD, f"--logfile={logfile}", *plugin_args(config)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, path=str(ROOT))
    RUNNING.append(transport)
    proc.ended.addBoth(done.callback)
    watcher = LogWatcher(logfile)
    try:
        await watcher.wait_for("OTS API listening on")
        assert f"configuration from {config}, {ini}" in watcher.text()
        assert f"ogon config {ini}: 1 global properties, 0 users" in watcher.text()
        peer = StandInRdpServer(reactor, pipe_dir=short_dir / "pipes")
        await peer.connect(f"unix:{short_dir}/icp.sock")
        assert await ask(peer, "number", "session.maxXRes") == (True, 1600)

        ini.write_text("[global]\nsession_maxXRes_number=2048\n")
        transport.signalProcess(signal.SIGHUP)
        await watcher.wait_for("configuration reloaded from")
        assert f"reload: {ini}: session.maxXRes: 1600 -> 2048" in watcher.text()
        assert await ask(peer, "number", "session.maxXRes") == (True, 2048)

        ini.write_text("[global]\nsession_maxXRes_number=4096\nsession_maxXRes_number=1\n")
        transport.signalProcess(signal.SIGHUP)
        await watcher.wait_for("configuration not reloaded")
        line = next(li for li in watcher.text().splitlines()
                    if "configuration not reloaded" in li)
        assert line.endswith(f"configuration not reloaded, the running one stays: {ini}:3: "
                             f"session_maxXRes_number given twice in [global] (first on line "
                             f"2); ogon then ignores the whole file")
        assert await ask(peer, "number", "session.maxXRes") == (True, 2048)
        assert not done.called and "Traceback" not in watcher.text()
        closed = peer.protocol.when_closed()
        transport.signalProcess(signal.SIGTERM)
        await done
        await closed
    finally:
        watcher.close()


@pytest_twisted.ensureDeferred
async def test_journal_lines_and_the_log_level(short_dir: Path) -> None:
    systemd = Systemd()
    notify = reactor.listenUNIXDatagram(str(short_dir / "notify"), systemd)
    config = write_config(short_dir, f"unix:{short_dir}/icp.sock:mode=600", log_level="warn")
    out = short_dir / "journal"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    info = os.fstat(fd)
    proc = Twistd()
    try:
        transport = reactor.spawnProcess(
            proc, sys.executable, [*TWISTD, *plugin_args(config)],
            env={**os.environ, "PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": str(short_dir / "notify"),
                 "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"},
            path=str(ROOT), childFDs={0: "w", 1: fd, 2: fd})
    finally:
        os.close(fd)
    RUNNING.append(transport)
    try:
        await systemd.when("READY")
        transport.signalProcess(signal.SIGTERM)
        await proc.ended
        lines = out.read_text().splitlines()
        assert lines, "it logged"
        assert all(line[:3] in ("<4>", "<3>", "<2>") for line in lines), lines
        assert any(line.startswith("<4>[bridge.service.BridgeService] no users file at")
                   for line in lines)
        assert not any(line[3:7].isdigit() for line in lines), "no timestamp of its own"
        assert not any("listening on" in line for line in lines), "info is below warn"
    finally:
        await notify.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_startup_error_is_one_line_naming_the_file(short_dir: Path) -> None:
    config = short_dir / "bridge.toml"
    config.write_text('[properties]\n"session.timeout" = "30"\n"session.timout" = 1\n')
    out, err, code = await getProcessOutputAndValue(
        sys.executable, [*TWISTD[1:], *plugin_args(config)],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, path=str(ROOT))
    assert code == 1 and out == b""
    assert err.decode().splitlines() == [
        f"icp-bridge: {config}: properties.session.timeout: ogon reads session.timeout as an "
        f"integer, not the string '30' (write 30 without quotes); a value of another type is "
        f"never found"]

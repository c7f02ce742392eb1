"""Shared fixtures: a real bridge service on 127.0.0.1 and a short UNIX
socket path, and the stand-in RDP server connected to it."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import sys
import tempfile
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import settings
from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher

from bridge.backends import standin as standin_backend
from bridge.backends.modules import Module
from bridge.config import Config
from bridge.rdp.standin import StandInRdpServer
from bridge.security.auth import InMemoryAuthenticator
from bridge.security.permissions import FULL, GUEST, USER
from bridge.service import BridgeService

settings.register_profile("ci", deadline=None, max_examples=100)
settings.load_profile("ci")


def _log_to_stderr(event: dict[str, Any]) -> None:
    """The bridge's log lines, in a failing test's captured stderr."""
    text = formatEvent(event)
    if event.get("log_failure") is not None:
        text += "\n" + event["log_failure"].getTraceback()
    sys.stderr.write(f"[{event.get('log_namespace', '-')}] {text}\n")


globalLogPublisher.addObserver(_log_to_stderr)

#: Where a test looks for the machine's own configuration: nowhere. A
#: developer's ogon host has /etc/ogon/config.ini (and maybe
#: /etc/icp-bridge/bridge.toml); the suite must give the result it gives in CI.
NO_HOST_FILES = Path("/nonexistent/icp-bridge-tests")


@pytest.fixture(autouse=True)
def _not_this_machines_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process, the default files are never read (a test that
    wants them points these at its own); children get flags instead
    (``plugin_args``)."""
    import bridge.config

    monkeypatch.setattr(bridge.config, "DEFAULT_CONFIG_FILE", NO_HOST_FILES / "bridge.toml")
    monkeypatch.setattr(bridge.config, "DEFAULT_OGON_CONFIG", NO_HOST_FILES / "config.ini")


#: ``twistd`` run as a child (its own options go after it, then plugin_args).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def no_ogon_config(config: Path) -> list[str]:
    """``--ogon-config ""`` unless the TOML file ``config`` names a
    config.ini: a child never reads this machine's /etc/ogon/config.ini."""
    try:
        with open(config, "rb") as f:
            names_one = "ogon_config" in tomllib.load(f)
    except tomllib.TOMLDecodeError:
        names_one = False  # the test is about that; the flag changes nothing
    return [] if names_one else ["--ogon-config", ""]


def plugin_args(config: Path, *flags: str) -> list[str]:
    """``icp-bridge --config FILE [flags]`` for a twistd child that reads
    only what the test gave it: the TOML file always named (never
    /etc/icp-bridge/bridge.toml; made empty when missing), and
    /etc/ogon/config.ini never (``no_ogon_config``)."""
    if not config.exists():
        config.write_text("")
    if "--ogon-config" not in flags:
        flags = (*flags, *no_ogon_config(config))
    return ["icp-bridge", "--config", str(config), *flags]

USERS = {
    "alice": ("alice-pw", FULL),
    "bob": ("bob-pw", int(USER)),
    "guest": ("guest-pw", int(GUEST)),
}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temp dir with a short path: AF_UNIX paths cap near 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ib-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


STANDIN_BACKEND = Path(standin_backend.__file__)
# The test users (alice, bob, ...) have no system accounts: backends run as us.
ME = pwd.getpwuid(os.geteuid()).pw_name


def standin_module(name: str, *extra: str, endpoint: str | None = None,
                   python: str = sys.executable, user: str = ME, **kwargs: Any) -> Module:
    """A module that runs the stand-in backend (``icp-bridge backend``)."""
    return Module(
        name=name,
        command=(python, str(STANDIN_BACKEND), "--socket", "{pipe_dir}/{endpoint}", *extra),
        endpoint=endpoint or f"ogon_{{session_id}}_{name}", user=user, **kwargs)


def make_config(base: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "icp_endpoint": f"unix:{base}/icp.sock:mode=600",
        "thrift_endpoint": "tcp:0:interface=127.0.0.1",
        "admin_endpoint": "tcp:0:interface=127.0.0.1",
        # Tests that want D-Bus start their own bus.
        "dbus_address": "",
        "state_dir": base / "state",
        "users_file": base / "users",
        "token_dir": base / "tokens",
        "pipe_dir": base / "pipes",
        "backend_log_dir": base / "logs",
        # The ICP socket's lock: not /run/icp-bridge, which tests would litter.
        "lock_dir": base / "run",
        "channels_deny": ["blocked"],
        # The main process serves the OTS API alone, unless a test asks for
        # worker processes (tests/e2e/test_workers.py).
        "otsapi_workers": 0,
        "properties": {"session.timeout": 30, "ssl.enabled": True, "desktop.name": "xfce"},
        "user_properties": {"alice": {"desktop.name": "kde"}},
        "modules": {"greeter": standin_module("greeter", ready_timeout=20),
                    "xsession": standin_module("xsession", ready_timeout=20)},
    }
    values.update(overrides)
    return Config(**values)


def kill_process_groups(pids: list[int]) -> None:
    """Backends outlive the service by design; tests end them."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def kill_and_wait(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL ``pid``'s process group and return once the process has
    exited (its pidfd is readable): kill() only queues the signal, and a
    check made at once could still see it running on a busy machine."""
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
        readable, _, _ = select.select([pidfd], [], [], timeout)
        assert readable, f"pid {pid} still runs {timeout} s after SIGKILL"
    finally:
        os.close(pidfd)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class BridgeUnderTest:
    """A started BridgeService plus what tests need to reach it."""

    def __init__(self, service: BridgeService, base: Path) -> None:
        self.service = service
        self.base = base
        self.peers: list[StandInRdpServer] = []

    @property
    def icp_path(self) -> str:
        return str(self.base / "icp.sock")

    @property
    def admin_port(self) -> int:
        listener = self.service.admin_listener
        assert listener is not None and listener.port is not None
        return listener.port.getHost().port

    @property
    def thrift_port(self) -> int:
        assert self.service.thrift_listener.port is not None
        return self.service.thrift_listener.port.getHost().port

    async def peer(self, **kwargs: Any) -> StandInRdpServer:
        kwargs.setdefault("pipe_dir", self.service.config.pipe_dir)
        peer = StandInRdpServer(reactor, **kwargs)
        await peer.connect(f"unix:{self.icp_path}")
        self.peers.append(peer)
        return peer

    def backend_pids(self) -> list[int]:
        # A backend that already exited has no pid any more.
        return [pid for pid in [b.pid for b in self.service.launcher.running()] + [
            s.backend.pid for s in self.service.registry if s.backend is not None]
            if pid is not None]

    async def stop(self, kill_backends: bool = True) -> None:
        """Stop the service; its users' backends are killed too, unless a
        restart test wants the next bridge to adopt them."""
        for peer in self.peers:
            if peer.protocol is not None and peer.protocol.transport is not None:
                closed = peer.protocol.when_closed()
                peer.close()
                await closed
        pids = self.backend_pids()
        await self.service.stopService()
        if kill_backends:
            kill_process_groups(pids)


async def start_bridge(base: Path, clock: Any = None,
                       users: dict[str, tuple[str, int]] | None = None,
                       **overrides: Any) -> BridgeUnderTest:
    service = BridgeService(make_config(base, **overrides), reactor,
                            authenticator=InMemoryAuthenticator(dict(users or USERS)), clock=clock)
    service.startService()
    return BridgeUnderTest(service, base)


@pytest_twisted.async_yield_fixture
async def bridge(short_dir: Path) -> AsyncIterator[BridgeUnderTest]:
    running = await start_bridge(short_dir)
    yield running
    await running.stop()

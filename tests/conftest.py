"""Shared fixtures: a real bridge service on 127.0.0.1 and a short UNIX
socket path, and the stand-in RDP server connected to it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import settings
from twisted.internet import reactor

from bridge.auth import InMemoryAuthenticator
from bridge.config import Config
from bridge.peer import StandInRdpServer
from bridge.permissions import FULL, GUEST, USER
from bridge.service import BridgeService

settings.register_profile("ci", deadline=None, max_examples=100)
settings.load_profile("ci")

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


def make_config(base: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "icp_endpoint": f"unix:{base}/icp.sock:mode=600",
        "thrift_endpoint": "tcp:0:interface=127.0.0.1",
        "state_dir": base / "state",
        "users_file": base / "users",
        "token_dir": base / "tokens",
        "channels_deny": ["blocked"],
        "properties": {"session.timeout": 30, "ssl.enabled": True, "desktop.name": "xfce"},
        "user_properties": {"alice": {"desktop.name": "kde"}},
    }
    values.update(overrides)
    return Config(**values)


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
    def thrift_port(self) -> int:
        assert self.service.thrift_listener.port is not None
        return self.service.thrift_listener.port.getHost().port

    async def peer(self, **kwargs: Any) -> StandInRdpServer:
        peer = StandInRdpServer(reactor, **kwargs)
        await peer.connect(f"unix:{self.icp_path}")
        self.peers.append(peer)
        return peer

    async def stop(self) -> None:
        for peer in self.peers:
            if peer.protocol is not None and peer.protocol.transport is not None:
                closed = peer.protocol.when_closed()
                peer.close()
                await closed
        await self.service.stopService()


async def start_bridge(base: Path, clock: Any = None, **overrides: Any) -> BridgeUnderTest:
    service = BridgeService(make_config(base, **overrides), reactor,
                            authenticator=InMemoryAuthenticator(dict(USERS)), clock=clock)
    service.startService()
    return BridgeUnderTest(service, base)


@pytest_twisted.async_yield_fixture
async def bridge(short_dir: Path) -> AsyncIterator[BridgeUnderTest]:
    running = await start_bridge(short_dir)
    yield running
    await running.stop()

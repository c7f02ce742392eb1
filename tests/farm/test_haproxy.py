"""Reconnect routing through a real HAProxy (Debian's 2.6) with the
configuration in contrib/haproxy/: an X.224 Connection Request with
``Cookie: mstshash=alice`` lands on the host holding alice's disconnected
session; one without a session lands by the default balance. Small TCP
listeners stand in for each host's RDP port."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import deferLater

from bridge.farm.haproxy import RuntimeApi
from bridge.security.permissions import FULL
from tests.conftest import USERS
from tests.farm.pg import FarmDatabase
from tests.farm.test_shipping import farm_bridge

ROOT = Path(__file__).resolve().parents[2]
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def connection_request(cookie: str | None) -> bytes:
    """An X.224 Connection Request as RDP clients send it (MS-RDPBCGR
    2.2.1.1): TPKT, the X.224 CR header, the routing cookie (if any), an
    RDP Negotiation Request for TLS."""
    body = (f"Cookie: mstshash={cookie}\r\n".encode() if cookie is not None else b"") \
        + struct.pack("<BBHI", 0x01, 0x00, 8, 0x00000003)
    x224 = struct.pack("!BBHHB", 6 + len(body), 0xE0, 0, 0, 0) + body
    return struct.pack("!BBH", 3, 0, 4 + len(x224)) + x224


class RdpPort(Protocol):
    """A host's RDP port: records who reached it with what first bytes."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.append(data)  # type: ignore[attr-defined]
        self.factory.arrived(data)  # type: ignore[attr-defined]


def rdp_port(name: str, arrivals: list[tuple[str, bytes]], waiters: list[Any]) -> Factory:
    factory = Factory.forProtocol(RdpPort)
    factory.received = []  # type: ignore[attr-defined]

    def arrived(data: bytes) -> None:
        arrivals.append((name, data))
        for d in list(waiters):
            waiters.remove(d)
            d.callback(None)

    factory.arrived = arrived  # type: ignore[attr-defined]
    return factory


class Haproxy(ProcessProtocol):
    def __init__(self) -> None:
        self.output = ""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode(errors="replace")

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


def haproxy_config(base: Path, frontend: int, ports: dict[str, int], map_path: Path,
                   socket: Path) -> Path:
    """contrib/haproxy/haproxy.cfg with this test's addresses and paths."""
    text = (ROOT / "contrib" / "haproxy" / "haproxy.cfg").read_text()
    text = text.replace("    log /dev/log local0\n", "").replace("    user haproxy\n", "") \
        .replace("    group haproxy\n", "") \
        .replace("/run/haproxy/icp-bridge.sock", str(socket)) \
        .replace("/run/haproxy/admin.sock", str(admin_socket(socket))) \
        .replace("/etc/haproxy/icp-bridge-users.map", str(map_path)) \
        .replace("bind :3389", f"bind 127.0.0.1:{frontend}") \
        .replace("192.0.2.11:3389", f"127.0.0.1:{ports['host-a']}") \
        .replace("192.0.2.12:3389", f"127.0.0.1:{ports['host-b']}")
    path = base / "haproxy.cfg"
    path.write_text(text)
    return path


def admin_socket(socket: Path) -> Path:
    """The administrators' socket (level admin), next to the bridge's."""
    return socket.with_name("admin.sock")


def spawn_haproxy(binary: str, config: Path) -> tuple[Haproxy, Any]:
    """HAProxy in the foreground on ``config``: its protocol and process."""
    proc = Haproxy()
    transport = reactor.spawnProcess(proc, binary, [binary, "-db", "-f", str(config)],
                                     env={"PATH": "/usr/sbin:/usr/bin:/bin"})
    return proc, transport


async def haproxy_listening(proc: Haproxy, socket: Path) -> None:
    """Once HAProxy's ``socket`` exists (fails if HAProxy ended first)."""
    async def up() -> bool:
        return socket.exists() or bool(proc.ended.called)
    await until(up, f"HAProxy's socket {socket.name}")
    assert not proc.ended.called, proc.output


@pytest.fixture
def haproxy_binary() -> str:
    if not os.path.exists(HAPROXY):
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed (.ci/run installs it)")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    return HAPROXY


async def until(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = reactor.seconds() + timeout
    while True:
        result = await check()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_cookie_lands_on_the_host_of_the_users_session(
        short_dir: Path, farm_db: FarmDatabase, haproxy_binary: str) -> None:
    arrivals: list[tuple[str, bytes]] = []
    waiters: list[Deferred[None]] = []
    listeners = {name: reactor.listenTCP(0, rdp_port(name, arrivals, waiters),
                                         interface="127.0.0.1")
                 for name in ("host-a", "host-b")}
    ports = {name: port.getHost().port for name, port in listeners.items()}
    frontend_port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    frontend = frontend_port.getHost().port
    await frontend_port.stopListening()
    map_path, socket = short_dir / "users.map", short_dir / "haproxy.sock"
    map_path.write_text("")
    users = {**USERS, "alexandra-long": ("alexandra-pw", FULL)}
    a = await farm_bridge(short_dir / "a", farm_db, "host-a", haproxy_socket=f"unix:{socket}",
                          haproxy_map=map_path, users=users)
    b = await farm_bridge(short_dir / "b", farm_db, "host-b", users=users)
    proc, transport = spawn_haproxy(
        haproxy_binary, haproxy_config(short_dir, frontend, ports, map_path, socket))
    api = RuntimeApi(reactor, f"unix:{socket}")
    try:
        await haproxy_listening(proc, socket)
        peer_b = await b.peer()
        await peer_b.logon(1, "alice", "alice-pw")
        await peer_b.client_disconnected(1)
        peer_a = await a.peer()
        await peer_a.logon(1, "alexandra-long", "alexandra-pw")

        async def routed() -> str:
            shown = await api.send([f"show map {map_path}"])
            return shown if "alice host-b" in shown and "alexandra host-a" in shown else ""
        shown = await until(routed, "the farm's routes in HAProxy's map")
        assert "alexandra-long host-a" in shown, "the full name and mstsc's nine characters"
        assert map_path.read_text().splitlines()[1:] == [
            "alexandra host-a", "alexandra-long host-a", "alice host-b"]

        async def connect(cookie: str | None) -> str:
            waiting: Deferred[None] = Deferred()
            waiters.append(waiting)
            client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", frontend),
                                           Protocol())
            client.transport.write(connection_request(cookie))
            await waiting.addTimeout(10, reactor)
            name, data = arrivals[-1]
            assert data == connection_request(cookie), "HAProxy passes the request on as is"
            return name

        assert [await connect("alice") for _ in range(3)] == ["host-b"] * 3
        assert await connect("ALICE") == "host-b", "cookies compare without case"
        assert await connect("alexandra") == "host-a", "mstsc's truncated name"
        # No session, or no cookie: the balance spreads them (leastconn;
        # the connections stay open, so each lands where fewer are).
        landed = [await connect(cookie) for cookie in ("bob", None, "bob", None)]
        assert sorted(landed) == ["host-a", "host-a", "host-b", "host-b"], landed
        # alice's session ends: her route goes too.
        session = b.service.registry.sessions_of("alice", "")[0]
        await b.service.lifecycle.logoff(session, False)

        async def unrouted() -> bool:
            return "alice" not in await api.send([f"show map {map_path}"])
        await until(unrouted, "alice's route removed")
    finally:
        transport.signalProcess("KILL")
        await proc.ended
        await a.stop()
        await b.stop()
        for port in listeners.values():
            await port.stopListening()

"""The admin endpoint under abuse (issue 18, item 7), over real sockets:
/events quotas that keep room for FULL tokens, the Host allow-list (DNS
rebinding), the connection cap, Twisted's own lines rate-limited, and a
failing render answered without a traceback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.registry import Collector
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs

from bridge.security.auth import Identity
from bridge.security.permissions import USER
from tests.conftest import BridgeUnderTest, start_bridge
from tests.e2e.test_admin import logon_token


def with_port(host: str, port: int) -> str:
    """``host`` with ``port`` unless it names one."""
    return host if ":" in host.rsplit("]", 1)[-1] else f"{host}:{port}"


def request(port: int, head: str, host: str | None = "127.0.0.1", body_limit: int = 65536,
            raw: bytes | None = None) -> tuple[int, bytes]:
    """(status, response) of one request on its own connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        if raw is None:
            lines = [head, "Connection: close"] + (
                [f"Host: {with_port(host, port)}"] if host else [])
            raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
        sock.sendall(raw)
        data = b""
        while len(data) < body_limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0, data


class Streams:
    """/events streams held open from a thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sockets: list[socket.socket] = []

    def open(self, token: str) -> int:
        """Opens one; its status (the socket stays open while it streams)."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
        sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        status = int(data.split(b" ", 2)[1])
        if status == 200:
            self.sockets.append(sock)
        else:
            sock.close()
        return status

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def tokens_of_users(bridge: BridgeUnderTest, count: int) -> Iterator[str]:
    """Session-level tokens of ``count`` different users, as logonConnection
    would give them (USER: QUERY_INFORMATION is enough for /events)."""
    for n in range(count):
        yield bridge.service.tokens.issue(Identity(f"user{n}", "", int(USER)), lifetime=3600)


@pytest_twisted.ensureDeferred
async def test_user_tokens_cannot_shut_the_admin_out_of_events(short_dir: Path) -> None:
    # The review: 256 /events streams opened with one user's session token
    # shut the admin out (503) for as long as the session lived.
    bridge = await start_bridge(short_dir)
    streams = Streams(bridge.admin_port)
    try:
        bob = await logon_token(bridge, "bob", "bob-pw")
        statuses = [await deferToThread(streams.open, bob) for _ in range(256)]
        assert statuses.count(200) < 256, "one user's token cannot take every stream"
        assert set(statuses[statuses.count(200):]) == {429}, "the rest: too many requests"
        # Many users' tokens together cannot take the streams kept for FULL.
        for token in tokens_of_users(bridge, 70):
            for _ in range(4):
                await deferToThread(streams.open, token)
        alice = await logon_token(bridge)
        assert await deferToThread(streams.open, alice) == 200, "the admin still gets in"
    finally:
        await deferToThread(streams.close)
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_dns_rebinding_is_answered_421(short_dir: Path) -> None:
    # The review: no Host-header check, so a web page on a name rebound to
    # 127.0.0.1 read /metrics, /healthz and /.
    bridge = await start_bridge(short_dir)
    port = bridge.admin_port
    try:
        for path in ("/metrics", "/healthz", "/", "/sessions", "/events"):
            status, _ = await deferToThread(request, port, f"GET {path} HTTP/1.1",
                                            "rebind.example")
            assert status == 421, path
        for host in ("127.0.0.1", "localhost", "LOCALHOST", "[::1]"):
            status, _ = await deferToThread(request, port, "GET /healthz HTTP/1.1", host)
            assert status == 200, host
        status, _ = await deferToThread(request, port, "GET /healthz HTTP/1.1",
                                        "127.0.0.1:1")
        assert status == 421, "a loopback name with another port is another site"
        status, _ = await deferToThread(request, port, "GET /healthz HTTP/1.0", None)
        assert status == 400, "no Host at all"
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_configured_names_are_served(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir, admin_allowed_hosts=["bridge.example.org",
                                                                "proxy.example.org:8443"])
    port = bridge.admin_port
    try:
        for host, expected in (("bridge.example.org:1234", 200), ("Bridge.Example.Org", 200),
                               ("proxy.example.org:8443", 200), ("proxy.example.org:9", 421),
                               ("other.example.org", 421)):
            status, _ = await deferToThread(request, port, "GET /healthz HTTP/1.1", host)
            assert status == expected, host
    finally:
        await bridge.stop()


def hold_connections(port: int, count: int) -> tuple[list[socket.socket], bool]:
    """Opens ``count`` idle connections; whether the last one was closed by
    the bridge at once (it reads end of file within 5 s)."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    try:
        closed = sockets[-1].recv(1) == b""
    except TimeoutError:
        closed = False
    return sockets, closed


@pytest_twisted.ensureDeferred
async def test_connections_beyond_the_cap_are_closed_at_once(short_dir: Path) -> None:
    # The review: no connection cap (17,369 descriptors reached).
    bridge = await start_bridge(short_dir)
    port = bridge.admin_port
    sockets: list[socket.socket] = []
    try:
        sockets, closed = await deferToThread(hold_connections, port, 520)
        assert closed, "over admin_max_connections (512): closed at once"
        for sock in sockets:
            sock.close()
        sockets = []
        status, metrics = await deferToThread(request, port, "GET /metrics HTTP/1.1",
                                              body_limit=1 << 22)
        assert status == 200
        assert b'icp_bridge_dropped_connections_total{listener="admin",reason="max_connections"}' \
            in metrics
    finally:
        for sock in sockets:
            sock.close()
        await bridge.stop()


def twisted_web_lines(events: list[dict[str, Any]]) -> list[str]:
    return [e.get("log_format") or "" for e in events
            if str(e.get("log_namespace", "")).startswith("twisted.web")]


@pytest_twisted.ensureDeferred
async def test_head_requests_and_idle_clients_do_not_flood_the_log(short_dir: Path) -> None:
    # The review: HEAD /metrics wrote 274 B of log per request, unauthenticated;
    # one "Timing out client" line per idle connection.
    bridge = await start_bridge(short_dir)
    port = bridge.admin_port
    try:
        with capturedLogs() as events:
            for _ in range(100):
                status, _ = await deferToThread(request, port, "HEAD /metrics HTTP/1.1")
                assert status == 200
        assert len(twisted_web_lines(events)) <= 2, twisted_web_lines(events)[:3]
        # The site the LazyFactory built for the first client.
        site = bridge.service.admin_listener.factory.factory  # type: ignore[union-attr]
        site.timeOut = 0.2  # Twisted's idle timeout (60 s), shortened for the test
        with capturedLogs() as events:
            sockets, _ = await deferToThread(hold_connections, port, 30)

            def all_closed() -> None:
                for sock in sockets:
                    sock.settimeout(20)
                    assert sock.recv(1) == b""
                    sock.close()

            await deferToThread(all_closed)
        timed_out = [f for f in twisted_web_lines(events) if "Timing out" in f]
        assert 1 <= len(timed_out) <= 2, len(timed_out)
    finally:
        await bridge.stop()


class Broken(Collector):
    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        raise RuntimeError("a collector that fails")


@pytest_twisted.ensureDeferred
async def test_a_failing_render_is_an_error_answer_without_a_traceback(short_dir: Path
                                                                        ) -> None:
    bridge = await start_bridge(short_dir)
    port = bridge.admin_port
    try:
        bridge.service.metrics.registry.register(Broken())
        with capturedLogs() as events:
            for _ in range(20):
                status, body = await deferToThread(request, port, "GET /metrics HTTP/1.1")
                assert status == 500 and b"Traceback" not in body
        assert not [e for e in events if e.get("log_failure") is not None], "no traceback"
        failed = [e for e in events if "failed" in (e.get("log_format") or "")]
        assert 1 <= len(failed) <= 2, "one short line, rate-limited"
        # Requests whose bytes do not decode: a client error, no traceback either.
        host = f"Host: 127.0.0.1:{port}".encode()
        with capturedLogs() as events:
            for raw in (b"G\xc3\xa9T / HTTP/1.1\r\n" + host + b"\r\nConnection: close\r\n\r\n",
                        b"GET /\xff HTTP/1.1\r\n" + host + b"\r\nConnection: close\r\n\r\n",
                        b"GET / HTTP/1.1\r\nHost: \xc3\xa9\r\nConnection: close\r\n\r\n",
                        b"GET /events HTTP/1.1\r\nAuthorization: \xff\r\n" + host
                        + b"\r\nConnection: close\r\n\r\n"):
                status, _ = await deferToThread(request, port, "", raw=raw)
                assert 400 <= status < 500, raw
        assert not [e for e in events if e.get("log_failure") is not None], "no traceback"
    finally:
        await bridge.stop()

"""protocols.listening: tcp:/ssl: endpoint strings, and TLS connections
whose socket is an ssl.SSLSocket, against real clients on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from bridge.security.tls import ensure_pair
from protocols.endpoint_strings import StreamListenSpec, parse_stream_endpoint, split_endpoint
from protocols.listening import SharedConnectionCount, bind_listening_socket, listen_stream
from protocols.transport import is_plain_socket, write_now


@pytest.mark.parametrize("description, expected", [
    ("tcp:9091", StreamListenSpec(9091)),
    ("tcp:0:interface=127.0.0.1:backlog=4096", StreamListenSpec(0, "127.0.0.1", 4096)),
    ("tcp:9091:10:127.0.0.1", StreamListenSpec(9091, "127.0.0.1", 10)),
    ("tcp6:9091:interface=\\:\\:1", StreamListenSpec(9091, "::1")),
    ("ssl:9091:interface=127.0.0.1:privateKey=/a\\:b.key:certKey=/c.crt",
     StreamListenSpec(9091, "127.0.0.1", 50, "/c.crt", "/a:b.key")),
    ("ssl:9091:privateKey=/k.pem", StreamListenSpec(9091, "", 50, "/k.pem", "/k.pem")),
    ("ssl:9091:privateKey=/k:certKey=/c:extraCertChain=/x:dhParameters=/d:backlog=7",
     StreamListenSpec(9091, "", 7, "/c", "/k", "/x", "/d")),
])
def test_tcp_and_ssl_endpoint_strings(description: str, expected: StreamListenSpec) -> None:
    assert parse_stream_endpoint(split_endpoint(description)) == expected


@pytest.mark.parametrize("description", [
    "unix:/tmp/x.sock", "systemd:domain=INET:index=0", "ssl:9091",  # no key
    "ssl:9091:privateKey=/k:sslmethod=TLSv1_2_METHOD",  # an option left to Twisted
    "tcp:port", "tcp:9091:interface=a:interface=b", "tcp:1:2:3:4",
])
def test_other_endpoints_are_left_to_twisted(description: str) -> None:
    assert parse_stream_endpoint(split_endpoint(description)) is None


@implementer(IHandshakeListener)
class Echo(Protocol):
    """Echoes; records the handshake and how the connection ended."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.handshake_seen = False

    def connectionMade(self) -> None:
        self.server.connections.append(self)

    def handshakeCompleted(self) -> None:
        self.handshake_seen = True

    def dataReceived(self, data: bytes) -> None:
        if data.startswith(b"close:"):
            self.transport.write(data[6:])
            self.transport.loseConnection()
            return
        if data.startswith(b"big:"):
            self.transport.write(b"x" * int(data[4:]))
            return
        write_now(self.transport, data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.server.lost.append(reason)
        waiting, self.server.waiting = self.server.waiting, []
        for d in waiting:
            d.callback(None)


class Server(Factory):
    def __init__(self) -> None:
        self.connections: list[Echo] = []
        self.lost: list[Any] = []
        self.waiting: list[Deferred[None]] = []

    async def lost_count(self, count: int) -> None:
        while len(self.lost) < count:
            d: Deferred[None] = Deferred()
            self.waiting.append(d)
            await d

    def buildProtocol(self, addr: Any) -> Echo:
        return Echo(self)


@pytest.fixture
def pair(short_dir: Path) -> tuple[str, str]:
    certificate, key = short_dir / "tls" / "ogon.crt", short_dir / "tls" / "ogon.key"
    ensure_pair(certificate, key)
    return str(certificate), str(key)


@pytest.fixture
def tls_server(pair: tuple[str, str]) -> Iterator[tuple[Server, int]]:
    spec = StreamListenSpec(0, "127.0.0.1", 50, pair[0], pair[1])
    sock = bind_listening_socket(spec)
    factory = Server()
    port = listen_stream(reactor, sock, factory, spec.context())
    yield factory, sock.getsockname()[1]
    port.stopListening()
    sock.close()


def tls_client(cafile: str, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def talk(port: int, context: ssl.SSLContext, *messages: bytes) -> list[bytes]:
    """Blocking client (run in a thread): one answer per message; then the
    bytes until the server closes, and whether it closed with close_notify."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
            context.wrap_socket(raw, server_hostname="localhost",
                                suppress_ragged_eofs=False) as tls:
        for message in messages:
            tls.sendall(message)
            want = int(message[4:]) if message.startswith(b"big:") else len(message)
            if message.startswith(b"close:"):
                want = len(message) - 6
            got = b""
            while len(got) < want:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                got += chunk
            answers.append(got)
        if messages and messages[-1].startswith(b"close:"):
            try:
                answers.append(tls.recv(10))  # b"" after the server's close_notify
            except ssl.SSLEOFError:
                answers.append(b"no close_notify")
    return answers


@pytest_twisted.ensureDeferred
async def test_tls_round_trips_and_a_clean_close(tls_server: tuple[Server, int],
                                                 pair: tuple[str, str]) -> None:
    factory, port = tls_server
    answers = await deferToThread(talk, port, tls_client(pair[0]), b"ping", b"pong" * 100,
                                  b"close:bye")
    assert answers == [b"ping", b"pong" * 100, b"bye", b""]
    [connection] = factory.connections
    assert connection.handshake_seen
    assert connection.transport.TLS is False and is_plain_socket(connection.transport)


@pytest_twisted.ensureDeferred
async def test_tls_big_replies_are_buffered_until_the_client_takes_them(
        tls_server: tuple[Server, int], pair: tuple[str, str]) -> None:
    _, port = tls_server
    answers = await deferToThread(talk, port, tls_client(pair[0]), b"big:5000000",
                                  b"after")
    assert [len(a) for a in answers] == [5_000_000, 5]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls_1_3_and_1_2_are_served_and_1_1_is_not(tls_server: tuple[Server, int],
                                                         pair: tuple[str, str]) -> None:
    _, port = tls_server
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        assert await deferToThread(talk, port, tls_client(pair[0], version), b"hi") == [b"hi"]
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    try:
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises(ssl.SSLError):
        await deferToThread(talk, port, old, b"hi")


@pytest_twisted.ensureDeferred
async def test_a_client_without_tls_is_dropped_and_the_port_serves_on(
        tls_server: tuple[Server, int], pair: tuple[str, str]) -> None:
    factory, port = tls_server

    def plain() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"\x00\x00\x00\x10not a tls hello at all")
            return s.recv(100)

    answer = await deferToThread(plain)
    assert answer == b"" or answer[:1] == b"\x15", answer  # nothing, or a TLS alert
    await factory.lost_count(1)
    assert not factory.connections[0].handshake_seen
    assert await deferToThread(talk, port, tls_client(pair[0]), b"still") == [b"still"]


def test_the_shared_count_holds_one_limit_across_processes() -> None:
    shared = SharedConnectionCount(3)
    main, worker = shared.for_slot(0), shared.for_slot(1)
    assert main.take(3) and worker.take(3)
    child = os.fork()
    if child == 0:  # another process takes the last one
        os._exit(0 if shared.for_slot(2).take(3) and not shared.for_slot(2).take(3) else 1)
    _, status = os.waitpid(child, 0)
    assert os.WEXITSTATUS(status) == 0
    assert shared.total() == 3 and not main.take(3)
    shared.reset(2)  # that process is gone
    assert main.take(3) and shared.total() == 3
    worker.give()
    worker.give()  # never below zero
    assert shared.total() == 2


def test_an_absent_slot_counts_nothing_and_balancing_looks_at_present_ones() -> None:
    shared = SharedConnectionCount(3)
    main, first, second = (shared.for_slot(i) for i in range(3))
    shared.absent(2)  # no process 2 yet
    assert first.take(5) and first.take(5)
    assert shared.total() == 2 and shared.counts() == [0, 2, -1]
    assert first.fair_share(range(1, 3)), "alone among the workers: always its turn"
    shared.reset(2)  # process 2 starts
    assert not first.fair_share(range(1, 3)) and second.fair_share(range(1, 3))
    assert first.fair_share(range(1, 3), slack=2)
    assert second.take(5) and main.take(5) and not main.take(4)

"""write_now: immediate sends on plain sockets only; TurnBatchedWriter."""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from twisted.internet import reactor, unix
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.tcp import Server
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from protocols.transport import TurnBatchedWriter, read_with_recv, write_now


def plain_server() -> tuple[Server, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    server = Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)
    return server, theirs


def close(server: Server, peer: socket.socket) -> None:
    server.stopReading()  # Server() registered it with the reactor
    server.stopWriting()  # and so did any write that had to be queued
    server.socket.close()
    peer.close()


def assert_nothing_sent(peer: socket.socket) -> None:
    peer.setblocking(False)
    try:
        data = peer.recv(10)
    except BlockingIOError:
        return
    assert data == b"", f"unexpected bytes on the socket: {data!r}"


def test_plain_socket_sends_at_once() -> None:
    server, peer = plain_server()
    write_now(server, b"hello")
    assert peer.recv(10) == b"hello"
    assert not server.dataBuffer and not server._tempDataBuffer
    close(server, peer)


@implementer(IPushProducer)
class Pauser:
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


def test_our_own_streaming_producer_does_not_turn_off_sending_at_once() -> None:
    """The protocols register a streaming producer (to pause their reading
    when replies back up); sends must still leave at once, both ways."""
    server, peer = plain_server()
    server.registerProducer(Pauser(), True)
    assert write_now(server, b"reply") is True
    assert peer.recv(10) == b"reply"
    writer = TurnBatchedWriter(server, Clock(), frame_limit=32 * 1024)
    frame = struct.pack("!I", 3) + b"icp"
    writer.write(frame, batch=False)
    assert peer.recv(10) == frame
    assert not server.dataBuffer and not server._tempDataBuffer
    server.unregisterProducer()
    close(server, peer)


def test_queued_data_keeps_its_order() -> None:
    server, peer = plain_server()
    server._tempDataBuffer.append(b"first")
    queued = []
    server.write = queued.append  # type: ignore[method-assign]
    write_now(server, b"second")
    assert queued == [b"second"], "queued behind what is there, not sent ahead of it"
    assert_nothing_sent(peer)
    close(server, peer)


def test_tls_marked_transport_is_not_bypassed() -> None:
    server, peer = plain_server()
    server.TLS = True
    server.write = lambda data: setattr(server, "written", data)  # type: ignore[method-assign]
    write_now(server, b"secret")
    assert server.written == b"secret"
    assert_nothing_sent(peer)
    close(server, peer)


def test_wrapper_and_string_transports_use_write() -> None:
    server, peer = plain_server()
    wrapper = ProtocolWrapper(WrappingFactory(None), Protocol())
    wrapper.makeConnection(server)
    written = []
    wrapper.write = written.append  # type: ignore[method-assign]
    write_now(wrapper, b"x")
    assert written == [b"x"], "a wrapper forwards writeSomeData to the raw socket: never use it"
    transport = StringTransport()
    write_now(transport, b"y")
    assert transport.value() == b"y"
    close(server, peer)


class CountingSocket:
    """A socket that records what is sent through it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sends.append(bytes(data))
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_a_full_socket_buffer_queues_the_rest_in_order() -> None:
    server, peer = plain_server()
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 4096  # 1 MiB: far more than the buffers hold
    write_now(server, big)
    queued = len(server.dataBuffer) + sum(map(len, server._tempDataBuffer))
    assert 0 < queued < len(big)
    write_now(server, b"after")  # must not overtake the queued bytes
    assert server._tempDataBuffer[-1] == b"after"
    close(server, peer)


def test_batched_writes_leave_in_one_send_after_the_turn() -> None:
    server, peer = plain_server()
    counting = CountingSocket(server.socket)
    server.socket = counting  # type: ignore[assignment]
    sends = counting.sends
    clock = Clock()
    writer = TurnBatchedWriter(server, clock)
    writer.write(b"one")
    writer.write(b"two", batch=False)  # earlier data is queued: keeps its place
    assert sends == []
    clock.advance(0)
    assert sends == [b"onetwo"] and peer.recv(10) == b"onetwo"
    close(server, peer)


def test_unbatched_write_goes_at_once_and_discard_drops_the_rest() -> None:
    server, peer = plain_server()
    clock = Clock()
    writer = TurnBatchedWriter(server, clock)
    writer.write(b"now", batch=False)
    assert peer.recv(10) == b"now" and clock.getDelayedCalls() == []
    writer.write(b"later")
    writer.discard()
    clock.advance(0)
    assert_nothing_sent(peer)
    assert clock.getDelayedCalls() == []
    close(server, peer)


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


def test_unix_transport_reads_with_recv_and_drops_passed_descriptors() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    protocol = Collect()
    server = unix.Server(ours, protocol, None, None, 1, reactor)
    protocol.makeConnection(server)
    read_with_recv(server)
    assert "doRead" in vars(server)
    fds_before = len(os.listdir("/proc/self/fd"))
    with open(os.devnull) as passed:
        theirs.sendmsg([b"frame"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     struct.pack("i", passed.fileno()))])
    assert server.doRead() is None
    assert protocol.data == b"frame"
    assert len(os.listdir("/proc/self/fd")) == fds_before, "the passed descriptor leaked"
    close(server, theirs)


def test_recv_reads_are_only_for_unix_transports() -> None:
    server, peer = plain_server()
    read_with_recv(server)
    assert "doRead" not in vars(server)
    read_with_recv(StringTransport())  # no error, nothing to change
    close(server, peer)

"""BridgeReactor: Twisted's epoll reactor with a direct event dispatch.

Driven one iteration at a time on a private instance (never installed, so
the suite's own reactor is untouched) with real socket pairs."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure

from bridge.reactor import BridgeReactor


class Reader:
    """A minimal IReadDescriptor on one end of a socket pair."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.fail = fail
        self.received: list[bytes] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "Reader"

    def doRead(self) -> None:
        data = self.sock.recv(4096)
        if self.fail:
            raise ValueError("reader bug")
        self.received.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


@pytest.fixture
def bridge_reactor(pairs: Any) -> Iterator[BridgeReactor]:
    """Set up after ``pairs`` so that it is torn down before the sockets close."""
    reactor = BridgeReactor()
    yield reactor
    reactor.removeAll()
    reactor.waker.connectionLost(None)
    reactor._poller.close()


def pair(pairs: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    pairs.append((a, b))
    return a, b


def test_ready_descriptors_are_read(bridge_reactor: BridgeReactor, pairs: Any) -> None:
    a, b = pair(pairs)
    reader = Reader(a)
    bridge_reactor.addReader(reader)
    bridge_reactor.doIteration(0)
    assert reader.received == []
    b.send(b"hello")
    bridge_reactor.doIteration(0)
    assert reader.received == [b"hello"]


def test_a_failing_reader_is_logged_and_dropped_others_still_read(
        bridge_reactor: BridgeReactor, pairs: Any) -> None:
    bad_sock, bad_peer = pair(pairs)
    good_sock, good_peer = pair(pairs)
    bad, good = Reader(bad_sock, fail=True), Reader(good_sock)
    bridge_reactor.addReader(bad)
    bridge_reactor.addReader(good)
    bad_peer.send(b"x")
    good_peer.send(b"y")
    with capturedLogs() as events:
        bridge_reactor.doIteration(0)
    assert good.received == [b"y"]
    assert len(bad.lost) == 1 and bad.lost[0].check(ValueError)
    assert bad not in bridge_reactor.getReaders()
    assert good in bridge_reactor.getReaders()
    # Twisted's own legacy log.err(), now without the transport's prefix.
    assert any(e.get("log_level") == LogLevel.critical and e.get("failure") is not None
               and e["failure"].check(ValueError) for e in events)


def test_a_dispatch_error_outside_the_descriptor_is_logged(
        bridge_reactor: BridgeReactor, pairs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """If dispatching itself fails (e.g. a connectionLost that raises), the
    poll goes on with the other descriptors and says what happened."""
    a, b = pair(pairs)
    c, d = pair(pairs)
    first, second = Reader(a), Reader(c)
    bridge_reactor.addReader(first)
    bridge_reactor.addReader(second)
    original = bridge_reactor._doReadOrWrite

    def dispatch(selectable: Any, fd: int, event: int) -> None:
        if selectable is first:
            raise RuntimeError("dispatch bug")
        original(selectable, fd, event)

    monkeypatch.setattr(bridge_reactor, "_doReadOrWrite", dispatch)
    b.send(b"1")
    d.send(b"2")
    with capturedLogs() as events:
        bridge_reactor.doIteration(0)
    assert second.received == [b"2"]
    assert any("unhandled error dispatching I/O" in e.get("log_format", "") and
               e["log_failure"].check(RuntimeError) for e in events)

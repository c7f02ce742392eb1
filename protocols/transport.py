"""Writing to a Twisted transport without waiting for the next reactor turn."""

from __future__ import annotations

from types import MethodType
from typing import Any

from twisted.internet import unix
from twisted.internet.interfaces import IFileDescriptorReceiver, IReactorTime
from twisted.internet.tcp import Connection


def is_plain_socket(transport: Any) -> bool:
    """Whether write_now may send on ``transport``'s socket directly: a TCP
    or UNIX stream transport without TLS. TLS wraps the real one (a
    ProtocolWrapper, which forwards unknown attributes such as ``socket`` to
    the raw transport) or marks it ``TLS``, and must never be bypassed."""
    return isinstance(transport, Connection) and not getattr(transport, "TLS", False)


def read_with_recv(transport: Any) -> None:
    """Make a UNIX stream transport read with ``recv`` instead of ``recvmsg``.

    Twisted reads every UNIX socket with ``recvmsg`` so that a protocol may
    receive file descriptors. ICP carries none, and that path cost ~2.8 us
    more per read than ``recv`` (socketpair, 60-byte messages): one read on
    the critical path of every sequential bridged call. Descriptors a peer
    sends anyway are closed by the kernel instead of by Twisted. Protocols
    that do take descriptors, and other transports, are left alone.
    """
    if isinstance(transport, (unix.Server, unix.Client)) and not (
        IFileDescriptorReceiver.providedBy(transport.protocol)
    ):
        transport.doRead = MethodType(Connection.doRead, transport)


def write_now(transport: Any, data: bytes, plain: bool | None = None) -> None:
    """Write ``data``, sending at once when nothing is queued.

    ``transport.write`` only queues: the bytes leave on the next reactor turn,
    after an ``epoll_ctl`` to watch for writability and before another to stop.
    A bridged call writes twice per hop, so on its hot path we try the socket
    first and queue only what is left. Anything queued already, a TLS or test
    transport (see is_plain_socket; ``plain`` passes a cached answer), a
    producer, a full socket buffer or a socket error falls back to
    ``transport.write``, which keeps ordering and error handling Twisted's
    (a broken connection is noticed and closed on its next turn).
    """
    if plain is None:
        plain = is_plain_socket(transport)
    if (
        not plain
        or transport.dataBuffer
        or transport._tempDataBuffer
        or transport.disconnecting
        or transport.producer is not None
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except OSError:  # EAGAIN, ENOBUFS, a reset: Twisted's write path copes
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


class TurnBatchedWriter:
    """Coalesces the writes of one reactor turn into one send.

    The ICP socket carries every bridged call: under load, one turn handles
    many OTS API requests, each producing an ICP frame. Sending each frame
    with its own syscall dominated the profile; this collects them and sends
    once, from a ``callLater(0)``, which Twisted runs after the turn's I/O
    and before it polls again, so no frame waits for another poll. Transports
    that write_now would not send at once (TLS, wrappers, test transports)
    get each write directly, in order.
    """

    def __init__(self, transport: Any, clock: IReactorTime | None = None) -> None:
        self.transport = transport
        self._batching = is_plain_socket(transport)
        # Only plain sockets batch, and those know the reactor they run on.
        self.clock = clock if clock is not None or not self._batching else transport.reactor
        self._pending: list[bytes] = []
        self._flush_call: Any = None

    def write(self, data: bytes, batch: bool = True) -> None:
        """Queue ``data`` for the end of this turn; with ``batch=False`` send
        it at once instead, unless earlier data is still queued (order)."""
        if not self._batching:
            self.transport.write(data)
            return
        if not batch and not self._pending:
            write_now(self.transport, data, plain=True)
            return
        self._pending.append(data)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send what is collected now (also called before a close)."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending.clear()
            write_now(self.transport, data, plain=True)

    def discard(self) -> None:
        """The connection is gone: drop what was not sent."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._pending.clear()

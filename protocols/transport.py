"""Writing to a Twisted transport without waiting for the next reactor turn."""

from __future__ import annotations

import struct
from collections.abc import Callable
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


def write_now(transport: Any, data: bytes, plain: bool | None = None,
              send: Any = None) -> bool:
    """Write ``data``, sending at once when nothing is queued.

    ``transport.write`` only queues: the bytes leave on the next reactor turn,
    after an ``epoll_ctl`` to watch for writability and before another to stop.
    A bridged call writes twice per hop, so on its hot path we try the socket
    first and queue only what is left. Anything queued already, a TLS or test
    transport (see is_plain_socket; ``plain`` passes a cached answer), a
    producer, a full socket buffer or a socket error falls back to
    ``transport.write``, which keeps ordering and error handling Twisted's
    (a broken connection is noticed and closed on its next turn). A
    streaming producer (the protocol's own backpressure) is no reason to
    queue: what the socket takes leaves no buffer to pause for, and the
    rest goes through ``transport.write``, which pauses it as usual.
    ``send`` is how bytes go out at once (default ``transport.socket.send``;
    a TLS transport of protocols.listening encrypts in its ``send_now``).
    Returns True when everything was sent.
    """
    if plain is None:
        plain = is_plain_socket(transport)
    if (
        not plain
        or transport.dataBuffer
        or transport._tempDataBuffer
        or transport.disconnecting
        or (transport.producer is not None and not transport.streamingProducer)
    ):
        transport.write(data)
        return False
    try:
        sent = (send or transport.socket.send)(data)
    except OSError:  # EAGAIN, ENOBUFS, a reset, TLS wanting I/O: Twisted's write path copes
        transport.write(data)
        return False
    if sent < len(data):
        transport.write(data[sent:])
        return False
    return True


class FrameAligner:
    """Makes every send() on a plain stream socket carry whole frames only,
    at most ``limit`` bytes of them (one frame alone if it is bigger).

    ogon's RDP server reads a frame's 4-byte length, then its body with one
    read() that must return all of it: a body split between two socket
    buffers (skbs) whose second half is not queued yet breaks the
    connection. Linux queues one send() of up to 32 KiB on an AF_UNIX
    stream socket as one skb, all or nothing, so frames cut into such sends
    always arrive whole. Both ways out are covered: ``send`` for data sent at
    once, and Twisted's own ``writeSomeData`` (replaced on the transport)
    for what it had to buffer.

    Invariant: ``_frame_left`` is how many bytes of a frame that went out
    only in part are still to be sent (0 between frames); Twisted's write
    buffer always starts where the last send stopped.
    """

    def __init__(self, transport: Any, limit: int) -> None:
        self.transport = transport
        self.limit = limit
        self._frame_left = 0
        self._send_some = transport.writeSomeData
        transport.writeSomeData = self._write_some

    def _end_of_chunk(self, data: Any, start: int) -> int:
        """Where the next send should stop: the end of the unfinished frame,
        else of as many whole frames as fit in ``limit`` (at least one)."""
        if self._frame_left:
            return min(len(data), start + self._frame_left)
        end = start
        while len(data) - end >= 4:
            (length,) = _FRAME_LENGTH.unpack_from(data, end)
            frame_end = end + 4 + length
            if end > start and frame_end - start > self.limit:
                break
            end = frame_end
            if end - start >= self.limit:
                break
        return min(len(data), end) if end > start else len(data)

    def _account(self, data: Any, start: int, sent: int) -> None:
        """Move ``_frame_left`` over ``sent`` bytes sent from ``start``."""
        position, left = start, self._frame_left
        stop = start + sent
        while position < stop:
            if left == 0:
                if len(data) - position < 4:
                    left = len(data) - position  # a torn tail: nothing to parse
                else:
                    (length,) = _FRAME_LENGTH.unpack_from(data, position)
                    left = 4 + length
            step = min(left, stop - position)
            position += step
            left -= step
        self._frame_left = left

    def _write_some(self, data: Any) -> Any:
        end = self._end_of_chunk(data, 0)
        sent = self._send_some(data if end == len(data) else memoryview(data)[:end])
        if isinstance(sent, int) and sent > 0:
            self._account(data, 0, sent)
        return sent

    def send(self, data: bytes) -> None:
        """Send whole frames now, as far as the socket takes them; queue the
        rest (in order) for Twisted to send through ``_write_some``."""
        transport = self.transport
        # As in write_now: our own streaming producer is no reason to queue.
        if (transport.dataBuffer or transport._tempDataBuffer or transport.disconnecting
                or (transport.producer is not None and not transport.streamingProducer)):
            transport.write(data)
            return
        offset = 0
        while offset < len(data):
            end = self._end_of_chunk(data, offset)
            sent = self._send_some(memoryview(data)[offset:end])
            if not isinstance(sent, int) or sent <= 0:
                break  # would block, or an error Twisted will find on its own
            self._account(data, offset, sent)
            offset += sent
            if offset < end:
                break
        if offset < len(data):
            transport.write(data[offset:] if offset else data)


_FRAME_LENGTH = struct.Struct("!I")


class TurnBatchedWriter:
    """Coalesces the writes of one reactor turn into few sends.

    The ICP socket carries every bridged call: under load, one turn handles
    many OTS API requests, each producing an ICP frame. Sending each frame
    with its own syscall dominated the profile; this collects them and sends
    them from a ``callLater(0)``, which Twisted runs after the turn's I/O
    and before it polls again, so no frame waits for another poll. With
    ``frame_limit`` the data are length-prefixed frames and each send
    carries whole frames of at most that many bytes (see FrameAligner).
    Transports that write_now would not send at once (TLS, wrappers, test
    transports) get each write directly, in order.
    """

    def __init__(self, transport: Any, clock: IReactorTime | None = None,
                 frame_limit: int | None = None) -> None:
        self.transport = transport
        self._batching = is_plain_socket(transport)
        # Only plain sockets batch, and those know the reactor they run on.
        self.clock = clock if clock is not None or not self._batching else transport.reactor
        self._aligner = (FrameAligner(transport, frame_limit)
                         if self._batching and frame_limit is not None else None)
        self._pending: list[bytes] = []
        # len() of all of _pending, kept as it grows: ``queued`` is asked
        # per call, and a turn can collect tens of thousands of frames.
        self._pending_bytes = 0
        self._flush_call: Any = None
        # What Twisted holds in its write buffer: a FileDescriptor keeps
        # counts; other transports (tests, wrappers) report none.
        if all(hasattr(transport, name) for name in ("_tempDataLen", "dataBuffer", "offset")):
            self._twisted_buffered: Callable[[], int] = lambda: (
                transport._tempDataLen + len(transport.dataBuffer) - transport.offset)
        else:
            self._twisted_buffered = lambda: 0

    def write(self, data: bytes, batch: bool = True) -> None:
        """Queue ``data`` for the end of this turn; with ``batch=False`` send
        it at once instead, unless earlier data is still queued (order)."""
        if not self._batching:
            self.transport.write(data)
            return
        if not batch and not self._pending:
            self._send(data)
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self.flush)

    def _send(self, data: bytes) -> None:
        if self._aligner is not None:
            self._aligner.send(data)
        else:
            write_now(self.transport, data, plain=True)

    def flush(self) -> None:
        """Send what is collected now (also called before a close)."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending.clear()
            self._pending_bytes = 0
            self._send(data)

    @property
    def maybe_queued(self) -> bool:
        """False when nothing at all is queued (cheap to ask; then ``queued``
        is 0)."""
        return bool(self._pending_bytes) or self._twisted_buffered() > 0

    @property
    def queued(self) -> int:
        """Bytes written but not yet handed to the kernel."""
        return self._pending_bytes + self._twisted_buffered()

    def discard(self) -> None:
        """The connection is gone: drop what was not sent."""
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._pending.clear()
        self._pending_bytes = 0

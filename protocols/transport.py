"""Writing to a Twisted transport without waiting for the next reactor turn."""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data``, sending at once when nothing is queued.

    ``transport.write`` only queues: the bytes leave on the next reactor turn,
    after an ``epoll_ctl`` to watch for writability and before another to stop.
    A bridged call writes twice per hop, so on its hot path we try the socket
    first through ``writeSomeData`` (FileDescriptor's "write what you can now")
    and queue only what is left. Anything queued already, a TLS or test
    transport, or an error falls back to ``transport.write``, which keeps
    ordering and error handling Twisted's.

    Only a plain socket transport qualifies: TLS wraps the real one (a
    ProtocolWrapper, which forwards unknown attributes such as writeSomeData
    to the raw socket) or marks it ``TLS``, and must never be bypassed.
    """
    if not isinstance(transport, FileDescriptor) or getattr(transport, "TLS", False):
        transport.write(data)
        return
    write_some = transport.writeSomeData
    if (
        getattr(transport, "dataBuffer", b"")
        or getattr(transport, "_tempDataBuffer", None)
        or getattr(transport, "disconnecting", False)
        or getattr(transport, "producer", None) is not None
    ):
        transport.write(data)
        return
    sent = write_some(data)
    if isinstance(sent, BaseException):
        transport.write(data)  # Twisted notices the broken connection on its own turn
    elif sent < len(data):
        transport.write(data[sent:])

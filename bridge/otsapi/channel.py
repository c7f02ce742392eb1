"""The channel between the main process and one OTS API worker process: a
UNIX stream socketpair carrying length-prefixed messages, each a one-byte
kind and its body. Both ends are ``Channel`` protocols.

Main process to worker:

- ``SESSION``: a session as it is now, or that it ended; ``TOKEN``: a token
  record as it is now, or that it is gone. Each carries a *position* that
  grows by one per change; the worker applies them in order and says up to
  which it has (``ACK``). Nothing is sent twice and nothing skipped: the
  worker starts from a copy of the state at a known position (it is
  forked) and hears every change after it on this one ordered stream.
- ``REPLY``: the answer to a forwarded call, for one of the worker's
  connections.
- ``SYNC``: send what is kept for later (token uses, counts) now, then
  ``SYNCED`` with the same number.
- ``LIMITS``: the OTS API's connection limits as a reload changed them;
  ``POLICY``: the properties and channel lists as a reload changed them.
- ``ICP_ANSWER``: the RDP server's answer to an ``ICP_CALL`` (its payload,
  or how the call failed).

Worker to main process: ``HELLO`` (serving), ``CALL`` (a call forwarded,
with the client's address and source when the method needs them), ``ICP_CALL`` (an ICP
request for the RDP server, serialized: the main process relays it on its
connection and the answer back), ``ACK``, ``TOUCH``
(tokens used, for their sliding lifetime), ``COUNTS`` (the metrics it
counts), ``SYNCED`` and ``LOG`` (its log events, written by the main
process's log).

Beside the channel, ``PublishedPosition``: the position of the last change
the main process made, in memory both share. The main process sets it
before the change can be seen anywhere (an ICP answer, a D-Bus signal, a
token file, an OTS API answer); a worker whose own position is behind it
when a call comes forwards the call instead of answering from an older
copy (``Worker.behind``). So a call made after any sign of a change sees
the change, whichever process answers it.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from bridge.security.tokens import TokenRecord
from bridge.sessions.model import BackendRecord, ClientInfo, ConnectState, Session
from protocols.errors import (
    IcpBackpressureError,
    IcpDisconnectedError,
    IcpFrameTooLargeError,
    IcpHandshakeTimeoutError,
    IcpNotConnectedError,
    IcpNotFoundError,
    IcpProtocolError,
    IcpRemoteError,
    IcpTimeoutError,
)
from protocols.transport import TurnBatchedWriter

# main -> worker
SESSION = b"s"
TOKEN = b"t"
REPLY = b"r"
SYNC = b"y"
LIMITS = b"m"
POLICY = b"p"
ICP_ANSWER = b"o"
# worker -> main
HELLO = b"h"
CALL = b"c"
ICP_CALL = b"i"
ACK = b"a"
TOUCH = b"u"
COUNTS = b"n"
SYNCED = b"z"
LOG = b"l"

_HEADER = struct.Struct("!IB")  # length of kind and body; kind
_CONNECTION = struct.Struct("!I")
_CALL = struct.Struct("!IHH")  # connection id, lengths of the client's address and source
_NUMBER = struct.Struct("!Q")
_ICP_CALL = struct.Struct("!IId")  # call id, ICP msgType, timeout (< 0: the default)
_ICP_ANSWER = struct.Struct("!IB")  # call id, 1: the payload follows, 0: a failure (JSON)
# Far above any Thrift frame (max_thrift_frame) plus its header.
MAX_MESSAGE = 64 * 1024 * 1024


class PublishedPosition:
    """The main process's position in shared anonymous memory (made
    before the workers are forked: they inherit the mapping). One aligned
    8-byte word, written by the main process only."""

    _WORD = struct.Struct("=q")

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, self._WORD.size)

    def publish(self, position: int) -> None:
        self._WORD.pack_into(self._map, 0, position)

    def read(self) -> int:
        return self._WORD.unpack_from(self._map, 0)[0]


def session_to_json(session: Session) -> dict[str, Any]:
    return dataclasses.asdict(session)


def session_from_json(data: dict[str, Any]) -> Session:
    values = dict(data)
    values["state"] = ConnectState(values["state"])
    values["client"] = ClientInfo(**values["client"])
    if values.get("backend") is not None:
        values["backend"] = BackendRecord(**values["backend"])
    return Session(**values)


def token_to_json(record: TokenRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


def token_from_json(data: dict[str, Any]) -> TokenRecord:
    return TokenRecord(**data)


def encode_json(kind: bytes, value: Any) -> bytes:
    body = json.dumps(value, separators=(",", ":")).encode()
    return _HEADER.pack(len(body) + 1, kind[0]) + body


def encode_number(kind: bytes, number: int) -> bytes:
    return _HEADER.pack(_NUMBER.size + 1, kind[0]) + _NUMBER.pack(number)


def encode_reply(connection_id: int, message: bytes) -> bytes:
    return (_HEADER.pack(_CONNECTION.size + len(message) + 1, REPLY[0])
            + _CONNECTION.pack(connection_id) + message)


def encode_call(connection_id: int, host: str, source: str, message: bytes) -> bytes:
    address, who = host.encode(), source.encode()
    return (_HEADER.pack(_CALL.size + len(address) + len(who) + len(message) + 1, CALL[0])
            + _CALL.pack(connection_id, len(address), len(who)) + address + who + message)


def encode_icp_call(call_id: int, msg_type: int, timeout: float | None,
                    payload: bytes) -> bytes:
    return (_HEADER.pack(_ICP_CALL.size + len(payload) + 1, ICP_CALL[0])
            + _ICP_CALL.pack(call_id, msg_type, -1.0 if timeout is None else timeout) + payload)


def decode_icp_call(body: bytes) -> tuple[int, int, float | None, bytes]:
    call_id, msg_type, timeout = _ICP_CALL.unpack_from(body)
    return call_id, msg_type, None if timeout < 0 else timeout, body[_ICP_CALL.size:]


def encode_icp_answer(call_id: int, payload: bytes) -> bytes:
    return (_HEADER.pack(_ICP_ANSWER.size + len(payload) + 1, ICP_ANSWER[0])
            + _ICP_ANSWER.pack(call_id, 1) + payload)


def encode_icp_failure(call_id: int, failure: dict[str, Any]) -> bytes:
    body = json.dumps(failure, separators=(",", ":")).encode()
    return (_HEADER.pack(_ICP_ANSWER.size + len(body) + 1, ICP_ANSWER[0])
            + _ICP_ANSWER.pack(call_id, 0) + body)


def decode_icp_answer(body: bytes) -> tuple[int, bool, bytes]:
    call_id, ok = _ICP_ANSWER.unpack_from(body)
    return call_id, bool(ok), body[_ICP_ANSWER.size:]


_ICP_ERRORS: dict[str, type[Exception]] = {cls.__name__: cls for cls in (
    IcpBackpressureError, IcpDisconnectedError, IcpFrameTooLargeError, IcpHandshakeTimeoutError,
    IcpNotConnectedError, IcpNotFoundError, IcpProtocolError, IcpRemoteError, IcpTimeoutError)}


def icp_failure(error: BaseException) -> dict[str, Any]:
    """How a relayed ICP call failed, for ``icp_error`` on the other side."""
    name = type(error).__name__
    return {"error": name if name in _ICP_ERRORS else "", "text": str(error),
            "msg_type": getattr(error, "msg_type", 0), "timeout": getattr(error, "timeout", 0.0),
            "description": getattr(error, "description", "")}


def icp_error(failure: dict[str, Any]) -> Exception:
    """The exception ``icp_failure`` described: the same class and text as
    the main process's call failed with (anything but an ICP failure is a
    bug there, and one here: a RuntimeError)."""
    name = failure.get("error", "")
    if name == "IcpTimeoutError":
        return IcpTimeoutError(failure["msg_type"], failure["timeout"])
    if name == "IcpRemoteError":
        return IcpRemoteError(failure["msg_type"], failure["description"])
    if name == "IcpNotFoundError":
        return IcpNotFoundError(failure["msg_type"])
    cls = _ICP_ERRORS.get(name)
    return cls(failure["text"]) if cls is not None else RuntimeError(failure["text"])


def decode_number(body: bytes) -> int:
    return _NUMBER.unpack_from(body)[0]


def decode_reply(body: bytes) -> tuple[int, bytes]:
    return _CONNECTION.unpack_from(body)[0], body[_CONNECTION.size:]


def decode_call(body: bytes) -> tuple[int, str, str, bytes]:
    connection_id, address, who = _CALL.unpack_from(body)
    source = _CALL.size + address
    start = source + who
    return (connection_id, body[_CALL.size:source].decode(), body[source:start].decode(),
            body[start:])


class Channel(Protocol):
    """One end of the channel: frames messages out (coalesced per reactor
    turn) and hands each message in to ``handlers[kind](body)``. A
    message of an unknown kind or a length past MAX_MESSAGE is a bug in
    the other process: the channel closes (and with it the worker)."""

    log = Logger()

    def __init__(self, clock: IReactorTime, handlers: dict[bytes, Callable[[bytes], None]],
                 on_lost: Callable[[Failure], None] | None = None) -> None:
        self.clock = clock
        self.handlers = {kind[0]: handler for kind, handler in handlers.items()}
        self.on_lost = on_lost
        self._buffer = b""
        self._writer: TurnBatchedWriter | None = None
        self.open = False

    def connectionMade(self) -> None:
        self.open = True
        self._writer = TurnBatchedWriter(self.transport, self.clock)

    def send(self, message: bytes, now: bool = False) -> None:
        """Queue an encoded message; it leaves at the end of this turn, or
        with ``now`` at once unless others are queued (their order kept).
        Like Nagle's rule: a lone call or answer goes at once; while others
        are out their answers wake the other side anyway, so messages are
        coalesced into one send per turn."""
        if self._writer is not None and self.open:
            self._writer.write(message, batch=not now)

    def flush(self) -> None:
        if self._writer is not None and self.open:
            self._writer.flush()

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        offset, size = 0, len(buffer)
        handlers = self.handlers
        while size - offset >= _HEADER.size and self.open:
            length, kind = _HEADER.unpack_from(buffer, offset)
            if not 1 <= length <= MAX_MESSAGE or kind not in handlers:
                self.log.error("worker channel: bad message (kind {kind}, {length} bytes); "
                               "closing it", kind=kind, length=length)
                self.transport.loseConnection()
                self.open = False
                break
            end = offset + 4 + length
            if end > size:
                break
            handlers[kind](buffer[offset + _HEADER.size:end])
            offset = end
        self._buffer = buffer[offset:] if offset < size else b""

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.open = False
        if self._writer is not None:
            self._writer.discard()
        if self.on_lost is not None:
            self.on_lost(reason or Failure(ConnectionError("worker channel closed")))

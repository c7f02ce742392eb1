"""Independent wire helpers for tests: frames are built with ``struct`` and
the generated message classes, never with the protocol code under test."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from protocols.generated import ICP_pb2, pbRPC_pb2
from protocols.icp import IcpProtocol

HANDSHAKE = 0xFFFFFFFF
RPCBase = pbRPC_pb2.RPCBase


def frame(rpc: RPCBase | bytes) -> bytes:
    body = rpc if isinstance(rpc, bytes) else rpc.SerializeToString()
    return struct.pack("!I", len(body)) + body


def handshake(tag: int = 1, major: int = 1, minor: int = 1) -> RPCBase:
    return RPCBase(
        tag=tag, isResponse=False, status=0, msgType=HANDSHAKE,
        versionInfo=pbRPC_pb2.VersionInfo(vmajor=major, vminor=minor),
    )


def request(tag: int, msg_type: int, message: Any | None = None) -> RPCBase:
    payload = message.SerializeToString() if message is not None else b""
    return RPCBase(tag=tag, isResponse=False, status=0, msgType=msg_type, payload=payload)


def response(tag: int, msg_type: int, message: Any | None = None, status: int = 0,
             error: str | None = None) -> RPCBase:
    rpc = RPCBase(tag=tag, isResponse=True, status=status, msgType=msg_type)
    if message is not None:
        rpc.payload = message.SerializeToString()
    if error is not None:
        rpc.errorDescription = error
    return rpc


def ping(tag: int) -> RPCBase:
    return request(tag, ICP_pb2.Ping, ICP_pb2.PingRequest())


def split_frames(data: bytes) -> list[RPCBase]:
    """Decode every whole frame in ``data`` (asserting nothing is left over)."""
    out = []
    offset = 0
    while offset < len(data):
        (length,) = struct.unpack_from("!I", data, offset)
        body = data[offset + 4 : offset + 4 + length]
        assert len(body) == length, "truncated frame"
        out.append(RPCBase.FromString(body))
        offset += 4 + length
    return out


def answers(transport: StringTransport) -> list[RPCBase]:
    """Frames written since the last call; clears the transport."""
    frames = split_frames(transport.value())
    transport.clear()
    return frames


def connected_icp(handlers: dict | None = None, *, initiator: bool = False,
                  **kwargs: Any) -> tuple[IcpProtocol, StringTransport, Clock]:
    clock = Clock()
    proto = IcpProtocol(handlers or {}, clock=clock, initiator=initiator, **kwargs)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def ready_icp(handlers: dict | None = None, **kwargs: Any
              ) -> tuple[IcpProtocol, StringTransport, Clock]:
    """A responder (bridge side) connection with the handshake done."""
    proto, transport, clock = connected_icp(handlers, **kwargs)
    proto.dataReceived(frame(handshake(tag=99)))
    [hello] = answers(transport)
    assert hello.isResponse and hello.tag == 99
    return proto, transport, clock

"""The Thrift server protocol over a StringTransport."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TApplicationException, TMessageType
from thrift.transport.TTransport import TMemoryBuffer
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from protocols import thrift_server
from protocols.generated.otsapi_blocking import otsapi
from protocols.thrift_server import ThriftServerProtocol, service_methods

METHODS = service_methods(otsapi)


def call_bytes(name: str, seqid: int, **args: Any) -> bytes:
    """A CALL message built with thrift's pure-Python encoder."""
    buffer = TMemoryBuffer()
    oprot = TBinaryProtocol.TBinaryProtocol(buffer)
    oprot.writeMessageBegin(name, TMessageType.CALL, seqid)
    getattr(otsapi, f"{name}_args")(**args).write(oprot)
    oprot.writeMessageEnd()
    return buffer.getvalue()


def framed(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def decode_replies(data: bytes, name: str, is_framed: bool = True) -> list[Any]:
    """Each reply's result value (or the TApplicationException)."""
    out = []
    buffer = TMemoryBuffer(data)
    while buffer._buffer.tell() < len(data):
        if is_framed:
            buffer.read(4)
        iprot = TBinaryProtocol.TBinaryProtocol(buffer)
        rname, mtype, seqid = iprot.readMessageBegin()
        if mtype == TMessageType.EXCEPTION:
            error = TApplicationException()
            error.read(iprot)
            out.append((seqid, error))
        else:
            result = getattr(otsapi, f"{rname}_result")()
            result.read(iprot)
            out.append((seqid, result.success))
        iprot.readMessageEnd()
    return out


class Handler:
    def __init__(self) -> None:
        self.later: list[Deferred[int]] = []

    def ping(self, value: int) -> int:
        return value

    def getPermissionForToken(self, token: str) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.later.append(d)
        return d

    def logoffConnection(self, token: str) -> bool:
        raise RuntimeError("handler bug")

    def getVersionInfo(self, version: Any) -> Any:
        return "not a TVersion"


def connected(max_frame_size: int = 1024) -> tuple[ThriftServerProtocol, StringTransport,
                                                     Handler]:
    handler = Handler()
    proto = ThriftServerProtocol(METHODS, handler, max_frame_size)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, handler


class ThriftServerTests(SynchronousTestCase):
    def test_framed_calls_split_and_coalesced(self) -> None:
        proto, transport, _ = connected()
        data = framed(call_bytes("ping", 1, input=5)) + framed(call_bytes("ping", 2, input=-6))
        for i in range(len(data)):
            proto.dataReceived(data[i : i + 1])
        assert decode_replies(transport.value(), "ping") == [(1, 5), (2, -6)]

    def test_unframed_client_is_served_unframed(self) -> None:
        proto, transport, _ = connected()
        with capturedLogs() as events:
            data = call_bytes("ping", 1, input=7) + call_bytes("ping", 2, input=8)
            proto.dataReceived(data[:10])
            proto.dataReceived(data[10:])
        assert decode_replies(transport.value(), "ping", is_framed=False) == [(1, 7), (2, 8)]
        assert any("TFramedTransport" in e["log_format"] for e in events)

    def test_deferred_results_answer_when_they_fire(self) -> None:
        proto, transport, handler = connected()
        proto.dataReceived(framed(call_bytes("getPermissionForToken", 1, authToken="a"))
                           + framed(call_bytes("getPermissionForToken", 2, authToken="b")))
        assert transport.value() == b""
        handler.later[1].callback(2)
        handler.later[0].callback(1)
        assert decode_replies(transport.value(), "x") == [(2, 2), (1, 1)]

    def test_handler_exception_is_internal_error_and_logged(self) -> None:
        proto, transport, _ = connected()
        proto.dataReceived(framed(call_bytes("logoffConnection", 3, authToken="t"))
                           + framed(call_bytes("ping", 4, input=1)))
        [(seqid, error), (_, pong)] = decode_replies(transport.value(), "x")
        assert seqid == 3 and error.type == TApplicationException.INTERNAL_ERROR
        assert "bug" not in error.message
        assert pong == 1 and not transport.disconnecting
        assert len(self.flushLoggedErrors(RuntimeError)) == 1

    def test_unencodable_result_is_internal_error(self) -> None:
        proto, transport, _ = connected()
        proto.dataReceived(framed(call_bytes("getVersionInfo", 1)))
        [(_, error)] = decode_replies(transport.value(), "x")
        assert error.type == TApplicationException.INTERNAL_ERROR
        self.flushLoggedErrors()

    def test_unknown_method(self) -> None:
        proto, transport, _ = connected()
        buffer = TMemoryBuffer()
        oprot = TBinaryProtocol.TBinaryProtocol(buffer)
        oprot.writeMessageBegin("noSuchMethod", TMessageType.CALL, 9)
        oprot.writeStructBegin("x")
        oprot.writeFieldStop()
        oprot.writeStructEnd()
        oprot.writeMessageEnd()
        proto.dataReceived(framed(buffer.getvalue()))
        [(seqid, error)] = decode_replies(transport.value(), "x")
        assert seqid == 9 and error.type == TApplicationException.UNKNOWN_METHOD
        assert not transport.disconnecting

    def test_oversize_frame_closes_with_log_line(self) -> None:
        proto, transport, _ = connected(max_frame_size=100)
        with capturedLogs() as events:
            proto.dataReceived(struct.pack("!i", 101))
        assert transport.disconnecting
        assert any("101" in str(e.get("reason")) for e in events)

    def test_mismatches_are_named(self) -> None:
        for first, word in ((b"\x16\x03\x01\x02\x00", "TLS"), (b"\x82\x21\x01\x04", "compact"),
                            (b"POST / HTTP/1.1\r\n", "HTTP"), (b'[1,"ping"', "JSON")):
            proto, transport, _ = connected()
            with capturedLogs() as events:
                proto.dataReceived(first)
            assert transport.disconnecting, word
            assert any(word in str(e.get("reason")) for e in events), word

    def test_framed_compact_payload_is_named(self) -> None:
        proto, transport, _ = connected()
        with capturedLogs() as events:
            proto.dataReceived(framed(b"\x82\x21\x01\x04ping\x00"))
        assert transport.disconnecting
        assert any("compact" in str(e.get("reason")) for e in events)

    def test_nothing_after_a_rejected_frame_is_served(self) -> None:
        proto, transport, _ = connected()
        ping = framed(call_bytes("ping", 2, input=1))
        with capturedLogs():
            proto.dataReceived(framed(b"\x82\x21\x01\x04ping\x00") + ping)
            proto.dataReceived(ping)
        assert transport.disconnecting
        assert transport.value() == b""

    def test_reply_after_disconnect_is_dropped(self) -> None:
        proto, transport, handler = connected()
        proto.dataReceived(framed(call_bytes("getPermissionForToken", 1, authToken="a")))
        proto.connectionLost(None)
        transport.clear()
        handler.later[0].callback(1)
        assert transport.value() == b""


@pytest.mark.parametrize("names", [(), ("a",), ("a", "b", "c")])
def test_handler_arguments_come_in_idl_order_for_any_arity(names: tuple[str, ...]) -> None:
    class Args:
        a, b, c = 1, 2, 3

    assert thrift_server._argument_getter(names)(Args()) == tuple(
        getattr(Args, name) for name in names)

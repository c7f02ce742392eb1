"""The ICP engine over a StringTransport, time driven by a Clock."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from protocols import icp
from protocols.errors import (
    IcpDisconnectedError,
    IcpHandlerError,
    IcpNotConnectedError,
    IcpNotFoundError,
    IcpRemoteError,
    IcpTimeoutError,
)
from protocols.generated import ICP_pb2
from protocols.icp import IcpState
from tests.wire import (
    HANDSHAKE,
    RPCBase,
    answers,
    connected_icp,
    frame,
    handshake,
    ping,
    ready_icp,
    request,
    response,
)

PING = ICP_pb2.Ping
VC_OPEN = ICP_pb2.OtsApiVirtualChannelOpen


def pong_handler(_request: ICP_pb2.PingRequest) -> ICP_pb2.PingResponse:
    return ICP_pb2.PingResponse(pong=True)


def vc_open_request(connection_id: int = 5) -> ICP_pb2.OtsApiVirtualChannelOpenRequest:
    return ICP_pb2.OtsApiVirtualChannelOpenRequest(
        connectionId=connection_id, virtualName="CLIPRDR", dynamicChannel=False, flags=0
    )


class HandshakeTests(SynchronousTestCase):
    def test_answers_version_and_becomes_ready(self) -> None:
        proto, transport, _ = connected_icp()
        ready = proto.when_ready()
        self.assertNoResult(ready)
        proto.dataReceived(frame(handshake(tag=42, major=1, minor=0)))
        [hello] = answers(transport)
        assert hello.isResponse and hello.tag == 42 and hello.msgType == HANDSHAKE
        assert hello.status == RPCBase.SUCCESS
        assert (hello.versionInfo.vmajor, hello.versionInfo.vminor) == (1, 1)
        assert self.successResultOf(ready) == (1, 0)
        assert proto.state is IcpState.READY

    def test_newer_major_is_answered_then_dropped(self) -> None:
        proto, transport, _ = connected_icp()
        ready = proto.when_ready()
        with capturedLogs() as events:
            proto.dataReceived(frame(handshake(tag=3, major=2)))
        [hello] = answers(transport)
        assert hello.isResponse and hello.versionInfo.vmajor == 1
        assert transport.disconnecting
        self.failureResultOf(ready, IcpDisconnectedError)
        assert any("newer" in e["log_format"].format(**e) or "newer" in str(e.get("reason"))
                   for e in events)

    def test_first_frame_not_a_handshake_is_a_protocol_error(self) -> None:
        proto, transport, _ = connected_icp({PING: pong_handler})
        proto.dataReceived(frame(ping(tag=1)))
        assert transport.value() == b""
        assert transport.disconnecting
        assert proto.state is IcpState.CLOSED

    def test_calls_before_handshake_fail_not_connected(self) -> None:
        proto, _, _ = connected_icp()
        self.failureResultOf(proto.call(PING, ICP_pb2.PingRequest()), IcpNotConnectedError)

    def test_initiator_sends_handshake_and_waits_for_answer(self) -> None:
        proto, transport, _ = connected_icp(initiator=True)
        [hello] = answers(transport)
        assert not hello.isResponse and hello.msgType == HANDSHAKE
        assert hello.versionInfo.vmajor == 1
        ready = proto.when_ready()
        proto.dataReceived(frame(RPCBase(
            tag=hello.tag, isResponse=True, status=0, msgType=HANDSHAKE,
            versionInfo=hello.versionInfo)))
        assert self.successResultOf(ready) == (1, 1)

    def test_initiator_drops_a_different_major(self) -> None:
        proto, transport, _ = connected_icp(initiator=True)
        [hello] = answers(transport)
        proto.dataReceived(frame(RPCBase(
            tag=hello.tag, isResponse=True, status=0, msgType=HANDSHAKE,
            versionInfo={"vmajor": 2, "vminor": 0})))
        assert transport.disconnecting


class FramingTests(SynchronousTestCase):
    def test_coalesced_frames_each_get_an_answer(self) -> None:
        proto, transport, _ = ready_icp({PING: pong_handler})
        proto.dataReceived(frame(ping(tag=7)) + frame(ping(tag=8)) + frame(ping(tag=9)))
        assert [m.tag for m in answers(transport)] == [7, 8, 9]

    def test_byte_at_a_time(self) -> None:
        proto, transport, _ = ready_icp({PING: pong_handler})
        data = frame(ping(tag=7)) + frame(ping(tag=8))
        for i in range(len(data)):
            proto.dataReceived(data[i : i + 1])
        got = answers(transport)
        assert [m.tag for m in got] == [7, 8]
        assert all(ICP_pb2.PingResponse.FromString(m.payload).pong for m in got)

    def test_every_split_point_of_a_stream(self) -> None:
        data = frame(handshake(tag=1)) + b"".join(frame(ping(tag=t)) for t in (2, 3, 4))
        for cut in range(len(data) + 1):
            proto, transport, _ = connected_icp({PING: pong_handler})
            proto.dataReceived(data[:cut])
            proto.dataReceived(data[cut:])
            assert [m.tag for m in answers(transport)] == [1, 2, 3, 4], cut

    def test_oversize_prefix_drops_and_fails_pending(self) -> None:
        proto, transport, _ = ready_icp(max_frame_size=1024)
        pending = proto.call(PING, ICP_pb2.PingRequest())
        transport.clear()
        with capturedLogs() as events:
            proto.dataReceived(struct.pack("!I", 1025) + b"x" * 10)
        assert transport.disconnecting
        failure = self.failureResultOf(pending, IcpDisconnectedError)
        assert "1025" in str(failure.value)
        assert any("1025" in str(e.get("reason", "")) for e in events)

    def test_default_limit_is_16_mib(self) -> None:
        proto, transport, _ = ready_icp()
        proto.dataReceived(struct.pack("!I", 16 * 1024 * 1024))
        assert not transport.disconnecting
        proto2, transport2, _ = ready_icp()
        proto2.dataReceived(struct.pack("!I", 16 * 1024 * 1024 + 1))
        assert transport2.disconnecting

    def test_garbage_frame_drops_connection(self) -> None:
        proto, transport, _ = ready_icp({PING: pong_handler})
        pending = proto.call(PING, ICP_pb2.PingRequest())
        transport.clear()
        with capturedLogs() as events:
            proto.dataReceived(frame(b"\xff\xff\xff garbage") + frame(ping(tag=3)))
        assert transport.disconnecting
        assert transport.value() == b"", "frames after the garbage are not answered"
        self.failureResultOf(pending, IcpDisconnectedError)
        assert any(e["log_level"] is LogLevel.error for e in events)

    def test_frame_missing_required_fields_drops_connection(self) -> None:
        proto, transport, _ = ready_icp()
        # tag only: isResponse/status/msgType are required.
        proto.dataReceived(frame(b"\x08\x05"))
        assert transport.disconnecting


class InboundTests(SynchronousTestCase):
    def test_unknown_msg_type_answers_notfound_and_stays(self) -> None:
        proto, transport, _ = ready_icp({PING: pong_handler})
        proto.dataReceived(frame(request(5, 3)) + frame(request(6, 12345)) + frame(ping(7)))
        got = answers(transport)
        assert [(m.tag, m.status) for m in got] == [
            (5, RPCBase.NOTFOUND), (6, RPCBase.NOTFOUND), (7, RPCBase.SUCCESS)]
        assert got[0].payload == b""
        assert not transport.disconnecting

    def test_registered_type_without_handler_answers_notfound(self) -> None:
        proto, transport, _ = ready_icp({})
        proto.dataReceived(frame(ping(1)))
        [got] = answers(transport)
        assert got.status == RPCBase.NOTFOUND and got.msgType == PING

    def test_handler_exception_answers_failed_without_traceback(self) -> None:
        def broken(_request: object) -> None:
            raise ZeroDivisionError("secret internals")

        proto, transport, _ = ready_icp({PING: broken})
        with capturedLogs() as events:
            proto.dataReceived(frame(ping(4)))
        [got] = answers(transport)
        assert got.status == RPCBase.FAILED and got.tag == 4
        assert "secret" not in got.errorDescription and "Traceback" not in got.errorDescription
        assert got.errorDescription
        assert any(e.get("log_failure") is not None for e in events)
        proto.dataReceived(frame(ping(5)))
        assert answers(transport)[0].status == RPCBase.FAILED, "connection stays up"
        assert len(self.flushLoggedErrors(ZeroDivisionError)) == 2

    def test_handler_refusal_carries_its_description(self) -> None:
        def refuse(_request: object) -> None:
            raise IcpHandlerError("no such connection")

        proto, transport, _ = ready_icp({PING: refuse})
        proto.dataReceived(frame(ping(4)))
        [got] = answers(transport)
        assert got.errorDescription == "no such connection"

    def test_a_refusal_kept_off_the_wire_is_a_bare_failed(self) -> None:
        """As ogon answers a call for a connection or session it does not
        know: FAILED, no payload, no errorDescription."""
        def refuse(_request: object) -> None:
            raise IcpHandlerError("no session on connection 9", on_wire=False)

        proto, transport, _ = ready_icp({PING: refuse})
        proto.dataReceived(frame(ping(4)))
        [got] = answers(transport)
        assert (got.tag, got.isResponse, got.status) == (4, True, RPCBase.FAILED)
        assert not got.HasField("payload") and not got.HasField("errorDescription")

    def test_deferred_answers_go_out_in_completion_order(self) -> None:
        waiting: list[Deferred] = []

        def later(_request: object) -> Deferred:
            d: Deferred = Deferred()
            waiting.append(d)
            return d

        proto, transport, _ = ready_icp({PING: later})
        proto.dataReceived(frame(ping(1)) + frame(ping(2)) + frame(ping(3)))
        assert transport.value() == b""
        for i in (2, 0, 1):
            waiting[i].callback(ICP_pb2.PingResponse(pong=True))
        assert [m.tag for m in answers(transport)] == [3, 1, 2]

    def test_deferred_failure_answers_failed(self) -> None:
        proto, transport, _ = ready_icp({PING: lambda r: fail(IcpHandlerError("nope"))})
        proto.dataReceived(frame(ping(1)))
        [got] = answers(transport)
        assert (got.status, got.errorDescription) == (RPCBase.FAILED, "nope")

    def test_malformed_payload_answers_failed(self) -> None:
        proto, transport, _ = ready_icp({VC_OPEN: lambda r: None})
        # connectionId only; the other required fields are missing.
        proto.dataReceived(frame(RPCBase(tag=1, isResponse=False, status=0, msgType=VC_OPEN,
                                         payload=b"\x08\x01")))
        [got] = answers(transport)
        assert got.status == RPCBase.FAILED and "malformed" in got.errorDescription
        assert not transport.disconnecting

    def test_incomplete_handler_response_answers_failed(self) -> None:
        proto, transport, _ = ready_icp({PING: lambda r: ICP_pb2.PingResponse()})
        proto.dataReceived(frame(ping(1)))
        [got] = answers(transport)
        assert got.status == RPCBase.FAILED

    def test_answer_after_disconnect_is_dropped(self) -> None:
        d: Deferred = Deferred()
        proto, transport, _ = ready_icp({PING: lambda r: d})
        proto.dataReceived(frame(ping(1)))
        proto.connectionLost(Failure(ConnectionDone()))
        transport.clear()
        d.callback(ICP_pb2.PingResponse(pong=True))
        assert transport.value() == b""


class OutboundTests(SynchronousTestCase):
    def test_call_fires_with_decoded_response(self) -> None:
        proto, transport, _ = ready_icp()
        d = proto.call(VC_OPEN, vc_open_request())
        [sent] = answers(transport)
        assert not sent.isResponse and sent.msgType == VC_OPEN
        assert ICP_pb2.OtsApiVirtualChannelOpenRequest.FromString(sent.payload).connectionId == 5
        proto.dataReceived(frame(response(sent.tag, VC_OPEN,
                                          ICP_pb2.OtsApiVirtualChannelOpenResponse(
                                              connectionString="pipe", instance=3))))
        result = self.successResultOf(d)
        assert (result.connectionString, result.instance) == ("pipe", 3)
        assert proto.pending_calls == 0

    def test_out_of_order_responses_reach_their_callers(self) -> None:
        proto, transport, _ = ready_icp()
        calls = [proto.call(VC_OPEN, vc_open_request(i)) for i in range(5)]
        sent = answers(transport)
        for rpc in reversed(sent):
            cid = ICP_pb2.OtsApiVirtualChannelOpenRequest.FromString(rpc.payload).connectionId
            proto.dataReceived(frame(response(rpc.tag, VC_OPEN,
                                              ICP_pb2.OtsApiVirtualChannelOpenResponse(
                                                  connectionString=f"c{cid}", instance=cid))))
        assert [self.successResultOf(d).connectionString for d in calls] == [
            f"c{i}" for i in range(5)]

    def test_remote_failed_and_notfound(self) -> None:
        proto, transport, _ = ready_icp()
        d1 = proto.call(PING, ICP_pb2.PingRequest())
        d2 = proto.call(PING, ICP_pb2.PingRequest())
        t1, t2 = (m.tag for m in answers(transport))
        proto.dataReceived(frame(response(t1, PING, status=RPCBase.FAILED, error="boom")))
        proto.dataReceived(frame(response(t2, PING, status=RPCBase.NOTFOUND)))
        assert self.failureResultOf(d1, IcpRemoteError).value.description == "boom"
        self.failureResultOf(d2, IcpNotFoundError)

    def test_timeout_uses_the_clock(self) -> None:
        proto, transport, clock = ready_icp(call_timeout=10)
        d = proto.call(PING, ICP_pb2.PingRequest())
        [sent] = answers(transport)
        clock.advance(9.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.failureResultOf(d, IcpTimeoutError)
        assert proto.pending_calls == 0
        with capturedLogs() as events:
            proto.dataReceived(frame(response(sent.tag, PING, ICP_pb2.PingResponse(pong=True))))
        assert any("unknown tag" in e["log_format"] for e in events)

    def test_per_call_timeout(self) -> None:
        proto, _, clock = ready_icp(call_timeout=10)
        d = proto.call(PING, ICP_pb2.PingRequest(), timeout=1)
        clock.advance(1)
        assert self.failureResultOf(d, IcpTimeoutError).value.timeout == 1

    def test_each_call_times_out_at_its_own_deadline(self) -> None:
        proto, transport, clock = ready_icp(call_timeout=10)
        first = proto.call(PING, ICP_pb2.PingRequest())  # deadline 10
        clock.advance(3)
        short = proto.call(PING, ICP_pb2.PingRequest(), timeout=2)  # deadline 5
        late = proto.call(PING, ICP_pb2.PingRequest())  # deadline 13
        tags = [m.tag for m in answers(transport)]
        proto.dataReceived(frame(response(tags[2], PING, ICP_pb2.PingResponse(pong=True))))
        assert self.successResultOf(late).pong
        clock.advance(1.9)
        self.assertNoResult(short)
        clock.advance(0.1)
        self.failureResultOf(short, IcpTimeoutError)
        clock.advance(4.9)
        self.assertNoResult(first)
        clock.advance(0.1)
        assert self.failureResultOf(first, IcpTimeoutError).value.timeout == 10
        assert clock.getDelayedCalls() == [] and proto.pending_calls == 0

    def test_many_answered_calls_leave_no_timers(self) -> None:
        proto, transport, clock = ready_icp()
        for _ in range(3):
            calls = [proto.call(PING, ICP_pb2.PingRequest()) for _ in range(50)]
            for rpc in answers(transport):
                proto.dataReceived(frame(response(rpc.tag, PING,
                                                  ICP_pb2.PingResponse(pong=True))))
            assert all(self.successResultOf(d).pong for d in calls)
        assert proto._deadlines == [] and len(clock.getDelayedCalls()) <= 1
        # The one sweep timer stays armed while idle; it fires once, finds
        # nothing to time out, and is not re-armed.
        clock.advance(icp.DEFAULT_CALL_TIMEOUT)
        assert clock.getDelayedCalls() == []

    def test_disconnect_fails_every_pending_call_at_once(self) -> None:
        proto, _, clock = ready_icp()
        calls = [proto.call(PING, ICP_pb2.PingRequest()) for _ in range(100)]
        closed = proto.when_closed()
        proto.connectionLost(Failure(ConnectionDone()))
        for d in calls:
            self.failureResultOf(d, IcpDisconnectedError)
        assert isinstance(self.successResultOf(closed), IcpDisconnectedError)
        assert clock.getDelayedCalls() == [], "timers are cancelled"
        later = proto.call(PING, ICP_pb2.PingRequest())
        self.failureResultOf(later, IcpDisconnectedError)

    def test_errback_that_calls_again_fails_at_once(self) -> None:
        proto, _, _ = ready_icp()
        retried: list[Deferred] = []
        d = proto.call(PING, ICP_pb2.PingRequest())
        d.addErrback(lambda f: retried.append(proto.call(PING, ICP_pb2.PingRequest())))
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(retried[0], IcpDisconnectedError)

    def test_cancel_forgets_the_tag(self) -> None:
        proto, _, clock = ready_icp()
        d = proto.call(PING, ICP_pb2.PingRequest())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        assert proto.pending_calls == 0 and proto._deadlines == []
        clock.advance(icp.DEFAULT_CALL_TIMEOUT)
        assert clock.getDelayedCalls() == []

    def test_unknown_tag_is_logged_and_ignored(self) -> None:
        proto, transport, _ = ready_icp()
        with capturedLogs() as events:
            proto.dataReceived(frame(response(777, PING, ICP_pb2.PingResponse(pong=True))))
        assert not transport.disconnecting
        assert any(e.get("tag") == 777 for e in events)

    def test_wrong_request_type_is_a_programming_error(self) -> None:
        proto, _, _ = ready_icp()
        with pytest.raises(TypeError):
            proto.call(PING, vc_open_request())

    def test_tags_wrap_and_skip_outstanding(self) -> None:
        proto, transport, _ = ready_icp()
        proto._next_tag = 0xFFFFFFFE
        first = [proto.call(PING, ICP_pb2.PingRequest()) for _ in range(3)]
        tags = [m.tag for m in answers(transport)]
        assert tags == [0xFFFFFFFE, 0xFFFFFFFF, 0]
        proto._next_tag = 0xFFFFFFFF  # force a collision with an outstanding tag
        proto.call(PING, ICP_pb2.PingRequest())
        [again] = answers(transport)
        assert again.tag == 1
        assert all(not d.called for d in first)

    def test_handler_for_unknown_type_is_rejected(self) -> None:
        with pytest.raises(ValueError):
            connected_icp({12345: pong_handler})


@given(st.lists(st.integers(min_value=0, max_value=0xFFFFFFFF), min_size=1, max_size=20),
       st.data())
def test_any_chunking_of_pings_answers_each_in_order(tags: list[int], data: st.DataObject) -> None:
    proto, transport, _ = ready_icp({PING: pong_handler})
    stream = b"".join(frame(ping(t)) for t in tags)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        proto.dataReceived(stream[start:end])
    assert [m.tag for m in answers(transport)] == tags


@given(st.binary(max_size=64))
def test_arbitrary_frame_bodies_never_raise(body: bytes) -> None:
    proto, _, _ = ready_icp({PING: pong_handler})
    proto.dataReceived(frame(body))
    # Either a valid RPCBase (answered or ignored) or a clean drop; never an exception.
    assert proto.state in (IcpState.READY, IcpState.CLOSED)


@given(st.builds(
    ICP_pb2.LogonUserRequest,
    connectionId=st.integers(0, 2**32 - 1), username=st.text(), password=st.text(),
    domain=st.text(), width=st.integers(0, 2**32 - 1), height=st.integers(0, 2**32 - 1),
    colorDepth=st.integers(0, 2**32 - 1), clientHostName=st.text(), clientAddress=st.text(),
    clientBuildNumber=st.integers(0, 2**32 - 1), clientProductId=st.integers(0, 2**32 - 1),
    clientHardwareId=st.integers(0, 2**32 - 1), clientProtocolType=st.integers(0, 2**32 - 1)))
def test_requests_round_trip_to_the_handler(message: ICP_pb2.LogonUserRequest) -> None:
    seen = []

    def handler(req: ICP_pb2.LogonUserRequest) -> ICP_pb2.LogonUserResponse:
        seen.append(req)
        return ICP_pb2.LogonUserResponse(serviceEndpoint="e", maxHeight=1, maxWidth=2,
                                         backendCookie="b", ogonCookie="o")

    proto, transport, _ = ready_icp({ICP_pb2.LogonUser: handler})
    proto.dataReceived(frame(request(9, ICP_pb2.LogonUser, message)))
    assert seen == [message]
    [got] = answers(transport)
    assert ICP_pb2.LogonUserResponse.FromString(got.payload).maxWidth == 2


@given(tag=st.integers(0, 2**32 - 1), msg_type=st.sampled_from(sorted(icp.ICP_METHODS)),
       payload=st.binary(max_size=300))
def test_hand_encoded_request_envelope_is_what_protobuf_writes(
        tag: int, msg_type: int, payload: bytes) -> None:
    """call() frames requests without a message object; the bytes must be
    exactly the generated class's, length prefix included."""
    body = RPCBase(tag=tag, isResponse=False, status=RPCBase.SUCCESS, msgType=msg_type,
                   payload=payload).SerializeToString()
    assert icp.request_frame(tag, icp._REQUEST_FIELDS[msg_type], payload) == (
        struct.pack("!I", len(body)) + body)

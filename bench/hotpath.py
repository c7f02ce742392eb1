"""The bridge's own Python cost per call, without sockets.

Builds the real service objects (OTS API handler, Thrift server protocol,
ICP protocol) on in-memory transports and a Clock, then drives calls
through them. No reactor, no syscalls, no other process: what is left is
exactly the Python work a call costs, in CPU time of this thread, steady
to about a microsecond where the socket benchmarks on a shared VM move by
±15% run to run. Use it to compare hot-path changes; ``--profile`` prints
where the time goes. Paths:

- ``bridged`` (the default): ``virtualChannelOpen`` on a connection of the
  main process: Thrift bytes in, the ICP request out, its answer in, the
  Thrift reply out;
- ``relayed``: the main process's side of the same call answered by an
  OTS API worker: the channel's ICP_CALL in, the ICP request out, its
  answer in, the channel's ICP_ANSWER out;
- ``worker-vc``: the worker's side of it: Thrift bytes in, the checks on
  its copy of the sessions and tokens, ICP_CALL out on its channel,
  ICP_ANSWER in, the Thrift reply out;
- ``forwarded``: the main process's side of a call a worker forwards
  (anything but the read-only and channel calls): the channel's CALL
  message in, served as a connection's, the channel's REPLY out
  (measured with the same virtualChannelOpen);
- ``local``: ``ping`` answered by a worker's connection (what a worker
  does for a read-only call): Thrift bytes in, the reply out.

usage: python -m bench.hotpath [--path bridged|relayed|worker-vc|forwarded|local]
                               [--calls N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from thrift.protocol import TBinaryProtocol
from thrift.Thrift import TMessageType
from thrift.transport.TTransport import TMemoryBuffer
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from bench.run import encode_call, frame
from bridge.config import Config
from bridge.security.auth import InMemoryAuthenticator
from bridge.security.permissions import FULL
from bridge.service import BridgeService
from bridge.sessions.model import ClientInfo
from protocols import icp
from protocols.generated import ICP_pb2, pbRPC_pb2
from protocols.generated.otsapi import otsapi as twisted_otsapi
from protocols.generated.otsapi_blocking import otsapi
from protocols.thrift_server import ThriftServerFactory


def thrift_call(name: str, **args: Any) -> bytes:
    return bytes.fromhex(encode_call(name, **args))


class HotPath:
    """One bridge, one RDP server connection with a logged-on user, one
    OTS API client connection; ``call()`` runs one bridged call."""

    def __init__(self, base: Path) -> None:
        clock = Clock()
        config = Config(icp_endpoint=f"unix:{base}/icp.sock", thrift_endpoint="tcp:0",
                        state_dir=base / "state", users_file=base / "users",
                        token_dir=base / "tokens", admin_endpoint="", dbus_address="",
                        backend_log_dir=base / "logs")
        self.service = BridgeService(config, reactor=clock, clock=clock,
                                     authenticator=InMemoryAuthenticator({"bench": ("pw", FULL)}))
        self.icp_transport = StringTransport()
        self.icp = self.service.link.buildProtocol(UNIXAddress(str(base / "icp.sock")))
        self.icp.makeConnection(self.icp_transport)
        self._rdp_request(1, icp.HANDSHAKE_MSG_TYPE,
                          versionInfo=pbRPC_pb2.VersionInfo(vmajor=1, vminor=1))
        # A logged-on session on connection 1, as a LogonUser would leave it
        # (without starting a backend process: this measures the hot path).
        registry = self.service.registry
        session = registry.create(1, ClientInfo(width=1024, height=768, color_depth=32),
                                  "bench", "", FULL)
        registry.connected(session)
        registry.log_on(session, "bench", "", FULL)
        self.icp_transport.clear()

        self.thrift_transport = StringTransport()
        factory = ThriftServerFactory(twisted_otsapi, self.service.otsapi)
        self.thrift = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.thrift.makeConnection(self.thrift_transport)
        token = self._thrift_reply(thrift_call("logonConnection", username="bench",
                                                password="pw", domain=""))
        self.request = thrift_call("virtualChannelOpen", authToken=token, sessionId=1,
                                    virtualName="CLIPRDR", isDynChannel=False, flags=0)
        self.answer_payload = ICP_pb2.OtsApiVirtualChannelOpenResponse(
            connectionString="\\\\.\\pipe\\ogon_1_svc_CLIPRDR_1", instance=1
        ).SerializeToString()
        # What a worker relays for the same call: its ICP request's payload.
        self.relay_payload = pbRPC_pb2.RPCBase.FromString(self.icp_request()).payload

    def _rdp_request(self, tag: int, msg_type: int, **fields: Any) -> None:
        self.icp.dataReceived(frame(pbRPC_pb2.RPCBase(
            tag=tag, isResponse=False, status=pbRPC_pb2.RPCBase.SUCCESS, msgType=msg_type,
            **fields)))

    def _thrift_reply(self, request: bytes) -> str:
        self.thrift.dataReceived(request)
        reply = self.thrift_transport.value()[4:]
        self.thrift_transport.clear()
        iprot = TBinaryProtocol.TBinaryProtocol(TMemoryBuffer(reply))
        iprot.readMessageBegin()
        result = otsapi.logonConnection_result()
        result.read(iprot)
        return result.success.authToken

    def answers(self, count: int) -> list[bytes]:
        """The RDP server's answers to the next ``count`` calls, encoded
        ahead so that encoding them is not timed (tags are handed out in
        order by a fresh connection)."""
        first = self.icp._next_tag
        return [frame(pbRPC_pb2.RPCBase(
            tag=first + i, isResponse=True, status=pbRPC_pb2.RPCBase.SUCCESS,
            msgType=icp.MSG_VIRTUAL_CHANNEL_OPEN, payload=self.answer_payload))
            for i in range(count)]

    def run(self, answers: list[bytes]) -> float:
        """Run one bridged call per answer; CPU seconds per call."""
        thrift, icp_proto = self.thrift, self.icp
        thrift_transport, icp_transport = self.thrift_transport, self.icp_transport
        request = self.request
        started = time.thread_time()
        for answer in answers:
            thrift.dataReceived(request)
            icp_proto.dataReceived(answer)
            thrift_transport.clear()
            icp_transport.clear()
        return (time.thread_time() - started) / len(answers)

    def forwarded(self) -> tuple[Any, StringTransport, bytes]:
        """The main process's side of a worker: its channel (on a
        StringTransport) and the CALL message a worker sends for
        ``self.request``."""
        from bridge.otsapi import channel as wire
        from bridge.otsapi.forwarding import ForwardedCalls
        from bridge.otsapi.workers import WorkerProcess

        factory = self.service.thrift_factory
        worker = WorkerProcess(1, 0, None, 0, 0.0)  # type: ignore[arg-type]
        worker.channel = wire.Channel(Clock(), {wire.CALL: lambda body: worker.calls.call(
            *wire.decode_call(body))})
        transport = StringTransport()
        worker.channel.makeConnection(transport)
        worker.calls = ForwardedCalls(factory, worker, _AlwaysOpen())
        return worker.channel, transport, wire.encode_call(7, "", "", self.request[4:])

    def run_forwarded(self, answers: list[bytes]) -> float:
        return self._run_channel(*self.forwarded(), answers)

    def _run_channel(self, channel: Any, channel_transport: StringTransport, call: bytes,
                     answers: list[bytes]) -> float:
        """``call`` in on a worker's channel, the RDP server's answer in,
        once per answer; CPU seconds per call."""
        icp_proto, icp_transport = self.icp, self.icp_transport
        started = time.thread_time()
        for answer in answers:
            channel.dataReceived(call)
            icp_proto.dataReceived(answer)
            channel.flush()
            channel_transport.clear()
            icp_transport.clear()
        return (time.thread_time() - started) / len(answers)

    def run_relayed(self, answers: list[bytes]) -> float:
        """The main process's side of a worker's virtualChannelOpen."""
        from bridge.otsapi import channel as wire
        from bridge.otsapi.forwarding import IcpRelay
        from bridge.otsapi.workers import WorkerProcess

        worker = WorkerProcess(1, 0, None, 0, 0.0)  # type: ignore[arg-type]
        relay = IcpRelay(self.service.link)
        channel = wire.Channel(Clock(), {wire.ICP_CALL: lambda body: relay.call(worker, body)})
        worker.channel = channel
        channel_transport = StringTransport()
        channel.makeConnection(channel_transport)
        call = wire.encode_icp_call(1, icp.MSG_VIRTUAL_CHANNEL_OPEN, None, self.relay_payload)
        return self._run_channel(channel, channel_transport, call, answers)

    def icp_request(self) -> bytes:
        """The ICP request ``self.request`` makes (one call, answered)."""
        [answer] = self.answers(1)
        self.thrift.dataReceived(self.request)
        sent = self.icp_transport.value()[4:]
        self.icp.dataReceived(answer)
        self.thrift_transport.clear()
        self.icp_transport.clear()
        return sent

    def worker(self) -> tuple[Any, Any, StringTransport, StringTransport]:
        """A worker (its state: this bridge's sessions and tokens, as a fork
        copies them), one of its connections, and their transports."""
        from bridge.otsapi import channel as wire
        from bridge.otsapi.worker import (
            ReplicaSessions,
            ReplicaTokens,
            Worker,
            WorkerCalls,
            _WorkerFactory,
        )

        clock = Clock()
        service = self.service
        sessions = ReplicaSessions({s.session_id: s for s in service.registry}, clock)
        tokens = ReplicaTokens(service.tokens.snapshot(), clock)
        factory = _WorkerFactory(twisted_otsapi, None)
        worker = Worker(1, clock, sessions, tokens, factory, 0, wire.PublishedPosition())
        factory.handler = WorkerCalls(sessions, tokens, worker.rdp, service.channels)
        factory.worker = worker
        factory.forwarder = worker
        channel_transport = StringTransport()
        worker.channel.makeConnection(channel_transport)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
        transport = StringTransport()
        proto.makeConnection(transport)
        return worker, proto, transport, channel_transport

    def run_worker_vc(self, count: int) -> float:
        """The worker's side of a virtualChannelOpen it answers."""
        from bridge.otsapi import channel as wire

        worker, proto, transport, channel_transport = self.worker()
        payload = ICP_pb2.OtsApiVirtualChannelOpenResponse(
            connectionString="\\\\.\\pipe\\ogon_1_svc_CLIPRDR_1", instance=1
        ).SerializeToString()
        # Call ids are handed out in order from 1.
        answers = [wire.encode_icp_answer(worker.rdp._next_id + i, payload) for i in range(count)]
        channel, request = worker.channel, self.request
        started = time.thread_time()
        for answer in answers:
            proto.dataReceived(request)
            channel.dataReceived(answer)
            transport.clear()
            channel_transport.clear()
        spent = (time.thread_time() - started) / count
        assert proto.calls_in_flight == 0, "every call was answered"
        return spent

    def run_local(self, count: int) -> float:
        """A worker's connection answering ping."""
        worker, proto, transport, _ = self.worker()
        ping = thrift_call("ping", input=7)
        before = worker._calls_out
        started = time.thread_time()
        for _ in range(count):
            proto.dataReceived(ping)
            transport.clear()
        spent = (time.thread_time() - started) / count
        assert worker._calls_out == before, "answered by the worker itself"
        return spent

    def check(self) -> None:
        """One call, checked: the ICP request and the Thrift reply."""
        [answer] = self.answers(1)
        self.thrift.dataReceived(self.request)
        sent = self.icp_transport.value()
        rpc = pbRPC_pb2.RPCBase.FromString(sent[4:])
        assert rpc.msgType == icp.MSG_VIRTUAL_CHANNEL_OPEN and not rpc.isResponse, rpc
        self.icp.dataReceived(answer)
        reply = self.thrift_transport.value()[4:]
        iprot = TBinaryProtocol.TBinaryProtocol(TMemoryBuffer(reply))
        _, message_type, _ = iprot.readMessageBegin()
        result = otsapi.virtualChannelOpen_result()
        result.read(iprot)
        assert message_type == TMessageType.REPLY and result.success.instance == 1, result
        self.thrift_transport.clear()
        self.icp_transport.clear()


class _AlwaysOpen:
    """A ReplyGate with no worker to wait for."""

    open = True

    def hold(self, send: Any) -> None:
        send()


WHAT = {"bridged": "bridged virtualChannelOpen on a main-process connection",
        "relayed": "a worker's virtualChannelOpen, main process's side (ICP relay)",
        "worker-vc": "a worker's virtualChannelOpen, worker's side",
        "forwarded": "a call forwarded by a worker, main process's side (virtualChannelOpen)",
        "local": "ping answered by a worker's connection"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=sorted(WHAT), default="bridged")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ib-hot-") as base:
        path = HotPath(Path(base))
        path.check()

        def one_round() -> float:
            if args.path == "local":
                return path.run_local(args.calls)
            if args.path == "worker-vc":
                return path.run_worker_vc(args.calls)
            answers = path.answers(args.calls)
            if args.path == "relayed":
                return path.run_relayed(answers)
            return path.run_forwarded(answers) if args.path == "forwarded" \
                else path.run(answers)

        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(one_round)
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(30)
            return
        times = [one_round() * 1e6 for _ in range(args.rounds)]
        print(f"{WHAT[args.path]}, Python only: median {statistics.median(times):.2f} us CPU "
              f"per call (rounds: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()

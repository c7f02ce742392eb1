"""What the main process does for its OTS API workers' calls: serves the
calls they forward (``ForwardedCalls``, exactly as a connection of its own
is served) and relays the ICP requests they make for the calls they answer
themselves (``IcpRelay``: virtualChannelOpen/Close ask the RDP server on
the main process's one connection to it)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from bridge.otsapi import channel as wire
from protocols import icp
from protocols.errors import IcpProtocolError
from protocols.thrift_server import ThriftServerFactory, ThriftServerProtocol

if TYPE_CHECKING:
    from bridge.otsapi.workers import WorkerPool, WorkerProcess

#: The ICP requests relayed for workers: those of the calls they answer.
RELAYED = frozenset({icp.MSG_VIRTUAL_CHANNEL_OPEN, icp.MSG_VIRTUAL_CHANNEL_CLOSE})


class ForwardedCalls(ThriftServerProtocol):
    """Calls a worker forwarded, served by this process's handler as any
    connection's are; the reply goes back over the worker's channel for
    the worker's connection (the ``route`` of ThriftServerProtocol)."""

    def __init__(self, factory: ThriftServerFactory, worker: WorkerProcess,
                 pool: WorkerPool) -> None:
        super().__init__(factory.methods, factory.handler, factory.max_frame_size,
                         factory.limits)
        self.call_counts = factory.call_counts
        self.log_limit = factory.log_limit
        self.gate = pool
        self.worker = worker
        # No transport of its own: always "connected", never paused.
        self.connected = True
        self._max_in_flight = sys.maxsize
        self._host = ""

    def call(self, connection_id: int, host: str, source: str, message: bytes) -> None:
        # Who the client is, as the worker's connection found it (its
        # address; a loopback client's uid, asked of the kernel there).
        self._host = host
        self._source = source
        self.worker.calls_here += 1
        self._message(message, connection_id)

    def _write(self, payload: bytes, route: Any) -> None:
        gate = self.gate
        if gate is not None and not gate.open:
            gate.hold(lambda: self._write(payload, route))
            return
        worker = self.worker
        worker.calls_here -= 1
        # The last answer the worker waits for goes at once (see Channel.send).
        worker.channel.send(wire.encode_reply(route, payload), now=worker.calls_here == 0)

    def _peer(self) -> str:
        return f"{self._host or 'a client'} (OTS API worker {self.worker.index})"

    def _reject(self, reason: str, kind: str = "bad_data") -> None:
        # The worker checked the message before it forwarded it.
        self.log.error("OTS API worker {index} forwarded a call that does not decode: "
                       "{reason}", index=self.worker.index, reason=reason)

    def pause(self, why: str) -> None:
        pass

    def resume(self, why: str) -> None:
        pass


class IcpRelay:
    """Sends workers' ICP requests to the RDP server and their answers (or
    how each failed) back, counted and timed by the link as the main
    process's own calls are."""

    def __init__(self, rdp: Any) -> None:
        """``rdp``: the RDP server link (``call_payload``)."""
        self.rdp = rdp

    def call(self, worker: WorkerProcess, body: bytes) -> None:
        """Relay a worker's ICP request to the RDP server, and the answer
        back. Only the calls workers make (virtualChannelOpen/Close) are
        relayed: anything else is a bug in the worker."""
        call_id, msg_type, timeout, payload = wire.decode_icp_call(body)
        worker.calls_here += 1
        if msg_type not in RELAYED or self.rdp is None:
            d: Deferred[bytes] = fail(IcpProtocolError(
                f"msgType {msg_type} is not relayed for OTS API workers"))
        else:
            d = self.rdp.call_payload(msg_type, payload, timeout)
        d.addCallbacks(self._answered, self._failed,
                       callbackArgs=(worker, call_id), errbackArgs=(worker, call_id))

    def _answered(self, payload: bytes, worker: WorkerProcess, call_id: int) -> None:
        worker.calls_here -= 1
        worker.channel.send(wire.encode_icp_answer(call_id, payload),
                            now=worker.calls_here == 0)

    def _failed(self, failure: Failure, worker: WorkerProcess, call_id: int) -> None:
        worker.calls_here -= 1
        worker.channel.send(wire.encode_icp_failure(call_id, wire.icp_failure(failure.value)),
                            now=worker.calls_here == 0)

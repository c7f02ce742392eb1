"""The link to the RDP server: at most one ICP connection at a time, peer
uid checks, and the call entry point the OTS API handlers use."""

from __future__ import annotations

import socket
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from protocols.errors import IcpHandshakeTimeoutError, IcpNotConnectedError, IcpProtocolError
from protocols.icp import Handler, IcpProtocol, IcpState, method_name


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(transport: Any) -> PeerCredentials | None:
    """SO_PEERCRED of a UNIX socket transport; None where there is none."""
    try:
        sock = transport.getHandle()
        if sock.family != socket.AF_UNIX:
            return None
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (AttributeError, OSError):
        return None
    return PeerCredentials(*struct.unpack("3i", raw))


def _describe(creds: PeerCredentials | None) -> str:
    return "unknown peer" if creds is None else f"pid {creds.pid}, uid {creds.uid}"


class RdpServerProtocol(IcpProtocol):
    """An ICP connection from an RDP server, admitted by its link."""

    def __init__(self, link: RdpServerLink, **kwargs: Any) -> None:
        super().__init__(link.handlers, **kwargs)
        self.link = link
        self.credentials: PeerCredentials | None = None

    def drop(self, error: IcpProtocolError) -> None:
        if self.state is not IcpState.CLOSED:
            self.link.dropped["handshake_timeout" if isinstance(error, IcpHandshakeTimeoutError)
                              else "protocol_error"] += 1
        super().drop(error)

    def connectionMade(self) -> None:
        self.credentials = peer_credentials(self.transport)
        if not self.link.admit(self):
            self.transport.loseConnection()
            return
        super().connectionMade()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        self.link.lost(self, reason)


class RdpServerLink(Factory):
    """Accepts RDP server connections, one at a time, and carries the
    bridge's calls to the current one.

    Invariant: ``current`` is the admitted connection until its
    connectionLost, else None.
    """

    log = Logger()
    noisy = False  # the listening service logs where it listens

    def __init__(
        self,
        handlers: Mapping[int, Handler],
        clock: IReactorTime,
        call_timeout: float,
        max_frame_size: int,
        allowed_uids: list[int] | None = None,
        max_send_frame: int = 32 * 1024,
        on_lost: Callable[[], None] = lambda: None,
        handshake_timeout: float = 10.0,
        max_pending: int = 50_000,
        max_queued: int = 16 * 1024 * 1024,
    ) -> None:
        self.handlers = handlers
        self.clock = clock
        self.call_timeout = call_timeout
        self.max_frame_size = max_frame_size
        self.max_send_frame = max_send_frame
        # For the metrics: the RDP server's requests by (method, answer),
        # the bridge's calls by (method, outcome), connections refused or
        # dropped by cause, and each call's seconds (set by the metrics).
        self.request_counts: Counter[tuple[str, str]] = Counter()
        self.call_counts: Counter[tuple[str, str]] = Counter()
        self.dropped: Counter[str] = Counter()
        self.protocol_options: dict[str, Any] = {"handshake_timeout": handshake_timeout,
                                 "max_pending": max_pending, "max_queued": max_queued,
                                 "request_counts": self.request_counts,
                                 "call_counts": self.call_counts}
        # Called once the RDP server (and so every client connection) is gone.
        self.on_lost = on_lost
        self.allowed_uids = set(allowed_uids or ())
        self.current: RdpServerProtocol | None = None
        self._ready_waiters: list[Deferred[RdpServerProtocol]] = []

    def buildProtocol(self, addr: IAddress) -> RdpServerProtocol:
        return RdpServerProtocol(
            self, clock=self.clock, call_timeout=self.call_timeout,
            max_frame_size=self.max_frame_size, max_send_frame=self.max_send_frame,
            **self.protocol_options,
        )

    def admit(self, proto: RdpServerProtocol) -> bool:
        creds = proto.credentials
        if self.allowed_uids and (creds is None or creds.uid not in self.allowed_uids):
            self.dropped["uid_not_allowed"] += 1
            self.log.warn("refused RDP server connection from {peer}: uid not allowed",
                          peer=_describe(creds))
            return False
        if self.current is not None:
            self.dropped["second_rdp_server"] += 1
            self.log.warn(
                "refused second RDP server connection from {peer}: one is already connected",
                peer=_describe(creds),
            )
            return False
        self.current = proto
        self.log.info("RDP server connected ({peer})", peer=_describe(creds))
        proto.when_ready().addCallbacks(self._ready, lambda _: None, callbackArgs=(proto,))
        return True

    def _ready(self, version: tuple[int, int], proto: RdpServerProtocol) -> None:
        self.log.info("RDP server speaks ICP {major}.{minor}", major=version[0], minor=version[1])
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(proto)

    def lost(self, proto: RdpServerProtocol, reason: Failure | None) -> None:
        if proto is not self.current:
            return
        self.current = None
        self.log.info("RDP server disconnected ({peer}): {reason}",
                      peer=_describe(proto.credentials),
                      reason=reason.getErrorMessage() if reason is not None else "closed")
        self.on_lost()

    @property
    def credentials(self) -> PeerCredentials | None:
        """SO_PEERCRED of the connected RDP server, if one is connected."""
        return self.current.credentials if self.current is not None else None

    @property
    def ready(self) -> bool:
        return self.current is not None and self.current.state is IcpState.READY

    def when_ready(self) -> Deferred[RdpServerProtocol]:
        """Fires with the RDP server connection once one has shaken hands
        (at once if one has)."""
        d: Deferred[RdpServerProtocol] = Deferred()
        if self.ready:
            d.callback(self.current)
        else:
            self._ready_waiters.append(d)
        return d

    def call(self, msg_type: int, request: Message, timeout: float | None = None
             ) -> Deferred[Any]:
        """Call the RDP server (see IcpProtocol.call); fails at once with
        IcpNotConnectedError when none is connected."""
        current = self.current
        if current is None:
            self.call_counts[method_name(msg_type), "not_connected"] += 1
            return fail(IcpNotConnectedError("no RDP server is connected"))
        return current.call(msg_type, request, timeout)

    def call_payload(self, msg_type: int, payload: bytes, timeout: float | None = None
                     ) -> Deferred[bytes]:
        """Call the RDP server with a request serialized elsewhere (an OTS
        API worker's); fires with the answer's payload (see
        IcpProtocol.call_payload)."""
        current = self.current
        if current is None:
            self.call_counts[method_name(msg_type), "not_connected"] += 1
            return fail(IcpNotConnectedError("no RDP server is connected"))
        return current.call_payload(msg_type, payload, timeout)

    def set_latency_observer(self, observe: Callable[[str, float], None]) -> None:
        """Give each call's seconds to ``observe`` (the metrics)."""
        self.protocol_options["observe_latency"] = observe
        if self.current is not None:
            self.current.observe_latency = observe

    def close(self) -> None:
        if self.current is not None:
            self.current.close()

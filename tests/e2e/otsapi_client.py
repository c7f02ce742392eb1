"""Thrift clients for the tests: thrift's own blocking client run in a
thread (so the reactor keeps serving), and its Twisted client."""

from __future__ import annotations

from typing import Any

from thrift.protocol import TBinaryProtocol
from thrift.transport import TSocket, TTransport, TTwisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientCreator
from twisted.internet.threads import deferToThread

from protocols.generated.otsapi import otsapi as otsapi_twisted
from protocols.generated.otsapi_blocking import otsapi


class BlockingClient:
    """One connection of thrift's blocking client (TSocket + TFramedTransport
    + TBinaryProtocol); ``await client.call(name, *args)`` runs it in a
    thread."""

    def __init__(self, port: int, framed: bool = True, socket: Any = None) -> None:
        sock = socket or TSocket.TSocket("127.0.0.1", port)
        sock.setTimeout(20_000)
        self.transport = (TTransport.TFramedTransport(sock) if framed
                          else TTransport.TBufferedTransport(sock))
        self.client = otsapi.Client(TBinaryProtocol.TBinaryProtocol(self.transport))
        self._opened = False

    def _run(self, name: str, *args: Any) -> Any:
        if not self._opened:
            self.transport.open()
            self._opened = True
        return getattr(self.client, name)(*args)

    def call(self, name: str, *args: Any) -> Deferred[Any]:
        return deferToThread(self._run, name, *args)

    def close(self) -> None:
        self.transport.close()


async def twisted_client(port: int) -> Any:
    """thrift's Twisted client protocol, connected; ``.client`` has the methods."""
    creator = ClientCreator(reactor, TTwisted.ThriftClientProtocol, otsapi_twisted.Client,
                            TBinaryProtocol.TBinaryProtocolFactory())
    proto = await creator.connectTCP("127.0.0.1", port)
    await proto.started
    return proto

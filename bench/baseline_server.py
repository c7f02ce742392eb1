"""The baseline of the benchmark: Apache Thrift's own Twisted server
(TTwisted.ThriftServerFactory with the generated Twisted processor and the
accelerated binary protocol), serving ``ping`` from the same IDL, no ICP hop.

usage: python -m bench.baseline_server PORT
"""

from __future__ import annotations

import sys

from thrift.protocol import TBinaryProtocol
from thrift.transport import TTwisted
from twisted.internet import reactor
from zope.interface import implementer

from protocols.generated.otsapi import otsapi


@implementer(otsapi.Iface)
class PingOnly:
    def ping(self, input: int) -> int:
        return input


def main() -> None:
    port = int(sys.argv[1])
    factory = TTwisted.ThriftServerFactory(
        otsapi.Processor(PingOnly()), TBinaryProtocol.TBinaryProtocolAcceleratedFactory()
    )
    reactor.listenTCP(port, factory, backlog=4096, interface="127.0.0.1")
    print(f"baseline listening on {port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()

"""The baseline of the benchmark: Apache Thrift's own Twisted server
(TTwisted.ThriftServerFactory with the generated Twisted processor and the
accelerated binary protocol), serving ``ping`` from the same IDL, no ICP hop.

It runs on Twisted's default reactor, as a user would run it; with
``--bridge-reactor`` it runs on the bridge's (bench.run --baseline-reactor
bridge), to see how much of the difference is the reactor.

usage: python -m bench.baseline_server PORT [--bridge-reactor]
"""

from __future__ import annotations

import sys

if "--bridge-reactor" in sys.argv:  # before anything imports the default reactor
    from bridge.reactor import install

    install()

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
    print(f"baseline listening on {port} ({type(reactor).__name__})", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()

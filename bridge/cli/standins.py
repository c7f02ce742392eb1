"""``icp-bridge peer`` and ``icp-bridge backend``: the stand-in RDP server and
the stand-in session backend, for demos, client development, tests and
load."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from bridge.cli.common import read_password


def cmd_peer(args: argparse.Namespace) -> int:
    from twisted.internet import task
    from twisted.internet.defer import Deferred, ensureDeferred
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from bridge.rdp.standin import StandInRdpServer

    password = read_password(f"password for {args.user}: ") if args.user else ""
    if not args.quiet:
        # Our own lines stay on stdout; the log (Twisted's and the peer's) on stderr.
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                         redirectStandardIO=False)
    statuses = {0: "AUTH_SUCCESSFUL", 1: "AUTH_BAD_CREDENTIALS", 2: "AUTH_WRONG_SESSION_STATE",
                3: "AUTH_UNKNOWN_ERROR"}

    def fail(text: str) -> NoReturn:
        print(f"icp-bridge peer: {text}", file=sys.stderr, flush=True)
        raise SystemExit(1)

    async def run(reactor: Any) -> None:
        from twisted.internet.error import ConnectError

        from protocols.errors import IcpError

        peer = StandInRdpServer(reactor, answer_delay=args.delay,
                                pipe_dir=Path(args.pipe_dir) if args.pipe_dir else None)
        try:
            proto = await peer.connect(f"unix:{args.socket}")
        except ConnectError as e:
            # osError is the errno for a UNIX socket (ENOENT, ECONNREFUSED, EACCES).
            why = os.strerror(e.osError) if isinstance(e.osError, int) else str(e)
            fail(f"no bridge at {args.socket} ({why})")
        except IcpError as e:
            # It serves one RDP server at a time: another one is connected.
            fail(f"the bridge at {args.socket} closed the connection ({e}); is another RDP "
                 f"server connected to it?")
        print(f"connected to {args.socket}, ICP {proto.peer_version[0]}.{proto.peer_version[1]}",
              flush=True)
        for connection_id in range(args.first_connection,
                                   args.first_connection + args.connections):
            # Without --user: a client that brings no credentials (the greeter).
            direct = args.direct or not args.user
            who = args.user if direct and args.user else "(greeter)"
            try:
                r = await peer.logon(connection_id, (args.user or "") if direct else "",
                                     password if direct else "", args.domain)
            except IcpError as e:
                fail(f"connection {connection_id}: logon {who} failed: {e}")
            print(f"connection {connection_id}: logon {who} -> {r.serviceEndpoint} "
                  f"({r.maxWidth}x{r.maxHeight})", flush=True)
            if not direct:
                try:
                    status = await peer.greeter_login(connection_id, args.user, password,
                                                      args.domain)
                except IcpError as e:
                    fail(f"connection {connection_id}: greeter login {args.user} failed: {e}")
                connection = peer.connections.get(connection_id)
                endpoint = connection.service_endpoint if connection is not None else "?"
                print(f"connection {connection_id}: greeter login {args.user}: "
                      f"{statuses.get(status, status)}; now on {endpoint}", flush=True)
        if args.once:
            peer.close()
            return
        print("answering the bridge's requests; Ctrl-C to stop", flush=True)
        closed: Deferred[Any] = proto.when_closed()
        reason = await closed
        print(f"bridge closed the connection: {reason}", flush=True)

    task.react(lambda reactor: ensureDeferred(run(reactor)))
    return 0


def cmd_backend(args: argparse.Namespace) -> int:
    from bridge.backends import standin as standin_backend

    return standin_backend.run(args)


def add_commands(commands: Any) -> None:
    peer = commands.add_parser("peer", help="run a stand-in RDP server")
    # The path real RDP servers dial (winpr maps the named pipe there).
    peer.add_argument("--socket", default="/tmp/.pipe/ogon_SessionManager",  # noqa: S108
                      help="the bridge's ICP socket")
    peer.add_argument("--user", help="log this user on (password on stdin)")
    peer.add_argument("--domain", default="")
    peer.add_argument("--connections", type=int, default=1,
                      help="client connections to log on")
    peer.add_argument("--first-connection", type=int, default=1)
    peer.add_argument("--delay", type=float, default=0.0,
                      help="seconds to hold every answer to the bridge")
    peer.add_argument("--direct", action="store_true",
                      help="send the password in LogonUser instead of logging on through "
                           "the greeter (SBP)")
    peer.add_argument("--pipe-dir", default="/tmp/.pipe",  # noqa: S108
                      help="where backend endpoints are (connect to them as ogon does; "
                           "'' to not connect)")
    peer.add_argument("--once", action="store_true", help="log on, then exit")
    peer.add_argument("--quiet", action="store_true", help="no log lines")
    peer.set_defaults(func=cmd_peer)

    from bridge.backends import standin as standin_backend

    backend = commands.add_parser(
        "backend", help="run a stand-in session backend (for [modules.*] in demos and tests)",
        description="A stand-in session backend: listens on its endpoint socket, logs each "
                    "connection, exits on SIGTERM.")
    standin_backend.add_arguments(backend)
    backend.set_defaults(func=cmd_backend)

"""A stand-in session backend, for demos and tests (``icp-bridge backend``).

It does what a backend must for the bridge and the RDP server: create its
endpoint socket and accept connections on it (logging each one), and exit
on SIGTERM. It can also report what it was started with, exit on its own,
crash at start or be slow to start.

Standard library only, and runnable as a plain script
(``python3 standin_backend.py ...``), so that a test can run it as another
user who cannot read the bridge's installation.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence


def say(text: str) -> None:
    print(f"standin-backend[{os.getpid()}]: {text}", flush=True)


def report(path: str) -> None:
    """Write what the bridge started us with (for the tests) to ``path``."""
    data = {
        "env": dict(os.environ), "uid": os.getuid(), "gid": os.getgid(),
        "groups": sorted(os.getgroups()), "pid": os.getpid(), "pgid": os.getpgid(0),
        "sid": os.getsid(0), "cwd": os.getcwd(), "argv": sys.argv,
    }
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as f:
        json.dump(data, f)
    os.replace(temp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The stand-in's options, on its own parser or on ``icp-bridge
    backend``'s (so that its ``--help`` lists them)."""
    parser.add_argument("--socket", required=True,
                        help="the endpoint socket to create (pipe_dir/endpoint)")
    parser.add_argument("--report", help="write environment, ids and process group here")
    parser.add_argument("--exit-after", type=float, help="exit by itself after this many s")
    parser.add_argument("--exit-status", type=int, default=0)
    parser.add_argument("--listen-delay", type=float, default=0.0,
                        help="seconds between binding the socket under its name and listening")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds to wait before listening (a slow start)")
    parser.add_argument("--crash", action="store_true", help="fail at once, before listening")
    parser.add_argument("--child", action="store_true",
                        help="start a child process (stopped with the process group)")
    parser.add_argument("--ignore-term", action="store_true",
                        help="ignore SIGTERM (to be stopped with SIGKILL)")
    parser.add_argument("--accept-once", action="store_true",
                        help="accept one connection, then stop listening, as ogon's Qt "
                             "platform plugin does")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icp-bridge backend", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Listen on ``args.socket`` until SIGTERM (or as the options say)."""
    if args.report:
        report(args.report)
    if args.crash:
        print("standin-backend: crashing at start as asked", file=sys.stderr, flush=True)
        return 3
    stopping = []
    if args.ignore_term:
        signal.signal(signal.SIGTERM, lambda *_: say("ignoring SIGTERM"))
    else:
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    child = None
    if args.child:
        child = subprocess.Popen(["sleep", "3600"])
        say(f"started child {child.pid}")
    if args.delay:
        time.sleep(args.delay)
    try:
        os.unlink(args.socket)
    except FileNotFoundError:
        pass
    # Listening before the name appears: whoever sees the file (the bridge
    # deciding readiness, the RDP server) can connect at once.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if args.listen_delay:
        # As most servers do: bound under its name, listening a moment later.
        server.bind(args.socket)
        time.sleep(args.listen_delay)
        server.listen(16)
    else:
        temporary = f"{args.socket}.{os.getpid()}.tmp"
        server.bind(temporary)
        server.listen(16)
        os.rename(temporary, args.socket)
    say(f"listening on {args.socket}")
    deadline = time.monotonic() + args.exit_after if args.exit_after is not None else None
    clients: dict[int, tuple[socket.socket, int]] = {}
    listening = [server]
    accepted = 0
    try:
        while not stopping:
            timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline:
                say(f"exiting by itself with status {args.exit_status}")
                return args.exit_status
            try:
                ready, _, _ = select.select([*listening, *(c for c, _ in clients.values())],
                                            [], [], timeout)
            except InterruptedError:
                continue
            for sock in ready:
                if sock is server:
                    conn, _ = server.accept()
                    accepted += 1
                    if args.accept_once:
                        say("stopped listening after one connection")
                        server.close()
                        listening = []
                    clients[conn.fileno()] = (conn, accepted)
                    say(f"accepted connection {accepted}")
                    # Who we are, for the stand-in RDP server (a real backend
                    # speaks ogon's backend protocol here instead).
                    try:
                        conn.sendall(f"icp-bridge-standin sid={os.environ.get('OGON_SID', '')}"
                                     f"\n".encode())
                    except OSError:
                        pass
                    continue
                conn, number = clients[sock.fileno()]
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    del clients[sock.fileno()]
                    conn.close()
                    say(f"connection {number} closed")
                else:
                    say(f"connection {number}: {len(data)} bytes")
        say("terminated (SIGTERM)")
        return 0
    finally:
        server.close()
        try:
            os.unlink(args.socket)
        except OSError:
            pass
        # A child is left to the process group's SIGTERM (what the tests check).


if __name__ == "__main__":
    sys.exit(main())

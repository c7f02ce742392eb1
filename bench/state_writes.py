"""How long the bridge's durable-state writes hold the reactor.

StateStore writes run on the reactor thread, one small SQLite transaction
per session change (its row and its journal row) or token issue/revoke
(WAL, synchronous=NORMAL: no fsync per commit), while a worker thread
checkpoints the WAL, as the service does (here every 0.2 s instead of
5 s, to have many checkpoints in the run). This times each kind of write
against a database that already holds ``--sessions`` sessions and as
many tokens, in a directory on the same kind of disk as the state dir
would be.

usage: python -m bench.state_writes [--dir DIR] [--sessions N] [--writes N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bridge.security.tokens import TokenRecord
from bridge.sessions.model import ClientInfo, ConnectState, Session, SessionChange, SessionEvent
from bridge.state.store import StateStore


def session(session_id: int) -> Session:
    return Session(
        session_id=session_id, username=f"user{session_id}", domain="", state=ConnectState.ACTIVE,
        connection_id=session_id, connect_time=1.0, logon_time=1.0, permission=0x1FF,
        client=ClientInfo(host_name=f"client{session_id}", address="192.0.2.10", build_number=19041,
                          width=1920, height=1080, color_depth=32),
    )


def change(event: SessionEvent, n: int) -> list[SessionChange]:
    """One session change, as the registry hands it to the store (session
    row and journal row in one transaction)."""
    s = session(n)
    return [SessionChange(event, s, ConnectState.INIT, s.state, "bench", time.time(), n + 1)]


def token(n: int) -> TokenRecord:
    return TokenRecord(digest=f"{n:064x}", username=f"user{n}", domain="", permission=0x1FF,
                       session_id=n, expires_at=None, lifetime=None)


def timed(writes: int, write: Callable[[int], None], first: int) -> list[float]:
    durations = []
    for n in range(first, first + writes):
        started = time.perf_counter()
        write(n)
        durations.append((time.perf_counter() - started) * 1e6)
    return durations


def measure(directory: str, sessions: int, writes: int) -> dict[str, list[float]]:
    """Durations in microseconds, by kind of write."""
    base = Path(tempfile.mkdtemp(prefix="ib-state-", dir=directory))
    try:
        store = StateStore(base / "state.sqlite")
        for n in range(1, sessions + 1):
            store.write(change(SessionEvent.CREATED, n))
            store.token_changed(token(n).digest, token(n))
        first = sessions + 1
        stop = threading.Event()

        def checkpoints() -> None:
            while not stop.wait(0.2):
                store.checkpoint()

        checkpointer = threading.Thread(target=checkpoints)
        checkpointer.start()
        results = {
            "write (logon, state change, + journal)": timed(
                writes, lambda n: store.write(change(SessionEvent.LOGGED_ON, n)), first),
            "token_changed (issue)": timed(
                writes, lambda n: store.token_changed(token(n).digest, token(n)), first),
            "token_changed (revoke)": timed(
                writes, lambda n: store.token_changed(token(n).digest, None), first),
            "write (session ends, + journal)": timed(
                writes, lambda n: store.write(change(SessionEvent.ENDED, n)), first),
        }
        stop.set()
        checkpointer.join()
        store.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/var/tmp", help="where to put the database")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--writes", type=int, default=2000)
    args = parser.parse_args()
    results = measure(args.dir, args.sessions, args.writes)
    print(f"{args.writes} writes of each kind, database with {args.sessions} sessions and "
          f"tokens, in {args.dir}")
    print(f"{'write':<36} {'p50 us':>8} {'p99 us':>8} {'max us':>8} {'over 2 ms':>10}")
    for name, durations in results.items():
        durations.sort()
        p99 = durations[int(len(durations) * 0.99) - 1]
        slow = sum(d > 2000 for d in durations)
        print(f"{name:<36} {statistics.median(durations):>8.0f} {p99:>8.0f} "
              f"{durations[-1]:>8.0f} {slow:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

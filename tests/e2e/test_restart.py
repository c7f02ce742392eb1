"""State across restarts: sessions, tokens and token files survive."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from bridge.sessions.model import ConnectState
from bridge.state.store import StateStore
from tests.conftest import kill_and_wait, kill_process_groups, start_bridge
from tests.e2e.otsapi_client import BlockingClient


@pytest_twisted.ensureDeferred
async def test_restart_keeps_sessions_tokens_and_files(short_dir: Path) -> None:
    first = await start_bridge(short_dir)
    peer = await first.peer()
    await peer.logon(1, "alice", "alice-pw")
    await peer.logon(2, "bob", "bob-pw")
    await peer.logon(3, "", "")  # a greeter: gone after the restart
    alice = first.service.registry.by_connection(1).session_id
    token_file = short_dir / "tokens" / f"ogon.session.{alice}"
    session_token = token_file.read_text().strip()
    client = BlockingClient(first.thrift_port)
    admin = (await client.call("logonConnection", "alice", "alice-pw", "")).authToken
    client.close()
    await first.stop(kill_backends=False)  # backends outlive the bridge

    second = await start_bridge(short_dir)
    try:
        registry = second.service.registry
        assert [(s.username, s.state, s.connection_id) for s in registry] == [
            ("alice", ConnectState.DISCONNECTED, None), ("bob", ConnectState.DISCONNECTED, None)]
        assert token_file.read_text().strip() == session_token, "file kept, token still valid"
        client = BlockingClient(second.thrift_port)
        assert await client.call("getPermissionForToken", admin) == 0x1FF
        assert await client.call("getPermissionForToken", session_token) == 0x1FF
        peer = await second.peer()
        again = await peer.logon(7, "alice", "alice-pw")
        assert again.serviceEndpoint.endswith(f"ogon_{alice}_xsession")
        assert registry.by_connection(7).session_id == alice
        await peer.logon(8, "guest", "guest-pw")
        assert registry.by_connection(8).session_id == 4, "ids 1-3 are not reused"
        client.close()
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_lost_token_file_is_rewritten_on_restart(short_dir: Path) -> None:
    first = await start_bridge(short_dir)
    peer = await first.peer()
    await peer.logon(1, "bob", "bob-pw")
    session_id = first.service.registry.by_connection(1).session_id
    token_file = short_dir / "tokens" / f"ogon.session.{session_id}"
    old = token_file.read_text().strip()
    await first.stop(kill_backends=False)
    token_file.unlink()  # e.g. /tmp cleaned at boot
    second = await start_bridge(short_dir)
    try:
        new = token_file.read_text().strip()
        assert new and new != old
        assert second.service.tokens.lookup(new).session_id == session_id
        assert second.service.tokens.lookup(old) is None
    finally:
        await second.stop()


def test_state_store_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s" / "state.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.load_sessions() == [] and store.next_session_id() == 1
    # The write-ahead log and its index hold the latest sessions and tokens too.
    for name in ("state.sqlite3", "state.sqlite3-wal", "state.sqlite3-shm"):
        assert (tmp_path / "s" / name).stat().st_mode & 0o777 == 0o600, name
    store.close()


def test_writes_never_checkpoint_checkpoint_does(tmp_path: Path) -> None:
    from bridge.sessions.model import ClientInfo, Session, SessionChange, SessionEvent

    path = tmp_path / "state.sqlite3"
    store = StateStore(path)
    for n in range(1, 400):  # well past SQLite's default autocheckpoint of 1000 pages
        session = Session(n, f"u{n}", "", ConnectState.ACTIVE, n, ClientInfo())
        store.write([SessionChange(SessionEvent.CREATED, session, None, session.state, "",
                                   float(n), n + 1)])
    page = store._db.execute("PRAGMA page_size").fetchone()[0]
    wal_bytes = Path(f"{path}-wal").stat().st_size
    assert wal_bytes > 1000 * (page + 24), "commits never checkpoint (the WAL kept growing)"
    before = path.stat().st_size
    store.checkpoint()
    assert path.stat().st_size > before + 10 * page, "checkpoint() copied the WAL over"
    store.close()
    assert len(StateStore(path).load_sessions()) == 399


@pytest_twisted.ensureDeferred
async def test_a_backend_gone_during_the_restart_ends_its_session(short_dir: Path) -> None:
    first = await start_bridge(short_dir)
    peer = await first.peer()
    await peer.logon(1, "alice", "alice-pw")
    await peer.logon(2, "bob", "bob-pw")
    alice = first.service.registry.by_connection(1)
    bob = first.service.registry.by_connection(2)
    pids = first.backend_pids()
    await first.stop(kill_backends=False)
    kill_and_wait(alice.backend.pid)  # e.g. the machine's OOM killer
    second = await start_bridge(short_dir)
    try:
        registry = second.service.registry
        assert registry.get(alice.session_id) is None, "its backend is gone: it ended"
        assert registry.get(bob.session_id).backend.pid == bob.backend.pid, "adopted"
        assert not (short_dir / "tokens" / f"ogon.session.{alice.session_id}").exists()
        assert [b.pid for b in second.service.launcher.running()] == [bob.backend.pid]
    finally:
        await second.stop()
        kill_process_groups(pids)

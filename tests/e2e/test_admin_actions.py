"""The admin endpoint's session actions over real sockets: POST
/sessions/<id>/logoff, /disconnect and /message, with a Bearer token only,
the action's OTS API flag, and the journal saying who."""

from __future__ import annotations

import json
import socket
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from bridge.sessions.model import ConnectState, SessionChange, SessionEvent
from tests.conftest import BridgeUnderTest, start_bridge
from tests.e2e.otsapi_client import BlockingClient
from tests.e2e.sse import _Body, get


async def post(port: int, path: str, token: str | None = None, body: Any = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) of POST ``path`` with ``body`` as JSON."""
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode() \
        if body is not None else b""
    response = await Agent(reactor).request(
        b"POST", f"http://127.0.0.1:{port}{path}".encode(),
        Headers({k: [v] for k, v in all_headers.items()}),
        FileBodyProducer(BytesIO(raw)) if raw else None)
    reader = _Body()
    response.deliverBody(reader)
    return response.code, json.loads(await reader.done)


async def token_of(bridge: BridgeUnderTest, user: str, password: str) -> str:
    client = BlockingClient(bridge.thrift_port)
    try:
        result = await client.call("logonConnection", user, password, "")
    finally:
        client.close()
    assert result.success
    return result.authToken


@pytest_twisted.ensureDeferred
async def test_full_tokens_log_off_disconnect_and_message_and_the_journal_says_who(
        short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        registry = bridge.service.registry
        alice = registry.by_connection(1).session_id
        bob = registry.by_connection(2).session_id
        port = bridge.admin_port
        full = await token_of(bridge, "alice", "alice-pw")

        code, sessions, _ = await get(port, "/sessions", full)
        assert json.loads(sessions)["caller"] == {
            "user": "alice", "permission": 0x1FF,
            "actions": ["logoff", "disconnect", "message"], "sees_everything": True}

        peer.message_result = 7
        code, answer = await post(port, f"/sessions/{bob}/message", full,
                                  {"title": "Update", "text": "Restart?", "style": 4,
                                   "wait": True})
        assert (code, answer) == (200, {"ok": True, "session_id": bob, "action": "message",
                                        "result": 7})
        sent = peer.seen("MessageRequest")[-1]
        assert (sent.parameter1, sent.parameter2, sent.style) == ("Update", "Restart?", 4)

        code, answer = await post(port, f"/sessions/{bob}/disconnect", full)
        assert (code, answer["ok"]) == (200, True)
        assert registry.get(bob).state is ConnectState.DISCONNECTED
        code, answer = await post(port, f"/sessions/{bob}/message", full, {"text": "x"})
        assert code == 409 and "no client connection" in answer["error"]
        code, answer = await post(port, f"/sessions/{alice}/logoff", full, {"wait": True})
        assert (code, answer["ok"]) == (200, True)
        assert registry.get(alice) is None

        by = "through the admin endpoint by alice from 127.0.0.1"
        reasons = [(e.session_id, e.event, e.reason)
                   for e in bridge.service.store.events_after(0, 1000)]
        assert (bob, "disconnected", f"disconnected {by}") in reasons
        assert (alice, "ended", f"logged off {by}") in reasons
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_without_the_flag_or_a_bearer_header_nothing_happens(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        session_id = bridge.service.registry.by_connection(1).session_id
        port = bridge.admin_port
        user = await token_of(bridge, "bob", "bob-pw")  # USER: no LOGOFF, ...
        full = await token_of(bridge, "alice", "alice-pw")
        last = bridge.service.events.last_id

        code, sessions, _ = await get(port, "/sessions", user)
        assert json.loads(sessions)["caller"]["actions"] == []
        for action, flag in (("logoff", "LOGOFF"), ("disconnect", "DISCONNECT"),
                             ("message", "MESSAGE")):
            code, answer = await post(port, f"/sessions/{session_id}/{action}", user,
                                      {"text": "x"})
            assert (code, answer["error"]) == (403, f"the token lacks {flag}")
        # A cookie is no credential here (no CSRF): 401.
        code, answer = await post(port, f"/sessions/{session_id}/logoff",
                                  headers={"Cookie": f"token={full}"})
        assert code == 401 and "cookies are not read" in answer["error"]
        code, _ = await post(port, f"/sessions/{session_id}/logoff", "x" * 43)
        assert code == 401
        assert bridge.service.registry.get(session_id).state is ConnectState.ACTIVE
        assert bridge.service.events.last_id == last, "nothing happened"

        # What is not an action is said so.
        assert (await post(port, "/sessions/999/logoff", full))[0] == 404
        assert (await post(port, f"/sessions/{session_id}/reboot", full))[0] == 404
        code, answer = await post(port, f"/sessions/{session_id}/message", full, b"{nope")
        assert code == 400 and answer["error"] == "the body is not JSON"
        code, answer = await post(port, f"/sessions/{session_id}/message", full,
                                  {"text": "x", "style": "yes"})
        assert code == 400 and answer["error"] == "style must be a whole number"
        code, answer = await post(port, f"/sessions/{session_id}/logoff", full, b"wait=1",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert code == 415
        code, answer = await post(port, f"/sessions/{session_id}/message", full,
                                  {"text": "x" * 70_000})
        assert code == 413 and answer["error"] == "the body is over 64 KiB"
        assert (await get(port, f"/sessions/{session_id}/logoff", full))[0] == 404
        assert bridge.service.registry.get(session_id).state is ConnectState.ACTIVE
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_that_goes_before_the_answer_does_not_stop_the_action(
        short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        session_id = bridge.service.registry.by_connection(1).session_id
        full = await token_of(bridge, "alice", "alice-pw")
        peer.hold = True  # the RDP server answers LogoffUserSession only when released
        seen = peer.requests_count
        raw = socket.create_connection(("127.0.0.1", bridge.admin_port), timeout=20)
        raw.sendall(f"POST /sessions/{session_id}/logoff HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{bridge.admin_port}\r\n"
                    f"Authorization: Bearer {full}\r\nContent-Length: 0\r\n\r\n".encode())
        await peer.when_requests_seen(seen + 1)
        raw.close()
        ended: Deferred[None] = Deferred()

        def watch(change: SessionChange) -> None:
            if change.event is SessionEvent.ENDED and not ended.called:
                ended.callback(None)

        bridge.service.registry.observe(watch)
        with capturedLogs() as logged:
            peer.release()
            await ended
        assert bridge.service.registry.get(session_id) is None
        assert not [e for e in logged if e.get("log_failure") is not None]
    finally:
        await bridge.stop()

"""Audit and watching: who ended or disconnected a session (log and
journal), failed logons and lockouts as journal events of session 0 (and
what reads the journal copes with them), and /metrics by Prometheus's
conventions (standard process_* names, build info, call outcomes, backend
exits by reason)."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher

from bridge.sessions.model import ConnectState
from tests.conftest import BridgeUnderTest, start_bridge
from tests.e2e.otsapi_client import BlockingClient
from tests.e2e.sse import get, open_events

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def log_lines() -> Iterator[list[str]]:
    """The bridge's log lines while the block runs, formatted."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


async def call(bridge: BridgeUnderTest, method: str, *args: Any) -> Any:
    client = BlockingClient(bridge.thrift_port)
    try:
        return await client.call(method, *args)
    finally:
        client.close()


async def logon_token(bridge: BridgeUnderTest, user: str = "alice",
                      password: str = "alice-pw") -> str:
    result = await call(bridge, "logonConnection", user, password, "")
    assert result.success
    return result.authToken


def journal(bridge: BridgeUnderTest) -> list[Any]:
    return bridge.service.store.events_after(0, 100_000)


# -- who did it ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_the_log_and_the_journal_say_who_ended_or_disconnected_a_session(
        short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        registry = bridge.service.registry
        alice = registry.by_connection(1).session_id
        bob = registry.by_connection(2).session_id
        token = await logon_token(bridge)
        with log_lines() as lines:
            assert await call(bridge, "disconnectSession", token, bob, True)
            assert registry.get(bob).state is ConnectState.DISCONNECTED
            assert await call(bridge, "logoffSession", token, alice, True)
            assert await call(bridge, "logoffSession", token, bob, False)
        by = "through the OTS API by alice from 127.0.0.1"
        reasons = [(e.session_id, e.event, e.reason) for e in journal(bridge)]
        assert (bob, "disconnected", f"disconnected {by}") in reasons
        assert (alice, "ended", f"logged off {by}") in reasons
        assert (bob, "ended", f"logged off {by}") in reasons
        assert f"session {alice} ended (logged off {by})" in lines
        assert f"session {bob} disconnected (disconnected {by})" in lines

        # A message says who sent it in the log (it changes no session).
        await peer.logon(3, "alice", "alice-pw")
        session_id = registry.by_connection(3).session_id
        with log_lines() as lines:
            assert await call(bridge, "sendMessage", token, session_id, "T", "Text", 0, 0,
                              False) == 32001
        assert f"message to session {session_id} {by} (5 characters)" in lines
    finally:
        await bridge.stop()


# -- failed logons and lockouts --------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_failed_logons_and_lockouts_are_journal_events_of_session_0(
        short_dir: Path) -> None:
    bridge = await start_bridge(short_dir, lockout_failures=2, logon_failures_before_delay=5)
    try:
        token = await logon_token(bridge)
        stream = await open_events(bridge.admin_port, token)
        peer = await bridge.peer()
        # A local OTS API client is counted by its uid (issue 18): two failures
        # from it lock it out of bob, and out of every user.
        local = f"uid:{os.geteuid()}"
        await peer.logon(1, "bob", "wrong")  # the RDP side: the greeter instead
        assert not (await call(bridge, "logonConnection", "bob", "bad", "")).success
        assert not (await call(bridge, "logonConnection", "bob", "bad", "")).success
        assert not (await call(bridge, "logonConnection", "bob", "bob-pw", "")).success, \
            "locked out"
        await stream.wait_for(lambda events: sum(e.data["event"] == "locked-out"
                                                 for e in events) == 2)
        stream.drop()
        events = [e.data for e in stream.sessions if e.data["session_id"] == 0]
        assert [(e["event"], e["username"]) for e in events] == [
            ("logon-failed", "bob"), ("logon-failed", "bob"), ("logon-failed", "bob"),
            ("locked-out", "bob"), ("locked-out", "bob")]
        assert events[0]["reason"] == \
            "failed logon from the RDP server from claimed address 192.0.2.10, 1 in a row"
        assert events[1]["reason"] == \
            f"failed logon through the OTS API from {local}, 2 in a row"
        assert events[3]["reason"] == \
            f"user bob from {local} locked out for 900 s after 2 failed logons"
        assert events[4]["reason"] == \
            f"local client {local} locked out for 900 s after 2 failed logons"
        assert events[0]["old_state"] is None and events[0]["new_state_name"] is None
        stored = [e for e in journal(bridge) if e.session_id == 0]
        assert [e.event for e in stored] == ["logon-failed"] * 3 + ["locked-out"] * 2

        # ctl events prints them without a session.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "ICP_BRIDGE_TOKEN": token}
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "bridge.cli", "ctl", "events", "--admin",
                             f"127.0.0.1:{bridge.admin_port}"], env=env, path=str(ROOT))
        assert code == 0, err
        lines = [line for line in out.decode().splitlines() if " locked-out " in line]
        assert len(lines) == 2 and "session" not in lines[0].split(" locked-out ")[0]
        assert lines[0].endswith(
            f"locked-out bob (user bob from {local} locked out for 900 s after 2 failed "
            "logons)")

        # /sessions and the metrics are not confused by session 0.
        code, body, _ = await get(bridge.admin_port, "/sessions", token)
        assert code == 200 and 0 not in [s["session_id"] for s in json.loads(body)["sessions"]]
        metrics = samples((await get(bridge.admin_port, "/metrics"))[1].decode())
        assert metrics["icp_bridge_lockouts_total", (("what", "pair"),)] == 1
        assert metrics["icp_bridge_lockouts_total", (("what", "source"),)] == 1
        assert metrics["icp_bridge_logons_total", (("kind", "otsapi"), ("outcome",
                                                                        "locked_out"))] == 1
        assert metrics["icp_bridge_event_journal_last_id", ()] == journal(bridge)[-1].id
        assert sum(v for (name, _), v in metrics.items() if name == "icp_bridge_sessions") \
            == len(bridge.service.registry)
    finally:
        await bridge.stop()


# -- metrics -------------------------------------------------------------------------------

def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest_twisted.ensureDeferred
async def test_metrics_follow_prometheus_conventions(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        token = await logon_token(bridge)
        session_id = bridge.service.registry.by_connection(1).session_id
        backend = bridge.service.lifecycle.backends[session_id]
        assert await call(bridge, "logoffSession", token, session_id, True)
        await backend.when_exited()
        text = (await get(bridge.admin_port, "/metrics"))[1].decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}

        for name, family in families.items():
            assert name.startswith(("icp_bridge_", "process_")), name
            assert not name.startswith("icp_bridge_process_"), "the standard process_* names"
            assert "_ms" not in name and "milliseconds" not in name, "base units"
            if family.type == "counter":
                assert all(s.name.endswith(("_total", "_created")) for s in family.samples), \
                    name
            if family.type == "histogram":
                assert name.endswith("_seconds"), name
            if family.type == "gauge":
                assert not name.endswith("_total"), name
        for standard in ("process_cpu_seconds", "process_open_fds",
                         "process_resident_memory_bytes", "process_start_time_seconds"):
            assert standard in families, standard

        [build] = families["icp_bridge_build_info"].samples
        assert build.name == "icp_bridge_build_info" and build.value == 1
        assert build.labels == {"version": version("icp-bridge"),
                                "python": platform.python_version(),
                                "twisted": version("twisted")}

        values = samples(text)
        # The backend stopped by the logoff: by module and reason.
        assert values["icp_bridge_backend_exits_total", (("module", "xsession"),
                                                         ("reason", "stopped"))] == 1
        assert values["icp_bridge_otsapi_calls_total", (("method", "logoffSession"),
                                                        ("outcome", "answered"))] == 1
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_backend_exits_are_counted_by_reason(short_dir: Path) -> None:
    from tests.conftest import standin_module

    modules = {"greeter": standin_module("greeter", ready_timeout=20),
               "xsession": standin_module("xsession", ready_timeout=20),
               "dies": standin_module("dies", "--exit-after", "0.3", "--exit-status", "3",
                                      ready_timeout=20),
               "ends": standin_module("ends", "--exit-after", "0.3", ready_timeout=20)}
    bridge = await start_bridge(short_dir, modules=modules, user_properties={
        "bob": {"module": "dies"}, "guest": {"module": "ends"}})
    try:
        peer = await bridge.peer()
        launcher = bridge.service.launcher
        backends = []
        for connection_id, user in ((1, "bob"), (2, "guest"), (3, "alice")):
            await peer.logon(connection_id, user, f"{user}-pw")
            # Taken at once: the short-lived ones may be gone by the next logon.
            backends += [b for b in launcher.running() if b not in backends]
        alice = next(b for b in backends if b.module.name == "xsession")
        os.killpg(alice.pid, 9)  # e.g. the OOM killer
        for backend in backends:
            await backend.when_exited()
        assert launcher.exits == {("dies", "failed"): 1, ("ends", "exited"): 1,
                                  ("xsession", "killed"): 1}
    finally:
        await bridge.stop()

"""Log forgery (review finding 9): text from outside (an RDP client's user
name and claimed address, a desktop's output) must not make log entries of
its own nor drive the operator's terminal. The review's log_forgery.py
made genuine-looking journal entries with U+2028 in a user name, a newline
in the client address and \\v in desktop output; here the same go through
the bridge's log observers and must stay inside their own entry."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, LogPublisher, capturedLogs, globalLogPublisher
from twisted.python.failure import Failure

from bridge.backends.launcher import Backend, BackendLauncher
from bridge.backends.modules import Module
from bridge.daemon.logs import BridgeLogging, classic_line, journal_line
from bridge.security.auth import is_user_name
from bridge.security.lockouts import source_identity
from bridge.sessions.model import BackendRecord
from protocols.errors import IcpRemoteError
from protocols.logtext import escaped
from tests.conftest import STANDIN_BACKEND, start_bridge

FORGED = "[bridge.lifecycle.ending] session 1 ended (logged off through the OTS API by root)"


def event(text_format: str, **fields: Any) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    log = Logger(namespace="bridge.x", observer=LogPublisher(events.append))
    log.warn(text_format, **fields)
    return events[0]


def test_escaping_is_repr_like_and_leaves_names_alone() -> None:
    assert escaped("a\nb\rc\x0bd\x1b]0;t\x07\x85\u2028\u2029\x7f\u202e") == \
        "a\\nb\\rc\\x0bd\\x1b]0;t\\x07\\x85\\u2028\\u2029\\x7f\\u202e"
    assert escaped("DOMAIN\\José 山田") == "DOMAIN\\José 山田"
    assert escaped(escaped("a\nb")) == "a\\nb", "escaping twice changes nothing"


@pytest.mark.parametrize("separator", ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028",
                                       "\u2029", "\r\n"])
def test_a_field_with_a_line_break_stays_in_its_journal_entry(separator: str) -> None:
    line = journal_line(event("failed logon for user {username} from {source}",
                              username=f"nobody{separator}{FORGED}", source="192.0.2.9"))
    assert line is not None and line.endswith("\n")
    assert line.count("\n") == 1 and len(line.splitlines()) == 1, repr(line)
    assert line.startswith("<4>[bridge.x] failed logon for user nobody\\")
    assert FORGED in line, "still there to read, escaped"


def test_a_multi_line_message_is_one_entry_and_a_traceback_is_marked() -> None:
    assert journal_line(event("first\nsecond {x}", x=1)) == "<4>[bridge.x] first\\nsecond 1\n"
    events: list[dict[str, Any]] = []
    log = Logger(namespace="bridge.x", observer=LogPublisher(events.append))
    try:
        raise ValueError(f"bad name\n{FORGED}")
    except ValueError:
        log.failure("it broke for {name}", Failure(), name="a\u2028b")
    lines = (journal_line(events[0]) or "").split("\n")[:-1]
    assert lines[0] == "<2>[bridge.x] it broke for a\\u2028b"
    assert len(lines) > 3 and all(line.startswith("<2>[bridge.x] | ") for line in lines[1:]), \
        "a traceback's lines: the priority, the system, and marked as its continuation"
    assert not any(line.startswith(("<2>[bridge.lifecycle", "[bridge.lifecycle"))
                   for line in lines)


def test_the_classic_log_gets_no_carriage_return_or_escape_sequence() -> None:
    line = classic_line(event("session 1 xsession: {line}",
                              line=f"x\r2026-12-02T03:00:00+0000 {FORGED}\x1b]0;pwned\x07"))
    assert line is not None
    assert "\r" not in line and "\x1b" not in line and "\x07" not in line
    assert "x\\r2026-12-02T03:00:00+0000" in line and "\\x1b]0;pwned\\x07" in line


def test_ctl_events_prints_one_line_per_event() -> None:
    from bridge.cli.events import _event_line

    line = _event_line({"id": 7, "time": 0.0, "session_id": 0, "event": "logon-failed",
                        "username": f"x\u2028{FORGED}",
                        "reason": "failed logon from claimed address 1.2.3.4\x1b[2J"})
    assert "\n" not in line and "\x1b" not in line and "\u2028" not in line
    assert "x\\u2028[bridge.lifecycle.ending]" in line and "\\x1b[2J" in line


def test_user_names_refuse_controls_format_and_separator_characters() -> None:
    for bad in ("a\x00b", "a\nb", "a\x7fb", "a\x85b", "nobody\u2028root", "a\u2029b",
                "ali\u202ece", "a\u200bb", "a\ufeffb"):
        assert not is_user_name(bad), repr(bad)
    for good in ("alice", "José", "山田", "first.last", "DOMAIN\\alice", "a b"):
        assert is_user_name(good), good


def test_a_source_that_is_no_address_is_no_source() -> None:
    assert source_identity("192.0.2.9\n[bridge.endpoints] removed") == ""
    assert source_identity("client.example.org") == ""
    assert source_identity("uid:1003") == "uid:1003"
    assert source_identity("uid:1\n2") == "" and source_identity("uid:x") == ""
    assert source_identity("[2001:db8::1%eth0]") == "2001:db8::/64"
    assert source_identity("198.51.100.7") == "198.51.100.7"


def test_backend_output_is_escaped_line_by_line(tmp_path: Path) -> None:
    clock = Clock()
    launcher = BackendLauncher(reactor, clock, tmp_path, tmp_path, as_root=False)
    path, fd = launcher.logs.create(1, "xsession")
    backend = Backend(launcher, 1, Module("xsession", ("x",), "e"),
                      BackendRecord("xsession", 1, 1, "e"))
    backend.follow_output(launcher.logs.attach(path, "session 1 xsession"), from_end=True)
    with capturedLogs() as events, open(fd, "w") as out:
        out.write(f"started\x0b{FORGED}\nx\r{FORGED}\x1b]0;pwned\x07\n")
        out.flush()
        clock.advance(1)
    lines = [e["line"] for e in events if "line" in e]
    assert lines == [f"started\\x0b{FORGED}", f"x\\r{FORGED}\\x1b]0;pwned\\x07"]
    assert list(backend.last_lines) == lines
    launcher.close()


@pytest_twisted.ensureDeferred
async def test_forged_entries_do_not_reach_the_journal_end_to_end(short_dir: Path) -> None:
    # The review's reproduction: the bridge logs in its journal form; an RDP
    # client sends U+2028 in its user name and a newline in its address,
    # and a desktop prints \v and \r before forged lines.
    desktop = short_dir / "desktop.py"
    desktop.write_text(
        "import os, sys\n"
        f"sys.stdout.write('started\\x0b{FORGED}\\n'\n"
        f"                 'x\\r{FORGED}\\x1b]0;pwned\\x07\\n')\n"
        "sys.stdout.flush()\n"
        f"os.execv(sys.executable, [sys.executable, {str(STANDIN_BACKEND)!r}, *sys.argv[1:]])\n")
    journal = short_dir / "journal"
    from tests.conftest import make_config

    modules = dict(make_config(short_dir).modules)
    xsession = modules["xsession"]
    modules["xsession"] = Module(
        name="xsession", command=(sys.executable, str(desktop), *xsession.command[2:]),
        endpoint=xsession.endpoint, user=xsession.user, ready_timeout=20)
    with open(journal, "w") as stream:
        info = os.fstat(stream.fileno())
        logging = BridgeLogging(None, "info", {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"},
                                stdout=stream)
        assert logging.journal
        globalLogPublisher.addObserver(logging.observer)
        bridge = await start_bridge(short_dir, modules=modules)
        try:
            peer = await bridge.peer()
            await peer.logon(1, "alice", "alice-pw")
            try:
                await peer.logon(2, f"nobody\u2028{FORGED}", "x",
                                 address=f"192.0.2.9\n{FORGED}")
            except IcpRemoteError:
                pass
            # The desktop's output is copied into the log at the follower's
            # next look: wait for it (bounded).
            for _ in range(200):
                stream.flush()
                if "started" in journal.read_text():
                    break
                await deferLater(reactor, 0.05)
        finally:
            await bridge.stop()
            globalLogPublisher.removeObserver(logging.observer)
    raw = journal.read_bytes().decode()
    lines = raw.split("\n")
    assert any("started\\x0b[bridge.lifecycle.ending]" in line for line in lines), raw[-2000:]
    for line in lines:
        entry = re.sub(r"^<\d>", "", line)
        assert not entry.startswith((FORGED, "2026-12-02T03:00:00")), "a forged entry: " + line
        assert "\r" not in line and "\x1b" not in line and "\x0b" not in line
        assert "\u2028" not in line and "\x85" not in line

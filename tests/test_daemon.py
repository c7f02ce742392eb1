"""Running as a daemon, part by part: systemd's notification protocol over a
real datagram socket (a path and an abstract address), the watchdog on a
Clock, the journal's line format and its detection, the log level, and
--logfile on SIGUSR1 (moved away: a new file; in place: rotated)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from bridge.daemon.logs import BridgeLogging, is_journal_stream, journal_line
from bridge.daemon.notify import SystemdNotifier, notify_address, watchdog_interval


@pytest.fixture
def listener(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket where systemd would listen, and NOTIFY_SOCKET for it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = short_dir / "notify"
    s.bind(str(path))
    s.setblocking(False)
    yield s, str(path)
    s.close()


def received(s: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(s.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_notify_sends_one_datagram_per_state(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "OTHER": "x"}
    notifier = SystemdNotifier(environ, unset=True)
    assert environ == {"OTHER": "x"}, "backends given the bridge's environment do not notify"
    assert notifier.ready("3 sessions") and notifier.reloading() and notifier.stopping()
    ready, reloading, stopping = received(s)
    assert ready == "READY=1\nSTATUS=3 sessions"
    fields = dict(line.split("=", 1) for line in reloading.splitlines())
    assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0
    assert abs(int(fields["MONOTONIC_USEC"]) - _monotonic_usec()) < 10_000_000
    assert stopping.startswith("STOPPING=1\n")


def _monotonic_usec() -> int:
    import time

    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_an_abstract_address_is_written_with_an_at() -> None:
    name = f"icpb-test-{secrets.token_hex(4)}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.setblocking(False)
    try:
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert received(s) == ["READY=1"]
    finally:
        s.close()
    assert notify_address("@x") == "\0x" and notify_address("/run/n") == "/run/n"
    assert notify_address("") is None and notify_address("vsock:2:1") is None


def test_without_systemd_nothing_is_sent_and_nothing_fails(short_dir: Path) -> None:
    assert not SystemdNotifier({}).ready()
    gone = SystemdNotifier({"NOTIFY_SOCKET": str(short_dir / "nobody-listens")})
    assert gone.enabled and not gone.ready(), "a socket that went away is a log line"


def test_the_watchdog_pings_every_half_interval(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    clock = Clock()
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert notifier.watchdog_interval == 1.0
    notifier.start_watchdog(clock)
    assert received(s) == ["WATCHDOG=1"]
    clock.advance(0.9)
    assert received(s) == []
    clock.advance(0.1)
    clock.advance(1.0)
    assert received(s) == ["WATCHDOG=1", "WATCHDOG=1"]
    notifier.stop_watchdog()
    clock.advance(5)
    assert received(s) == []
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "2"}, pid=2) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_journal_lines_carry_priorities_and_no_timestamp() -> None:
    log = Logger(namespace="bridge.x")
    events: list[dict] = []
    publisher = LogPublisher(events.append)
    log.observer = publisher
    log.warn("disk {what}", what="full")
    log.info("fine")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("it broke", Failure())
    warn, info, failure = (journal_line(e) for e in events)
    assert warn == "<4>[bridge.x] disk full\n"
    assert info == "<6>[bridge.x] fine\n"
    assert failure is not None
    lines = failure.splitlines()
    assert lines[0] == "<2>[bridge.x] it broke" and len(lines) > 3
    assert all(line.startswith("<2>") for line in lines), "a traceback's lines too"
    assert "ZeroDivisionError" in failure


def test_the_journal_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open(out, "w") as stream:
        info = os.fstat(stream.fileno())
        assert is_journal_stream(stream, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
        assert not is_journal_stream(stream, {"JOURNAL_STREAM": f"{info.st_dev}:1"})
        assert not is_journal_stream(stream, {})
        logging = BridgeLogging(None, "warn", {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"},
                                stdout=stream)
        assert logging.journal
        log = Logger(namespace="bridge.y", observer=logging.observer)
        log.info("dropped below warn")
        log.error("kept")
        logging.set_level("debug")  # a reload
        log.debug("now kept")
    assert out.read_text() == "<3>[bridge.y] kept\n<7>[bridge.y] now kept\n"


def test_logfile_moved_away_is_replaced_on_sigusr1(tmp_path: Path) -> None:
    path = tmp_path / "bridge.log"
    logging = BridgeLogging(str(path), "info")
    log = Logger(namespace="bridge.z", observer=logging.observer)
    log.info("first")
    path.rename(tmp_path / "bridge.log.1")  # logrotate's mv
    log.info("still the old file")
    assert logging.reopen is not None and logging.reopen() == "reopened"
    log.info("second")
    assert "first" in (tmp_path / "bridge.log.1").read_text()
    assert "still the old file" in (tmp_path / "bridge.log.1").read_text()
    assert "second" in path.read_text() and "first" not in path.read_text()
    # Not moved: rotated, as twistd's own SIGUSR1 does.
    assert logging.reopen() == "rotated"
    log.info("third")
    assert "third" in path.read_text() and "second" in (tmp_path / "bridge.log.1").read_text()


def test_levels_map_to_syslog_priorities() -> None:
    from bridge.daemon.logs import PRIORITIES

    assert [PRIORITIES[level] for level in (LogLevel.debug, LogLevel.info, LogLevel.warn,
                                            LogLevel.error, LogLevel.critical)] == [7, 6, 4, 3, 2]

"""An ogon installation made of stand-ins (tests/ogon_standins), for the
bridge to run ogon's module kinds with: ogon's bin directory with
ogon-backend-x, ogon-qt-greeter, ogon-backend-weston,
ogon-backend-launcher, ogonXsession/startwm/stopwm/startvc; the module
libraries' directory (the launcher stand-in only reads their names); a
records directory the stand-ins write what they were started with to."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import inotify, reactor
from twisted.internet.defer import Deferred
from twisted.python.filepath import FilePath

from tests.conftest import ME

STANDINS = Path(__file__).resolve().parents[1] / "ogon_standins"
PYTHON = "/usr/bin/python3"
TEST_USER = "icpbtest"
PROGRAMS = ("ogon-backend-x", "ogon-qt-greeter", "ogon-backend-weston", "ogon-backend-launcher")
SCRIPTS = ("ogonXsession", "startwm", "stopwm", "startvc")


def desktop_account() -> str:
    """A real non-root account to run desktops as (created when we are
    root, as CI is), else ourselves."""
    if os.geteuid() != 0:
        return ME
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--user-group",
                        TEST_USER], check=True, capture_output=True)
    return TEST_USER


class OgonSite:
    """The stand-in installation under ``base/ogon`` (world-readable: the
    programs run as the test account too)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.bin = base / "ogon" / "bin"
        self.modules = base / "ogon" / "lib" / "ogon1" / "modules"
        self.records = base / "records"
        self.x11 = base / "x11"
        self.pipes = base / "pipes"
        for directory in (self.bin, self.modules):
            directory.mkdir(parents=True)
        for directory in (base / "ogon", base / "ogon" / "lib", base / "ogon" / "lib" / "ogon1",
                          self.bin, self.modules):
            directory.chmod(0o755)
        for directory in (self.records, self.x11, self.pipes):
            directory.mkdir()
            directory.chmod(0o1777)
        for name in PROGRAMS:
            shutil.copy(STANDINS / name, self.bin / name)
            (self.bin / name).chmod(0o755)
        for name in SCRIPTS:
            shutil.copy(STANDINS / "ogon-session-script", self.bin / name)
            (self.bin / name).chmod(0o755)
        shutil.copy(STANDINS / "ogon_standin_lib.py", self.bin / "ogon_standin_lib.py")
        (self.bin / "ogon_standin_lib.py").chmod(0o644)
        for library in ("libogon-mod-x11.so", "libogon-mod-qt.so", "libogon-mod-weston.so"):
            (self.modules / library).write_bytes(b"")
        settings = {"records": str(self.records), "pipe_dir": str(self.pipes),
                    "x11_dir": str(self.x11)}
        (self.bin / "standin.json").write_text(json.dumps(settings))
        (self.bin / "standin.json").chmod(0o644)

    def records_of(self, prog: str) -> list[dict[str, Any]]:
        """What each run of ``prog`` recorded, oldest first."""
        found = []
        for path in self.records.glob(f"{prog}.*.json"):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                pass
        return sorted(found, key=lambda r: r["started"])

    def when_recorded(self, prog: str, condition: Any = None) -> Deferred[dict[str, Any]]:
        """Fires with ``prog``'s latest record once there is one (for which
        ``condition(record)`` holds): the stand-ins write their records by
        renaming, which inotify reports; nothing polls."""
        d: Deferred[dict[str, Any]] = Deferred()
        notifier = inotify.INotify(reactor)
        notifier.startReading()

        def check(*_: Any) -> None:
            records = self.records_of(prog)
            if d.called or not records or (condition is not None and not condition(records[-1])):
                return
            notifier.loseConnection()
            d.callback(records[-1])

        notifier.watch(FilePath(str(self.records)), mask=inotify.IN_MOVED_TO,
                       callbacks=[check])
        check()
        return d.addTimeout(30, reactor)

    def record(self, prog: str) -> dict[str, Any]:
        [one] = self.records_of(prog)
        return one

    def event_time(self, prog: str, what: str) -> float:
        return next(e["t"] for e in self.record(prog)["events"] if e["what"] == what)

    def pids(self) -> list[int]:
        return [r["pid"] for path in self.records.glob("*.json")
                for r in [json.loads(path.read_text())]]

    def kill_all(self) -> None:
        """End every stand-in still running (by the pids they recorded)."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


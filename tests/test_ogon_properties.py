"""Every property ogon's modules read, and what it changes: the X11
module's (displayOffset, dpi, fontPath, noKPCursor, xauthoritypath,
startwm, stopwm, startvc, and the sizes initResolutions reads), Qt's and
Weston's ``cmd``, and the session manager's choice (modulename, uselauncher,
launcherexecutable, launcherdebugfile). Processes are not started: the
launcher's spawn primitive is given a recorder."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from bridge.backends.environment import Account, own_account, placeholders
from bridge.backends.launcher import BackendLauncher
from bridge.backends.modules import BackendError, LaunchContext
from bridge.backends.ogon.commandline import command_line_to_argv
from bridge.backends.ogon.kinds import OgonModules, OgonSettings, packaged_module_dir
from bridge.backends.ogon.properties import KindChoice, ModuleProperties, choose_kind
from bridge.backends.ogon.x11 import X11Backend

#: A pid no process has: signals to it fail harmlessly.
NO_PID = 2**31 - 7


class FakeProcess:
    def __init__(self, protocol: Any, args: list[str], env: dict[str, str], path: str | None,
                 uid: int | None, child_fds: dict[int, Any]) -> None:
        self.protocol = protocol
        self.args = args
        self.env = env
        self.path = path
        self.uid = uid
        self.child_fds = child_fds
        self.pid = NO_PID

    def end(self) -> None:
        self.protocol.processEnded(Failure(ProcessTerminated(signal=15)))


class Spawns:
    def __init__(self) -> None:
        self.started: list[FakeProcess] = []

    def __call__(self, protocol: Any, executable: str, args: list[str], env: dict[str, str],
                 path: str | None, uid: int | None, gid: int | None,
                 child_fds: dict[int, Any]) -> FakeProcess:
        process = FakeProcess(protocol, args, env, path, uid, child_fds)
        process.executable = executable  # type: ignore[attr-defined]
        self.started.append(process)
        return process


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short directory: the pipe sockets' paths must fit AF_UNIX."""
    short = Path(tempfile.mkdtemp(prefix="ibp-", dir="/tmp"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


class World:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.pipes = base / "pipes"
        self.pipes.mkdir()
        self.bin = base / "bin"
        self.bin.mkdir()
        for name in ("ogon-backend-x", "ogonXsession", "startwm", "stopwm", "startvc",
                     "ogon-backend-launcher"):
            (self.bin / name).write_text("#!/bin/sh\n")
            (self.bin / name).chmod(0o755)
        self.home = base / "home"
        self.home.mkdir()
        self.spawns = Spawns()
        self.clock = Clock()
        (base / "logs").mkdir()
        self.launcher = BackendLauncher(reactor, self.clock, self.pipes, base / "logs",
                                        as_root=False, spawn=self.spawns,
                                        bin_dirs=(str(self.bin),))
        me = own_account()
        self.account = Account(me.name, me.uid, me.gid, str(self.home), me.shell)
        self.values: dict[str, Any] = {}
        self.listening: list[socket.socket] = []

    def lookup(self, session_id: int, path: str) -> Any:
        return self.values.get(path.lower())

    def set(self, **values: Any) -> None:
        self.values.update({k.replace("__", ".").lower(): v for k, v in values.items()})

    def properties(self) -> ModuleProperties:
        return ModuleProperties(self.lookup, 7, "xsession")

    def make_socket(self, name: str) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.pipes / name))
        s.listen(1)  # as the X server does: readiness waits for listen()
        self.listening.append(s)

    def start_x11(self, display: int = 12) -> tuple[X11Backend, Any]:
        """Start the X11 module; the X server 'writes' ``display`` and makes
        its pipe."""
        env = {"HOME": str(self.home), "PATH": "/usr/bin"}
        backend = X11Backend(self.launcher, 7, "xsession", self.account, env, None,
                             f"{self.bin}:/usr/bin")
        started = Deferred.fromCoroutine(backend.start(self.properties()))
        x = self.spawns.started[0]
        self.make_socket(f"ogon_{display}_X11")
        x.protocol.childDataReceived(3, f"{display}\n".encode())
        return backend, started

    def close(self) -> None:
        self.launcher.close()
        for s in self.listening:
            s.close()


@pytest.fixture
def world(tmp: Path) -> Iterator[World]:
    made = World(tmp)
    yield made
    made.close()


def result_of(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


# -- the X11 module ---------------------------------------------------------------------

def test_x11_defaults(world: World) -> None:
    world.set(current__connection__initialxres=1600, current__connection__initialyres=900,
              session__maxxres=1920, session__maxyres=1200)
    backend, started = world.start_x11()
    assert result_of(started) is backend
    x, wm = world.spawns.started
    xauthority = f"{world.home}/.Xauthority.ogon"
    assert x.args == ["ogon-backend-x", "-displayfd", "3:10", "-geometry", "1600x900",
                      "-depth", "24", "-dpi", "96", "-auth", xauthority]
    assert x.executable == f"{world.bin}/ogon-backend-x", "on the session manager's PATH"
    assert x.child_fds[3] == "r" and x.path == str(world.home)
    assert x.env["XAUTHORITY"] == xauthority and "DISPLAY" not in x.env
    assert wm.args == ["ogonXsession"] and wm.executable == f"{world.bin}/ogonXsession"
    assert wm.env["DISPLAY"] == ":12" and wm.env["XAUTHORITY"] == xauthority
    assert wm.path == str(world.home)
    assert backend.record.station == "X11:12" and backend.record.endpoint == "ogon_12_X11"
    assert backend.record.processes[0].role == "window-manager"
    assert Path(xauthority).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("values", "expected"), [
    ({"module.xsession.displayOffset": 100}, ["-displayfd", "3:100"]),
    ({"module.xsession.displayOffset": -1}, ["-displayfd", "3:4294967295"]),  # ogon's %u
    ({"module.xsession.dpi": 120}, ["-dpi", "120"]),
    ({"module.xsession.fontPath": "/usr/share/fonts/X11/misc,built-ins"},
     ["-fp", "/usr/share/fonts/X11/misc,built-ins"]),
    ({"module.xsession.noKPCursor": True}, ["-nkc"]),
    ({"current.connection.initialxres": 3000, "current.connection.initialyres": 2000,
      "session.maxxres": 2560, "session.maxyres": 1440}, ["-geometry", "2560x1440"]),
    ({"current.connection.initialxres": 800, "session.maxxres": 1920, "session.maxyres": 1200},
     ["-geometry", "1024x768"]),  # no height from the client: session.xres/yres's defaults
    ({"session.xres": 1280, "session.yres": 1024}, ["-geometry", "1280x1024"]),
])
def test_x11_server_arguments(world: World, values: dict[str, Any], expected: list[str]
                              ) -> None:
    world.values.update({k.lower(): v for k, v in values.items()})
    _, started = world.start_x11()
    result_of(started)
    args = world.spawns.started[0].args
    start = args.index(expected[0])
    assert args[start:start + len(expected)] == expected


def test_a_font_path_with_blanks_is_split_as_ogon_splits_it(world: World) -> None:
    world.set(module__xsession__fontPath="/a b")
    _, started = world.start_x11()
    result_of(started)
    args = world.spawns.started[0].args
    assert args[args.index("-fp"):args.index("-fp") + 3] == ["-fp", "/a", "b"]


def test_xauthoritypath(world: World) -> None:
    shared = world.base / "xauth"
    shared.mkdir()
    world.set(module__xsession__xauthoritypath=str(shared))
    _, started = world.start_x11()
    result_of(started)
    x, wm = world.spawns.started
    path = f"{shared}/.Xauthority.ogon.7"
    assert x.args[-2:] == ["-auth", path] and wm.env["XAUTHORITY"] == path
    assert x.path is None and wm.path is None, "ogon gives no working directory then"
    assert Path(path).exists()


def test_startwm_stopwm_startvc(world: World) -> None:
    world.set(module__xsession__startwm=f'"{world.bin}/startwm" --session "a b"',
              module__xsession__stopwm=f"{world.bin}/stopwm now",
              module__xsession__startvc=f"{world.bin}/startvc")
    backend, started = world.start_x11()
    result_of(started)
    x, wm = world.spawns.started
    assert wm.args == [f"{world.bin}/startwm", "--session", "a b"]
    backend.connected()
    [vc] = world.spawns.started[2:]
    assert vc.args == [f"{world.bin}/startvc"] and vc.env["DISPLAY"] == ":12"
    assert vc.path == str(world.home)
    assert [p.role for p in backend.record.processes] == ["window-manager", "startvc"]
    stopped = backend.stop()
    [stopwm] = world.spawns.started[3:]
    assert stopwm.args == [f"{world.bin}/stopwm", "now"] and stopwm.path == str(world.home)
    assert not stopped.called, "stopwm runs first"
    stopwm.end()
    wm.end()
    x.end()
    vc.end()
    assert result_of(stopped) == "stopped"


def test_stopwm_is_stopped_after_five_seconds(world: World) -> None:
    world.set(module__xsession__stopwm=f"{world.bin}/stopwm")
    backend, started = world.start_x11()
    result_of(started)
    x, wm = world.spawns.started
    stopped = backend.stop()
    stopwm = world.spawns.started[2]
    world.clock.advance(4.9)
    assert stopwm.protocol.backend.running
    world.clock.advance(0.2)  # then SIGTERM (harmless here), SIGKILL 0.5 s later
    stopwm.end()
    wm.end()
    x.end()
    assert result_of(stopped) == "stopped"


def test_no_startvc_no_process(world: World) -> None:
    backend, started = world.start_x11()
    result_of(started)
    backend.connected()
    assert len(world.spawns.started) == 2


def test_a_window_manager_that_exits_ends_the_module(world: World) -> None:
    backend, started = world.start_x11()
    result_of(started)
    x, wm = world.spawns.started
    exited = backend.when_exited()
    wm.end()
    assert not exited.called, "the X server is stopped first"
    x.end()
    assert "window manager" in result_of(exited)


def test_a_display_that_never_comes(world: World) -> None:
    env = {"HOME": str(world.home), "PATH": "/usr/bin"}
    backend = X11Backend(world.launcher, 7, "xsession", world.account, env, None,
                         f"{world.bin}:/usr/bin")
    started = Deferred.fromCoroutine(backend.start(world.properties()))
    world.clock.advance(5.1)
    world.spawns.started[0].end()
    with pytest.raises(BackendError, match="could not get the display number"):
        result_of(started)


# -- Qt and Weston -------------------------------------------------------------------------

def context(session_id: int = 7, username: str = "") -> LaunchContext:
    return LaunchContext(session_id, username, "", 1600, 900, 32, 1920, 1200, "c", "192.0.2.1",
                         "b" * 50, "o" * 50)


def test_qt_and_weston_cmd(world: World) -> None:
    modules = OgonModules(reactor, world.launcher, OgonSettings(world.base / "k.sock"))
    world.set(module__greeter__cmd="/usr/bin/ogon-qt-greeter --noeffects")
    qt = modules.local_module(KindChoice("greeter", "Qt", False), context(),
                              ModuleProperties(world.lookup, 7, "greeter"), None)
    assert qt.command == ("/usr/bin/ogon-qt-greeter", "--noeffects", "-platform", "ogon")
    assert qt.endpoint == "ogon_7_Qt" and qt.kind == "Qt" and qt.cwd == ""
    values = placeholders(qt, context(), world.pipes)
    assert {k: v.format(**values) for k, v in qt.environment.items()} == {
        "OGON_PIPE_PATH": f"{world.pipes}/ogon_7_Qt"}, "the endpoint's own path"
    assert (qt.ready_timeout, qt.stop_timeout) == (5.0, 2.1)
    world.set(module__weston__cmd="/usr/bin/ogon-backend-weston",
              current__connection__initialxres=1600, current__connection__initialyres=900,
              session__maxxres=1920, session__maxyres=1200)
    weston = modules.local_module(KindChoice("weston", "Weston", False), context(7, "alice"),
                                  ModuleProperties(world.lookup, 7, "weston"), world.account)
    assert weston.command == ("/usr/bin/ogon-backend-weston", "--backend=ogon-backend.so",
                              "--session-id=7", "--width=1600", "--height=900")
    assert weston.endpoint == "ogon_7_Weston" and weston.cwd == str(world.home)
    assert dict(weston.environment) == {}
    with pytest.raises(BackendError, match=r"module.nothing.cmd"):
        modules.local_module(KindChoice("nothing", "Qt", False), context(),
                             ModuleProperties(world.lookup, 7, "nothing"), None)
    world.set(module__long__cmd="x" * 256)
    with pytest.raises(BackendError, match="cmd"):
        modules.local_module(KindChoice("long", "Qt", False), context(),
                             ModuleProperties(world.lookup, 7, "long"), None)


# -- which kind, and how it is started --------------------------------------------------------

def test_modulename_uselauncher_launcherexecutable_launcherdebugfile() -> None:
    user: dict[str, Any] = {"module.xsession.modulename": "X11",
                            "module.xsession.uselauncher": False}
    global_: dict[str, Any] = {"module.xsession.modulename": "Weston",
                               "module.xsession.uselauncher": True,
                               "module.xsession.launcherexecutable": True}

    def lookup(session_id: int, path: str) -> Any:
        return user.get(path, global_.get(path))

    choice = choose_kind(lookup, global_.get, 9, "xsession")
    assert choice.kind == "X11", "modulename: the user's own value"
    assert choice.use_launcher, "uselauncher: global only, as ogon looks it up"
    assert choice.launcher_command == "ogon-backend-launcher 9", \
        "ogon's default launcherexecutable is a bool: the bare name"
    global_["module.xsession.launcherexecutable"] = "/usr/sbin/ogon-backend-launcher"
    global_["module.xsession.launcherdebugfile"] = "/var/log/my launcher.log"
    choice = choose_kind(lookup, global_.get, 9, "xsession")
    assert choice.launcher_command == \
        "/usr/sbin/ogon-backend-launcher 9 '/var/log/my launcher.log'"
    assert command_line_to_argv(choice.launcher_command) == [
        "/usr/sbin/ogon-backend-launcher", "9", "'/var/log/my", "launcher.log'"], \
        "WinPR keeps the quotes (the launcher strips them) and splits at the blank"
    global_["module.xsession.uselauncher"] = False
    assert not choose_kind(lookup, global_.get, 9, "xsession").use_launcher
    del global_["module.xsession.uselauncher"]
    assert choose_kind(lookup, global_.get, 9, "xsession").use_launcher, "missing: true"
    user["module.xsession.modulename"] = "Xorg"
    with pytest.raises(BackendError, match="no module found for name 'Xorg'"):
        choose_kind(lookup, global_.get, 9, "xsession")
    with pytest.raises(BackendError, match=r"module.other.modulename not found"):
        choose_kind(lookup, global_.get, 9, "other")


def test_the_module_library_next_to_the_launcher(world: World, monkeypatch: Any) -> None:
    monkeypatch.delenv("OGON_ADDITIONAL_MODULES", raising=False)
    prefix = world.base / "prefix"
    (prefix / "sbin").mkdir(parents=True)
    (prefix / "lib" / "ogon1" / "modules").mkdir(parents=True)
    (prefix / "lib" / "ogon1" / "modules" / "libogon-mod-x11.so").write_bytes(b"")
    launcher = str(prefix / "sbin" / "ogon-backend-launcher")
    modules = OgonModules(reactor, world.launcher, OgonSettings(world.base / "k.sock"))
    assert modules.module_file("X11", launcher) == \
        f"{prefix}/lib/ogon1/modules/libogon-mod-x11.so"
    with pytest.raises(BackendError, match=r"libogon-mod-qt\.so is not in any of"):
        modules.module_file("Qt", launcher)
    extra = world.base / "extra"
    extra.mkdir()
    (extra / "libogon-mod-qt.so").write_bytes(b"")
    monkeypatch.setenv("OGON_ADDITIONAL_MODULES", f"/nowhere:{extra}")
    assert modules.module_file("Qt", launcher) == f"{extra}/libogon-mod-qt.so"
    configured = OgonModules(reactor, world.launcher,
                             OgonSettings(world.base / "k.sock", module_dir="/opt/ogon/mods"))
    assert configured.module_file("Weston", launcher) == "/opt/ogon/mods/libogon-mod-weston.so"
    assert packaged_module_dir().startswith("/usr/lib/") and packaged_module_dir().endswith(
        "/ogon1/modules")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a socket owned by another user")
def test_a_reported_display_whose_pipe_is_another_users_is_a_failed_start(
        world: World) -> None:
    """The second review's spoof: the user's own X server reports another
    session's display; that session's pipe is never removed, the start
    fails (it is not a take-back)."""
    victim = world.pipes / "ogon_12_X11"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(victim))
    s.listen(1)
    world.listening.append(s)
    os.chown(victim, 65534, 65534)
    env = {"HOME": str(world.home), "PATH": "/usr/bin"}
    backend = X11Backend(world.launcher, 7, "xsession", world.account, env, None,
                         f"{world.bin}:/usr/bin")
    started = Deferred.fromCoroutine(backend.start(world.properties()))
    x = world.spawns.started[0]
    x.protocol.childDataReceived(3, b"12\n")  # another session's display
    x.end()  # stopped, as a start that failed is
    with pytest.raises(BackendError, match="not its own"):
        result_of(started)
    assert victim.lstat().st_uid == 65534, "the other session's pipe is left alone"

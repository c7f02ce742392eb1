"""The systemd units in contrib/systemd pass ``systemd-analyze verify`` (with
their ExecStart pointed at this venv's twistd, which verify wants to find),
say why KillMode=process, and the tmpfiles line makes /tmp/.pipe as winpr
does. (The units' protocol, NOTIFY_SOCKET and socket activation, runs in
tests/e2e/test_operating.py.)"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
SHIPPED_TWISTD = "/opt/icp-bridge/bin/twistd"
#: backend_log_dir's default on a tmpfs of its own (its name is its path, escaped).
LOG_MOUNT = "run-icp\\x2dbridge-backends.mount"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package systemd; .ci/run installs it)")
    return path


def unit_text(name: str) -> str:
    return (UNITS / name).read_text()


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    twistd = Path(sys.executable).with_name("twistd")
    assert twistd.exists(), twistd
    service = unit_text("icp-bridge.service")
    assert f"ExecStart={SHIPPED_TWISTD} " in service
    (tmp_path / "icp-bridge.service").write_text(
        service.replace(SHIPPED_TWISTD, str(twistd)))
    shutil.copy(UNITS / "icp-bridge.socket", tmp_path / "icp-bridge.socket")
    shutil.copy(UNITS / LOG_MOUNT, tmp_path / LOG_MOUNT)
    result = subprocess.run(
        [tool("systemd-analyze"), "verify", "icp-bridge.socket", "icp-bridge.service",
         LOG_MOUNT], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    # Unknown keys and bad values are only warnings for verify: none may appear.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key or a missing
    ExecStart binary is reported."""
    service = unit_text("icp-bridge.service").replace("KillMode=", "KilMode=")
    (tmp_path / "icp-bridge.service").write_text(service)
    shutil.copy(UNITS / "icp-bridge.socket", tmp_path / "icp-bridge.socket")
    result = subprocess.run([tool("systemd-analyze"), "verify", "icp-bridge.service"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "KilMode" in result.stderr
    assert "is not executable" in result.stderr or SHIPPED_TWISTD in result.stderr


def test_the_service_is_notify_keeps_desktops_and_reloads() -> None:
    lines = unit_text("icp-bridge.service").splitlines()
    settings = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in lines
                if "=" in line and not line.startswith("#")}
    assert settings["Type"] == "notify"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["KillMode"] == "process"
    assert "WatchdogSec" in settings and settings["Requires"] == "icp-bridge.socket"
    # The reason is written right above it.
    at = lines.index("KillMode=process")
    reason = " ".join(lines[at - 6:at])
    assert "Desktops must survive a restart" in reason and "control-group" in reason
    socket = unit_text("icp-bridge.socket")
    assert "ListenStream=/tmp/.pipe/ogon_SessionManager" in socket
    assert "SocketMode=0600" in socket and "FileDescriptorName=icp" in socket


def test_tmpfiles_makes_the_pipe_directory_as_winpr_does(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = subprocess.run([tool("systemd-tmpfiles"), "--create", f"--root={root}",
                             str(UNITS / "icp-bridge.tmpfiles")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    made = (root / "tmp" / ".pipe").stat()
    assert stat.S_ISDIR(made.st_mode) and stat.S_IMODE(made.st_mode) == 0o1777
    assert made.st_uid == 0 or made.st_uid == Path(root).stat().st_uid


def test_backend_logs_get_a_size_limited_tmpfs_of_their_own(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:
    """The mount unit is at backend_log_dir's default as root, the service
    pulls it in, and its name must match its Where= (verify refuses a
    mismatch: the name is not just a label)."""
    from bridge import config as config_module
    from bridge.config import Config, backend_log_directory

    monkeypatch.setattr(config_module, "_running_as_root", lambda: True)
    where = str(backend_log_directory(Config()))
    mount = unit_text(LOG_MOUNT)
    settings = dict(line.split("=", 1) for line in mount.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Where"] == where == "/run/icp-bridge/backends"
    assert settings["Type"] == "tmpfs"
    options = settings["Options"].split(",")
    assert "mode=0700" in options and "uid=0" in options, "as backend_log_dir must be"
    assert any(option.startswith("size=") for option in options), "size-limited"
    assert f"RequiresMountsFor={where}" in unit_text("icp-bridge.service").splitlines()
    renamed = tmp_path / "icp-bridge-backends.mount"
    renamed.write_text(mount)
    result = subprocess.run([tool("systemd-analyze"), "verify", renamed.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert "doesn't match unit name" in result.stderr

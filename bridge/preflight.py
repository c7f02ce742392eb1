"""Preflight: what a configuration means on this machine, checked before
the bridge starts (and before a reload is applied, and by ``icp-bridge
config check``), each finding one line naming the key.

Three kinds of finding, decided per check (README, "Operating it"):

- **errors** stop startup and refuse a reload: mistakes inside the
  configuration that can never work and that the operator fixes in the
  file -- a ``module``/``auth.greeter`` property of the TOML file naming a
  module that is not defined, a ``pipe_dir`` the session users cannot
  create their sockets in (every desktop would fail to start), an
  ``authenticator`` this machine cannot run (PAM without python-pam or
  libpam); a configuration file, the users file or a module program run as
  root that someone besides root and the bridge's user can change
  (bridge.security.file_trust).
- **alerts** are logged as errors but the bridge runs: an expired
  certificate (the RDP server reads the same pair; refusing to start would
  lock every client out instead of warning them).
- **warnings**: the machine may still change under a running bridge (a
  package installed, an account created), and the launcher checks again at
  every start with a clear line -- a module command that is missing or not
  executable, a module account that does not exist, no desktop module at
  all, a certificate that expires within 30 days, a plaintext or
  off-loopback listener. A module that ogon's config.ini names but the
  bridge does not define is one too: config.ini names ogon's own module
  configurations (``module_xsession_*``), which an ogon host has and the
  bridge does not run, as the default ``module`` names ``xsession``.

The properties checked are those the bridge serves (``load_properties``:
config.ini under the TOML file's); a finding about a value config.ini set
names its file and line.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pwd
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bridge.backends.environment import STANDARD_PATH
from bridge.backends.modules import Module
from bridge.backends.ogon.properties import KINDS
from bridge.config import Config, Problem, backend_log_directory, default_modules
from bridge.config_sources import load_properties
from bridge.endpoints import split_endpoint
from bridge.security.file_trust import untrusted
from bridge.security.pam_auth import pam_unavailable
from bridge.security.tls import (
    certificate_not_after,
    default_pair,
    endpoint_certificate,
    uses_default_pair,
)
from bridge.sessions.ogon_config import MergedProperties
from bridge.sessions.properties import PropertyTable
from bridge.state.trust import state_dir_problem

#: A certificate expiring sooner than this is warned about.
CERTIFICATE_WARNING = datetime.timedelta(days=30)
_PLACEHOLDERS = {"session_id": "1", "user": "user", "endpoint": "endpoint", "width": "1024",
                 "height": "768", "bpp": "32", "pipe_dir": "/tmp/.pipe"}  # noqa: S108


@dataclass
class Findings:
    """What preflight found, by kind (see the module's docstring)."""

    errors: list[Problem] = field(default_factory=list)
    alerts: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from self.errors
        yield from self.alerts
        yield from self.warnings


class _Checker:
    """One run of the checks over one configuration."""

    def __init__(self, config: Config, origins: dict[str, str], as_root: bool,
                 now: datetime.datetime, properties: MergedProperties) -> None:
        self.config = config
        self.origins = origins
        self.as_root = as_root
        self.now = now
        self.findings = Findings()
        self.merged = properties
        self.properties = properties.table()

    def named_by(self, prop: str, user: str = "") -> str:
        """Where the served ``prop`` (global, or ``user``'s own) is set: its
        TOML key (``properties.module``), config.ini's ``FILE:LINE``, or ""
        (ogon's default)."""
        toml = self.config.user_properties.get(user, {}) if user else self.config.properties
        if prop in toml:
            return f"user_properties.{user}.{prop}" if user else f"properties.{prop}"
        ini = self.merged.ini
        line = ini.lines.get((user, prop)) if ini is not None else None
        return f"{ini.source}:{line}" if ini is not None and line else ""

    def _problem(self, key: str, text: str, warning: bool = False) -> Problem:
        if _is_file_line(key):  # set in config.ini: its file and line
            return Problem(key, text, warning=warning)
        parts = key.split(".")
        if parts[0] == "modules" and len(parts) > 1 and \
                default_modules().get(parts[1]) == self.config.modules.get(parts[1]):
            return Problem("", text, warning=warning)  # the built-in module, no file's
        return Problem(self.origins.get(parts[0], ""), text, warning=warning)

    def error(self, key: str, text: str) -> None:
        self.findings.errors.append(self._problem(key, text))

    def alert(self, key: str, text: str) -> None:
        self.findings.alerts.append(self._problem(key, text))

    def warn(self, key: str, text: str) -> None:
        self.findings.warnings.append(self._problem(key, text, warning=True))

    # -- modules ------------------------------------------------------------------------

    def used_modules(self) -> dict[str, list[tuple[str, str, str]]]:
        """Module name -> (property, where it is set: see named_by, the user
        whose own value it is or "") for each property naming it."""
        used: dict[str, list[tuple[str, str, str]]] = {}
        for prop, default in (("module", "xsession"), ("auth.greeter", "greeter")):
            used.setdefault(self.properties.string_or(prop, "", default), []).append(
                (prop, self.named_by(prop), ""))
            for user, table in self.merged.per_user.items():
                value = table.get(prop)
                if isinstance(value, str):
                    used.setdefault(value, []).append((prop, self.named_by(prop, user), user))
        return used

    def ogon_kind(self, name: str, prop: str, user: str) -> bool:
        """Whether module.NAME.modulename selects one of ogon's kinds for
        those ``prop`` names it for (a greeter has no user yet: global)."""
        kind = self.properties.get(f"module.{name}.modulename",
                                   user if prop == "module" else "")
        return kind in KINDS

    def modules(self) -> list[Module]:
        """Check that every module named is defined (a [modules.NAME] command
        module, else ogon's kind by module.NAME.modulename); the command
        modules to check."""
        checked = []
        served = {**self.merged.defaults, **self.merged.global_values}
        kinds = [path.split(".")[1] for path, value in served.items()
                 if path.startswith("module.") and path.endswith(".modulename")
                 and path.count(".") == 2 and value in KINDS]
        for name, named_by in self.used_modules().items():
            module = self.config.modules.get(name)
            if module is not None:
                checked.append(module)
                continue
            unresolved = [(prop, where) for prop, where, user in named_by
                          if not self.ogon_kind(name, prop, user)]
            if not unresolved:
                continue
            explicit = [where for _, where in unresolved if where and not _is_file_line(where)]
            in_ini = [(prop, where) for prop, where in unresolved if _is_file_line(where)]
            names = ", ".join(sorted({*self.config.modules, *kinds}))
            for where in explicit:
                self.error(where, f"{where}: names module {name!r}, which is not defined "
                                  f"(add [modules.{name}] or module.{name}.modulename, or "
                                  f"name one of: {names})")
            for prop, where in in_ini if not explicit else ():
                self.warn(where, f"{prop}: names module {name!r}, which is not defined (no "
                                 f"[modules.{name}], no module_{name}_modulename_string naming "
                                 f"X11, Qt or Weston): those logons get the greeter until "
                                 f"one is configured")
            if not explicit and not in_ini:
                self.warn("modules", f"modules.{name}: not defined, and the module property "
                                     f"names it by default: a logon with a password gets "
                                     f"the greeter until [modules.{name}] or "
                                     f"module.{name}.modulename (a desktop) is configured")
        # Modules the configuration defines are meant to be used: check them too.
        built_in = default_modules()
        checked += [m for name, m in self.config.modules.items()
                    if m not in checked and built_in.get(name) != m]
        return checked

    def search_path(self, module: Module) -> str:
        """PATH as the launcher gives it to the module's process."""
        path = STANDARD_PATH
        passed = self.properties.split_list("environment.filter")
        if ("*" in passed or "PATH" in passed) and "PATH" in os.environ:
            path = os.environ["PATH"]
        for item in self.properties.split_list("environment.add"):
            name, _, value = item.partition(":")
            if name.strip() == "PATH":
                path = value
        if "PATH" in module.environment:
            path = module.environment["PATH"].format(**_PLACEHOLDERS)
        return path

    def consequence(self, module: Module) -> str:
        """What the operator's users see when ``module`` cannot start."""
        if module.name == self.properties.string_or("auth.greeter", "", "greeter"):
            return " (clients without a password get FAILED instead of a greeter)"
        if module.name == self.properties.string_or("module", "", "xsession"):
            return " (logons get the greeter instead of their desktop)"
        return ""

    def runs_as_others(self, module: Module) -> bool:
        """Whether the module's processes run as another user than the
        bridge's (whose sockets and files it cannot rely on). A greeter has
        no session user yet: with ``user = "session"`` it runs as the
        bridge's user, as in ogon."""
        if not self.as_root:
            return False
        if module.user == "session":
            return self.used_as_desktop(module.name)
        return module.user not in ("root", _own_name())

    def used_as_desktop(self, name: str) -> bool:
        """Whether a ``module`` property (or the default) names ``name``."""
        if self.properties.string_or("module", "", "xsession") == name:
            return True
        return any(table.get("module") == name for table in self.merged.per_user.values())

    def command(self, module: Module) -> None:
        key = f"modules.{module.name}.command"
        program = module.command[0]
        if "{" in program:
            return  # chosen per session: nothing to check before
        if "/" not in program:
            search = self.search_path(module)
            found = shutil.which(program, path=search)
            if found is None:
                self.warn(key, f"{key}: {program!r} not found in PATH ({search}); "
                               f"{module.name} backends cannot start{self.consequence(module)}")
                return
            program = found
        path = Path(program)
        try:
            info = path.stat()
        except OSError as e:
            self.warn(key, f"{key}: {program}: {e.strerror}; {module.name} backends "
                           f"cannot start{self.consequence(module)}")
            return
        if not stat.S_ISREG(info.st_mode) or not os.access(path, os.X_OK):
            self.warn(key, f"{key}: {program} is not an executable file; "
                           f"{module.name} backends cannot start{self.consequence(module)}")
        elif self.runs_as_others(module) and not info.st_mode & stat.S_IXOTH:
            self.warn(key, f"{key}: {program} (mode {stat.S_IMODE(info.st_mode):04o}) "
                           f"may not be executable by the users {module.name} runs as")

    def account(self, module: Module) -> None:
        if module.user == "session" or not self.as_root:
            return  # not root: backends run as the bridge's own user
        try:
            pwd.getpwnam(module.user)
        except KeyError:
            self.warn(f"modules.{module.name}", f"modules.{module.name}.user: no account "
                      f"{module.user!r}; {module.name} backends cannot start"
                      f"{self.consequence(module)}")

    def trusted_files(self, files: Iterable[str], modules: list[Module]) -> None:
        """What the bridge runs root's commands from, or takes its users
        from, must be changeable by root and its own user alone."""
        ini = str(self.config.ogon_config) if self.config.ogon_config else ""
        checked = [(name, "ogon's config.ini" if name == ini else "configuration file")
                   for name in dict.fromkeys([*files, *([ini] if ini else [])])]
        if self.config.authenticator == "users-file":
            checked.append((str(self.config.users_file), "users file"))
        for name, what in checked:
            line = untrusted(Path(name), what)
            if line:
                self.findings.errors.append(Problem("", line))
        for key, program in self.root_programs(modules):
            line = untrusted(Path(program), "module program")
            if line:
                self.error(key, f"{key}: {line}")

    def root_programs(self, modules: list[Module]) -> list[tuple[str, str]]:
        """(key, program) of what runs as root: command modules running as
        the bridge's user (root), ogon's launcher and the greeter's cmd."""
        if not self.as_root:
            return []
        found = []
        for module in modules:
            as_bridge = module.user in ("root", _own_name()) or (
                module.user == "session" and not self.used_as_desktop(module.name))
            if as_bridge and "{" not in module.command[0]:
                found.append((f"modules.{module.name}.command", module.command[0],
                              self.search_path(module)))
        greeter = self.properties.string_or("auth.greeter", "", "greeter")
        for table in [{**self.merged.defaults, **self.merged.global_values},
                      *self.merged.per_user.values()]:
            for prop, value in table.items():
                parts = prop.split(".")
                if len(parts) == 3 and parts[0] == "module" and isinstance(value, str) and (
                        parts[2] == "launcherexecutable" or (parts[1] == greeter
                                                            and parts[2] == "cmd")):
                    words = value.replace("'", " ").replace('"', " ").split()
                    if words:
                        found.append((prop, words[0], os.environ.get("PATH", STANDARD_PATH)))
        programs = {}
        for key, program, search in found:
            path = program if "/" in program else shutil.which(program, path=search)
            if path:
                programs.setdefault(path, key)
        return [(key, path) for path, key in programs.items()]

    def pipe_dir(self, modules: list[Module]) -> None:
        """The backends create their endpoint sockets in pipe_dir: every
        account they run as must be able to."""
        others = [m for m in modules if self.runs_as_others(m)]
        directory = self.config.pipe_dir
        if not others or not directory.exists():
            return  # created 1777 at startup when missing (as winpr does)
        fixed = {m.user for m in others if m.user != "session"}
        any_user = any(m.user == "session" for m in others)
        who = "the session's users" if any_user else ", ".join(sorted(fixed))
        names = ", ".join(sorted(m.name for m in others))
        for part in [directory, *directory.parents]:
            try:
                info = part.stat()
            except OSError:
                return
            # As "others" bits: write and search the directory itself, search
            # every directory above it.
            need = stat.S_IWOTH | stat.S_IXOTH if part == directory else stat.S_IXOTH
            if (not any_user or info.st_mode & need == need) and \
                    all(_may(info, user, need) for user in fixed):
                continue
            if part == directory:
                what, fix = "create sockets in", f"chmod 1777 {part}, as winpr makes it"
            else:
                what, fix = "reach", f"chmod o+x {part}, or choose another pipe_dir"
            self.error("pipe_dir", f"pipe_dir: {who} cannot {what} {part} (owner uid "
                                   f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}), "
                                   f"so {names} backends cannot start ({fix})")
            return

    def authenticator(self) -> None:
        """PAM needs python-pam and libpam: said before a start, not by the
        start after it made files (a TLS pair, the state directory)."""
        if self.config.authenticator == "pam":
            problem = pam_unavailable()
            if problem is not None:
                self.error("authenticator", problem)

    # -- directories ------------------------------------------------------------------------

    def state_dir(self) -> None:
        """The state database is root's word on what to signal and remove:
        a state_dir others could write to stops startup (StateStore checks
        the same at its open)."""
        problem = state_dir_problem(self.config.state_dir)
        if problem is not None:
            self.error("state_dir", f"state_dir: {problem}")

    def backend_log_filesystem(self) -> None:
        """Backends write their output through a root-opened descriptor: on
        a shared filesystem a desktop can fallocate() all of its free space
        in one call, before the bridge cuts the file back (README, "Backend
        output")."""
        if not self.as_root:
            return  # backends run as the bridge's own user, on its own quota
        directory = backend_log_directory(self.config)
        shared = [str(other) for other in (Path("/"), Path("/run"), self.config.state_dir)
                  if _same_filesystem(directory, other)]
        if not shared:
            return
        self.warn("backend_log_dir", f"backend_log_dir: {directory} is on the filesystem of "
                                     f"{' and '.join(shared)}: a desktop can reserve all its "
                                     f"free space at once (fallocate() on its output) before "
                                     f"the bridge cuts its file back, and whatever else writes "
                                     f"there fails meanwhile; mount a size-limited tmpfs on "
                                     f"it (contrib/systemd/run-icp\\x2dbridge-backends.mount)")

    # -- TLS and listeners ------------------------------------------------------------------

    def certificate(self) -> None:
        path, key = certificate_path(self.config, self.properties, self.as_root)
        label = key
        if key == "properties.ssl.certificate" and _is_file_line(self.named_by("ssl.certificate")):
            key, label = self.named_by("ssl.certificate"), "ssl.certificate"
        if path is None or not path.exists():
            return  # generated at startup
        not_after = certificate_not_after(path)
        if not_after is None:
            self.warn(key, f"{label}: {path} holds no PEM certificate")
            return
        left = not_after - self.now
        when = not_after.strftime("%Y-%m-%d %H:%M UTC")
        if left <= datetime.timedelta(0):
            self.alert(key, f"{label}: the certificate {path} EXPIRED on {when}: TLS clients "
                            f"refuse the OTS API (and RDP clients warn); renew it and restart")
        elif left < CERTIFICATE_WARNING:
            self.warn(key, f"{label}: the certificate {path} expires on {when} ({left.days} "
                           f"days); renew it before then (a restart serves the new one)")

    def listeners(self) -> None:
        config = self.config
        for key, description, what in (
                ("thrift_endpoint", config.thrift_endpoint, "logonConnection passwords "
                 "and tokens"),
                ("admin_endpoint", config.admin_endpoint, "tokens (Authorization headers)")):
            if not description:
                continue
            kind = split_endpoint(description)[0]
            exposed = _exposed_interface(description)
            if kind in ("tcp", "tcp6", "unix") and (key == "thrift_endpoint" or exposed):
                extra = (" and ogon's WTSAPI clients, which dial TLS, cannot connect"
                         if key == "thrift_endpoint" else "")
                self.warn(key, f"{key}: {description!r} is not TLS: {what} cross it "
                               f"unencrypted{extra}")
            if exposed:
                self.warn(key, f"{key}: listens on {exposed}, reachable from the "
                               f"network (add :interface=127.0.0.1 to keep it local)")


def _is_file_line(where: str) -> bool:
    """Whether ``where`` (see _Checker.named_by) is a config.ini line."""
    return where.rpartition(":")[2].isdigit()


def _existing(path: Path) -> Path:
    """``path``, or the nearest directory above it that exists (where it
    would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _same_filesystem(path: Path, other: Path) -> bool:
    """Whether ``path`` (or where it would be created) is on the
    filesystem of ``other`` (its device number: a mount of its own has
    another)."""
    try:
        return _existing(path).stat().st_dev == _existing(other).stat().st_dev
    except OSError:
        return False


def _own_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return ""


def _may(info: os.stat_result, user: str, need: int) -> bool:
    """Whether ``user`` has the permission bits ``need`` (given as the
    "others" bits) on a file with ``info``."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return True  # said elsewhere: the account is missing
    if entry.pw_uid == 0:
        return True
    mode = info.st_mode
    if entry.pw_uid == info.st_uid:
        return mode & (need << 6) == need << 6
    if info.st_gid in os.getgrouplist(user, entry.pw_gid):
        return mode & (need << 3) == need << 3
    return mode & need == need


def _exposed_interface(description: str) -> str:
    """For a TCP or TLS endpoint string: "" when it listens on loopback
    only, else what it listens on ("every interface" or the address)."""
    from twisted.internet.endpoints import _parse

    kind = split_endpoint(description)[0]
    if kind not in ("tcp", "tcp6", "ssl"):
        return ""
    _, options = _parse(description[len(kind) + 1:])
    interface = options.get("interface", "")
    if interface in ("", "0.0.0.0", "::"):  # noqa: S104 - what is looked for
        return "every interface"
    if interface == "localhost":
        return ""
    try:
        return "" if ipaddress.ip_address(interface).is_loopback else interface
    except ValueError:
        return interface


def certificate_path(config: Config, properties: PropertyTable, as_root: bool,
                     ) -> tuple[Path | None, str]:
    """The certificate the OTS API serves, and the key that names it."""
    description = config.thrift_endpoint
    if uses_default_pair(description):
        default = default_pair(as_root, config.state_dir)[0]
        return Path(properties.string_or("ssl.certificate", "", str(default))), \
            "properties.ssl.certificate"
    return endpoint_certificate(description), "thrift_endpoint"


def preflight(config: Config, origins: dict[str, str] | None = None,
              as_root: bool | None = None,
              now: Callable[[], datetime.datetime] | None = None,
              properties: MergedProperties | None = None,
              files: Iterable[str] = ()) -> Findings:
    """Check ``config`` against this machine; ``origins`` names the file
    of each top-level key (for the lines). ``properties``: what
    load_properties(config) says, when the caller has read it (else it is
    read here; raises OgonConfigError). ``files``: the configuration files
    read (LoadedConfig.files), whose owners and modes are checked."""
    checker = _Checker(config, origins or {}, os.geteuid() == 0 if as_root is None else as_root,
                       (now or (lambda: datetime.datetime.now(datetime.UTC)))(),
                       properties if properties is not None else load_properties(config))
    checker.authenticator()
    modules = checker.modules()
    for module in modules:
        checker.command(module)
        checker.account(module)
    checker.pipe_dir(modules)
    checker.trusted_files(files, modules)
    checker.certificate()
    checker.listeners()
    checker.state_dir()
    checker.backend_log_filesystem()
    return checker.findings

"""``twistd icp-bridge``: options, makeService, and what running as a daemon
adds around the bridge (``DaemonService``): the configuration's sources
(ogon's config.ini among them) and its preflight, the log's observer,
systemd's notifications, SIGHUP (reload) and SIGUSR1 (reopen --logfile).

twistd imports this module before the reactor: the reactor, the service
and what they import come after the options are read, so that what the
configuration does not need is not imported at all (``_openssl_hidden``).
"""

from __future__ import annotations

import gc
import importlib
import signal
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from bridge.config import Config, ConfigError, default_config_file
from bridge.daemon.logs import BridgeLogging, is_journal_stream
from bridge.daemon.notify import SystemdNotifier
from bridge.sessions.model import state_name

if TYPE_CHECKING:
    from bridge.config_sources import ConfigSources, LoadedConfig
    from bridge.service import BridgeService

#: Seconds between reminders of a certificate close to its expiry.
CERTIFICATE_REMINDER_INTERVAL = 24 * 3600.0
#: systemd's STATUS follows the sessions at most this often (seconds).
STATUS_INTERVAL = 1.0

# flag name -> config key; every flag overrides the config file.
FLAG_KEYS = {
    "icp": "icp_endpoint",
    "thrift": "thrift_endpoint",
    "state": "state_dir",
    "users": "users_file",
    "token-dir": "token_dir",
    "call-timeout": "call_timeout",
    "admin": "admin_endpoint",
    "dbus": "dbus_address",
    "ogon-config": "ogon_config",
}


def _exit(lines: list[str]) -> SystemExit:
    """Startup refused: the lines alone on stderr, exit status 1 (twistd
    prints a SystemExit's text and no usage); as errors for the journal
    when stderr is the journal's."""
    mark = "<3>" if is_journal_stream(sys.stderr) else ""
    return SystemExit("\n".join(f"{mark}icp-bridge: {line}" for line in lines))


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Session-manager bridge for FreeRDS/ogon RDP servers: listens for the RDP "
        "server on ICP and for WTSAPI clients on the OTS API (Thrift)."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file; flags override it "
         "[default: /etc/icp-bridge/bridge.toml when it exists]"],
        ["icp", None, None, "ICP endpoint for the RDP server "
         "[default: unix:/tmp/.pipe/ogon_SessionManager:mode=600]"],
        ["thrift", None, None, "OTS API endpoint [default: ssl:9091:interface=127.0.0.1, with "
         "the ssl.certificate/ssl.key pair]"],
        ["state", None, None, "state directory (SQLite database)"],
        ["users", None, None, "users file"],
        ["token-dir", None, None, "directory of per-session token files [default: /tmp]"],
        ["call-timeout", None, None, "seconds before a bridged call fails [default: 10]",
         float],
        ["admin", None, None, "admin HTTP endpoint: /metrics, /events, /healthz, status page "
         "('' for none) [default: tcp:9092:interface=127.0.0.1]"],
        ["dbus", None, None, "D-Bus for ogon's session notifications: system, an address "
         "(unix:path=...) or '' for none [default: system]"],
        ["ogon-config", None, None, "ogon's config.ini, read with ogon's rules; the TOML "
         "file's properties override it ('' for none) [default: /etc/ogon/config.ini when "
         "it exists]"],
    ]

    #: Whether postOptions paused the cyclic garbage collector (see there).
    gc_paused = False

    def postOptions(self) -> None:
        if getattr(self, "parent", None) is not None and gc.isenabled():
            # Run by twistd: the start allocates a great many objects and
            # frees few, so the collections its imports would trigger find
            # almost nothing (~5 ms of a start). DaemonService.startService
            # turns the collector back on, after BridgeService has frozen
            # what the start built (a start that fails exits).
            gc.disable()
            self.gc_paused = True
        overrides: dict[str, Any] = {}
        for flag, key in FLAG_KEYS.items():
            value = self[flag]
            if value is not None:
                overrides[key] = str(value) if key.endswith(("_dir", "_file")) else value
        path = Path(self["config"]) if self["config"] else default_config_file()
        # Before the first import of the reactor (and of what imports it).
        with _openssl_hidden(unless=endpoints_need_twisted_tls(path, overrides)):
            for name in ("twisted.internet.tcp", "twisted.internet.endpoints"):
                importlib.import_module(name)
            from bridge.reactor import install_unless_chosen

            install_unless_chosen()
        from bridge.config_sources import ConfigSources

        self.sources = ConfigSources.for_service(path, overrides)
        try:
            # The bridge's own sources. ogon's config.ini they name is read
            # when the service is made (makeService hands it to the
            # BridgeService), so a broken one is said where BridgeService
            # says it.
            self.loaded: LoadedConfig = self.sources.load_settings()
        except ConfigError as e:
            raise _exit([str(problem) for problem in e.problems]) from None
        self.config: Config = self.loaded.config


@contextmanager
def _openssl_hidden(unless: bool) -> Iterator[None]:
    """Import Twisted's TCP transports and endpoints without pyOpenSSL.

    twisted.internet.tcp imports pyOpenSSL only to offer startTLS, and
    falls back to plain transports when it cannot; posixbase and
    endpoints import it for Twisted's ssl: endpoints. When no endpoint of
    the configuration is served by Twisted's TLS (``unless`` False), an
    ``import OpenSSL`` fails while they are imported: pyOpenSSL and
    cryptography's bindings then cost neither their import time (~70 ms)
    nor their memory (~12 MB). Later imports of pyOpenSSL still work (the
    block is lifted); only Twisted's ssl: endpoints and startTLS do not,
    which is why a configuration needing them keeps the full import, as
    does a process that imported the reactor already (the tests)."""
    if unless or "OpenSSL" in sys.modules or "twisted.internet.reactor" in sys.modules:
        yield
        return
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # "import OpenSSL" fails
    try:
        yield
    finally:
        if sys.modules.get("OpenSSL", 0) is None:
            del sys.modules["OpenSSL"]


def endpoints_need_twisted_tls(path: Path | None, overrides: dict[str, Any]) -> bool:
    """Whether an endpoint the configuration will have is served by Twisted's
    own TLS (pyOpenSSL): the OTS API on anything but tcp:/ssl: (those are
    served by protocols.listening), or the ICP or admin endpoint on
    anything but tcp:/unix:/systemd:. Read from the TOML file and the
    flags alone, before the configuration is loaded (loading it imports
    the endpoints); a file that cannot be read says yes (the loading then
    says what is wrong)."""
    from protocols.endpoint_strings import parse_stream_endpoint, split_endpoint

    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError):
            return True
    values.update(overrides)
    if "metrics_endpoint" in values and "admin_endpoint" not in values:
        values["admin_endpoint"] = values["metrics_endpoint"]
    defaults = Config()
    try:
        thrift = str(values.get("thrift_endpoint", defaults.thrift_endpoint))
        others = [str(values.get(key, getattr(defaults, key)))
                  for key in ("icp_endpoint", "admin_endpoint")]
    except (TypeError, ValueError):
        return True
    parts = split_endpoint(thrift)
    if parts[0] == "ssl" and not any(p.startswith(("privateKey=", "certKey=")) for p in parts):
        parts.append("privateKey=ssl.key")  # the service adds the ssl.key/ssl.certificate pair
    if parse_stream_endpoint(parts) is None:
        return True
    return any(description and split_endpoint(description)[0] not in
               ("tcp", "tcp6", "unix", "systemd") for description in others)


class DaemonService(MultiService):
    """The bridge as twistd runs it. Around ``bridge``: the log observer
    twistd begins logging to (set on the application), READY/RELOADING/
    STOPPING and the watchdog for systemd, SIGHUP and SIGUSR1."""

    log = Logger()

    def __init__(self, bridge: BridgeService, sources: ConfigSources,
                 logging: BridgeLogging | None, notifier: SystemdNotifier,
                 resume_gc: bool = False) -> None:
        """``resume_gc``: the options paused the garbage collector for the
        start; startService turns it back on."""
        super().__init__()
        self.resume_gc = resume_gc
        self.bridge = bridge
        self.logging = logging
        self.notifier = notifier
        from bridge.reload import Reloader

        self.reloader = Reloader(bridge, sources,
                                 logging.set_level if logging is not None else None)
        bridge.setServiceParent(self)
        # A bridge runs for months: its certificate may come close to expiry
        # meanwhile (at startup, preflight says so).
        self.reminder = LoopingCall(self.certificate_reminder)
        self.reminder.clock = bridge.reactor
        self.clock: Any = bridge.reactor
        self._status_call: Any = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd begins logging to the application's ILogObserver, when it
        # has one, unless --logger names another.
        if self.logging is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.logging.observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        if self.resume_gc:
            self.resume_gc = False
            gc.enable()
        reactor = self.bridge.reactor
        for signum, handler in ((signal.SIGHUP, self.reload),
                                (signal.SIGUSR1, self.reopen_log)):
            # Signal handlers run between bytecodes: hand the work to the reactor.
            signal.signal(signum, lambda *_, h=handler: reactor.callFromThread(h))
        self.notifier.ready(self.status_text())
        self.follow_sessions()
        self.notifier.start_watchdog(reactor)
        self.reminder.start(CERTIFICATE_REMINDER_INTERVAL, now=False)
        if self.notifier.enabled:
            self.log.info("told systemd the bridge is ready")

    def status_text(self) -> str:
        """What ``systemctl status`` shows: the sessions, by state."""
        by_state = Counter(state_name(session.state) for session in self.bridge.registry)
        states = ", ".join(f"{count} {state}" for state, count in sorted(by_state.items()))
        count = len(self.bridge.registry)
        return f"{count} session{'' if count == 1 else 's'}" + (f" ({states})" if states else "")

    def follow_sessions(self) -> None:
        """Keep systemd's STATUS current as sessions change, at most once
        a second."""
        if self.notifier.enabled:
            self.bridge.registry.observe(self._sessions_changed)

    def _sessions_changed(self, change: object) -> None:
        if self._status_call is None or not self._status_call.active():
            self._status_call = self.clock.callLater(STATUS_INTERVAL, self._tell_status)

    def _tell_status(self) -> None:
        self._status_call = None
        self.notifier.status(self.status_text())

    def certificate_reminder(self) -> None:
        """Once a day: a line while the served certificate expires within
        30 days."""
        from bridge.preflight import CERTIFICATE_WARNING

        operations = self.bridge.operations
        expiry = operations.certificate_not_after
        if expiry is None:
            return
        left = expiry - time.time()
        if left <= 0:
            self.log.error("the OTS API's certificate {path} has EXPIRED: TLS clients refuse "
                           "it; renew it and restart", path=operations.certificate_path)
        elif left < CERTIFICATE_WARNING.total_seconds():
            self.log.warn("the OTS API's certificate {path} expires in {days:.0f} days; renew "
                          "it and restart", path=operations.certificate_path, days=left / 86400)

    def reload(self) -> None:
        self.log.info("SIGHUP: reloading the configuration")
        self.notifier.reloading()
        try:
            applied = self.reloader.reload()
        except Exception:
            # A bug here must not take the service down with it.
            self.log.failure("configuration reload failed; the running one stays")
            applied = False
        self.notifier.ready("configuration reloaded" if applied
                            else "configuration reload refused; the running one stays")

    def reopen_log(self) -> None:
        reopen = self.logging.reopen if self.logging is not None else None
        if reopen is None:
            self.log.info("SIGUSR1: no --logfile to reopen")
            return
        what = reopen()
        self.log.info("SIGUSR1: log file {what}", what=what)

    def stopService(self) -> Deferred[None]:
        if self._status_call is not None and self._status_call.active():
            self._status_call.cancel()
        self.notifier.stopping()
        self.notifier.stop_watchdog()
        if self.reminder.running:
            self.reminder.stop()
        return super().stopService()


def _logging(options: Options, config: Config) -> BridgeLogging | None:
    """The observer for twistd's own options: None when --logger or
    --syslog chose one (or when not run by twistd)."""
    twistd = getattr(options, "parent", None)
    if twistd is None or twistd.get("logger") or twistd.get("syslog"):
        return None
    logfile = twistd.get("logfile") or None
    if not logfile and not twistd.get("nodaemon"):
        logfile = "twistd.log"  # a daemon has no terminal: twistd's own default
    return BridgeLogging(logfile, config.log_level)


def makeService(options: Options) -> DaemonService:
    from bridge.endpoints import StartupError
    from bridge.preflight import preflight
    from bridge.service import BridgeService

    config, loaded = options.config, options.loaded
    try:
        properties = loaded.read_properties()  # ogon's config.ini, if any
    except ConfigError as e:
        raise _exit([str(problem) for problem in e.problems]) from None
    findings = preflight(config, loaded.origins, properties=properties, files=loaded.files)
    if findings.errors:
        raise _exit([str(problem) for problem in findings.errors])
    logging = _logging(options, config)
    log = Logger(namespace="bridge.tap")
    sources = options.sources
    log.info("configuration from {sources}", sources=", ".join(loaded.files) or
             "the defaults (no /etc/icp-bridge/bridge.toml, no /etc/ogon/config.ini)")
    for problem in [*options.loaded.warnings, *findings.warnings]:
        log.warn("{problem}", problem=str(problem))
    for problem in findings.alerts:
        log.error("{problem}", problem=str(problem))
    # Read before the endpoints are parsed: a systemd: endpoint needs LISTEN_FDS.
    notifier = SystemdNotifier(unset=True)
    try:
        # preflight found PAM usable (it stops the start when not).
        bridge = BridgeService(config, exit_on_startup_error=True, properties=properties,
                               pam_checked=True)
    except StartupError as e:
        raise _exit([str(e)]) from None
    return DaemonService(bridge, sources, logging, notifier,
                         resume_gc=getattr(options, "gc_paused", False))

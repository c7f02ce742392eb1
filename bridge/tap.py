"""``twistd icp-bridge``: options and makeService: the configuration's
sources, its preflight against the machine, and startup errors as one line
per problem (no usage text)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from bridge.config import Config, ConfigError, default_config_file
from bridge.config_sources import ConfigSources, LoadedConfig
from bridge.endpoints import StartupError
from bridge.preflight import preflight
from bridge.reactor import install_unless_chosen
from bridge.service import BridgeService

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
    prints a SystemExit's text and no usage)."""
    return SystemExit("\n".join(f"icp-bridge: {line}" for line in lines))


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

    def postOptions(self) -> None:
        overrides: dict[str, Any] = {}
        for flag, key in FLAG_KEYS.items():
            value = self[flag]
            if value is not None:
                overrides[key] = str(value) if key.endswith(("_dir", "_file")) else value
        path = Path(self["config"]) if self["config"] else default_config_file()
        self.sources = ConfigSources.for_service(path, overrides)
        try:
            self.loaded: LoadedConfig = self.sources.load()
        except ConfigError as e:
            raise _exit([str(problem) for problem in e.problems]) from None
        install_unless_chosen()  # before the first import of the reactor
        self.config: Config = self.loaded.config


def makeService(options: Options) -> BridgeService:
    config = options.config
    findings = preflight(config, options.loaded.origins)
    if findings.errors:
        raise _exit([str(problem) for problem in findings.errors])
    log = Logger(namespace="bridge.tap")
    log.info("configuration from {sources}", sources=", ".join(options.sources.files) or
             "the defaults (no /etc/icp-bridge/bridge.toml)")
    for problem in [*options.loaded.warnings, *findings.warnings]:
        log.warn("{problem}", problem=str(problem))
    for problem in findings.alerts:
        log.error("{problem}", problem=str(problem))
    try:
        return BridgeService(config, exit_on_startup_error=True)
    except StartupError as e:
        raise _exit([str(e)]) from None

"""``twistd icp-bridge``: options and makeService."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.python import usage

from bridge.config import Config, ConfigError, load_config
from bridge.endpoints import StartupError
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


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Session-manager bridge for FreeRDS/ogon RDP servers: listens for the RDP "
        "server on ICP and for WTSAPI clients on the OTS API (Thrift)."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file; flags override it."],
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
        try:
            config = load_config(Path(self["config"]) if self["config"] else None, overrides)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        install_unless_chosen()  # before the first import of the reactor
        self.config: Config = config


def makeService(options: Options) -> BridgeService:
    try:
        return BridgeService(options.config, exit_on_startup_error=True)
    except StartupError as e:
        raise SystemExit(f"icp-bridge: {e}") from None

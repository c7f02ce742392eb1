"""Where ``ctl`` finds the bridge: the OTS API's address and the certificate
it serves, and the admin endpoint's URL, read from the bridge's own
configuration as the bridge reads it (the TOML file, ogon's config.ini it
names or /etc/ogon/config.ini, over ogon's defaults), so that on a host
whose config.ini names another pair (Debian's snakeoil one) or another port
``ctl`` dials and verifies what the bridge serves. Only the keys needed are
checked: a mistake elsewhere in the file does not stop an admin tool.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.cli.otsclient import EXIT_USAGE, CtlError

if TYPE_CHECKING:
    from bridge.config import Config
    from bridge.sessions.ogon_config import MergedProperties

#: The keys read from the TOML file (those the addresses depend on).
_KEYS = ("thrift_endpoint", "admin_endpoint", "state_dir", "ogon_config", "properties",
         "user_properties", "ogon_bin_dirs")


@dataclass(frozen=True)
class Listener:
    """A TCP or TLS endpoint of the bridge, as a client dials it."""

    host: str
    port: int
    tls: bool
    #: The certificate it serves (TLS), and where the configuration names it.
    certificate: Path | None = None
    certificate_from: str = ""


@dataclass(frozen=True)
class BridgeAddresses:
    """The bridge's OTS API and admin endpoint (None: "" or not TCP)."""

    otsapi: Listener | None
    admin: Listener | None
    #: The files read, for messages.
    files: tuple[str, ...]
    otsapi_endpoint: str
    admin_endpoint: str

    def admin_url(self) -> str | None:
        if self.admin is None:
            return None
        host = f"[{self.admin.host}]" if ":" in self.admin.host else self.admin.host
        return f"{'https' if self.admin.tls else 'http'}://{host}:{self.admin.port}"


def _dial_host(interface: str) -> str:
    """Where a local client dials a listener on ``interface``."""
    if interface in ("", "0.0.0.0"):  # noqa: S104 - every interface: the loopback is one
        return "127.0.0.1"
    if interface == "::":
        return "::1"
    return interface


def listener(description: str, default_certificate: Path | None = None,
             default_from: str = "") -> Listener | None:
    """How to dial a ``tcp:``/``ssl:`` endpoint string (None for another
    kind). An ``ssl:`` one without ``certKey``/``privateKey`` serves
    ``default_certificate`` (the ssl.certificate property)."""
    from twisted.internet.endpoints import _parse

    from bridge.endpoints import split_endpoint
    from bridge.security.tls import endpoint_certificate

    kind = split_endpoint(description)[0]
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    args, options = _parse(description[len(kind) + 1:])
    if not args or not str(args[0]).isdigit():
        return None
    host, port = _dial_host(options.get("interface", "")), int(args[0])
    if kind != "ssl":
        return Listener(host, port, tls=False)
    named = endpoint_certificate(description)
    if named is not None:
        option = "certKey" if "certKey" in options else "privateKey"
        return Listener(host, port, tls=True, certificate=named,
                        certificate_from=f"{option} of the endpoint")
    return Listener(host, port, tls=True, certificate=default_certificate,
                    certificate_from=default_from)


def bridge_addresses(named_config: str | None) -> BridgeAddresses:
    """Read the bridge's configuration (``--config``, else
    /etc/icp-bridge/bridge.toml when it exists; its ogon_config, else
    /etc/ogon/config.ini when it exists). Raises CtlError (usage) naming
    what cannot be read."""
    from bridge.cli.common import config_values
    from bridge.config import Config, ConfigError, check_values, with_ogon_defaults
    from bridge.config_sources import load_properties
    from bridge.sessions.ogon_config import OgonConfigError

    try:
        path, wanted = config_values(named_config, _KEYS)
    except ConfigError as e:
        raise _unusable(str(e)) from None
    wanted = with_ogon_defaults(wanted)
    parsed, problems = check_values(wanted, str(path or ""))
    if problems:
        raise _unusable(str(problems[0]))
    config = Config()
    for key, value in parsed.items():
        setattr(config, key, value)
    try:
        merged = load_properties(config)
    except OgonConfigError as e:
        raise _unusable(str(e)) from None
    certificate = merged.table().get_string("ssl.certificate")
    files = tuple(str(f) for f in (path, config.ogon_config) if f is not None)
    return BridgeAddresses(
        otsapi=listener(config.thrift_endpoint, Path(certificate) if certificate else None,
                        _certificate_origin(config, merged, path)),
        admin=listener(config.admin_endpoint) if config.admin_endpoint else None,
        files=files, otsapi_endpoint=config.thrift_endpoint,
        admin_endpoint=config.admin_endpoint)


def _certificate_origin(config: Config, merged: MergedProperties, toml: Path | None) -> str:
    """Where the served ssl.certificate is set: the TOML file's
    [properties], config.ini's line, or ogon's default."""
    if "ssl.certificate" in config.properties:
        return f"ssl.certificate of {toml}"
    ini = merged.ini
    line = ini.lines.get(("", "ssl.certificate")) if ini is not None else None
    if ini is not None and line:
        return f"ssl.certificate of {ini.source}:{line}"
    return "the default ssl.certificate"


def _unusable(what: str) -> CtlError:
    return CtlError(f"cannot read the bridge's configuration: {what} (or give --port and "
                    f"--cafile, --plain or --insecure)", EXIT_USAGE)


def admin_connection(url: str, timeout: float | None, addresses: BridgeAddresses | None
                     ) -> Any:
    """An HTTP(S) connection to the admin endpoint at ``url``; an https one
    verifies the certificate the bridge's admin endpoint serves when the
    configuration names it, else the system's trust."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url if "//" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CtlError(f"--admin: expected http://HOST:PORT or https://HOST:PORT, got "
                       f"{url!r}", EXIT_USAGE)
    if parts.scheme == "http":
        return http.client.HTTPConnection(parts.hostname, parts.port or 9092, timeout=timeout)
    admin = addresses.admin if addresses is not None else None
    cafile = admin.certificate if admin is not None else None
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    return http.client.HTTPSConnection(parts.hostname, parts.port or 9092, timeout=timeout,
                                       context=context)

"""Endpoint strings, read without Twisted: split on their unescaped
colons, and the tcp:/ssl: server endpoints that ``protocols.listening``
serves. Importing this module imports nothing of Twisted (a twistd start
decides with it what to import)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl


def split_endpoint(description: str) -> list[str]:
    """Split an endpoint string on unescaped colons (``\\:`` escapes one)."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


@dataclass(frozen=True)
class StreamListenSpec:
    """What a ``tcp:``/``ssl:`` server endpoint string asks for."""

    port: int
    interface: str = ""
    backlog: int = 50
    # ssl: only; None for tcp:
    certificate: str | None = None
    key: str | None = None
    extra_chain: str | None = None
    dh_parameters: str | None = None

    @property
    def tls(self) -> bool:
        return self.key is not None

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.interface else socket.AF_INET

    def context(self) -> ssl.SSLContext | None:
        """The TLS context it asks for (None: plain TCP). Raises OSError or
        ssl.SSLError for a certificate or key that cannot be used."""
        if self.key is None:
            return None
        from protocols.listening import server_context

        return server_context(self.certificate or self.key, self.key, self.extra_chain,
                              self.dh_parameters)


_TCP_KEYS = {"port", "interface", "backlog"}
_SSL_KEYS = _TCP_KEYS | {"privateKey", "certKey", "extraCertChain", "dhParameters"}


def parse_stream_endpoint(parts: list[str]) -> StreamListenSpec | None:
    """A ``tcp:`` or ``ssl:`` endpoint string, already split on its
    unescaped colons, as a StreamListenSpec; None for anything else (other
    endpoint types, options this module does not serve, such as
    ``sslmethod``), which is then left to Twisted's own endpoints."""
    kind, args = parts[0], parts[1:]
    if kind not in ("tcp", "ssl", "tcp6"):
        return None
    allowed = _TCP_KEYS if kind != "ssl" else _SSL_KEYS
    values: dict[str, str] = {}
    positional = ["port", "backlog", "interface"] if kind != "ssl" else \
        ["port", "privateKey", "certKey", "backlog", "interface"]
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep:
            if not positional:
                return None
            name, value = positional.pop(0), arg
        if name not in allowed or name in values:
            return None
        values[name] = value
    try:
        port = int(values["port"])
        backlog = int(values.get("backlog", "50"))
    except (KeyError, ValueError):
        return None
    interface = values.get("interface", "" if kind != "tcp6" else "::")
    if kind == "ssl":
        key = values.get("privateKey")
        if key is None:
            return None
        return StreamListenSpec(port, interface, backlog, values.get("certKey", key), key,
                                values.get("extraCertChain"), values.get("dhParameters"))
    return StreamListenSpec(port, interface, backlog)

"""The admin endpoint's twisted.web Site, hardened for a port every local
user (and every web page a local browser opens) can reach:

- A Host-header allow-list against DNS rebinding: a page on
  ``evil.example`` whose name is made to resolve to 127.0.0.1 reaches the
  port, but its requests say ``Host: evil.example``. Only loopback names
  (``localhost``, ``127.0.0.1``, ``[::1]``) or the address the connection
  came in on, with the listening port, and names the operator configured
  (``admin_allowed_hosts``) are served; others get 421, a missing or
  unreadable Host 400.
- A cap on connections (``admin_max_connections``) and the descriptor
  reserve of the OTS API: a connection over the cap, or whose descriptor
  lands in the last 256 the process may open, is closed at once.
- Twisted's own per-request and per-connection lines ("Timing out
  client", "HEAD request ... returning a message body") are written once
  per kind per 10 s, then one line with the count; there is no access log.
- A request whose rendering fails is answered 500 (400 when it is the
  request's own bytes that do not decode) with one short, rate-limited
  line and no traceback.
"""

from __future__ import annotations

import resource
from collections import Counter
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from protocols.loglimit import LogLimiter

#: Names a browser on this host uses for a loopback listener.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
#: Descriptors kept free for the RDP server, the state and backends (as on
#: the OTS API): a connection whose descriptor lands here is refused.
FD_RESERVE = 256


class RateLimitedLogger(Logger):
    """A Logger whose lines go out through a LogLimiter, one kind per
    format string: for Twisted's own lines, which a client causes at will."""

    def __init__(self, limiter: LogLimiter, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self._limiter = limiter
        self._plain = Logger(namespace=namespace)

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        self._limiter.emit(self._plain, level, (self.namespace, format), format or "",
                           **kwargs)


def split_host(value: str) -> tuple[str, int | None]:
    """(name, port) of a Host header value; the name lower-case, an IPv6
    literal with its brackets. ValueError when it is no host."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError("unclosed [")
        name, rest = value[:end + 1], value[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError("junk after ]")
        port = rest[1:]
    else:
        name, _, port = value.partition(":")
    if not name or any(c in name for c in " /\\@?#"):
        raise ValueError("no name")
    if port and not port.isdigit():
        raise ValueError("port is not a number")
    return name, int(port) if port else None


class AdminChannel(HTTPChannel):
    """HTTPChannel under the site's connection cap, its Twisted lines
    rate-limited."""

    site: AdminSite

    def connectionMade(self) -> None:
        self._log = self.site.twisted_log
        super().connectionMade()
        if not self.site.admit(self):
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.site.connections.discard(self)
        super().connectionLost(reason)


class AdminRequest(Request):
    """A request of the admin site: the Host checked before anything else,
    a failure answered without a traceback."""

    site: AdminSite

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self._log = channel.site.twisted_log

    def process(self) -> None:
        site: AdminSite = self.channel.site
        refusal = site.host_refusal(self)
        if refusal is None:
            super().process()
            return
        code, reason = refusal
        site.log_limit.warn(site.logger, ("host", code),
                            "admin endpoint: refused a request with {reason} (code {code}; "
                            "admin_allowed_hosts names the hosts served)", reason=reason,
                            code=code)
        self.site = site
        self.setResponseCode(code)
        self.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self.write(f"{reason}: not served here (DNS rebinding?)\n".encode())
        self.finish()

    def processingFailed(self, reason: Failure) -> None:
        site: AdminSite = self.channel.site
        bad_input = reason.check(UnicodeError) is not None  # the request's own bytes
        code = 400 if bad_input else 500
        path = self.path[:80].decode("ascii", "replace") if self.path else "?"
        # One kind per answer code: a kind per path or error would let
        # clients grow the limiter's table.
        site.log_limit.warn(site.logger, ("failed", code),
                            "admin request for {path} failed ({code}): {error}", path=path,
                            code=code, error=f"{reason.type.__name__}: "
                                             f"{str(reason.value)[:200]}")
        if self.finished or self._disconnected:
            return
        if self.startedWriting:
            # Headers and part of a body are out: all that is left is to end.
            if self.channel is not None and self.channel.transport is not None:
                self.channel.transport.abortConnection()
            return
        body = b"bad request\n" if bad_input else b"internal error (see the bridge's log)\n"
        self.setResponseCode(code)
        self.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()


class AdminSite(Site):
    """twisted.web's Site for the admin endpoint (see the module's docstring).
    ``dropped`` counts refused connections by reason, for /metrics."""

    protocol = AdminChannel  # type: ignore[assignment]
    logger = Logger()

    def __init__(self, root: Resource, clock: IReactorTime, allowed_hosts: Iterable[str] = (),
                 max_connections: int = 512, timeout: float = 60,
                 dropped: Counter[str] | None = None) -> None:
        super().__init__(root, requestFactory=AdminRequest, timeout=timeout)
        self.displayTracebacks = False
        self.noisy = False
        self.log_limit = LogLimiter(clock)
        self.twisted_log = RateLimitedLogger(self.log_limit, "twisted.web")
        self.allowed_hosts = [split_host(host) for host in allowed_hosts]
        self.max_connections = max_connections
        self.connections: set[AdminChannel] = set()
        self.dropped: Counter[str] = dropped if dropped is not None else Counter()

    def log(self, request: Request) -> None:  # type: ignore[override]
        """No access log: a scrape every few seconds would fill the bridge's."""

    # -- connections -----------------------------------------------------------

    def admit(self, channel: AdminChannel) -> bool:
        reason = None
        if len(self.connections) >= self.max_connections:
            reason, kind = (f"{self.max_connections} connections already "
                            f"(admin_max_connections)"), "max_connections"
        else:
            fd = _descriptor(channel.transport)
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if fd is not None and limit != resource.RLIM_INFINITY and fd >= limit - FD_RESERVE:
                reason, kind = (f"descriptor {fd} is in the {FD_RESERVE} kept in reserve "
                                f"(limit {limit})"), "fd_reserve"
        if reason is None:
            self.connections.add(channel)
            return True
        self.dropped[kind] += 1
        self.log_limit.warn(self.logger, ("refused", kind),
                            "refusing admin endpoint connections: {reason} ({count} refused "
                            "so far)", reason=reason, count=sum(self.dropped.values()))
        return False

    # -- the Host allow-list -------------------------------------------------------

    def host_refusal(self, request: Request) -> tuple[int, str] | None:
        """(code, why) when the request's Host is not one this site serves."""
        values = request.requestHeaders.getRawHeaders(b"host") or []
        if len(values) != 1:
            return 400, "no Host header" if not values else "several Host headers"
        try:
            name, port = split_host(values[0].decode("ascii"))
        except (UnicodeError, ValueError):
            return 400, "an unreadable Host header"
        local = request.getHost()
        local_port = getattr(local, "port", None)
        default_port = 443 if request.isSecure() else 80
        if name in LOOPBACK_NAMES or name == _literal(getattr(local, "host", "")):
            if port == local_port or (port is None and local_port == default_port):
                return None
        for allowed_name, allowed_port in self.allowed_hosts:
            if name == allowed_name and allowed_port in (None, port):
                return None
        shown = values[0][:100].decode("ascii", "replace")
        return 421, f"Host {shown}"


def _literal(host: str) -> str:
    """An address as it appears in a Host header ([...] around IPv6)."""
    return f"[{host.lower()}]" if ":" in host else host


def _descriptor(transport: Any) -> int | None:
    raw = getattr(transport, "transport", transport)  # under TLS, the socket's transport
    try:
        return int(raw.fileno())
    except (AttributeError, OSError, TypeError, ValueError):
        return None

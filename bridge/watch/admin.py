"""The admin HTTP endpoint (twisted.web): /metrics, /events, /sessions,
/healthz and a status page at /.

/events is the session event journal as Server-Sent Events: it starts
after ``Last-Event-ID`` (or ``?after=N``; default: only new events), sends
what the journal has, then each new event as it is written. ``?once=1``
ends the response once caught up (for scripts). /events and /sessions need
``Authorization: Bearer <token>`` of an OTS API token with
QUERY_INFORMATION; /metrics and /healthz, which tell nothing about who is
logged on, do not; the default endpoint listens on 127.0.0.1 only.

Every desktop holds a session token (USER, which has QUERY_INFORMATION) in
/tmp/ogon.session.<id>, so what a token below FULL sees is cut to what is
its user's own (``sees_everything``): /events sends it only its user's
session events (failed logons and lockouts never: they carry names as typed,
a password typed into the name field among them, and client addresses);
/sessions lists every session, as enumerateSessions does, but other users'
without their client's name and address. The farm scope alike.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import pages
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from bridge.security.permissions import FULL, Permission
from bridge.security.tokens import TokenRecord, TokenStore
from bridge.sessions.model import state_name
from bridge.sessions.registry import SessionRegistry
from bridge.state.journal import LOCKED_OUT, LOGON_FAILED, EventHub, Subscription, event_json
from bridge.state.store import JournalEvent
from bridge.watch.actions import ACTIONS, SessionActionRoutes
from bridge.watch.operations import disk_free
from bridge.watch.site import AdminSite
from protocols.loglimit import LogLimiter

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from bridge.endpoints import ListeningService
    from bridge.farm.service import FarmService
    from bridge.rdp.link import RdpServerLink
    from bridge.watch.dbus import SessionNotifier

#: A comment line every so often keeps idle streams (and proxies) alive and
#: finds clients that went away without a word.
KEEPALIVE_INTERVAL = 15.0
#: A client that has not read for this long is dropped (it resumes by id).
STALL_TIMEOUT = 60.0
#: At most this many /events streams at once; the last FULL_RESERVE of them
#: only for FULL tokens, so that users' session tokens cannot shut the admin
#: out. Per token at most STREAMS_PER_TOKEN (a FULL token: more, for the
#: tabs of a status page), and per user of lesser tokens (a user may mint
#: tokens with logonConnection) at most STREAMS_PER_USER.
MAX_STREAMS = 256
FULL_RESERVE = 64
STREAMS_PER_TOKEN = 4
STREAMS_PER_FULL_TOKEN = 32
STREAMS_PER_USER = 8


#: Journal events of no session that only FULL tokens see (a name as typed,
#: a client's address).
FULL_ONLY_EVENTS = frozenset({LOGON_FAILED, LOCKED_OUT})
#: Fields of another user's session a token below FULL does not see.
CLIENT_FIELDS = ("client_name", "client_address")


def sees_everything(record: TokenRecord) -> bool:
    return record.permission & FULL == FULL


def event_visible(record: TokenRecord, event: Any) -> bool:
    """Whether ``record`` is sent ``event`` (a host's or the farm's journal
    event): all for FULL, else its own user's session events."""
    if sees_everything(record):
        return True
    # (A token of no user owns none: greeter sessions have no user either.)
    return event.event not in FULL_ONLY_EVENTS and bool(record.username) \
        and event.username == record.username


def redact_sessions(record: TokenRecord, sessions: list[dict[str, Any]],
                    user_key: str) -> list[dict[str, Any]]:
    """``sessions`` as ``record`` sees them: other users' without their
    client's name and address (None) unless it is FULL."""
    if sees_everything(record):
        return sessions
    return [session if record.username and session.get(user_key) == record.username
            else {**session, **dict.fromkeys(CLIENT_FIELDS)} for session in sessions]


def _json(request: Request, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value, indent=1).encode() + b"\n"


def _query(request: Request) -> dict[str, list[str]]:
    return parse_qs(urlsplit(request.uri.decode("latin-1")).query)


def _bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if any."""
    header = (request.getHeader(b"authorization") or b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class _Authorized(Resource):
    """A resource for holders of a token with QUERY_INFORMATION."""

    isLeaf = True
    log = Logger()

    def __init__(self, tokens: TokenStore, registry: SessionRegistry, journal: EventHub,
                 farm: FarmService | None = None) -> None:
        super().__init__()
        self.tokens = tokens
        self.registry = registry
        self.journal = journal
        self.farm = farm

    def farm_scope(self, request: Request) -> bool:
        """``?scope=farm``: the whole farm's, not this host's."""
        return _query(request).get("scope", ["host"])[0] == "farm"

    def not_a_farm(self, request: Request) -> bytes:
        return _json(request, {"error": "this bridge is not in a farm (farm_database)"}, 404)

    def authorized(self, request: Request) -> TokenRecord | None:
        token = _bearer(request)
        record = self.tokens.lookup(token) if token is not None else None
        if record is None or not record.permission & Permission.QUERY_INFORMATION:
            return None
        return record

    def refuse(self, request: Request) -> bytes:
        request.setHeader(b"www-authenticate", b'Bearer realm="icp-bridge"')
        return _json(request, {"error": "an OTS API token with QUERY_INFORMATION is needed "
                                        "(Authorization: Bearer <token>)"}, 401)


class SessionsResource(_Authorized):
    #: POST /sessions/<id>/<action> (bridge.watch.actions), when wired.
    actions: SessionActionRoutes | None = None

    def render_POST(self, request: Request) -> bytes | int:
        if self.actions is None:
            return _json(request, {"error": "no actions here"}, 404)
        return self.actions.render_POST(request)

    def render_GET(self, request: Request) -> bytes | int:
        record = self.authorized(request)
        if record is None:
            return self.refuse(request)
        if self.farm_scope(request):
            if self.farm is None:
                return self.not_a_farm(request)
            from bridge.watch.farm_admin import sessions_view

            return sessions_view(request, self.farm,
                                 lambda rows: redact_sessions(record, rows, "username"))
        if any(request.postpath):
            return _json(request, {"error": "not found"}, 404)
        sessions = []
        for session in sorted(self.registry, key=lambda s: s.session_id):
            sessions.append({
                "session_id": session.session_id, "user": session.username,
                "domain": session.domain, "state": int(session.state),
                "state_name": state_name(int(session.state)),
                "greeter": not session.logged_on,
                "connection_id": session.connection_id,
                "client_name": session.client.host_name,
                "client_address": session.client.address,
                "since": session.state_since, "connect_time": session.connect_time,
                "logon_time": session.logon_time,
                "shadowing": session.shadowing,
            })
        # Who asks and what they may do (the status page shows its buttons).
        caller = {"user": record.username, "permission": record.permission,
                  "actions": [name for name, flag in ACTIONS.items()
                              if record.permission & flag],
                  "sees_everything": sees_everything(record)}
        return _json(request, {"sessions": redact_sessions(record, sessions, "user"),
                               "caller": caller,
                               "last_event_id": self.journal.last_id})


@implementer(IPushProducer)
class EventStream:
    """One /events response: a Subscriber the hub feeds, paused by Twisted
    while the client does not read."""

    log = Logger()

    def __init__(self, request: Request, token: str, once: bool,
                 record: TokenRecord | None = None) -> None:
        self.request = request
        self.token = token
        self.once = once
        # Whose stream it is, for the quotas and for what it is sent.
        self.record = record
        self.full = record is not None and sees_everything(record)
        self.username = record.username if record is not None else ""
        self.subscription: Subscription | None = None
        self.finished = False

    # Subscriber
    def send(self, event: JournalEvent) -> None:
        if self.record is not None and not event_visible(self.record, event):
            if self.once:
                self.caught_up()
            return
        data = json.dumps(event_json(event), separators=(",", ":"))
        self.request.write(f"id: {event.id}\nevent: session\ndata: {data}\n\n".encode())
        if self.once:
            self.caught_up()

    def resync(self, requested_after: int, resumed_after: int, reason: str) -> None:
        data = json.dumps({"requested_after": requested_after, "resumed_after": resumed_after,
                           "reason": reason})
        self.request.write(f"event: resync\ndata: {data}\n\n".encode())

    # IPushProducer
    def pauseProducing(self) -> None:
        if self.subscription is not None:
            self.subscription.pause()

    def resumeProducing(self) -> None:
        if self.subscription is not None:
            self.subscription.resume()
            self.caught_up()

    def stopProducing(self) -> None:
        self.end()

    def caught_up(self) -> None:
        subscription = self.subscription
        if self.once and subscription is not None and not subscription.paused \
                and subscription.position >= subscription.hub.last_id:
            self.finish()

    def keepalive(self) -> None:
        self.request.write(b": keepalive\n\n")

    def finish(self) -> None:
        if not self.finished:
            self.end()
            self.request.unregisterProducer()
            self.request.finish()

    def end(self) -> None:
        self.finished = True
        if self.subscription is not None:
            self.subscription.close()

    def abort(self) -> None:
        self.end()
        transport = self.request.channel.transport if self.request.channel else None
        if transport is not None:
            transport.abortConnection()


class EventsResource(_Authorized):
    def __init__(self, tokens: TokenStore, registry: SessionRegistry, journal: EventHub,
                 clock: IReactorTime, farm: FarmService | None = None) -> None:
        super().__init__(tokens, registry, journal, farm)
        self.streams: set[EventStream] = set()
        self.log_limit = LogLimiter(clock)
        self._keepalive = LoopingCall(self._tick)
        self._keepalive.clock = clock

    def start(self) -> None:
        self._keepalive.start(KEEPALIVE_INTERVAL, now=False)

    def stop(self) -> None:
        if self._keepalive.running:
            self._keepalive.stop()
        for stream in list(self.streams):
            stream.finish()

    def _tick(self) -> None:
        stalled = {s.subscriber for s in self.journal.stalled(STALL_TIMEOUT)}
        if self.farm is not None:
            stalled |= {s.subscriber for s in self.farm.events.stalled(STALL_TIMEOUT)}
        for stream in list(self.streams):
            if stream in stalled:
                self.log.info("dropping an /events client that read nothing for {seconds:g} "
                              "s (it resumes by id)", seconds=STALL_TIMEOUT)
                stream.abort()
            elif self.tokens.lookup(stream.token) is None:
                stream.finish()  # the token expired or was revoked
            elif not (stream.subscription and stream.subscription.paused):
                stream.keepalive()

    def render_GET(self, request: Request) -> bytes | int:
        record = self.authorized(request)
        if record is None:
            return self.refuse(request)
        refusal = self.quota_refusal(record, _bearer(request) or "")
        if refusal is not None:
            code, reason = refusal
            self.log_limit.warn(self.log, ("quota", code), "refused an /events stream of user "
                                "{username}: {reason}", username=record.username,
                                reason=reason)
            if code == 429:
                request.setHeader(b"retry-after", b"60")
            return _json(request, {"error": reason}, code)
        query = _query(request)
        hub: Any = self.journal
        if self.farm_scope(request):
            if self.farm is None:
                return self.not_a_farm(request)
            hub = self.farm.events
            if not hub.loaded and "after" not in query \
                    and request.getHeader(b"last-event-id") is None:
                return _json(request, {"error": "the farm journal is not read yet (the farm "
                                                "database is away?); give ?after=N"}, 503)
        try:
            header = request.getHeader(b"last-event-id")
            if header is not None:
                after = int(header)
            elif "after" in query:
                after = int(query["after"][0])
            else:
                after = hub.last_id
        except ValueError:
            return _json(request, {"error": "after / Last-Event-ID must be an event id"}, 400)
        once = query.get("once", ["0"])[0] not in ("0", "", "false")
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        stream = EventStream(request, _bearer(request) or "", once, record)
        request.registerProducer(stream, True)
        request.write(b"retry: 2000\n\n")
        self.streams.add(stream)
        request.notifyFinish().addBoth(lambda _: self._gone(stream))
        stream.subscription = hub.subscribe(stream, max(0, after))
        stream.caught_up()
        return NOT_DONE_YET

    def quota_refusal(self, record: TokenRecord, token: str) -> tuple[int, str] | None:
        """(code, why) when ``record`` may not open another stream now."""
        if len(self.streams) >= MAX_STREAMS:
            return 503, f"{MAX_STREAMS} event streams already"
        full = record.permission & FULL == FULL
        if not full and sum(not s.full for s in self.streams) >= MAX_STREAMS - FULL_RESERVE:
            return 503, (f"{MAX_STREAMS - FULL_RESERVE} event streams of non-FULL tokens "
                         f"already (the other {FULL_RESERVE} are kept for FULL tokens)")
        per_token = STREAMS_PER_FULL_TOKEN if full else STREAMS_PER_TOKEN
        if sum(s.token == token for s in self.streams) >= per_token:
            return 429, f"this token has {per_token} event streams open already"
        if not full and sum(not s.full and s.username == record.username
                            for s in self.streams) >= STREAMS_PER_USER:
            return 429, f"this user's tokens have {STREAMS_PER_USER} event streams open already"
        return None

    def _gone(self, stream: EventStream) -> None:
        stream.end()
        self.streams.discard(stream)


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: CollectorRegistry,
                 refresh: Callable[[], Deferred[None]] | None = None) -> None:
        """``refresh``: fetch what other processes count (the OTS API
        workers) before the metrics are read."""
        super().__init__()
        self.metrics = metrics
        self.refresh = refresh

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        if self.refresh is None:
            return generate_latest(self.metrics)

        def render(_: object) -> None:
            if not request.finished and not request._disconnected:
                request.write(generate_latest(self.metrics))
                request.finish()

        self.refresh().addBoth(render)
        return NOT_DONE_YET

    def render_HEAD(self, request: Request) -> bytes:
        """The headers only, without collecting anything: a HEAD flood
        costs neither the metrics' work nor Twisted's per-request line."""
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return b""


class HealthResource(Resource):
    isLeaf = True

    def __init__(self, icp_listener: ListeningService, otsapi_listener: ListeningService,
                 link: RdpServerLink, registry: SessionRegistry,
                 dbus: SessionNotifier | None, disk_paths: Sequence[Path] = (),
                 min_free_disk: int = 0,
                 degraded: Callable[[], list[str]] | None = None) -> None:
        """``disk_paths``: directories whose filesystem must keep
        ``min_free_disk`` bytes free (the state's, the backend logs').
        ``degraded``: why the bridge, though serving, needs an operator (a
        bad users file, a refused reload, an expiring certificate)."""
        super().__init__()
        self.icp_listener = icp_listener
        self.otsapi_listener = otsapi_listener
        self.link = link
        self.registry = registry
        self.dbus = dbus
        self.disk_paths = disk_paths
        self.min_free_disk = min_free_disk
        self.degraded = degraded or list

    def render_GET(self, request: Request) -> bytes:
        icp = self.icp_listener.port is not None
        otsapi = self.otsapi_listener.port is not None
        notifier = self.dbus
        free = disk_free(self.disk_paths)
        short = [f"{path} has {n} bytes free (min_free_disk is {self.min_free_disk})"
                 for path, n in free.items() if n < self.min_free_disk]
        ok = icp and otsapi and not short
        health = {
            "ok": ok,
            "icp_listening": icp, "otsapi_listening": otsapi,
            "rdp_server_connected": self.link.ready,
            "sessions": len(self.registry),
            "dbus": "off" if notifier is None else
                    ("connected" if notifier.connected else "not connected"),
            "state_unwritten": self.registry.unwritten,
            "disk_free": free,
            "degraded": self.degraded(),
        }
        if not ok:
            health["problem"] = "; ".join(
                (["a listener is not listening"] if not (icp and otsapi) else [])
                + [f"disk: {line}" for line in short])
        return _json(request, health, 200 if ok else 503)


class StatusPage(Resource):
    isLeaf = True
    page = resources.files("bridge.watch").joinpath("status.html").read_bytes()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        # Everything it needs is in the page itself; nothing may be loaded
        # from elsewhere, nor the page framed.
        request.setHeader(b"content-security-policy",
                          b"default-src 'none'; script-src 'unsafe-inline'; style-src "
                          b"'unsafe-inline'; connect-src 'self'; img-src data:; "
                          b"frame-ancestors 'none'")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return self.page


class _Root(Resource):
    def __init__(self) -> None:
        super().__init__()
        self.status = StatusPage()

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self.status
        return pages.notFound()


def admin_site(tokens: TokenStore, registry: SessionRegistry, journal: EventHub,
               metrics: CollectorRegistry, health: HealthResource, clock: IReactorTime,
               actions: SessionActionRoutes | None = None,
               farm: FarmService | None = None, allowed_hosts: Iterable[str] = (),
               max_connections: int = 512, dropped: Counter[str] | None = None,
               refresh_metrics: Callable[[], Deferred[None]] | None = None
               ) -> tuple[AdminSite, EventsResource]:
    """The admin endpoint's site and its /events resource (which the service
    starts and stops). ``clock`` (real time) paces the streams' keepalives;
    ``actions`` answers POST /sessions/<id>/<action>. With ``farm``, the
    farm's scope and commands too (bridge.watch.farm_admin). ``allowed_hosts``,
    ``max_connections`` and ``dropped`` are the site's (bridge/watch/site.py);
    ``refresh_metrics`` fetches what other processes count before /metrics
    is read."""
    root = _Root()
    events = EventsResource(tokens, registry, journal, clock, farm)
    root.putChild(b"events", events)
    sessions = SessionsResource(tokens, registry, journal, farm)
    sessions.actions = actions
    root.putChild(b"sessions", sessions)
    if farm is not None:
        from bridge.watch.farm_admin import FarmCommandsResource

        root.putChild(b"farm", FarmCommandsResource(tokens, farm))
    root.putChild(b"metrics", MetricsResource(metrics, refresh_metrics))
    root.putChild(b"healthz", health)
    site = AdminSite(root, clock, allowed_hosts=allowed_hosts, max_connections=max_connections,
                     timeout=60, dropped=dropped)
    return site, events

"""The farm on the admin endpoint: ``/sessions?scope=farm`` (every host,
stale or not, and every session), ``/events?scope=farm`` (the farm journal,
resumed by Last-Event-ID as the host's own) and the farm commands:

    POST /farm/sessions/<host>/<session id>/<logoff|disconnect|message>
    POST /farm/users/<name>/<logoff|disconnect|message>

with ``Authorization: Bearer <token>`` of a FULL token of this host and a
JSON body: ``wait`` (the RDP server's answer, default true), ``timeout``
(seconds the call waits for the host, default 10), ``expires`` (seconds a
command for a host that is away stays pending, default 300); a message's
``title``, ``text``, ``style``, ``message_timeout``. The answer lists each
command: its host, session, state (done, pending, expired) and result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from bridge.farm.commands import ACTIONS
from bridge.farm.service import FarmService
from bridge.farm.view import farm_sessions
from bridge.security.permissions import FULL
from bridge.security.tokens import TokenStore
from bridge.state.engines import DatabaseUnavailableError
from bridge.state.farm_store import FarmCommand

#: A command body is small: a message's title and text at most.
MAX_BODY = 64 * 1024


def _write_json(request: Request, value: Any, code: int = 200) -> None:
    if request.finished or request._disconnected:
        return
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.write(json.dumps(value, indent=1).encode() + b"\n")
    request.finish()


def answer_later(request: Request, work: Deferred[Any], log: Logger) -> int:
    """Answer ``request`` with ``work``'s JSON when it fires: 503 while the
    farm database is away, 500 (logged) on a bug."""
    def failed(failure: Failure) -> None:
        if failure.check(DatabaseUnavailableError):
            _write_json(request, {"error": f"the farm database is unavailable: "
                                           f"{failure.getErrorMessage()}"}, 503)
            return
        log.failure("admin: farm request failed", failure)
        _write_json(request, {"error": "internal error (see the bridge's log)"}, 500)

    work.addCallbacks(lambda value: _write_json(request, value), failed)
    return NOT_DONE_YET


def sessions_view(request: Request, farm: FarmService,
                  redact: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> int:
    """The farm view, its sessions passed through ``redact`` (what the
    caller's token may see of them)."""
    async def view() -> dict[str, Any]:
        value = await farm_sessions(farm.store, farm.settings.stale_after)
        return {**value, "sessions": redact(value["sessions"])}

    return answer_later(request, Deferred.fromCoroutine(view()), FarmCommandsResource.log)


def command_json(command: FarmCommand) -> dict[str, Any]:
    return {"id": command.id, "host": command.host, "session_id": command.session_id,
            "action": command.action, "state": command.state, "result": command.result}


class FarmCommandsResource(Resource):
    """POST /farm/sessions/<host>/<id>/<action>, /farm/users/<name>/<action>."""

    isLeaf = True
    log = Logger()

    def __init__(self, tokens: TokenStore, farm: FarmService) -> None:
        super().__init__()
        self.tokens = tokens
        self.farm = farm

    def render_POST(self, request: Request) -> bytes | int:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        record = self.tokens.lookup(token.strip()) if scheme.lower() == "bearer" else None
        if record is None or record.permission & FULL != FULL:
            request.setHeader(b"www-authenticate", b'Bearer realm="icp-bridge"')
            return _error(request, 401, "a FULL OTS API token is needed (Authorization: "
                                        "Bearer <token>)")
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        try:
            body = json.loads(request.content.read(MAX_BODY + 1) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
            timeout = float(body.get("timeout", 10))
            expires = float(body.get("expires", 300))
        except (ValueError, TypeError) as e:
            return _error(request, 400, f"the body must be a JSON object ({e})")
        if not 0 < timeout <= 3600 or not 0 < expires <= 7 * 24 * 3600:
            return _error(request, 400, "timeout: 0-3600 s, expires: up to 7 days")
        args: dict[str, Any] = {"wait": bool(body.get("wait", True))}
        if len(parts) == 4 and parts[0] == "sessions" and parts[3] in ACTIONS \
                and parts[2].isdigit():
            action, target = parts[3], ("session", parts[1], int(parts[2]))
        elif len(parts) == 3 and parts[0] == "users" and parts[2] in ACTIONS and parts[1]:
            action, target = parts[2], ("user", parts[1], 0)
        else:
            return _error(request, 404, "POST /farm/sessions/<host>/<id>/<action> or "
                                        "/farm/users/<name>/<action>; action: "
                                        + ", ".join(ACTIONS))
        if action == "message":
            args.update(title=str(body.get("title", "")), text=str(body.get("text", "")),
                        style=int(body.get("style", 0)),
                        timeout=int(body.get("message_timeout", 0)))
        peer = request.getClientAddress()
        who = f"{record.username} on {self.farm.settings.host}"
        if getattr(peer, "host", ""):
            who += f" from {peer.host}"
        self.log.info("farm {action} of {what} {name} {session} {who}", action=action,
                      what=target[0], name=target[1], session=target[2] or "", who=who)
        work = Deferred.fromCoroutine(self._run(action, target, args, who, timeout, expires))
        return answer_later(request, work, self.log)

    async def _run(self, action: str, target: tuple[str, str, int], args: dict[str, Any],
                   who: str, timeout: float, expires: float) -> dict[str, Any]:
        kind, name, session_id = target
        if kind == "session":
            targets = [(name, session_id)]
        else:
            targets = [(row["host"], row["session_id"])
                       for row in await self.farm.store.sessions(name)]
        if not targets:
            return {"commands": [], "note": f"user {name} has no session in the farm"}
        commands = await self.farm.waiter.run(targets, action, args, who, timeout, expires)
        return {"commands": [command_json(c) for c in commands]}


def _error(request: Request, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"error": text}).encode() + b"\n"

"""The admin endpoint's session actions: ``POST /sessions/<id>/logoff``,
``/disconnect`` and ``/message``, what the status page's buttons call.

- Authorized by ``Authorization: Bearer <token>`` only (an OTS API token):
  nothing here reads cookies, so another site cannot make a browser act
  (no CSRF); a request with a cookie and no header is 401.
- The token needs the action's OTS API flag (LOGOFF, DISCONNECT, MESSAGE),
  also for its own sessions: 403 without it.
- The JSON body: ``{"wait": true}`` for logoff and disconnect (the default:
  the answer says what the RDP server did); ``{"title", "text", "style",
  "timeout", "wait"}`` for a message.
- Carried out by ``SessionActions``, exactly as the OTS API methods are;
  the journal says who ("logged off through the admin endpoint by alice
  from 127.0.0.1").

Answers are JSON: 200 ``{"ok": true, ...}``; 400 a bad body, 401, 403, 404
no such session or action, 409 no client to show a message to, 413 a body
over 64 KiB, 415 a body that is not JSON, 502 the RDP server did not do it.

A farm adds a host to the path; ``locate`` is where it picks the host's
``SessionActions``, the rest stays.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from bridge.otsapi.actions import Actor, NoClientError, SessionActions
from bridge.security.permissions import Permission
from bridge.security.tokens import TokenStore
from bridge.sessions.model import Session
from bridge.sessions.registry import SessionRegistry

#: The way in, as the journal's reasons name it.
VIA = "the admin endpoint"
#: The flag each action needs.
ACTIONS = {"logoff": Permission.LOGOFF, "disconnect": Permission.DISCONNECT,
           "message": Permission.MESSAGE}
MAX_BODY = 64 * 1024
#: A message box's title and text: far below the RDP server's 32 KiB frames.
MAX_MESSAGE_TEXT = 8 * 1024


class BadRequestError(Exception):
    """The body is not what the action takes; the text says what."""


def _answer(request: Request, value: dict[str, Any], code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value).encode() + b"\n"


def _bearer(request: Request) -> str | None:
    header = (request.getHeader(b"authorization") or b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _body(request: Request) -> dict[str, Any]:
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        raise BadRequestError(f"413 the body is over {MAX_BODY // 1024} KiB")
    if not raw.strip():
        return {}
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if kind != b"application/json":
        raise BadRequestError("415 the body must be application/json")
    try:
        value = json.loads(raw)
    except ValueError:
        raise BadRequestError("400 the body is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequestError("400 the body must be a JSON object")
    return value


def _field(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    # bool is an int in Python; a number field takes no true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = {bool: "true or false", int: "a whole number", str: "a string"}[kind]
        raise BadRequestError(f"400 {name} must be {what}")
    return value


class SessionActionRoutes:
    """``POST /sessions/<id>/<action>`` (called by the /sessions resource)."""

    log = Logger()

    def __init__(self, tokens: TokenStore, registry: SessionRegistry,
                 actions: SessionActions) -> None:
        self.tokens = tokens
        self.registry = registry
        self.actions = actions

    def locate(self, session_id: int) -> tuple[SessionActions, Session] | None:
        """The actions that own the session, and the session (a farm picks
        the session's host here)."""
        session = self.registry.get(session_id)
        return None if session is None else (self.actions, session)

    def render_POST(self, request: Request) -> bytes | int:
        path = [part.decode("latin-1") for part in request.postpath if part]
        token = _bearer(request)
        record = self.tokens.lookup(token) if token is not None else None
        if record is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="icp-bridge"')
            return _answer(request, {"ok": False, "error": "an OTS API token is needed "
                                     "(Authorization: Bearer <token>; cookies are not "
                                     "read)"}, 401)
        if len(path) != 2 or not path[0].isdigit() or path[1] not in ACTIONS:
            return _answer(request, {"ok": False, "error": "POST /sessions/<id>/logoff, "
                                     "/disconnect or /message"}, 404)
        session_id, action = int(path[0]), path[1]
        flag = ACTIONS[action]
        if not record.permission & flag:
            return _answer(request, {"ok": False, "error": f"the token lacks {flag.name}"},
                           403)
        located = self.locate(session_id)
        if located is None:
            return _answer(request, {"ok": False, "error": f"no session {session_id}"}, 404)
        try:
            body = _body(request)
            run = self._prepare(action, body)
        except BadRequestError as e:
            code, _, text = str(e).partition(" ")
            return _answer(request, {"ok": False, "error": text}, int(code))
        actions, session = located
        actor = Actor(record.username, VIA, getattr(request.getClientAddress(), "host", ""))
        self.log.info("{action} of session {session_id} asked {who}", action=action,
                      session_id=session_id, who=actor.describe())
        # The client may go before the answer: the action happens regardless.
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = maybeDeferred(run, actions, session, actor)
        d.addCallbacks(self._done, self._failed, callbackArgs=(request, action, session_id),
                       errbackArgs=(request, action, session_id))
        d.addCallback(lambda body: None if gone else self._finish(request, body))
        return NOT_DONE_YET

    def _prepare(self, action: str, body: dict[str, Any]
                 ) -> Callable[[SessionActions, Session, Actor], Any]:
        """What the action will do, its body checked (BadRequestError)."""
        if action in ("logoff", "disconnect"):
            wait = _field(body, "wait", bool, True)
            if action == "logoff":
                return lambda actions, session, actor: actions.logoff(session, wait, actor)
            return lambda actions, session, actor: actions.disconnect(session, wait, actor)
        title = _field(body, "title", str, "")
        text = _field(body, "text", str, "")
        if not text or len(title) > MAX_MESSAGE_TEXT or len(text) > MAX_MESSAGE_TEXT:
            raise BadRequestError(f"400 a message needs a text; title and text at most "
                                  f"{MAX_MESSAGE_TEXT} characters")
        style = _field(body, "style", int, 0)
        timeout = _field(body, "timeout", int, 0)
        wait = _field(body, "wait", bool, False)
        return lambda actions, session, actor: actions.message(
            session, title, text, style, timeout, wait, actor)

    def _done(self, result: bool | int, request: Request, action: str, session_id: int
              ) -> bytes:
        value: dict[str, Any] = {"ok": bool(result), "session_id": session_id,
                                 "action": action}
        if action == "message":
            value["result"] = int(result)
        code = 200 if result else 502
        if not result:
            value["error"] = "the RDP server did not do it (the bridge's log says why)"
        return _answer(request, value, code)

    def _failed(self, failure: Failure, request: Request, action: str, session_id: int
                ) -> bytes:
        if failure.check(NoClientError):
            return _answer(request, {"ok": False, "session_id": session_id,
                                     "action": action, "error": str(failure.value)}, 409)
        self.log.failure("{action} of session {session_id} failed", failure,
                         action=action, session_id=session_id)
        return _answer(request, {"ok": False, "error": "internal error"}, 500)

    @staticmethod
    def _finish(request: Request, body: bytes) -> None:
        request.write(body)
        request.finish()


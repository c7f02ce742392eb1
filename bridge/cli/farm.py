"""``icp-bridge ctl farm``: the whole farm through any host's admin
endpoint: ``sessions`` (every host, stale ones marked), and ``logoff``,
``disconnect``, ``message`` for a session on any host (HOST SESSION) or
for every session of a user (``--user NAME``). Commands need a FULL token
of the host whose admin endpoint is asked; the command waits ``--within``
seconds for the hosts' answers."""

from __future__ import annotations

import argparse
import http.client
import json
import time
from typing import Any
from urllib.parse import quote

from bridge.cli.common import token
from bridge.sessions.model import state_name


def _request(args: argparse.Namespace, method: str, path: str, body: Any = None,
             timeout: float = 30.0) -> Any:
    from bridge.cli.addresses import admin_connection
    from bridge.cli.events import admin_url

    address, addresses = admin_url(args)
    connection = admin_connection(address, timeout, addresses)
    try:
        headers = {"Authorization": f"Bearer {token(args)}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as e:
        raise SystemExit(f"cannot reach the admin endpoint {address}: {e}") from None
    finally:
        connection.close()
    try:
        value = json.loads(text)
    except ValueError:
        value = {"error": text[:500]}
    if response.status != 200:
        raise SystemExit(f"{path}: {response.status} {response.reason}: "
                         f"{value.get('error', value)}")
    return value


def cmd_sessions(args: argparse.Namespace) -> int:
    view = _request(args, "GET", "/sessions?scope=farm")
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True))
        return 0
    stale = {h["host"] for h in view["hosts"] if h["stale"]}
    for h in view["hosts"]:
        mark = f"STALE (no heartbeat for {h['seconds_since_heartbeat']:g} s)" \
            if h["stale"] else "live"
        print(f"{h['host']}  {mark}  {h['sessions']} sessions")
    rows = []
    for s in view["sessions"]:
        host = s["host"] + (" (stale)" if s["host"] in stale else "")
        user = s["username"] if s["logged_on"] else "(greeter)"
        client = " ".join(x for x in (s["client_name"], s["client_address"]) if x)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["since"])) \
            if s["since"] else ""
        rows.append([host, s["session_id"], state_name(s["state"]) or "", user, client, since])
    header = ["HOST", "SESSION", "STATE", "USER", "CLIENT", "SINCE"]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    print()
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_command(args: argparse.Namespace) -> int:
    if args.user:
        if args.target:
            raise SystemExit(f"farm {args.action}: either HOST SESSION or --user NAME")
        path = f"/farm/users/{quote(args.user, safe='')}/{args.action}"
    else:
        if len(args.target) != 2 or not args.target[1].isdigit():
            raise SystemExit(f"farm {args.action}: HOST SESSION (or --user NAME)")
        host, session = args.target
        path = f"/farm/sessions/{quote(host, safe='')}/{session}/{args.action}"
    body: dict[str, Any] = {"wait": not args.no_wait, "timeout": args.within,
                            "expires": args.expires}
    if args.action == "message":
        body.update(title=args.title, text=args.text, style=args.style,
                    message_timeout=args.message_timeout)
    answer = _request(args, "POST", path, body, timeout=args.within + 15)
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    elif not answer["commands"]:
        print(answer.get("note", "nothing to do"))
    ok = bool(answer["commands"])
    for command in answer["commands"]:
        where = f"{command['host']} session {command['session_id']}"
        result = command["result"] or {}
        if command["state"] == "done":
            done_ok = bool(result.get("ok"))
            ok = ok and done_ok
            detail = "ok" if done_ok else f"failed: {result.get('error', 'refused')}"
            if "answer" in result:
                detail += f" (answer {result['answer']})"
        elif command["state"] == "pending":
            ok = False
            detail = (f"pending: {command['host']} has not answered within {args.within:g} s; "
                      f"it runs if {command['host']} answers within {args.expires:g} s")
        elif command["state"] == "refused":
            ok = False
            detail = f"refused: {result.get('refused', '')}"
        else:
            ok = False
            detail = f"{command['state']}: {command['host']} did not run it in time"
        if not args.json:
            print(f"{where}: {args.action} {detail}")
    return 0 if ok else 1


def add_command(calls: Any) -> None:
    farm = calls.add_parser("farm", help="the whole farm, through the admin endpoint: "
                                         "sessions; logoff, disconnect, message anywhere")
    farm.add_argument("--admin", metavar="URL",
                      help="any host's admin endpoint [default: admin_endpoint of the bridge's "
                           "configuration (ctl --config), http://127.0.0.1:9092]")
    farm.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="print JSON")
    verbs = farm.add_subparsers(dest="farm_call", required=True)
    verbs.add_parser("sessions", help="every host (stale ones marked) and every session"
                     ).set_defaults(func=cmd_sessions)
    for action in ("logoff", "disconnect", "message"):
        c = verbs.add_parser(action, help=f"{action} HOST SESSION, or every session of "
                                          f"--user NAME")
        c.add_argument("target", nargs="*", metavar="HOST SESSION")
        c.add_argument("--user", help="every session of this user, on every host")
        c.add_argument("--within", type=float, default=10.0,
                       help="seconds to wait for the hosts [default: %(default)s]")
        c.add_argument("--expires", type=float, default=300.0,
                       help="seconds a command for a host that is away stays pending "
                            "[default: %(default)s]")
        c.add_argument("--no-wait", action="store_true",
                       help="do not wait for the RDP server's answer")
        if action == "message":
            c.add_argument("--title", required=True)
            c.add_argument("--text", required=True)
            c.add_argument("--style", type=int, default=0)
            c.add_argument("--timeout", dest="message_timeout", type=int, default=0,
                           help="seconds the box stays [default: until answered]")
        c.set_defaults(func=cmd_command, action=action)

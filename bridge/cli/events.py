"""``icp-bridge ctl events``: the session events from the admin endpoint's
``/events`` (Server-Sent Events), all the journal keeps or, following, the
new ones as they come, resuming by id when the bridge restarts."""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from bridge.cli.addresses import BridgeAddresses, admin_connection, bridge_addresses
from bridge.cli.common import token
from bridge.cli.decode import iso
from bridge.cli.otsclient import EXIT_USAGE, CtlError, unreachable
from protocols.logtext import escaped


def _sse_blocks(response: Any) -> Iterator[dict[str, str]]:
    """The events of a text/event-stream response, as field -> value."""
    block: dict[str, str] = {}
    for raw in response:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if block:
                yield block
            block = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            block[name] = block[name] + "\n" + value if name in block else value


def _event_line(event: dict[str, Any]) -> str:
    """One journal event for people. Events of no session (session_id 0:
    failed logons, lockouts) name no session."""
    states = ""
    if event.get("old_state_name") and event.get("new_state_name") \
            and event["old_state_name"] != event["new_state_name"]:
        states = f" {event['old_state_name']} -> {event['new_state_name']}"
    user = f" {event['username']}" if event.get("username") else ""
    reason = f" ({event['reason']})" if event.get("reason") else ""
    session = f"session {event['session_id']} " if event.get("session_id") else ""
    host = f" {event['host']}#{event['local_id']}" if "host" in event else ""
    # A user name or a reason may hold what a client typed: one line, no
    # escape sequence reaches the terminal (protocols.logtext).
    return escaped(f"#{event['id']}{host} {iso(event['time'])} {session}{event['event']}{user}"
                   f"{states}{reason}")


def admin_url(args: argparse.Namespace) -> tuple[str, BridgeAddresses | None]:
    """``--admin``, else the admin endpoint of the bridge's configuration
    (``ctl --config``); with what that configuration says (for https)."""
    if args.admin is not None and not args.admin.startswith("https:"):
        return args.admin, None
    addresses = None
    try:
        addresses = bridge_addresses(args.config)
    except CtlError:
        if args.admin is None:
            raise
    if args.admin is not None:
        return args.admin, addresses  # https: the certificate it names, if it does
    url = addresses.admin_url() if addresses is not None else None
    if url is None:
        raise CtlError(f"the bridge's configuration has no admin endpoint ctl can reach "
                       f"(admin_endpoint = {addresses.admin_endpoint if addresses else ''!r}"
                       f"): give --admin URL", EXIT_USAGE)
    return url, addresses


def cmd_events(args: argparse.Namespace) -> int:
    admin_token = token(args)
    address, addresses = admin_url(args)
    url = urlsplit(address if "//" in address else f"http://{address}")
    # Without --after: everything the journal keeps, or with --follow only new ones.
    last: int | None = args.after if args.after is not None else (None if args.follow else 0)
    delay = 1.0
    while True:
        query = {} if last is None else {"after": str(last)}
        if args.farm:
            query["scope"] = "farm"
        if not args.follow:
            query["once"] = "1"
        connection = admin_connection(address, None if args.follow else args.timeout,
                                      addresses)
        try:
            connection.request("GET", "/events?" + urlencode(query),
                               headers={"Authorization": f"Bearer {admin_token}"})
            response = connection.getresponse()
            if response.status != 200:
                body = response.read(2000).decode("utf-8", "replace")
                try:
                    body = json.loads(body).get("error", body)
                except ValueError:
                    pass
                raise CtlError(f"/events: {response.status} {response.reason}: {body}")
            delay = 1.0
            for block in _sse_blocks(response):
                if block.get("event") == "resync":
                    print(f"note: {json.loads(block['data'])['reason']}", file=sys.stderr)
                if block.get("event") != "session" or "data" not in block:
                    continue
                event = json.loads(block["data"])
                last = event["id"]
                print(json.dumps({**event, "time": iso(event["time"])}, sort_keys=True)
                      if args.json else _event_line(event), flush=True)
        except (OSError, http.client.HTTPException) as e:
            if not args.follow:
                where = f"{url.hostname}:{url.port or 9092}"
                if isinstance(e, ConnectionRefusedError):
                    raise unreachable(f"admin endpoint not listening at {where} (connection "
                                      f"refused)") from None
                raise unreachable(f"cannot read events from {where}: {e}") from None
            print(f"events: {e or type(e).__name__}; trying again in {delay:g} s",
                  file=sys.stderr)
            time.sleep(delay)
            delay = min(10.0, delay * 2)
            continue
        finally:
            connection.close()
        if not args.follow:
            return 0
        # The bridge ended the stream (it stopped): resume after the last id.
        time.sleep(delay)


def add_command(calls: Any) -> None:
    c = calls.add_parser("events", help="session events from the admin endpoint's journal")
    c.add_argument("--admin", metavar="URL",
                   help="the admin endpoint [default: admin_endpoint of the bridge's "
                        "configuration (ctl --config), http://127.0.0.1:9092]")
    c.add_argument("--after", type=int,
                   help="start after this event id [default: the oldest kept; with --follow, "
                        "only new events]")
    c.add_argument("--follow", action="store_true",
                   help="keep printing new events (resuming by id across restarts)")
    c.add_argument("--farm", action="store_true",
                   help="the farm journal: every host's events, in the farm's order")
    c.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="one JSON object per line")
    c.set_defaults(func=cmd_events)

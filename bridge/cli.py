"""The ``icp-bridge`` command: ``users``, ``ctl`` and ``peer``.

(The service itself runs under twistd: ``twistd -n icp-bridge``.)
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from bridge.config import default_users_file
from bridge.security.auth import (
    UserEntry,
    UsersFileError,
    check_username,
    hash_password,
    read_users,
    write_users,
)
from bridge.security.permissions import LEVELS, level_name

TOKEN_ENV = "ICP_BRIDGE_TOKEN"  # noqa: S105 - the variable name, not a secret


def _read_password(prompt: str) -> str:
    """From the terminal without echo, else the first line of stdin."""
    if sys.stdin.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("again: ") != first:
            raise SystemExit("passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


# -- users -------------------------------------------------------------------

def cmd_lockouts(args: argparse.Namespace) -> int:
    """List or clear failed-logon lockouts in the state database (the
    running bridge sees a cleared one at its next logon attempt)."""
    import time

    from bridge.config import default_state_dir
    from bridge.security.throttle import LockoutStore, source_key, user_key

    path = (Path(args.state) if args.state else default_state_dir()) / "state.sqlite3"
    if not path.exists():
        print(f"no state database at {path}", file=sys.stderr)
        return 1
    store = LockoutStore(path)
    try:
        if args.action == "lockouts":
            now = time.time()
            rows = [(key, count) for key, count in sorted(store.load().items())
                    if count.locked_until > now or args.all]
            if not rows:
                print("no lockouts")
            for key, count in rows:
                left = max(0, count.locked_until - now)
                print(f"{key}\t{count.failures} failures\t"
                      f"{'locked ' + format(left, '.0f') + ' s more' if left else 'not locked'}")
            return 0
        key = source_key(args.source) if args.source else user_key(args.name or "")
        if store.delete(key):
            print(f"unlocked {key}")
            return 0
        print(f"no lockout for {key}", file=sys.stderr)
        return 1
    finally:
        store.close()


def cmd_users(args: argparse.Namespace) -> int:
    if args.action in ("lockouts", "unlock"):
        return cmd_lockouts(args)
    path = Path(args.users) if args.users else default_users_file()
    try:
        users = read_users(path)
        if args.action == "list":
            if not users:
                print(f"no users in {path}")
            for entry in users.values():
                print(f"{entry.name}\t{level_name(entry.permission)}")
            return 0
        check_username(args.name)
        if args.action == "add":
            password = _read_password(f"password for {args.name}: ")
            if not password:
                raise SystemExit("empty password refused")
            users[args.name] = UserEntry(args.name, LEVELS[args.permission],
                                         hash_password(password, n=args.scrypt_n))
            write_users(path, users.values())
            print(f"user {args.name} ({args.permission}) saved in {path}")
        else:
            if users.pop(args.name, None) is None:
                print(f"no user {args.name} in {path}", file=sys.stderr)
                return 1
            write_users(path, users.values())
            print(f"user {args.name} removed from {path}")
    except UsersFileError as e:
        print(f"icp-bridge users: {e}", file=sys.stderr)
        return 1
    return 0


# -- ctl -----------------------------------------------------------------------

INFO_CLASSES = {
    "SessionId": 4, "UserName": 5, "WinStationName": 6, "DomainName": 7, "ConnectState": 8,
    "ClientBuildNumber": 9, "ClientName": 10, "ClientProductId": 12, "ClientHardwareId": 13,
    "ClientAddress": 14, "ClientDisplay": 15, "ClientProtocolType": 16, "LogonTime": 18,
    "SessionInfo": 24,
}
STATES = ["Active", "Connected", "ConnectQuery", "Shadow", "Disconnected", "Idle", "Listen",
          "Reset", "Down", "Init"]


def _default_certificate() -> Path:
    """The bridge's certificate where it keeps it by default (its
    ssl.certificate property unless set otherwise)."""
    from bridge.config import default_state_dir
    from bridge.security.tls import default_pair

    return default_pair(os.geteuid() == 0, default_state_dir())[0]


def _client(args: argparse.Namespace) -> tuple[Any, Any]:
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TSocket, TSSLSocket, TTransport

    from protocols.generated.otsapi_blocking import otsapi

    if not args.plain:
        import ssl

        kwargs: dict[str, Any] = {"host": args.host, "port": args.port}
        if args.insecure:
            kwargs["cert_reqs"] = ssl.CERT_NONE
        else:
            # The bridge's certificate is self-signed: trust exactly it.
            cafile = Path(args.cafile) if args.cafile else _default_certificate()
            if not cafile.exists():
                raise SystemExit(
                    f"no certificate at {cafile} to verify the bridge with: pass --cafile "
                    f"(its ssl.certificate), --insecure, or --plain for a tcp: endpoint")
            kwargs["ca_certs"] = str(cafile)
        socket = TSSLSocket.TSSLSocket(**kwargs)
    else:
        socket = TSocket.TSocket(args.host, args.port)
    socket.setTimeout(args.timeout * 1000)
    transport = TTransport.TFramedTransport(socket)
    client = otsapi.Client(TBinaryProtocol.TBinaryProtocolAccelerated(transport))
    transport.open()
    return client, transport


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        raise SystemExit(f"this command needs a token: --token or ${TOKEN_ENV} "
                         f"(get one with `icp-bridge ctl logon USER`)")
    return token


def _display(value: Any) -> Any:
    """A Thrift struct as plain data."""
    if hasattr(value, "thrift_spec"):
        return {k: _display(v) for k, v in vars(value).items() if v is not None}
    if isinstance(value, list):
        return [_display(v) for v in value]
    return value


def _table(rows: list[list[Any]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def cmd_ctl(args: argparse.Namespace) -> int:
    client, transport = _client(args)
    try:
        result, text = args.run(client, args)
    finally:
        transport.close()
    if args.json:
        print(json.dumps(_display(result), indent=2, sort_keys=True))
    else:
        print(text)
    return 0


def _ctl_ping(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    value = client.ping(args.value)
    return value, f"pong {value}"


def _ctl_version(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    from protocols.generated.otsapi_blocking.ttypes import TVersion

    v = client.getVersionInfo(TVersion(1, 1))
    return v, f"OTS API {v.VersionMajor}.{v.VersionMinor}"


def _ctl_logon(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    password = _read_password(f"password for {args.user}: ")
    r = client.logonConnection(args.user, password, args.domain)
    if not r.success:
        raise SystemExit("logon failed")
    return r, r.authToken


def _ctl_permission(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    flags = client.getPermissionForToken(_token(args))
    return flags, f"0x{flags:03x} ({level_name(flags)})" if flags else "0 (unknown token)"


def _ctl_sessions(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    r = client.enumerateSessions(_token(args), 1)
    if not r.returnValue:
        raise SystemExit("enumerateSessions refused (token unknown or lacks QUERY_INFORMATION)")
    rows = []
    for info in r.sessionInfoList:
        user = client.querySessionInformation(_token(args), info.sessionId, 5)
        rows.append([info.sessionId, STATES[info.connectState] if 0 <= info.connectState < 10
                     else info.connectState, info.winStationName,
                     user.infoValue.stringValue if user.returnValue else ""])
    return r, _table(rows, ["SESSION", "STATE", "WINSTATION", "USER"]) if rows else "no sessions"


def _ctl_query(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    names = args.info or ["SessionInfo"]
    results, lines = {}, []
    for name in names:
        number = INFO_CLASSES.get(name)
        if number is None:
            number = int(name) if name.lstrip("-").isdigit() else None
        if number is None:
            raise SystemExit(f"unknown info class {name}; one of {', '.join(INFO_CLASSES)}")
        r = client.querySessionInformation(_token(args), args.session, number)
        value = _display(r.infoValue) if r.returnValue else None
        results[name] = value
        lines.append(f"{name}: {value if r.returnValue else '(not available)'}")
    return results, "\n".join(lines)


def _ctl_vc_open(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    flags = args.flags | (1 if args.dynamic else 0)
    r = client.virtualChannelOpen(_token(args), args.session, args.name, args.dynamic, flags)
    if not r.pipeName:
        raise SystemExit("virtualChannelOpen failed")
    return r, f"pipe {r.pipeName} instance {r.instance}"


def _ctl_bool(method: str) -> Callable[[Any, argparse.Namespace], tuple[Any, str]]:
    def run(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
        if method == "virtualChannelClose":
            ok = client.virtualChannelClose(_token(args), args.session, args.name, args.instance)
        else:
            ok = getattr(client, method)(_token(args), args.session, args.wait)
        if not ok:
            raise SystemExit(f"{method} failed")
        return ok, "ok"

    return run


def _ctl_message(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    r = client.sendMessage(_token(args), args.session, args.title, args.text, args.style,
                           args.message_timeout, args.wait)
    if r == 0:
        raise SystemExit("sendMessage failed")
    return r, f"result {r}"


# -- peer ----------------------------------------------------------------------

def cmd_peer(args: argparse.Namespace) -> int:
    from twisted.internet import task
    from twisted.internet.defer import Deferred, ensureDeferred
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from bridge.rdp.standin import StandInRdpServer

    password = _read_password(f"password for {args.user}: ") if args.user else ""
    if not args.quiet:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    statuses = {0: "AUTH_SUCCESSFUL", 1: "AUTH_BAD_CREDENTIALS", 2: "AUTH_WRONG_SESSION_STATE",
                3: "AUTH_UNKNOWN_ERROR"}

    async def run(reactor: Any) -> None:
        peer = StandInRdpServer(reactor, answer_delay=args.delay,
                                pipe_dir=Path(args.pipe_dir) if args.pipe_dir else None)
        proto = await peer.connect(f"unix:{args.socket}")
        print(f"connected to {args.socket}, ICP {proto.peer_version[0]}.{proto.peer_version[1]}",
              flush=True)
        for connection_id in range(args.first_connection,
                                   args.first_connection + args.connections):
            direct = args.direct or not args.user
            r = await peer.logon(connection_id, args.user if direct else "",
                                 password if direct else "", args.domain)
            who = args.user if direct and args.user else "(greeter)"
            print(f"connection {connection_id}: logon {who} -> {r.serviceEndpoint} "
                  f"({r.maxWidth}x{r.maxHeight})", flush=True)
            if not direct:
                status = await peer.greeter_login(connection_id, args.user, password,
                                                  args.domain)
                connection = peer.connections.get(connection_id)
                endpoint = connection.service_endpoint if connection is not None else "?"
                print(f"connection {connection_id}: greeter login {args.user}: "
                      f"{statuses.get(status, status)}; now on {endpoint}", flush=True)
        if args.once:
            peer.close()
            return
        print("answering the bridge's requests; Ctrl-C to stop", flush=True)
        closed: Deferred[Any] = proto.when_closed()
        reason = await closed
        print(f"bridge closed the connection: {reason}", flush=True)

    task.react(lambda reactor: ensureDeferred(run(reactor)))
    return 0


# -- ctl events: the admin endpoint's /events ---------------------------------------

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
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    states = ""
    if event.get("old_state_name") and event.get("new_state_name") \
            and event["old_state_name"] != event["new_state_name"]:
        states = f" {event['old_state_name']} -> {event['new_state_name']}"
    user = f" {event['username']}" if event.get("username") else ""
    reason = f" ({event['reason']})" if event.get("reason") else ""
    return f"#{event['id']} {when} session {event['session_id']} {event['event']}{user}" \
           f"{states}{reason}"


def cmd_events(args: argparse.Namespace) -> int:
    token = _token(args)
    url = urlsplit(args.admin if "//" in args.admin else f"http://{args.admin}")
    if url.scheme != "http" or not url.hostname:
        raise SystemExit(f"--admin: expected http://HOST:PORT, got {args.admin!r}")
    # Without --after: everything the journal keeps, or with --follow only new ones.
    last: int | None = args.after if args.after is not None else (None if args.follow else 0)
    delay = 1.0
    while True:
        query = {} if last is None else {"after": str(last)}
        if not args.follow:
            query["once"] = "1"
        connection = http.client.HTTPConnection(url.hostname, url.port or 9092,
                                                timeout=None if args.follow else args.timeout)
        try:
            connection.request("GET", "/events?" + urlencode(query),
                               headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            if response.status != 200:
                body = response.read(2000).decode("utf-8", "replace")
                try:
                    body = json.loads(body).get("error", body)
                except ValueError:
                    pass
                raise SystemExit(f"/events: {response.status} {response.reason}: {body}")
            delay = 1.0
            for block in _sse_blocks(response):
                if block.get("event") == "resync":
                    print(f"note: {json.loads(block['data'])['reason']}", file=sys.stderr)
                if block.get("event") != "session" or "data" not in block:
                    continue
                event = json.loads(block["data"])
                last = event["id"]
                print(json.dumps(event, sort_keys=True) if args.json else _event_line(event),
                      flush=True)
        except (OSError, http.client.HTTPException) as e:
            if not args.follow:
                raise SystemExit(f"cannot read events from {args.admin}: {e}") from None
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


# -- backend and state ---------------------------------------------------------

def cmd_backend(args: argparse.Namespace) -> int:
    from bridge.backends import standin as standin_backend

    return standin_backend.main(args.backend_args)


def cmd_state(args: argparse.Namespace) -> int:
    from bridge.config import default_state_dir
    from bridge.state.store import check

    path = Path(args.file) if args.file else default_state_dir() / "state.sqlite3"
    problems = check(path)
    if problems:
        for problem in problems:
            print(f"{path}: {problem}")
        return 1
    print(f"{path}: sound")
    return 0


# -- argument parsing ------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icp-bridge",
        description="Tools for icp-bridge (the service runs as `twistd -n icp-bridge`).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    users = commands.add_parser("users", help="manage the users file")
    user_actions = users.add_subparsers(dest="action", required=True)
    add = user_actions.add_parser("add", help="add or change a user (password on stdin)")
    add.add_argument("name")
    add.add_argument("--permission", choices=sorted(LEVELS), required=True)
    # Tests use a cheap cost; operators keep the default.
    add.add_argument("--scrypt-n", type=int, default=2**15, help=argparse.SUPPRESS)
    listing = user_actions.add_parser("list", help="list users and their permission level")
    remove = user_actions.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    for action in (add, listing, remove):
        action.add_argument("--users", help=f"users file [default: {default_users_file()}]")
    lockouts = user_actions.add_parser(
        "lockouts", help="users and client addresses locked out after failed logons")
    lockouts.add_argument("--all", action="store_true", help="also counts not locked yet")
    unlock = user_actions.add_parser("unlock", help="clear a lockout (user, or --source ADDR)")
    unlock.add_argument("name", nargs="?")
    unlock.add_argument("--source", help="a client address instead of a user")
    for action in (lockouts, unlock):
        action.add_argument("--state", help="state directory [default: the service's]")
    users.set_defaults(func=cmd_users)

    ctl = commands.add_parser("ctl", help="call the OTS API (admin client)")
    ctl.add_argument("--host", default="127.0.0.1")
    ctl.add_argument("--port", type=int, default=9091)
    ctl.add_argument("--plain", action="store_true",
                     help="plain TCP instead of TLS (for a tcp: thrift_endpoint)")
    ctl.add_argument("--tls", action="store_true", help=argparse.SUPPRESS)  # the default now
    ctl.add_argument("--cafile", help="certificate to verify the bridge with "
                                      "[default: the bridge's own ssl.certificate]")
    ctl.add_argument("--insecure", action="store_true", help="TLS without verification")
    ctl.add_argument("--timeout", type=float, default=30.0, help="socket timeout, seconds")
    ctl.add_argument("--token", help=f"auth token [default: ${TOKEN_ENV}]")
    ctl.add_argument("--json", action="store_true", help="print JSON")
    ctl.set_defaults(func=cmd_ctl)
    calls = ctl.add_subparsers(dest="call", required=True)

    c = calls.add_parser("ping", help="echo a number")
    c.add_argument("value", type=int, nargs="?", default=1)
    c.set_defaults(run=_ctl_ping)
    calls.add_parser("version", help="OTS API version").set_defaults(run=_ctl_version)
    c = calls.add_parser("logon", help="get a token (password on stdin); prints it")
    c.add_argument("user")
    c.add_argument("--domain", default="")
    c.set_defaults(run=_ctl_logon)
    calls.add_parser("permission", help="the token's permission flags").set_defaults(
        run=_ctl_permission)
    calls.add_parser("sessions", help="list sessions").set_defaults(run=_ctl_sessions)
    c = calls.add_parser("query", help="query session information")
    c.add_argument("session", type=int)
    c.add_argument("info", nargs="*", help=f"info classes [default: SessionInfo]: "
                                           f"{', '.join(INFO_CLASSES)}")
    c.set_defaults(run=_ctl_query)
    c = calls.add_parser("vc-open", help="open a virtual channel")
    c.add_argument("session", type=int)
    c.add_argument("name")
    c.add_argument("--dynamic", action="store_true")
    c.add_argument("--flags", type=lambda s: int(s, 0), default=0)
    c.set_defaults(run=_ctl_vc_open)
    c = calls.add_parser("vc-close", help="close a virtual channel")
    c.add_argument("session", type=int)
    c.add_argument("name")
    c.add_argument("instance", type=int)
    c.set_defaults(run=_ctl_bool("virtualChannelClose"))
    for name, method in (("disconnect", "disconnectSession"), ("logoff", "logoffSession")):
        c = calls.add_parser(name, help=f"{name} a session")
        c.add_argument("session", type=int)
        c.add_argument("--wait", action="store_true", help="wait for the RDP server")
        c.set_defaults(run=_ctl_bool(method))
    c = calls.add_parser("message", help="show a message box in a session")
    c.add_argument("session", type=int)
    c.add_argument("title")
    c.add_argument("text")
    c.add_argument("--style", type=int, default=0)
    c.add_argument("--timeout", dest="message_timeout", type=int, default=0)
    c.add_argument("--wait", action="store_true")
    c.set_defaults(run=_ctl_message)

    c = calls.add_parser("events", help="session events from the admin endpoint's journal")
    c.add_argument("--admin", default="http://127.0.0.1:9092",
                   help="the admin endpoint [default: %(default)s]")
    c.add_argument("--after", type=int,
                   help="start after this event id [default: the oldest kept; with --follow, "
                        "only new events]")
    c.add_argument("--follow", action="store_true",
                   help="keep printing new events (resuming by id across restarts)")
    c.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                   help="one JSON object per line")
    c.set_defaults(func=cmd_events)

    peer = commands.add_parser("peer", help="run a stand-in RDP server")
    # The path real RDP servers dial (winpr maps the named pipe there).
    peer.add_argument("--socket", default="/tmp/.pipe/ogon_SessionManager",  # noqa: S108
                      help="the bridge's ICP socket")
    peer.add_argument("--user", help="log this user on (password on stdin)")
    peer.add_argument("--domain", default="")
    peer.add_argument("--connections", type=int, default=1,
                      help="client connections to log on")
    peer.add_argument("--first-connection", type=int, default=1)
    peer.add_argument("--delay", type=float, default=0.0,
                      help="seconds to hold every answer to the bridge")
    peer.add_argument("--direct", action="store_true",
                      help="send the password in LogonUser instead of logging on through "
                           "the greeter (SBP)")
    peer.add_argument("--pipe-dir", default="/tmp/.pipe",  # noqa: S108
                      help="where backend endpoints are (connect to them as ogon does; "
                           "'' to not connect)")
    peer.add_argument("--once", action="store_true", help="log on, then exit")
    peer.add_argument("--quiet", action="store_true", help="no log lines")
    peer.set_defaults(func=cmd_peer)

    backend = commands.add_parser(
        "backend", help="run a stand-in session backend (for [modules.*] in demos and tests)",
        add_help=False)
    backend.add_argument("backend_args", nargs=argparse.REMAINDER)
    backend.set_defaults(func=cmd_backend)

    state = commands.add_parser("state", help="the state database")
    state_actions = state.add_subparsers(dest="action", required=True)
    state_check = state_actions.add_parser("check", help="say whether a state database is sound")
    state_check.add_argument("file", nargs="?", help="[default: <state_dir>/state.sqlite3]")
    state.set_defaults(func=cmd_state)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from thrift.Thrift import TException

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, TException) as e:
        print(f"icp-bridge {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``icp-bridge ctl``: an OTS API client for admins (ping, version, logon,
sessions, query, vc-open, vc-close, disconnect, logoff, message; events is
in ``bridge.cli.events``)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.cli import events
from bridge.cli.common import TOKEN_ENV, read_password, token
from bridge.security.permissions import level_name
from bridge.sessions.model import state_name

INFO_CLASSES = {
    "SessionId": 4, "UserName": 5, "WinStationName": 6, "DomainName": 7, "ConnectState": 8,
    "ClientBuildNumber": 9, "ClientName": 10, "ClientProductId": 12, "ClientHardwareId": 13,
    "ClientAddress": 14, "ClientDisplay": 15, "ClientProtocolType": 16, "LogonTime": 18,
    "SessionInfo": 24,
}


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
    password = read_password(f"password for {args.user}: ")
    r = client.logonConnection(args.user, password, args.domain)
    if not r.success:
        raise SystemExit("logon failed")
    return r, r.authToken


def _ctl_permission(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    flags = client.getPermissionForToken(token(args))
    return flags, f"0x{flags:03x} ({level_name(flags)})" if flags else "0 (unknown token)"


def _ctl_sessions(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    r = client.enumerateSessions(token(args), 1)
    if not r.returnValue:
        raise SystemExit("enumerateSessions refused (token unknown or lacks QUERY_INFORMATION)")
    rows = []
    for info in r.sessionInfoList:
        user = client.querySessionInformation(token(args), info.sessionId, 5)
        rows.append([info.sessionId, state_name(info.connectState), info.winStationName,
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
        r = client.querySessionInformation(token(args), args.session, number)
        value = _display(r.infoValue) if r.returnValue else None
        results[name] = value
        lines.append(f"{name}: {value if r.returnValue else '(not available)'}")
    return results, "\n".join(lines)


def _ctl_vc_open(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    flags = args.flags | (1 if args.dynamic else 0)
    r = client.virtualChannelOpen(token(args), args.session, args.name, args.dynamic, flags)
    if not r.pipeName:
        raise SystemExit("virtualChannelOpen failed")
    return r, f"pipe {r.pipeName} instance {r.instance}"


def _ctl_bool(method: str) -> Callable[[Any, argparse.Namespace], tuple[Any, str]]:
    def run(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
        if method == "virtualChannelClose":
            ok = client.virtualChannelClose(token(args), args.session, args.name, args.instance)
        else:
            ok = getattr(client, method)(token(args), args.session, args.wait)
        if not ok:
            raise SystemExit(f"{method} failed")
        return ok, "ok"

    return run


def _ctl_message(client: Any, args: argparse.Namespace) -> tuple[Any, str]:
    r = client.sendMessage(token(args), args.session, args.title, args.text, args.style,
                           args.message_timeout, args.wait)
    if r == 0:
        raise SystemExit("sendMessage failed")
    return r, f"result {r}"


def add_commands(commands: Any) -> None:
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

    events.add_command(calls)

"""``icp-bridge ctl``: an OTS API client for admins (ping, version, logon,
permission, sessions, query, vc-open, vc-close, disconnect, logoff,
message, shadow, unshadow; events is in ``bridge.cli.events``).

What it prints is decoded (``bridge.cli.decode``): names, not numbers;
ISO times; ``--json`` carries every field. Every failure says why on
stderr and exits non-zero (``bridge.cli.otsclient``: 1 for a refused or
failed call, 3 when the bridge cannot be reached). The commands that act
on a user's sessions (``--user``) or on all of them (``--all``) do what
ogon's CLI does with ``--logoffUser``/``--disconnectUser``: one call per
session, a line per session, non-zero if any failed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bridge.cli import events, farm
from bridge.cli.addresses import bridge_addresses
from bridge.cli.common import TOKEN_ENV, read_password, token
from bridge.cli.decode import (
    INFO_CLASSES,
    INFO_NAMES,
    duration,
    info_value,
    message_result,
    message_style,
    text,
    unix_time,
)
from bridge.cli.otsclient import EXIT_USAGE, CtlError, OtsClient, Target
from bridge.security.permissions import Permission, level_name
from bridge.sessions.model import ConnectState, state_name

#: VK_F10 with REMOTECONTROL_KBDCTRL_HOTKEY: what ogon's CLI shadows with
#: (Ctrl+F10 ends the shadowing).
SHADOW_HOTKEY_VK = 0x79
SHADOW_HOTKEY_MODIFIERS = 0x2
#: Sessions messaged at once by ``message --all --wait`` (one connection each).
MESSAGE_PARALLEL = 16


class Ctl:
    """One ``ctl`` run: its arguments, its connection, its token."""

    def __init__(self, args: argparse.Namespace, target: Target) -> None:
        self.args = args
        self.target = target
        self.client = OtsClient(target)

    def token(self) -> str:
        return token(self.args)

    def another_client(self) -> OtsClient:
        return OtsClient(self.target)

    def why_refused(self, method: str, session_id: int | None = None,
                    flag: Permission | None = None, otherwise: str | None = None
                    ) -> CtlError:
        """Why the bridge answered ``method`` with its failure value, as far
        as the OTS API lets us tell (it answers no reasons; the bridge's log
        has them); ``otherwise`` when neither the token nor the session is
        the reason."""
        client, auth = self.client, self.token()
        flags = client.getPermissionForToken(auth)
        if not flags:
            return CtlError(f"{method}: the token is unknown or expired (get one with "
                            f"`icp-bridge ctl logon USER`)")
        sessions = None
        if flags & Permission.QUERY_INFORMATION:
            listed = client.enumerateSessions(auth, 1)
            if listed.returnValue:
                sessions = {s.sessionId: s for s in listed.sessionInfoList}
        if session_id is not None and sessions is not None and session_id not in sessions:
            return CtlError(f"{method}: no session {session_id}")
        if flag is not None and not flags & flag:
            return CtlError(f"{method}: refused: the token ({level_name(flags)}) lacks "
                            f"{flag.name} and does not own session {session_id}")
        if session_id is not None and sessions is not None \
                and sessions[session_id].connectState == ConnectState.DISCONNECTED:
            return CtlError(f"{method}: session {session_id} is Disconnected (no client)")
        if otherwise is not None:
            return CtlError(f"{method}: {otherwise}")
        return CtlError(f"{method} failed: the bridge refused it or the RDP server did not "
                        f"do it (the bridge's log says why)")


def _target(args: argparse.Namespace) -> Target:
    """Where the OTS API is and how to verify it: the flags, and for what
    they leave open the bridge's own configuration (``--config``):
    thrift_endpoint's port and kind, the certificate it serves."""
    explicit = args.port is not None and (args.plain or args.insecure or args.cafile)
    addresses = None if explicit else bridge_addresses(args.config)
    otsapi = addresses.otsapi if addresses is not None else None
    if addresses is not None and otsapi is None:
        raise CtlError(f"thrift_endpoint {addresses.otsapi_endpoint!r} "
                       f"({', '.join(addresses.files) or 'the default'}) is not a TCP or TLS "
                       f"endpoint ctl can dial: give --port", EXIT_USAGE)
    port = args.port if args.port is not None else otsapi.port  # type: ignore[union-attr]
    plain = args.plain or (otsapi is not None and not otsapi.tls and not args.cafile
                           and not args.insecure)
    cafile, cafile_from = None, "--cafile"
    if not plain and not args.insecure:
        # The bridge's certificate is self-signed: trust exactly it.
        if args.cafile:
            cafile = Path(args.cafile)
        elif otsapi is not None and otsapi.certificate is not None:
            cafile, cafile_from = otsapi.certificate, otsapi.certificate_from
        if cafile is None or not cafile.exists():
            where = f" at {cafile} ({cafile_from})" if cafile is not None else ""
            raise CtlError(f"no certificate{where} to verify the bridge with: pass --cafile "
                           f"(its ssl.certificate), --insecure, or --plain for a tcp: endpoint")
    host = args.host or (otsapi.host if otsapi is not None else "127.0.0.1")
    return Target(host, port, args.timeout, plain=plain, insecure=args.insecure, cafile=cafile,
                  cafile_from=cafile_from)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    return "\n".join(lines)


def cmd_ctl(args: argparse.Namespace) -> int:
    ctl = Ctl(args, _target(args))
    try:
        result, lines, status = _outcome(args.run(ctl, args))
    finally:
        ctl.client.close()
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif lines:
        print(lines)
    return status


def _outcome(value: tuple[Any, ...]) -> tuple[Any, str, int]:
    """A command's (json, text) or (json, text, exit status)."""
    if len(value) == 2:
        return value[0], value[1], 0
    return value[0], value[1], value[2]


# -- simple calls ----------------------------------------------------------------------

def _ctl_ping(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str]:
    value = ctl.client.ping(args.value)
    return {"pong": value}, f"pong {value}"


def _ctl_version(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str]:
    from protocols.generated.otsapi_blocking.ttypes import TVersion

    v = ctl.client.getVersionInfo(TVersion(1, 1))
    return ({"major": v.VersionMajor, "minor": v.VersionMinor},
            f"OTS API {v.VersionMajor}.{v.VersionMinor}")


def _ctl_logon(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str]:
    password = read_password(f"password for {args.user}: ")
    r = ctl.client.logonConnection(args.user, password, args.domain)
    if not r.success:
        raise CtlError(f"logon of {args.user} refused: wrong user name or password, locked "
                       f"out after failed logons, or not allowed to log on (the bridge's log "
                       f"says which)")
    return {"token": r.authToken, "user": args.user, "domain": args.domain}, r.authToken


def _permissions(flags: int) -> list[str]:
    return [flag.name for flag in Permission if flags & flag and flag.name]


def _ctl_permission(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str]:
    flags = ctl.client.getPermissionForToken(ctl.token())
    if not flags:
        raise CtlError("the token is unknown or expired")
    names = _permissions(flags)
    return ({"flags": flags, "level": level_name(flags), "permissions": names},
            f"0x{flags:03x} ({level_name(flags)}): {' '.join(names)}")


# -- sessions ----------------------------------------------------------------------------

def _query(client: OtsClient, auth: str, session_id: int, name: str) -> Any:
    """A decoded querySessionInformation answer, or None (not answered)."""
    r = client.querySessionInformation(auth, session_id, INFO_CLASSES[name])
    return info_value(INFO_CLASSES[name], r.infoValue) if r.returnValue else None


def session_rows(ctl: Ctl) -> list[dict[str, Any]]:
    """Every session as enumerateSessions and querySessionInformation
    (WTSSessionInfo, WTSClientName, WTSClientAddress) give it; None where
    the bridge does not answer. WTSIdleTime is not asked: the bridge, like
    ogon, knows no input times and would log a refusal for each session;
    the idle time comes from WTSSessionInfo's LastInputTime when a server
    fills it in."""
    client, auth = ctl.client, ctl.token()
    r = client.enumerateSessions(auth, 1)
    if not r.returnValue:
        raise ctl.why_refused("enumerateSessions", flag=Permission.QUERY_INFORMATION)
    rows = []
    for entry in sorted(r.sessionInfoList, key=lambda s: s.sessionId):
        session_id = entry.sessionId
        answer = client.querySessionInformation(auth, session_id, INFO_CLASSES["SessionInfo"])
        raw = answer.infoValue.WTSINFO if answer.returnValue else None
        info = info_value(INFO_CLASSES["SessionInfo"], answer.infoValue) if raw else {}
        state = state_name(entry.connectState)
        since = info.get("DisconnectTime") if state == "Disconnected" else \
            info.get("ConnectTime") or info.get("LogonTime")
        idle = _idle_from_input_time(raw)
        # A Disconnected session has no client to ask about.
        client_attached = state != "Disconnected"
        rows.append({
            "session_id": session_id, "state": state, "winstation": entry.winStationName,
            "user": info.get("UserName") or "", "domain": info.get("Domain") or "",
            "client_name": _query(client, auth, session_id, "ClientName")
            if client_attached else None,
            "client_address": _query(client, auth, session_id, "ClientAddress")
            if client_attached else None,
            "since": since, "idle_seconds": idle,
            "connect_time": info.get("ConnectTime"),
            "disconnect_time": info.get("DisconnectTime"),
            "logon_time": info.get("LogonTime"),
            "last_input_time": info.get("LastInputTime"),
        })
    return rows


def _idle_from_input_time(wtsinfo: Any) -> float | None:
    """CurrentTime - LastInputTime of WTSSessionInfo, when it has one."""
    if wtsinfo is None:
        return None
    current, last = unix_time(wtsinfo.CurrentTime), unix_time(wtsinfo.LastInputTime)
    if current is None or last is None:
        return None
    return max(0.0, current - last)


def _ctl_sessions(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str]:
    rows = session_rows(ctl)
    table = [[row["session_id"], row["state"], text(row["user"]), text(row["client_name"]),
              text(row["client_address"]), text(row["since"]),
              text(duration(row["idle_seconds"]))] for row in rows]
    header = ["SESSION", "STATE", "USER", "CLIENT", "ADDRESS", "SINCE", "IDLE"]
    return {"sessions": rows}, _table(table, header) if rows else "no sessions"


def _info_class(name: str) -> tuple[str, int]:
    if name in INFO_CLASSES:
        return name, INFO_CLASSES[name]
    if name.lstrip("-").isdigit():
        number = int(name)
        return INFO_NAMES.get(number, name), number
    raise CtlError(f"unknown info class {name}; one of {', '.join(INFO_CLASSES)} or a number")


def _ctl_query(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str, int]:
    client, auth = ctl.client, ctl.token()
    classes = [_info_class(name) for name in args.info or ["SessionInfo"]]
    results: dict[str, Any] = {}
    lines, missing = [], []
    for name, number in classes:
        r = client.querySessionInformation(auth, args.session, number)
        if not r.returnValue:
            missing.append(name)
            results[name] = None
            lines.append(f"{name}: - (not answered)")
            continue
        value = info_value(number, r.infoValue)
        results[name] = value
        if isinstance(value, dict) and "State" in value:
            lines.append(f"{name}:")
            lines += [f"  {key}: {text(item)}" for key, item in value.items()]
        else:
            lines.append(f"{name}: {text(value)}")
    not_answered = f"not answered for session {args.session}: {', '.join(missing)} (no " \
                   f"client attached, or a class the bridge does not answer)"
    if missing == ["IdleTime"]:
        not_answered = "IdleTime is never answered: the bridge, like ogon, knows no input times"
    if len(missing) == len(classes):
        raise ctl.why_refused("querySessionInformation", args.session,
                              Permission.QUERY_INFORMATION, otherwise=not_answered)
    if missing:
        lines.append(not_answered)
    return {"session_id": args.session, "info": results}, "\n".join(lines), 1 if missing else 0


# -- virtual channels --------------------------------------------------------------------

def _ctl_vc_open(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str]:
    flags = args.flags | (1 if args.dynamic else 0)
    r = ctl.client.virtualChannelOpen(ctl.token(), args.session, args.name, args.dynamic, flags)
    if not r.pipeName:
        raise ctl.why_refused("virtualChannelOpen", args.session, Permission.VIRTUAL_CHANNEL)
    return ({"session_id": args.session, "channel": args.name, "pipe": r.pipeName,
             "instance": r.instance}, f"pipe {r.pipeName} instance {r.instance}")


def _ctl_vc_close(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str]:
    if not ctl.client.virtualChannelClose(ctl.token(), args.session, args.name, args.instance):
        raise ctl.why_refused("virtualChannelClose", args.session, Permission.VIRTUAL_CHANNEL)
    return ({"session_id": args.session, "channel": args.name, "instance": args.instance,
             "closed": True}, f"closed {args.name} instance {args.instance}")


# -- ending sessions ---------------------------------------------------------------------

_ENDINGS = {
    "logoff": ("logoffSession", Permission.LOGOFF, "logged off"),
    "disconnect": ("disconnectSession", Permission.DISCONNECT, "disconnected"),
}


def _ctl_end(action: str) -> Callable[[Ctl, argparse.Namespace], tuple[Any, str, int]]:
    method, flag, done = _ENDINGS[action]

    def run(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str, int]:
        if (args.session is None) == (args.user is None):
            raise CtlError(f"{action}: give a SESSION or --user NAME (not both)")
        if args.session is not None:
            if not getattr(ctl.client, method)(ctl.token(), args.session, args.wait):
                raise ctl.why_refused(method, args.session, flag)
            return ({"session_id": args.session, "action": action, "ok": True},
                    f"session {args.session} {done}", 0)
        return _end_users_sessions(ctl, args, action)

    return run


def _end_users_sessions(ctl: Ctl, args: argparse.Namespace, action: str
                        ) -> tuple[Any, str, int]:
    """ogon's CLI ``--logoffUser``/``--disconnectUser``: every session of
    the user (a Disconnected one is not disconnected again), waiting for
    the RDP server as ogon does."""
    method, flag, done = _ENDINGS[action]
    users = [row for row in session_rows(ctl) if row["user"] == args.user]
    sessions = [row for row in users
                if not (action == "disconnect" and row["state"] == "Disconnected")]
    results, lines = [], []
    for row in sessions:
        session_id = row["session_id"]
        ok = bool(getattr(ctl.client, method)(ctl.token(), session_id, True))
        error = None if ok else str(ctl.why_refused(method, session_id, flag))
        results.append({"session_id": session_id, "ok": ok, "error": error})
        lines.append(f"session {session_id} {done}" if ok else f"session {session_id}: {error}")
    if not users:
        lines.append(f"user {args.user} has no session")
    for row in users:
        if row not in sessions:
            lines.append(f"session {row['session_id']} is Disconnected already")
    failed = sum(not r["ok"] for r in results)
    return ({"user": args.user, "action": action, "sessions": results, "failed": failed,
             "disconnected_already": [row["session_id"] for row in users
                                      if row not in sessions]},
            "\n".join(lines), 1 if failed else 0)


# -- messages ----------------------------------------------------------------------------

def _send(client: OtsClient, auth: str, session_id: int, args: argparse.Namespace) -> int:
    return int(client.sendMessage(auth, session_id, args.title, args.text, args.style,
                                  args.message_timeout, args.wait))


def _ctl_message(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str, int]:
    if (args.session is None) == (not args.all):
        raise CtlError("message: give a SESSION or --all (not both)")
    if not args.all:
        result = _send(ctl.client, ctl.token(), args.session, args)
        if result == 0:
            raise ctl.why_refused("sendMessage", args.session, Permission.MESSAGE)
        return ({"session_id": args.session, "result": result,
                 "result_name": message_result(result)},
                f"session {args.session}: {message_result(result)}", 0)
    # Every session with a client (a Disconnected one has nobody to show it to).
    targets = [row["session_id"] for row in session_rows(ctl)
               if row["state"] != "Disconnected"]

    def one(session_id: int) -> tuple[int, int]:
        # With --wait each box waits for its user: one connection per session.
        if not args.wait:
            return session_id, _send(ctl.client, ctl.token(), session_id, args)
        with ctl.another_client() as client:
            return session_id, _send(client, ctl.token(), session_id, args)

    if args.wait:
        with ThreadPoolExecutor(MESSAGE_PARALLEL) as pool:
            answers = list(pool.map(one, targets))
    else:
        answers = [one(session_id) for session_id in targets]
    results, lines = [], []
    for session_id, result in answers:
        error = str(ctl.why_refused("sendMessage", session_id, Permission.MESSAGE)) \
            if result == 0 else None
        results.append({"session_id": session_id, "result": result,
                        "result_name": message_result(result), "error": error})
        lines.append(f"session {session_id}: {error or message_result(result)}")
    if not targets:
        lines.append("no sessions with a client to message")
    failed = sum(r["result"] == 0 for r in results)
    return {"sessions": results, "failed": failed}, "\n".join(lines), 1 if failed else 0


# -- shadowing ---------------------------------------------------------------------------

def _session_token(args: argparse.Namespace, session_id: int) -> str | None:
    """The session token the bridge wrote for ``session_id``
    (``<token_dir>/ogon.session.<id>``, first line), if we may read it."""
    path = Path(args.token_dir) / f"ogon.session.{session_id}"
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def _ctl_shadow(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str]:
    """startRemoteControlSession: only from the spy's own session, with its
    session token (as WTSAPI does from inside a session)."""
    auth = _session_token(args, args.spy) or ctl.token()
    ok = ctl.client.startRemoteControlSession(auth, args.spy, args.target, args.hotkey_vk,
                                              args.hotkey_modifiers, 0)
    if not ok:
        raise CtlError(
            f"startRemoteControlSession: session {args.spy} cannot shadow session "
            f"{args.target}: it needs session {args.spy}'s own token (read from "
            f"{Path(args.token_dir) / f'ogon.session.{args.spy}'} when readable) with "
            f"REMOTE_CONTROL, and session {args.target} Active (the bridge's log says which)")
    return ({"spy": args.spy, "target": args.target, "ok": True},
            f"session {args.spy} shadows session {args.target}")


def _ctl_unshadow(ctl: Ctl, args: argparse.Namespace) -> tuple[Any, str]:
    auth = (_session_token(args, args.session) if args.token_dir else None) or ctl.token()
    if not ctl.client.stopRemoteControlSession(auth, args.session, 0):
        raise ctl.why_refused("stopRemoteControlSession", args.session,
                              Permission.REMOTE_CONTROL)
    return ({"session_id": args.session, "ok": True},
            f"shadowing of session {args.session} stopped")


# -- the parser ----------------------------------------------------------------------------

def _style(text_value: str) -> int:
    try:
        return message_style(text_value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_commands(commands: Any) -> None:
    from bridge.config import DEFAULT_CONFIG_FILE

    ctl = commands.add_parser(
        "ctl", help="call the OTS API (admin client)",
        description="An OTS API client for admins. Exit status: 0 done, 1 refused or failed "
                    "(the reason on stderr), 2 usage, 3 the bridge not reached.")
    ctl.add_argument("--config", help="the bridge's configuration, read as the bridge reads "
                                      "it (with ogon's config.ini) for what the flags leave "
                                      "open: the OTS API's port and certificate, the admin "
                                      f"endpoint [default: {DEFAULT_CONFIG_FILE} when it "
                                      f"exists]")
    ctl.add_argument("--host", help="[default: the address thrift_endpoint listens on, "
                                    "127.0.0.1 for all]")
    ctl.add_argument("--port", type=int, help="[default: thrift_endpoint's, 9091]")
    ctl.add_argument("--plain", action="store_true",
                     help="plain TCP instead of TLS [default: TLS unless thrift_endpoint is "
                          "tcp:]")
    ctl.add_argument("--tls", action="store_true", help=argparse.SUPPRESS)  # the default now
    ctl.add_argument("--cafile", help="certificate to verify the bridge with [default: the one "
                                      "it serves: its ssl.certificate, or the endpoint's "
                                      "certKey]")
    ctl.add_argument("--insecure", action="store_true", help="TLS without verification")
    ctl.add_argument("--timeout", type=float, default=30.0, help="socket timeout, seconds")
    tokens = ctl.add_mutually_exclusive_group()
    tokens.add_argument("--token-file", metavar="PATH",
                        help="read the auth token from this file (mode 600: one others may "
                             "read or write is refused), or from stdin with '-' "
                             f"[default: ${TOKEN_ENV}]")
    tokens.add_argument("--token", help="the auth token itself (warns: every local user can "
                                        "read a command line)")
    ctl.add_argument("--json", action="store_true", help="print JSON (every field)")
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
    calls.add_parser("sessions", help="list sessions: state, user, client, address, since, "
                                      "idle").set_defaults(run=_ctl_sessions)
    c = calls.add_parser("query", help="query session information (decoded)")
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
    c.set_defaults(run=_ctl_vc_close)
    for name in _ENDINGS:
        c = calls.add_parser(name, help=f"{name} a session, or every session of --user NAME")
        c.add_argument("session", type=int, nargs="?")
        c.add_argument("--user", help=f"{name} every session of this user (as ogon's CLI "
                                      f"--{name}User; waits for the RDP server)")
        c.add_argument("--wait", action="store_true", help="wait for the RDP server")
        c.set_defaults(run=_ctl_end(name))
    c = calls.add_parser("message", help="show a message box in a session, or in all (--all)")
    c.add_argument("session", type=int, nargs="?")
    c.add_argument("title")
    c.add_argument("text")
    c.add_argument("--all", action="store_true",
                   help="every session with a client (Disconnected ones have none)")
    c.add_argument("--style", type=_style, default=0,
                   help="buttons: ok, okcancel, yesno, yesnocancel, retrycancel, "
                        "abortretryignore, canceltrycontinue, or a number [default: ok]")
    c.add_argument("--timeout", dest="message_timeout", type=int, default=0,
                   help="seconds until the box answers IDTIMEOUT [default: 0, none]")
    c.add_argument("--wait", action="store_true",
                   help="wait for the user's answer (IDOK, IDYES, ...) instead of IDASYNC")
    c.set_defaults(run=_ctl_message)
    c = calls.add_parser("shadow", help="let session SPY shadow (remote-control) session "
                                        "TARGET")
    c.add_argument("spy", type=int)
    c.add_argument("target", type=int)
    c.add_argument("--token-dir", default="/tmp",  # noqa: S108 - where the bridge writes them
                   help="where the bridge writes session tokens; SPY's own is used when "
                        "readable [default: %(default)s]")
    c.add_argument("--hotkey-vk", type=lambda s: int(s, 0), default=SHADOW_HOTKEY_VK,
                   help="virtual key that ends the shadowing [default: 0x79, F10]")
    c.add_argument("--hotkey-modifiers", type=lambda s: int(s, 0),
                   default=SHADOW_HOTKEY_MODIFIERS,
                   help="its modifiers [default: 0x2, Ctrl]")
    c.set_defaults(run=_ctl_shadow)
    c = calls.add_parser("unshadow", help="stop the shadowing of (or by) a session")
    c.add_argument("session", type=int)
    c.add_argument("--token-dir", help="use the session's own token from this directory "
                                       "instead of --token")
    c.set_defaults(run=_ctl_unshadow)

    events.add_command(calls)
    farm.add_command(calls)

"""``icp-bridge ctl`` against a real bridge, as an operator runs it (a
subprocess): decoded output, the sessions table, complete ``--json``,
exit statuses and reasons, acting on a user's sessions or on all of them,
shadowing, and telling "not listening" from TLS failures and timeouts."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher

from bridge.sessions.model import ConnectState
from tests.conftest import BridgeUnderTest, start_bridge
from tests.e2e.otsapi_client import BlockingClient

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
ENV.pop("ICP_BRIDGE_TOKEN", None)
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d")


async def cli(*args: str, stdin: str = "") -> tuple[str, str, int]:
    if stdin:
        argv = ("-c", f"import sys, io; sys.stdin = io.StringIO({stdin!r}); "
                "from bridge.cli import main; sys.exit(main(sys.argv[1:]))", *args)
    else:
        argv = ("-m", "bridge.cli", *args)
    out, err, code = await getProcessOutputAndValue(sys.executable, argv, env=ENV,
                                                    path=str(ROOT))
    return out.decode(), err.decode(), code


async def ctl(bridge: BridgeUnderTest, token: str | None, *args: str) -> tuple[str, str, int]:
    """``icp-bridge ctl --plain`` on the bridge's (tcp:) OTS API port, the
    token on stdin (``--token-file -``), as an admin's script passes it."""
    if token is None:
        return await cli("ctl", "--plain", "--port", str(bridge.thrift_port), *args)
    return await cli("ctl", "--plain", "--port", str(bridge.thrift_port), "--token-file", "-",
                     *args, stdin=f"{token}\n")


async def token_of(bridge: BridgeUnderTest, user: str, password: str) -> str:
    client = BlockingClient(bridge.thrift_port)
    try:
        result = await client.call("logonConnection", user, password, "")
    finally:
        client.close()
    assert result.success
    return result.authToken


def several_sessions(**overrides: object) -> dict[str, object]:
    """A bridge where a user may have several sessions (ogon's
    session.singleSession false), so that --user has more than one."""
    return {"properties": {"session.timeout": 30, "session.singleSession": False},
            **overrides}


def parse_iso(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


# -- output ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_sessions_table_and_complete_json(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        await peer.client_disconnected(2)
        token = await token_of(bridge, "alice", "alice-pw")
        registry = bridge.service.registry
        alice = registry.sessions_of("alice", "")[0]
        bob = registry.sessions_of("bob", "")[0]
        assert bob.state is ConnectState.DISCONNECTED

        refusals: list[dict[str, object]] = []

        def refusal(event: dict[str, object]) -> None:
            # The OTS API's refusals only (other tests' held log lines may come out now).
            if event.get("log_namespace") == "bridge.otsapi.handler.OtsApiHandler" \
                    and "refused" in str(event.get("log_format", "")):
                refusals.append(event)

        globalLogPublisher.addObserver(refusal)
        try:
            out, err, code = await ctl(bridge, token, "sessions")
        finally:
            globalLogPublisher.removeObserver(refusal)
        assert code == 0, err
        assert refusals == [], "ctl asks nothing the bridge does not answer (no log line)"
        header, *rows = out.splitlines()
        assert header.split() == ["SESSION", "STATE", "USER", "CLIENT", "ADDRESS", "SINCE",
                                  "IDLE"]
        by_id = {int(row.split()[0]): row.split() for row in rows}
        assert by_id[alice.session_id][1:5] == ["Active", "alice", "client1", "192.0.2.10"]
        assert ISO.fullmatch(by_id[alice.session_id][5])
        assert by_id[alice.session_id][6] == "-", "no input times: idle unknown"
        # Disconnected: no client, since the disconnect.
        assert by_id[bob.session_id][1:5] == ["Disconnected", "bob", "-", "-"]
        assert "{" not in out and "Value" not in out

        out, err, code = await ctl(bridge, token, "--json", "sessions")
        assert code == 0, err
        listed = {row["session_id"]: row for row in json.loads(out)["sessions"]}
        row = listed[alice.session_id]
        assert {key: row[key] for key in ("state", "user", "winstation", "client_name",
                                          "client_address")} == {
            "state": "Active", "user": "alice",
            "winstation": f"xsession:{alice.backend.pid}",  # <module name>:<pid>
            "client_name": "client1", "client_address": "192.0.2.10"}
        assert set(row) >= {"session_id", "domain", "since", "idle_seconds", "connect_time",
                            "disconnect_time", "logon_time", "last_input_time"}
        assert abs(parse_iso(row["logon_time"]) - alice.logon_time) < 1
        assert abs(parse_iso(row["since"]) - alice.connect_time) < 1
        assert row["disconnect_time"] is None and row["idle_seconds"] is None
        gone = listed[bob.session_id]
        assert gone["user"] == "bob" and gone["state"] == "Disconnected"
        assert abs(parse_iso(gone["since"]) - bob.disconnect_time) < 1
        assert gone["client_name"] is None
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_query_prints_decoded_values(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        token = await token_of(bridge, "alice", "alice-pw")
        session_id = bridge.service.registry.by_connection(1).session_id
        wanted = ["UserName", "ConnectState", "LogonTime", "ClientDisplay",
                  "ClientProtocolType", "SessionInfo"]
        out, err, code = await ctl(bridge, token, "query", str(session_id), *wanted)
        assert code == 0, err
        lines = out.splitlines()
        assert "UserName: alice" in lines
        assert "ConnectState: Active" in lines
        assert "ClientDisplay: 1920x1080, 32 bpp" in lines
        assert "ClientProtocolType: RDP" in lines
        logon = next(line for line in lines if line.startswith("LogonTime: "))
        assert ISO.fullmatch(logon.split(": ", 1)[1])
        assert "SessionInfo:" in lines and "  State: Active" in lines
        assert "  UserName: alice" in lines and "  LastInputTime: -" in lines
        assert "stringValue" not in out and "{" not in out

        out, err, code = await ctl(bridge, token, "--json", "query", str(session_id), *wanted)
        assert code == 0, err
        info = json.loads(out)["info"]
        assert info["UserName"] == "alice" and info["ConnectState"] == "Active"
        assert info["ClientDisplay"] == {"width": 1920, "height": 1080, "color_depth": 32}
        assert info["SessionInfo"]["State"] == "Active"
        assert info["SessionInfo"]["SessionId"] == session_id
        assert ISO.fullmatch(info["SessionInfo"]["CurrentTime"])
        assert info["LogonTime"] == info["SessionInfo"]["LogonTime"]

        # A class it does not answer: said, and the status says so.
        out, err, code = await ctl(bridge, token, "query", str(session_id), "UserName",
                                   "IdleTime")
        assert code == 1
        assert "UserName: alice" in out and "IdleTime: - (not answered)" in out
        _, err, code = await ctl(bridge, token, "query", str(session_id), "IdleTime")
        assert code == 1 and err.strip().endswith(
            "IdleTime is never answered: the bridge, like ogon, knows no input times"), err
    finally:
        await bridge.stop()


# -- failures ------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_every_failure_says_why_and_exits_non_zero(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        await peer.client_disconnected(2)
        registry = bridge.service.registry
        alice = registry.sessions_of("alice", "")[0].session_id
        bob = registry.sessions_of("bob", "")[0].session_id
        admin = await token_of(bridge, "alice", "alice-pw")
        user = await token_of(bridge, "bob", "bob-pw")

        out, err, code = await ctl(bridge, admin, "query", "999")
        assert (code, out) == (1, "")
        assert "no session 999" in err
        _, err, code = await ctl(bridge, "x" * 43, "sessions")
        assert code == 1 and "the token is unknown or expired" in err
        _, err, code = await ctl(bridge, user, "logoff", str(alice))
        assert code == 1 and "lacks LOGOFF" in err
        assert registry.get(alice) is not None
        _, err, code = await ctl(bridge, admin, "message", str(bob), "t", "x")
        assert code == 1 and f"session {bob} is Disconnected" in err
        _, err, code = await cli("ctl", "--plain", "--port", str(bridge.thrift_port), "logon",
                                 "alice", stdin="wrong\n")
        assert code == 1 and "logon of alice refused" in err
        _, err, code = await ctl(bridge, None, "sessions")
        assert code == 1 and "needs a token" in err
        _, err, code = await ctl(bridge, admin, "query", "1", "NoSuchClass")
        assert code == 1 and "unknown info class NoSuchClass" in err
        _, err, code = await ctl(bridge, admin, "logoff")
        assert code == 1 and "give a SESSION or --user NAME" in err
        for err_text in (err,):
            assert "Traceback" not in err_text
    finally:
        await bridge.stop()


# -- acting on sessions ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_disconnect_and_logoff_every_session_of_a_user(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir, **several_sessions())
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "alice", "alice-pw")
        await peer.logon(3, "bob", "bob-pw")
        registry = bridge.service.registry
        first, second = (s.session_id for s in registry.sessions_of("alice", ""))
        bob = registry.sessions_of("bob", "")[0]
        token = await token_of(bridge, "alice", "alice-pw")

        out, err, code = await ctl(bridge, token, "disconnect", "--user", "alice")
        assert code == 0, err
        assert out.splitlines() == [f"session {first} disconnected",
                                    f"session {second} disconnected"]
        assert {s.state for s in registry.sessions_of("alice", "")} == {
            ConnectState.DISCONNECTED}
        assert bob.state is ConnectState.ACTIVE
        # Again: she has sessions, none to disconnect; that is said, not "no sessions".
        out, err, code = await ctl(bridge, token, "disconnect", "--user", "alice")
        assert code == 0, err
        assert out.splitlines() == [f"session {first} is Disconnected already",
                                    f"session {second} is Disconnected already"]

        out, err, code = await ctl(bridge, token, "--json", "logoff", "--user", "alice")
        assert code == 0, err
        result = json.loads(out)
        assert result["user"] == "alice" and result["failed"] == 0
        assert [r["session_id"] for r in result["sessions"]] == [first, second]
        assert registry.sessions_of("alice", "") == [] and registry.get(bob.session_id)

        out, err, code = await ctl(bridge, token, "logoff", "--user", "nobody")
        assert (code, out) == (0, "user nobody has no session\n")  # no failure, as ogon's CLI
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_message_results_by_name_and_to_all(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir, **several_sessions())
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        await peer.logon(3, "guest", "guest-pw")
        await peer.client_disconnected(3)
        registry = bridge.service.registry
        alice = registry.by_connection(1).session_id
        bob = registry.by_connection(2).session_id
        token = await token_of(bridge, "alice", "alice-pw")

        peer.message_result = 6
        out, err, code = await ctl(bridge, token, "message", str(alice), "Update",
                                   "Reboot now?", "--style", "yesno", "--wait")
        assert (code, out.strip()) == (0, f"session {alice}: IDYES"), err
        assert peer.seen("MessageRequest")[-1].style == 4
        out, err, code = await ctl(bridge, token, "--json", "message", str(alice), "t", "x")
        assert code == 0, err
        assert json.loads(out) == {"session_id": alice, "result": 32001,
                                   "result_name": "IDASYNC"}

        peer.message_result = 1
        out, err, code = await ctl(bridge, token, "message", "--all", "Maintenance",
                                   "at noon", "--wait")
        assert code == 0, err
        assert sorted(out.splitlines()) == sorted([f"session {alice}: IDOK",
                                                   f"session {bob}: IDOK"])
        texts = [(m.parameter1, m.parameter2) for m in peer.seen("MessageRequest")[-2:]]
        assert texts == [("Maintenance", "at noon")] * 2
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_shadow_and_unshadow(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir, **several_sessions())
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        registry = bridge.service.registry
        spy = registry.by_connection(1)
        target = registry.by_connection(2)
        token = await token_of(bridge, "alice", "alice-pw")
        token_dir = str(bridge.service.config.token_dir)

        # A logon token is not a session's own: refused, saying what it needs.
        out, err, code = await ctl(bridge, token, "shadow", str(spy.session_id),
                                   str(target.session_id), "--token-dir", str(short_dir))
        assert code == 1 and "needs session" in err and "own token" in err

        out, err, code = await ctl(bridge, token, "shadow", str(spy.session_id),
                                   str(target.session_id), "--token-dir", token_dir)
        assert code == 0, err
        assert out.strip() == f"session {spy.session_id} shadows session {target.session_id}"
        assert spy.state is ConnectState.SHADOW and spy.shadowing == target.session_id
        request = peer.seen("OtsApiStartRemoteControlRequest")[-1]
        assert (request.hotKeyVk, request.hotKeyModifiers) == (0x79, 0x2)

        out, err, code = await ctl(bridge, token, "unshadow", str(spy.session_id))
        assert code == 0, err
        assert spy.state is ConnectState.ACTIVE and spy.shadowing is None
    finally:
        await bridge.stop()


# -- reaching the bridge -------------------------------------------------------------------

def write_pair(directory: Path, name: str, valid_days: float) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (expired when ``valid_days``
    is negative) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(days=30) if valid_days < 0 else now
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def tls_endpoint(cert: Path, key: Path) -> str:
    return f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Chatty(Protocol):
    """A plain TCP server that is no TLS server: it answers anything with text."""

    def connectionMade(self) -> None:
        self.transport.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_not_listening_tls_failures_and_timeouts_are_told_apart(short_dir: Path
                                                                       ) -> None:
    good_cert, good_key = write_pair(short_dir, "good", 30)
    expired_cert, expired_key = write_pair(short_dir, "expired", -1)
    other_cert, _ = write_pair(short_dir, "other", 30)
    bridge = await start_bridge(short_dir, thrift_endpoint=tls_endpoint(good_cert, good_key))
    for other in ("x", "p"):
        (short_dir / other).mkdir()
    expired = await start_bridge(short_dir / "x", thrift_endpoint=tls_endpoint(expired_cert,
                                                                              expired_key))
    chatty = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(_Chatty))
    silent = socket.socket()  # accepts (the kernel does) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        async def ping(port: int, *options: str) -> tuple[str, int]:
            _, err, code = await cli("ctl", "--port", str(port), *options, "ping")
            assert "Traceback" not in err
            return err.strip(), code

        # Verified against its own certificate: it works.
        err, code = await ping(bridge.thrift_port, "--cafile", str(good_cert))
        assert code == 0, err

        port = closed_port()
        err, code = await ping(port, "--cafile", str(good_cert))
        assert code == 3
        assert err.endswith(f"bridge not listening at 127.0.0.1:{port} (connection refused)")

        err, code = await ping(expired.thrift_port, "--cafile", str(expired_cert))
        assert code == 3 and "TLS handshake failed: certificate expired on " in err

        err, code = await ping(bridge.thrift_port, "--cafile", str(other_cert))
        assert code == 3
        assert f"TLS handshake failed: certificate does not match {other_cert}" in err

        err, code = await ping(chatty.getHost().port, "--cafile", str(good_cert))
        assert code == 3 and "is not a TLS server (is it --plain?)" in err

        plain = await start_bridge(short_dir / "p")  # a tcp: OTS API endpoint
        try:
            err, code = await ping(plain.thrift_port, "--cafile", str(good_cert))
            assert code == 3 and "not a TLS server (is it --plain?)" in err
        finally:
            await plain.stop()

        err, code = await ping(bridge.thrift_port, "--plain")
        assert code == 3 and "closed the connection without an answer" in err
        assert "drop --plain" in err

        err, code = await ping(silent.getsockname()[1], "--cafile", str(good_cert),
                               "--timeout", "0.5")
        assert code == 3 and "timed out" in err
    finally:
        silent.close()
        await chatty.stopListening()
        await expired.stop()
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_ctl_finds_the_bridge_through_its_configuration(short_dir: Path) -> None:
    """Without --port/--cafile ctl reads the bridge's configuration as the
    bridge does: the port of thrift_endpoint, the certificate config.ini's
    ssl_certificate_string names (not ogon's default), the admin endpoint
    for ctl events; a tcp: thrift_endpoint is dialled plain. The flags
    still win."""
    cert, key = write_pair(short_dir, "snakeoil", 30)
    ini = short_dir / "config.ini"
    ini.write_text(f"[global]\nssl_certificate_string={cert}\nssl_key_string={key}\n")
    bridge = await start_bridge(short_dir, thrift_endpoint="ssl:0:interface=127.0.0.1",
                                ogon_config=ini)
    try:
        toml = short_dir / "bridge.toml"
        toml.write_text(f'thrift_endpoint = "ssl:{bridge.thrift_port}:interface=127.0.0.1"\n'
                        f'admin_endpoint = "tcp:{bridge.admin_port}:interface=127.0.0.1"\n'
                        f'ogon_config = "{ini}"\n')
        out, err, code = await cli("ctl", "--config", str(toml), "logon", "alice",
                                   stdin="alice-pw\n")
        assert code == 0, err
        token = out.strip()
        tokens = short_dir / "token"
        tokens.write_text(token)
        tokens.chmod(0o600)
        auth = ("--token-file", str(tokens))
        out, err, code = await cli("ctl", "--config", str(toml), *auth, "ping", "7")
        assert (out, code) == ("pong 7\n", 0), err
        out, err, code = await cli("ctl", "--config", str(toml), *auth, "events")
        assert code == 0, err
        assert "logon-failed" not in out  # (it reads the journal; nothing failed)

        # What the configuration names is what is verified, and said when it does not match.
        other, _ = write_pair(short_dir, "other", 30)
        ini.write_text(f"[global]\nssl_certificate_string={other}\nssl_key_string={key}\n")
        _, err, code = await cli("ctl", "--config", str(toml), *auth, "ping")
        assert code == 3
        assert err.strip().endswith(
            f"TLS handshake failed: certificate does not match {other} (ssl.certificate of "
            f"{ini}:2; pass --cafile with the one the bridge serves)")
        out, err, code = await cli("ctl", "--config", str(toml), "--cafile", str(cert), *auth,
                                   "ping")
        assert code == 0, "--cafile wins"

        # A tcp: endpoint: plain, without being told.
        toml.write_text(f'thrift_endpoint = "tcp:{closed_port()}:interface=127.0.0.1"\n'
                        f'ogon_config = ""\n'
                        f'admin_endpoint = ""\n')
        _, err, code = await cli("ctl", "--config", str(toml), *auth, "ping")
        assert code == 3 and "bridge not listening at 127.0.0.1:" in err
        _, err, code = await cli("ctl", "--config", str(toml), *auth, "events")
        assert code == 2 and "has no admin endpoint ctl can reach (admin_endpoint = '')" in err
        toml.write_text('thrift_endpoint = 9091\n')
        _, err, code = await cli("ctl", "--config", str(toml), *auth, "ping")
        assert code == 2 and err.strip() == (
            f"icp-bridge ctl ping: cannot read the bridge's configuration: {toml}: "
            f"thrift_endpoint: "
            f"expected a string, got int (or give --port and --cafile, --plain or --insecure)")
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_the_token_from_a_private_file_stdin_or_the_environment(short_dir: Path) -> None:
    """A token on a command line is every local user's (/proc/PID/cmdline):
    --token-file (mode 600; a file others may read or write is refused),
    --token-file - (stdin) and $ICP_BRIDGE_TOKEN take it silently; --token
    still works, with a warning."""
    bridge = await start_bridge(short_dir)
    try:
        token = await token_of(bridge, "alice", "alice-pw")
        base = ("ctl", "--plain", "--port", str(bridge.thrift_port))
        path = short_dir / "token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        out, err, code = await cli(*base, "--token-file", str(path), "permission")
        assert (code, err) == (0, "") and out.startswith("0x1ff (full)"), err
        out, err, code = await cli(*base, "--token-file", "-", "permission",
                                   stdin=token + "\n")
        assert (code, err) == (0, "") and out.startswith("0x1ff (full)"), err
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ("-m", "bridge.cli", *base, "permission"),
            env={**ENV, "ICP_BRIDGE_TOKEN": token}, path=str(ROOT))
        assert (code, err) == (0, b"") and out.startswith(b"0x1ff (full)"), err

        out, err, code = await cli(*base, "--token", token, "permission")
        assert code == 0 and out.startswith("0x1ff (full)")
        assert "warning: --token puts the token on the command line, which every local " \
               "user can read" in err and "--token-file" in err and token not in err

        for mode in (0o644, 0o620, 0o604):
            path.chmod(mode)
            _, err, code = await cli(*base, "--token-file", str(path), "permission")
            assert code == 2 and err.strip().endswith(
                f"--token-file {path}: refused: others may read or write it (mode "
                f"{mode:04o}); `chmod 600 {path}` and use a new token if others could read "
                f"this one"), err
        path.chmod(0o600)
        link = short_dir / "link"
        link.symlink_to(path)
        _, err, code = await cli(*base, "--token-file", str(link), "permission")
        assert code == 2 and f"--token-file {link}: cannot read it" in err
        _, err, code = await cli(*base, "--token-file", str(short_dir / "none"), "permission")
        assert code == 2 and "cannot read it: No such file or directory" in err
        (short_dir / "empty").touch(mode=0o600)
        _, err, code = await cli(*base, "--token-file", str(short_dir / "empty"), "permission")
        assert code == 2 and err.strip().endswith("empty")
        _, err, code = await cli(*base, "--token-file", "-", "permission", stdin="\n")
        assert code == 2 and "no token on stdin" in err
        _, err, code = await cli(*base, "--token-file", str(path), "--token", token,
                                 "permission")
        assert code == 2 and "not allowed with argument" in err
    finally:
        await bridge.stop()


# -- the stand-in RDP server -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_peer_without_user_brings_a_client_to_the_greeter(short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        peer = ("peer", "--socket", bridge.icp_path, "--pipe-dir",
                str(bridge.service.config.pipe_dir), "--once", "--quiet")
        out, err, code = await cli(*peer)
        assert code == 0, err
        assert "connection 1: logon (greeter) -> \\\\.\\pipe\\ogon_1_greeter" in out
        events = [(e.event, e.reason) for e in bridge.service.store.events_after(0)]
        assert ("created", "greeter") in events
        out, err, code = await cli(*peer[:-1])  # its log on stderr: no factory noise
        assert code == 0 and "Starting factory" not in err and "Stopping factory" not in err, err

        out, err, code = await cli("peer", "--socket", str(short_dir / "none.sock"),
                                   "--once", "--quiet")
        assert code == 1 and "Traceback" not in err
        assert f"no bridge at {short_dir / 'none.sock'} (No such file or directory)" in err

        await bridge.peer()  # the RDP server: the bridge serves one at a time
        out, err, code = await cli(*peer)
        assert code == 1 and "Traceback" not in err, err
        assert f"icp-bridge peer: the bridge at {bridge.icp_path} closed the connection" in err
    finally:
        await bridge.stop()

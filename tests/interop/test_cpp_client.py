"""Interop with Apache Thrift's C++ library (plain and TLS, framed and
buffered) through a running bridge and the stand-in RDP server. Skipped
where g++, the thrift compiler or libthrift-dev are missing (.ci/run
installs them when it can)."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs

from tests.conftest import start_bridge

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _have_toolchain() -> bool:
    headers = ("/usr/include/thrift/Thrift.h", "/usr/include/boost/numeric/conversion/cast.hpp")
    return all(shutil.which(t) for t in ("g++", "thrift")) and all(
        Path(h).exists() for h in headers)


pytestmark = pytest.mark.skipif(not _have_toolchain(),
                                reason="needs g++, thrift-compiler, libthrift-dev, libboost-dev")


@pytest.fixture(scope="module")
def cpp_client() -> Iterator[Path]:
    build = Path(tempfile.mkdtemp(prefix="ib-cpp-"))
    subprocess.run(["thrift", "-out", str(build), "--gen", "cpp",
                    str(ROOT / "idl" / "otsapi.thrift")], check=True)
    sources = [str(HERE / "otsapi_client.cpp"), str(build / "otsapi.cpp"),
               str(build / "otsapi_types.cpp")]
    binary = build / "otsapi_client"
    subprocess.run(["g++", "-std=c++17", "-O1", "-I", str(build), *sources, "-o", str(binary),
                    "-lthrift", "-lssl", "-lcrypto", "-lpthread"], check=True)
    yield binary
    shutil.rmtree(build, ignore_errors=True)


def self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


async def run_client(binary: Path, port: int, framed: str, tls: str, cafile: str,
                     session: int) -> tuple[dict[str, str], int]:
    out, err, code = await getProcessOutputAndValue(
        str(binary), ["127.0.0.1", str(port), framed, tls, cafile, "alice", "alice-pw",
                      str(session)])
    lines = dict(line.split(": ", 1) for line in out.decode().splitlines() if ": " in line)
    lines["stderr"] = err.decode()
    return lines, code


EXPECTED = {
    "getVersionInfo": "1.1", "ping": "4711", "logonConnection": "1",
    "getPermissionForToken": "511", "enumerateSessions": "1 2",
    "querySessionInformation.UserName": "bob",
    "querySessionInformation.ClientDisplay": "1920x1080",
    "virtualChannelClose": "1", "sendMessage": "1",
    "startRemoteControlSession": "0",  # a logon token has no session to shadow from
    "stopRemoteControlSession": "1",
    "disconnectSession": "1", "logoffSession": "1", "logoffConnection": "1",
}


@pytest.mark.parametrize("tls", ["plain", "tls"])
@pytest_twisted.ensureDeferred
async def test_cpp_client_all_methods(cpp_client: Path, short_dir: Path, tls: str) -> None:
    endpoint = "tcp:0:interface=127.0.0.1"
    cafile = ""
    if tls == "tls":
        key, cert = self_signed(short_dir)
        endpoint = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        cafile = str(cert)
    bridge = await start_bridge(short_dir, thrift_endpoint=endpoint)
    try:
        peer = await bridge.peer()
        await peer.logon(1, "alice", "alice-pw")
        await peer.logon(2, "bob", "bob-pw")
        bob = bridge.service.registry.by_connection(2).session_id
        lines, code = await run_client(cpp_client, bridge.thrift_port, "framed", tls, cafile,
                                       bob)
        assert code == 0, lines
        for name, value in EXPECTED.items():
            assert lines.get(name) == value, (name, lines)
        assert lines["virtualChannelOpen"].endswith("_svc_CLIPRDR_1 1")
        assert lines["querySessionInformation.SessionInfo"] == f"{bob} bob"
        assert bridge.service.registry.get(bob) is None, "logged off"
    finally:
        await bridge.stop()


@pytest_twisted.ensureDeferred
async def test_buffered_cpp_client_is_served(cpp_client: Path, short_dir: Path) -> None:
    bridge = await start_bridge(short_dir)
    try:
        peer = await bridge.peer()
        await peer.logon(1, "bob", "bob-pw")
        session = bridge.service.registry.by_connection(1).session_id
        with capturedLogs() as events:
            lines, code = await run_client(cpp_client, bridge.thrift_port, "buffered", "plain",
                                           "", session)
        assert code == 0, lines
        assert lines["ping"] == "4711" and lines["logoffSession"] == "1"
        assert any("unframed (buffered) transport" in e.get("log_format", "") for e in events)
    finally:
        await bridge.stop()

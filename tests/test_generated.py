"""Generated code matches idl/, and the package boundaries hold."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "protocols" / "generated"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generated_code_is_from_the_current_idl() -> None:
    stamp = json.loads((GENERATED / "STAMP.json").read_text())
    current = {p.name: sha256(p) for p in sorted((ROOT / "idl").iterdir()) if p.is_file()}
    assert stamp["inputs"] == current, "idl/ changed: run python tools/regenerate.py"


def test_generated_code_is_not_hand_edited() -> None:
    stamp = json.loads((GENERATED / "STAMP.json").read_text())
    present = sorted(
        str(p.relative_to(GENERATED)) for p in GENERATED.rglob("*")
        if p.is_file() and p.name != "STAMP.json" and "__pycache__" not in p.parts
    )
    assert sorted(stamp["outputs"]) == present
    for name, digest in stamp["outputs"].items():
        assert sha256(GENERATED / name) == digest, f"{name} differs from what was generated"


@pytest.mark.skipif(shutil.which("thrift") is None, reason="thrift compiler not installed")
def test_regenerating_reproduces_the_tree() -> None:
    try:
        import grpc_tools  # noqa: F401
    except ImportError:
        if shutil.which("protoc") is None:
            pytest.skip("no protoc")
    stamp = json.loads((GENERATED / "STAMP.json").read_text())
    versions = subprocess.run([shutil.which("thrift"), "--version"], capture_output=True,
                              text=True).stdout.strip()
    if versions != stamp["tools"]["thrift"]:
        pytest.skip(f"different thrift compiler ({versions})")
    protoc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "--version"],
                            capture_output=True, text=True).stdout.strip()
    if protoc and protoc != stamp["tools"]["protoc"]:
        pytest.skip(f"different protoc ({protoc})")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "regenerate.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_protocols_never_imports_bridge() -> None:
    offenders = [
        str(path.relative_to(ROOT)) for path in (ROOT / "protocols").rglob("*.py")
        if any(name == "bridge" or name.startswith("bridge.") for name in imported_modules(path))
    ]
    assert offenders == []


def test_wire_numbers_match_wire_md() -> None:
    from protocols.generated import ICP_pb2, pbRPC_pb2

    rpc = pbRPC_pb2.RPCBase.DESCRIPTOR.fields_by_name
    assert {n: f.number for n, f in rpc.items()} == {
        "tag": 1, "isResponse": 2, "status": 3, "msgType": 4, "payload": 5,
        "errorDescription": 6, "versionInfo": 7}
    assert dict(ICP_pb2.MSGTYPE.items()) == {
        "IsChannelAllowed": 1, "Ping": 2, "DisconnectUserSession": 4, "LogoffUserSession": 5,
        "OtsApiVirtualChannelOpen": 6, "LogonUser": 7, "SwitchTo": 8, "PropertyBool": 9,
        "PropertyNumber": 10, "PropertyString": 11, "OtsApiVirtualChannelClose": 12,
        "OtsApiStartRemoteControl": 13, "OtsApiStopRemoteControl": 14,
        "RemoteControlEnded": 15, "Message": 16, "PropertyBulk": 17}
    logon = ICP_pb2.LogonUserRequest.DESCRIPTOR.fields_by_name
    assert [logon[n].number for n in (
        "connectionId", "username", "password", "domain", "width", "height", "colorDepth",
        "clientHostName", "clientAddress", "clientBuildNumber", "clientProductId",
        "clientHardwareId", "clientProtocolType")] == list(range(1, 14))
    message = ICP_pb2.MessageRequest.DESCRIPTOR.fields_by_name
    assert [message[f"parameter{i}"].number for i in range(1, 6)] == [6, 7, 8, 9, 10]
    value = ICP_pb2.PropertyValue.DESCRIPTOR.fields_by_name
    assert value["intValue"].type == value["intValue"].TYPE_INT32


def test_thrift_field_ids_match_wire_md() -> None:
    from thrift.Thrift import TType

    from protocols.generated.otsapi import otsapi, ttypes

    def ids(cls: type) -> list[tuple[int, int, str]]:
        return [(s[0], s[1], s[2]) for s in cls.thrift_spec if s is not None]

    assert ids(ttypes.TSessionInfoValue) == [
        (1, TType.BOOL, "boolValue"), (2, TType.I16, "int16Value"), (3, TType.I32, "int32Value"),
        (4, TType.STRING, "stringValue"), (5, TType.STRUCT, "displayValue"),
        (6, TType.STRUCT, "WTSINFO"), (7, TType.I64, "int64Value")]
    assert ids(otsapi.startRemoteControlSession_args) == [
        (1, TType.STRING, "authToken"), (2, TType.I32, "sourceLogonId"),
        (3, TType.I32, "targetLogonId"), (4, TType.BYTE, "HotkeyVk"),
        (5, TType.I16, "HotkeyModifiers"), (6, TType.I32, "flags")]
    assert ids(otsapi.sendMessage_args)[-1] == (7, TType.BOOL, "wait")
    assert [s[0] for s in ttypes.TWTSINFO.thrift_spec if s] == list(range(1, 17))
    assert sorted(otsapi.Iface.names()) == sorted([
        "getVersionInfo", "logonConnection", "getPermissionForToken", "logoffConnection",
        "ping", "virtualChannelOpen", "virtualChannelClose", "disconnectSession",
        "logoffSession", "enumerateSessions", "querySessionInformation",
        "startRemoteControlSession", "stopRemoteControlSession", "sendMessage"])

"""What the stand-ins for ogon's programs share (tests/ogon_standins):
their settings (``standin.json`` beside them: where to record, the pipe
directory, the X11 socket directory), recording what they were started
with, a socket that listens, and a minimal protobuf codec for ogon's
module protocol (Debian's python3 has no protobuf; the stand-ins run with
it, as another user than the test).

Standard library only.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def settings() -> dict[str, Any]:
    with open(os.path.join(HERE, "standin.json")) as f:
        return json.load(f)


def exec_env() -> dict[str, str]:
    """The environment exactly as exec'd (Python adds LC_CTYPE to os.environ)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read().split(b"\0")
        return dict(x.decode(errors="replace").split("=", 1) for x in raw if b"=" in x)
    except OSError:
        return dict(os.environ)


def exec_env_order() -> list[str]:
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read().split(b"\0")
        return [x.decode(errors="replace").split("=", 1)[0] for x in raw if b"=" in x]
    except OSError:
        return list(os.environ)


def open_fds() -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            out[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


class Record:
    """The JSON record of one stand-in process: <records>/<prog>.<pid>.json."""

    def __init__(self, prog: str) -> None:
        self.dir = settings()["records"]
        self.data: dict[str, Any] = {
            "prog": prog, "pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0),
            "sid": os.getsid(0), "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "groups": sorted(os.getgroups()), "cwd": os.getcwd(), "argv": sys.argv,
            "env": exec_env(), "env_order": exec_env_order(), "fds": open_fds(),
            "started": time.time(), "events": []}
        self.path = os.path.join(self.dir, f"{prog}.{os.getpid()}.json")
        self.save()

    def event(self, what: str, **extra: Any) -> None:
        self.data["events"].append({"t": time.time(), "what": what, **extra})
        self.save()

    def save(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.rename(tmp, self.path)


def greet(conn: socket.socket) -> None:
    """What the bridge's stand-in RDP server reads from a backend it
    connects to (a real backend speaks ogon's backend protocol here)."""
    try:
        conn.sendall(f"icp-bridge-standin sid={os.environ.get('OGON_SID', '')}\n".encode())
    except OSError:
        pass


def listen(path: str) -> socket.socket:
    """A socket listening at ``path`` by the time the file is there (made
    under another name and renamed): the bridge answers the RDP server as
    soon as the file appears, and the RDP server connects at once."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temporary = f"{path}.{os.getpid()}"
    s.bind(temporary)
    s.listen(16)
    os.rename(temporary, path)
    return s


# -- a minimal protobuf codec (proto2 scalars, strings, bytes) ---------------------------

def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(fields: list[tuple[int, Any]]) -> bytes:
    """Fields in order: int/bool as varint, str/bytes length-delimited."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, (bool, int)):
            out += varint(number << 3) + varint(int(value))
        else:
            data = value.encode() if isinstance(value, str) else bytes(value)
            out += varint(number << 3 | 2) + varint(len(data)) + data
    return bytes(out)


def decode(data: bytes) -> dict[int, Any]:
    """Field number -> value (int, or bytes for length-delimited)."""
    fields: dict[int, Any] = {}
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _read_varint(data, i)
        elif kind == 2:
            length, i = _read_varint(data, i)
            value, i = data[i:i + length], i + length
        else:
            raise ValueError(f"wire type {kind}")
        fields[number] = value
    return fields


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        try:
            chunk = os.read(fd, n - len(data))
        except InterruptedError:
            continue
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_frame(fd: int) -> dict[int, Any]:
    (length,) = struct.unpack("!I", read_exactly(fd, 4))
    return decode(read_exactly(fd, length))


def write_frame(fd: int, tag: int, msg_type: int, payload: bytes, is_response: bool) -> None:
    body = encode([(1, tag), (2, is_response), (3, 0), (4, msg_type), (5, payload)])
    # Two writes, as ogon's writeInternal does: the length, then the body.
    os.write(fd, struct.pack("!I", len(body)))
    os.write(fd, body)

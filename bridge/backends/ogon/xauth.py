"""The X11 module's xauth file (ogon's x11_rds_module_init_xauth,
session-manager/module/X11/x11_module.cpp).

One MIT-MAGIC-COOKIE-1 entry for the local host: family FamilyLocal (256),
the host name as address, no display number (it matches every display),
16 random bytes. A file that already holds such an entry for this host is
used as it is (the cookie survives logoffs, as ogon's does); the file is
never deleted.

The session manager runs as root and writes into the user's home (or the
``xauthoritypath`` directory), so unlike ogon the bridge does not follow a
link at the file's name, reuses only a regular file the user owns (another
user's file in a shared directory could hold a cookie they know), and
writes a new file next to it and renames it over, mode 0600, owned by
the user from the start; entries already in the file are kept after the
new one (ogon writes its entry over the start of the old file).
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import struct
from pathlib import Path

FAMILY_LOCAL = 256
COOKIE_NAME = b"MIT-MAGIC-COOKIE-1"
COOKIE_BYTES = 16
#: An xauth file bigger than this is not read (a user's file is short).
MAX_FILE = 64 * 1024


def local_host_name() -> bytes:
    """What ogon puts in the address field: gethostname(), else "localhost"."""
    try:
        name = socket.gethostname()
    except OSError:
        name = ""
    return (name or "localhost").encode()[:255]


def _field(value: bytes) -> bytes:
    return struct.pack(">H", len(value)) + value


def entry(family: int, address: bytes, number: bytes, name: bytes, data: bytes) -> bytes:
    """One Xauthority entry (XauWriteAuth's layout, big-endian lengths)."""
    return struct.pack(">H", family) + b"".join(
        _field(part) for part in (address, number, name, data))


def parse(data: bytes) -> list[tuple[int, bytes, bytes, bytes, bytes]]:
    """The entries of an Xauthority file: (family, address, number, name,
    data); a truncated tail is ignored, as XauReadAuth stops there."""
    entries = []
    offset = 0
    while offset + 2 <= len(data):
        (family,) = struct.unpack_from(">H", data, offset)
        offset += 2
        parts = []
        for _ in range(4):
            if offset + 2 > len(data):
                return entries
            (length,) = struct.unpack_from(">H", data, offset)
            offset += 2
            if offset + length > len(data):
                return entries
            parts.append(data[offset:offset + length])
            offset += length
        entries.append((family, parts[0], parts[1], parts[2], parts[3]))
    return entries


def _read_own(path: Path, uid: int) -> bytes | None:
    """The file's content when it is a regular file of ``uid`` (no link
    followed, nothing blocking); None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != uid or info.st_size > MAX_FILE:
            return None
        return os.read(fd, MAX_FILE)
    except OSError:
        return None
    finally:
        os.close(fd)


def ensure_cookie(path: Path, uid: int, gid: int, host: bytes | None = None) -> bool:
    """Make ``path`` hold a local MIT-MAGIC-COOKIE-1 entry for this host,
    owned by ``uid``/``gid``, mode 0600. Returns True when the user's file
    already had one (left as it is), False when a new cookie was written.
    Raises OSError when the file cannot be written."""
    host = local_host_name() if host is None else host
    old = _read_own(path, uid)
    kept: list[tuple[int, bytes, bytes, bytes, bytes]] = []
    if old is not None:
        kept = parse(old)
        for family, address, _number, name, _data in kept:
            if family == FAMILY_LOCAL and name == COOKIE_NAME and address == host:
                return True
    content = entry(FAMILY_LOCAL, host, b"", COOKIE_NAME, secrets.token_bytes(COOKIE_BYTES))
    content += b"".join(entry(*item) for item in kept)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    temporary = f".{path.name}.{secrets.token_hex(6)}"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=directory)
        try:
            os.fchmod(fd, 0o600)
            if os.geteuid() == 0:
                os.fchown(fd, uid, gid)
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
    except OSError:
        try:
            os.unlink(temporary, dir_fd=directory)
        except OSError:
            pass
        raise
    finally:
        os.close(directory)
    return False

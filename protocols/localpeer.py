"""Who is on the other end of a loopback TCP connection: the uid owning the
client's socket, as the kernel knows it.

Every local client of a 127.0.0.1 listener has the same address, so an
address cannot tell them apart (a policy per address would put every
local user in one basket). The kernel records each socket's owner; its
sock_diag netlink interface (what ``ss -e`` reads) looks one socket up by
its four-tuple and answers with ``idiag_uid``, in one round trip and
without privileges, however many sockets the host has, where reading
/proc/net/tcp would cost time in proportion to all of them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
# struct inet_diag_req_v2, then struct inet_diag_sockid (ports and
# addresses in network order, interface and cookie in host order).
_REQUEST = struct.Struct("=BBBBI")
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
# struct inet_diag_msg: family, state, timer, retrans, the sockid (48
# bytes), then expires, rqueue, wqueue, uid, inode.
_UID_OFFSET = _HEADER.size + 4 + 48 + 12
_UID = struct.Struct("=I")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address as Twisted reports it) is a loopback
    address, also as an IPv4-mapped IPv6 address."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _plain(host: str) -> tuple[int, bytes]:
    """(address family, packed address) of a socket's address; an
    IPv4-mapped address is the IPv4 socket it stands for."""
    address = ipaddress.ip_address(host.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        return socket.AF_INET, address.packed
    return socket.AF_INET6, address.packed


def tcp_owner_uid(client: tuple[str, int], server: tuple[str, int],
                  timeout: float = 1.0) -> int | None:
    """The uid owning the TCP socket whose own end is ``client`` (host,
    port) and whose other end is ``server``: for a connection accepted on
    this host, the local user who opened it. None when the kernel does not
    know that socket (it closed meanwhile) or cannot be asked."""
    try:
        family, client_address = _plain(client[0])
        server_family, server_address = _plain(server[0])
    except ValueError:
        return None
    if family != server_family:
        # The client dialled an IPv4 address our dual-stack listener shows
        # mapped; its socket is IPv4 at both ends.
        return None
    request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES) + _SOCKID.pack(
        client[1], server[1], client_address.ljust(16, b"\0"),
        server_address.ljust(16, b"\0")) + _SOCKID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE)
    message = _HEADER.pack(_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST,
                           1, 0) + request
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                           _NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(timeout)
            diag.sendto(message, (0, 0))
            answer = diag.recv(8192)
    except OSError:
        return None
    if len(answer) < _HEADER.size:
        return None
    _, kind, _, _, _ = _HEADER.unpack_from(answer)
    if kind != _SOCK_DIAG_BY_FAMILY or len(answer) < _UID_OFFSET + _UID.size:
        return None  # NLMSG_ERROR: no such socket
    return int(_UID.unpack_from(answer, _UID_OFFSET)[0])


# -- UNIX sockets: which ones listen, by the file they are bound to -------------------

_NLM_F_DUMP = 0x300
_NLMSG_DONE = 3
_TCP_LISTEN = 10
_UDIAG_SHOW_VFS = 0x2
_UNIX_DIAG_VFS = 1
_UNIX_REQUEST = struct.Struct("=BBHIIIII")  # struct unix_diag_req
_UNIX_MESSAGE = struct.Struct("=BBBBIII")  # struct unix_diag_msg
_ATTRIBUTE = struct.Struct("=HH")  # struct rtattr
_VFS = struct.Struct("=II")  # struct unix_diag_vfs: inode, device (the kernel's dev_t)


def _kernel_device(encoded: int) -> int:
    """A kernel-internal dev_t (major << 20 | minor) as stat() reports one."""
    return os.makedev(encoded >> 20, encoded & 0xFFFFF)


def listening_unix_files(timeout: float = 1.0) -> set[tuple[int, int]] | None:
    """(device, inode) of the file of every listening UNIX socket bound to a
    path, as stat() gives them for that file: one netlink dump (what
    ``ss -xl`` reads), filtered by the kernel to listening sockets. A socket
    is matched by the very file it is bound to, not by the name it was bound
    under (renamed into place, or another socket once bound to that name).
    None when the kernel cannot be asked."""
    request = _UNIX_REQUEST.pack(socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0, _UDIAG_SHOW_VFS,
                                 0, 0)
    message = _HEADER.pack(_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY,
                           _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + request
    found: set[tuple[int, int]] = set()
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                           _NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(timeout)
            diag.sendto(message, (0, 0))
            while True:
                data = diag.recv(65536)
                offset = 0
                while offset + _HEADER.size <= len(data):
                    length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                    if kind == _NLMSG_DONE:
                        return found
                    if kind == _NLMSG_ERROR or length < _HEADER.size:
                        return None
                    _scan_unix_message(data, offset + _HEADER.size, offset + length, found)
                    offset += (length + 3) & ~3
    except OSError:
        return None


def _scan_unix_message(data: bytes, start: int, end: int,
                       found: set[tuple[int, int]]) -> None:
    offset = start + _UNIX_MESSAGE.size
    while offset + _ATTRIBUTE.size <= end:
        length, kind = _ATTRIBUTE.unpack_from(data, offset)
        if length < _ATTRIBUTE.size:
            return
        if kind == _UNIX_DIAG_VFS and length >= _ATTRIBUTE.size + _VFS.size:
            inode, device = _VFS.unpack_from(data, offset + _ATTRIBUTE.size)
            found.add((_kernel_device(device), inode))
        offset += (length + 3) & ~3

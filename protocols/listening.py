"""Listening for stream clients on TCP, in the clear or with TLS done by the
standard library's ``ssl`` module, and the listening socket shared by
several processes.

Twisted serves TLS through a protocol wrapper (``twisted.protocols.tls``)
that moves every record between pyOpenSSL memory BIOs in Python: per
request and reply, a read into the BIO, ``SSL_read`` through cffi with
its errors raised as exceptions, a write aggregated until the next
reactor turn, ``SSL_write``, a read out of the BIO, a socket write and
two ``epoll_ctl`` calls. Here the socket itself is an ``ssl.SSLSocket``
in non-blocking mode: one ``recv`` and one ``send`` per request, each a
single call into C that reads or writes the socket and does the crypto.
Everything else a connection does is Twisted's own TCP transport
(buffering, producers, closing), which this module only subclasses.

TLS is set up as Twisted's default ``ssl:`` endpoints set it up
(``CertificateOptions``): TLS 1.2 or 1.3, the same cipher preference, no
compression, the server's cipher order, single-use (EC)DH keys, no
session tickets.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.interfaces import IHandshakeListener, IProtocolFactory

from protocols.endpoint_strings import StreamListenSpec

# Twisted's defaultCiphers (twisted.internet._sslverify) for TLS 1.2; TLS 1.3
# suites are OpenSSL's defaults, the three Twisted lists.
TWISTED_CIPHERS = ("ECDH+AESGCM:ECDH+CHACHA20:DH+AESGCM:DH+CHACHA20:ECDH+AES256:DH+AES256:"
                   "ECDH+AES128:DH+AES:RSA+AESGCM:RSA+AES:!aNULL:!MD5:!DSS")


def server_context(certificate: str, key: str, extra_chain: str | None = None,
                   dh_parameters: str | None = None) -> ssl.SSLContext:
    """A server TLS context with the certificate (and any intermediate
    certificates of ``extra_chain``, PEM) and its key, set up as Twisted's
    ``ssl:`` endpoints are. Raises OSError or ssl.SSLError for files that
    cannot be read or do not match."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                        | ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE | ssl.OP_NO_TICKET)
    # Twisted turns sessions off; TLS 1.3 tickets are what would resume them.
    context.num_tickets = 0
    context.set_ciphers(TWISTED_CIPHERS)
    if extra_chain:
        # ssl takes the chain from the certificate file: certificate first.
        with open(certificate, "rb") as f:
            leaf = f.read()
        with open(extra_chain, "rb") as f:
            chain = f.read()
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".pem") as combined:
            combined.write(leaf.rstrip(b"\n") + b"\n" + chain)
            combined.flush()
            context.load_cert_chain(combined.name, key)
    else:
        context.load_cert_chain(certificate, key)
    if dh_parameters:
        context.load_dh_params(dh_parameters)
    return context


def bind_listening_socket(spec: StreamListenSpec) -> socket.socket:
    """The bound, listening, non-blocking socket for ``spec`` (as Twisted
    binds one: SO_REUSEADDR). Raises OSError."""
    family = spec.family
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            address: Any = socket.getaddrinfo(spec.interface, spec.port, family,
                                              socket.SOCK_STREAM)[0][4]
        else:
            address = (spec.interface, spec.port)
        sock.bind(address)
        sock.listen(spec.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class TLSServer(tcp.Server):
    """A server connection whose socket is a non-blocking ``ssl.SSLSocket``.

    Reads and writes go straight through the SSLSocket; the TLS handshake
    is driven from ``doRead``/``doWrite`` until it is done, then the
    protocol hears ``handshakeCompleted`` (IHandshakeListener) and only
    then any data. ``_handshakeDone`` mirrors Twisted's TLS wrapper, which
    callers use to tell a TLS connection that has not finished its
    handshake.
    """

    # Not Twisted's startTLS TLS: a send on ``socket`` encrypts.
    TLS = False
    direct_tls = True

    def __init__(self, sock: socket.socket, protocol: Any, client: tuple[Any, ...],
                 server: StreamPort, sessionno: int, reactor: Any) -> None:
        self._handshakeDone = False
        # The handshake (or a renegotiation) waits for the socket to take data.
        self._ssl_wants_write = False
        context = server.ssl_context
        assert context is not None
        wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        super().__init__(wrapped, protocol, client, server, sessionno, reactor)
        # The C object behind the SSLSocket: its read and write are what
        # SSLSocket.recv and .send call after two Python frames of checks
        # that do not apply here (the socket is connected, no flags).
        sslobj = getattr(wrapped, "_sslobj", None)
        self._tls_read = sslobj.read if sslobj is not None else wrapped.recv
        self.send_now = sslobj.write if sslobj is not None else wrapped.send

    def doRead(self) -> Any:
        if not self._handshakeDone:
            return self._handshake()
        try:
            data = self._tls_read(self.bufferSize)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLWantWriteError:
            self._ssl_wants_write = True
            self.startWriting()
            return None
        except ssl.SSLEOFError:  # closed without close_notify
            return main.CONNECTION_DONE
        except OSError as e:
            if e.args and e.args[0] == errno.EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        if data:
            self.protocol.dataReceived(data)
            return None
        return main.CONNECTION_DONE

    def doWrite(self) -> Any:
        if not self._handshakeDone:
            return self._handshake()
        if self._ssl_wants_write:
            self._ssl_wants_write = False
            if not self.dataBuffer and not self._tempDataBuffer:
                self.stopWriting()
            result = self.doRead()
            if result is not None:
                return result
        return super().doWrite()

    def _handshake(self) -> Any:
        try:
            self.socket.do_handshake()
        except ssl.SSLWantReadError:
            if self._ssl_wants_write:
                self._ssl_wants_write = False
                if not self.dataBuffer and not self._tempDataBuffer:
                    self.stopWriting()
            return None
        except ssl.SSLWantWriteError:
            self._ssl_wants_write = True
            self.startWriting()
            return None
        except (ssl.SSLError, OSError):
            return main.CONNECTION_LOST
        self._handshakeDone = True
        if self._ssl_wants_write:
            self._ssl_wants_write = False
            if not self.dataBuffer and not self._tempDataBuffer:
                self.stopWriting()
        protocol = self.protocol
        if IHandshakeListener.providedBy(protocol):
            protocol.handshakeCompleted()
        if self.dataBuffer or self._tempDataBuffer:
            self.startWriting()
        if self.disconnected:
            return None
        # The client's first request may have come with its last handshake
        # flight, already read from the socket into the TLS connection.
        if self.socket.pending():
            return self.doRead()
        return None

    def writeSomeData(self, data: Any) -> Any:
        if not self._handshakeDone:
            return 0
        try:
            return self.send_now(memoryview(data)[: self.SEND_LIMIT])
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        except OSError as e:
            if e.args and e.args[0] in (errno.EWOULDBLOCK, errno.ENOBUFS):
                return 0
            return main.CONNECTION_LOST

    def _closeSocket(self, orderly: bool) -> None:
        # A finished session says so (close_notify) before the socket goes;
        # whether the client answers is not waited for.
        if orderly and self._handshakeDone:
            try:
                self.socket.unwrap()
            except (OSError, ValueError):
                pass
        super()._closeSocket(orderly)

    def _closeWriteConnection(self) -> None:
        # TLS has no half-close: the whole connection closes.
        self.loseConnection()


class StreamPort(tcp.Port):
    """A TCP listening port whose connections are plain ``tcp.Server`` or,
    with ``ssl_context``, TLSServer transports. ``accepts_per_read`` caps the
    connections taken per readable event (processes sharing one listening
    socket each take their part instead of one taking a whole burst)."""

    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def from_socket(cls, reactor: Any, sock: socket.socket, factory: IProtocolFactory,
                    context: ssl.SSLContext | None, accepts_per_read: int | None = None
                    ) -> StreamPort:
        port = cls._fromListeningDescriptor(reactor, sock.fileno(), sock.family, factory)
        port.ssl_context = context
        if context is not None:
            port.transport = TLSServer  # type: ignore[assignment]
            port._type = "TLS"
        port._accepts_cap = accepts_per_read
        return port

    _accepts_cap: int | None = None
    # With several processes on one socket: whether this one should take the
    # next connection (it is not ahead of the others), and how long it stays
    # away when it should not (the others are woken by the same event).
    accept_now: Callable[[], bool] | None = None
    ACCEPT_BACKOFF = 0.002

    # Deferred turns in a row: a process that is not ahead only waits so
    # often for the others (one of them may not be accepting at all).
    ACCEPT_DEFERRALS = 2
    _deferrals = 0
    # Set while the factory paused accepting (a storm of TLS handshakes):
    # the backoff must not undo that.
    accepting_paused = False

    def doRead(self) -> None:
        if self.accept_now is not None and self._deferrals < self.ACCEPT_DEFERRALS \
                and not self.accept_now():
            self._deferrals += 1
            self.stopReading()
            self.reactor.callLater(self.ACCEPT_BACKOFF, self._read_again)
            return
        self._deferrals = 0
        if self._accepts_cap is not None:
            self.numberAccepts = min(self.numberAccepts, self._accepts_cap)
        super().doRead()
        if self._accepts_cap is not None:
            self.numberAccepts = min(self.numberAccepts, self._accepts_cap)

    def _read_again(self) -> None:
        if self.connected and not self.disconnecting and self.accepting_paused is False:
            self.startReading()


def listen_stream(reactor: Any, sock: socket.socket, factory: IProtocolFactory,
                  context: ssl.SSLContext | None, accepts_per_read: int | None = None
                  ) -> StreamPort:
    """Listen on an already bound socket (which stays the caller's; the port
    works on a duplicate of it)."""
    port = StreamPort.from_socket(reactor, sock, factory, context, accepts_per_read)
    port.startListening()
    return port


class SharedConnectionCount:
    """The connections open in several processes that share one listening
    socket, counted against one limit (ConnectionCount for each process).

    One slot per process in a shared memory page (a memfd mapped shared,
    inherited across fork), changed under a POSIX record lock on it: such
    locks belong to a process (a forked child does not share its parent's)
    and are released when the process dies, however it dies.

    Invariant: slot ``i`` holds the connections process ``i`` has open, or
    -1 while no process ``i`` serves; only process ``i`` changes it, but for
    ``reset`` and ``absent`` by the process that starts and ends them.
    """

    _SLOT = struct.Struct("=q")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._fd = os.memfd_create("icp-bridge-connections", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, slots * self._SLOT.size)
        self._map = mmap.mmap(self._fd, slots * self._SLOT.size)

    def for_slot(self, slot: int) -> SlotCount:
        return SlotCount(self, slot)

    def total(self) -> int:
        with self._locked():
            return self._sum()

    def reset(self, slot: int) -> None:
        """Process ``slot`` is gone: its connections with it."""
        with self._locked():
            self._SLOT.pack_into(self._map, slot * self._SLOT.size, 0)

    def absent(self, slot: int) -> None:
        """No process ``slot`` serves (not yet, or no longer)."""
        with self._locked():
            self._SLOT.pack_into(self._map, slot * self._SLOT.size, -1)

    def counts(self) -> list[int]:
        """Each slot's connections (-1: absent); read without the lock, so a
        moment's picture, for balancing (never for the limit)."""
        size = self._SLOT.size
        return [self._SLOT.unpack_from(self._map, i * size)[0] for i in range(self.slots)]

    def _sum(self) -> int:
        size = self._SLOT.size
        return sum(max(0, self._SLOT.unpack_from(self._map, i * size)[0])
                   for i in range(self.slots))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _add(self, slot: int, limit: int | None, step: int) -> bool:
        offset = slot * self._SLOT.size
        with self._locked():
            if limit is not None and self._sum() >= limit:
                return False
            (mine,) = self._SLOT.unpack_from(self._map, offset)
            self._SLOT.pack_into(self._map, offset, max(0, mine + step))
        return True

    @property
    def fd(self) -> int:
        """The memfd (a forked process keeps it open)."""
        return self._fd


class SlotCount:
    """One process's view of a SharedConnectionCount (a ConnectionCount)."""

    def __init__(self, shared: SharedConnectionCount, slot: int) -> None:
        self.shared = shared
        self.slot = slot

    def take(self, limit: int) -> bool:
        return self.shared._add(self.slot, limit, 1)

    def fair_share(self, peers: range, slack: int = 1) -> bool:
        """Whether this process holds no more than ``slack`` connections
        above the least loaded present process among ``peers`` (slots)."""
        counts = self.shared.counts()
        others = [counts[i] for i in peers if i != self.slot and counts[i] >= 0]
        return not others or counts[self.slot] <= min(others) + slack

    def give(self) -> None:
        self.shared._add(self.slot, None, -1)

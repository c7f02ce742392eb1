"""The OTS API connection the ``ctl`` commands share: TLS by default, and
every way it can fail told apart, so that the operator knows where to look:

- ``bridge not listening at HOST:PORT (connection refused)``;
- ``TLS handshake failed: ...``: the certificate expired (or is not valid
  yet), it does not match ``--cafile``, it is not for HOST, or the other
  end is no TLS server (is it ``--plain``?);
- ``timed out`` connecting, in the handshake, or waiting for an answer;
- the bridge closing the connection without an answer (``--plain`` against
  a TLS endpoint), or failing the call itself.

Each is a :class:`CtlError` carrying the exit status: 3 when the bridge
cannot be reached, 1 when a call failed.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Exit statuses of ``ctl``: a call refused or failed; a usage error; the
#: bridge not reached.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

# OpenSSL's X509_V_ERR_* codes the operator needs told apart.
_EXPIRED = 10
_NOT_YET_VALID = 9
_HOSTNAME_MISMATCH = 62
_UNTRUSTED = {7, 18, 19, 20, 21}  # bad signature, self-signed, unknown issuer
# Reasons OpenSSL gives when the other end does not speak TLS at all.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
            "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "UNEXPECTED_MESSAGE"}


class CtlError(Exception):
    """A ctl command failed; ``str()`` says why, ``exit_code`` is the status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def unreachable(message: str) -> CtlError:
    return CtlError(message, EXIT_UNREACHABLE)


@dataclass(frozen=True)
class Target:
    """Where the bridge's OTS API is and how to speak to it."""

    host: str
    port: int
    timeout: float
    plain: bool = False
    insecure: bool = False
    #: The certificate the bridge must present (its own, self-signed).
    cafile: Path | None = None
    #: Where ``cafile`` comes from: "--cafile", or where the bridge's
    #: configuration names it ("ssl.certificate of /etc/ogon/config.ini:3").
    cafile_from: str = "--cafile"

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def _tls_context(target: Target) -> ssl.SSLContext:
    if target.insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    assert target.cafile is not None
    try:
        return ssl.create_default_context(cafile=str(target.cafile))
    except (OSError, ssl.SSLError) as e:
        raise CtlError(f"cannot use {target.cafile} to verify the bridge: "
                       f"{getattr(e, 'strerror', None) or e}") from None


def _certificate_dates(target: Target) -> tuple[str, str] | None:
    """The validity of the certificate the bridge presents (a second,
    unverified handshake: the verified one refused it), as UTC text."""
    from cryptography import x509

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((target.host, target.port), target.timeout) as raw, \
                context.wrap_socket(raw, server_hostname=target.host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    if der is None:
        return None
    certificate = x509.load_der_x509_certificate(der)
    return (certificate.not_valid_before_utc.strftime("%Y-%m-%d %H:%M UTC"),
            certificate.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"))


def _verify_failed(target: Target, error: ssl.SSLCertVerificationError) -> CtlError:
    code = error.verify_code
    if code in (_EXPIRED, _NOT_YET_VALID):
        dates = _certificate_dates(target)
        if code == _EXPIRED:
            what = "certificate expired" + (f" on {dates[1]}" if dates else "")
        else:
            what = "certificate not valid yet" + (f" (from {dates[0]})" if dates else "")
        return unreachable(f"TLS handshake failed: {what} ({target.where}); the bridge needs "
                           f"a new ssl.certificate")
    if code == _HOSTNAME_MISMATCH:
        return unreachable(f"TLS handshake failed: the certificate is not for {target.host} "
                           f"(dial a name it was made for: 127.0.0.1 or localhost for a "
                           f"generated one)")
    if code in _UNTRUSTED:
        source = target.cafile_from if target.cafile_from == "--cafile" else \
            f"{target.cafile_from}; pass --cafile with the one the bridge serves"
        return unreachable(f"TLS handshake failed: certificate does not match {target.cafile} "
                           f"({source})")
    return unreachable(f"TLS handshake failed: {error.verify_message} ({target.where})")


def connect(target: Target) -> socket.socket:
    """A connected socket to the bridge, TLS unless ``target.plain``, its
    handshake done. Raises CtlError saying why not."""
    context = None if target.plain else _tls_context(target)
    try:
        raw = socket.create_connection((target.host, target.port), timeout=target.timeout)
    except ConnectionRefusedError:
        raise unreachable(f"bridge not listening at {target.where} (connection refused)"
                          ) from None
    except TimeoutError:
        raise unreachable(f"timed out connecting to {target.where} after "
                          f"{target.timeout:g} s") from None
    except OSError as e:
        raise unreachable(f"cannot connect to {target.where}: {e.strerror or e}") from None
    if context is None:
        return raw
    try:
        return context.wrap_socket(raw, server_hostname=target.host)
    except ssl.SSLCertVerificationError as e:
        raw.close()
        raise _verify_failed(target, e) from None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError):
        raw.close()
        raise unreachable(f"TLS handshake failed: {target.where} closed the connection: not a "
                          f"TLS server (is it --plain?)") from None
    except ssl.SSLError as e:
        raw.close()
        if (e.reason or "") in _NOT_TLS:
            raise unreachable(f"TLS handshake failed: {target.where} is not a TLS server (is "
                              f"it --plain?)") from None
        raise unreachable(f"TLS handshake failed with {target.where}: {e.reason or e}"
                          ) from None
    except TimeoutError:
        raw.close()
        raise unreachable(f"TLS handshake with {target.where} timed out after "
                          f"{target.timeout:g} s (is it --plain?)") from None
    except OSError as e:
        raw.close()
        raise unreachable(f"TLS handshake failed with {target.where}: {e.strerror or e}"
                          ) from None


class OtsClient:
    """thrift's blocking OTS API client on one connection; a method call
    that fails on the wire raises CtlError saying how."""

    def __init__(self, target: Target) -> None:
        from thrift.protocol import TBinaryProtocol
        from thrift.transport import TSocket, TTransport

        from protocols.generated.otsapi_blocking import otsapi

        self.target = target
        sock = TSocket.TSocket(target.host, target.port)
        sock.setHandle(connect(target))
        sock.setTimeout(target.timeout * 1000)
        self.transport = TTransport.TFramedTransport(sock)
        self._client = otsapi.Client(TBinaryProtocol.TBinaryProtocolAccelerated(self.transport))

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> OtsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)

        def call(*args: Any) -> Any:
            from thrift.Thrift import TApplicationException
            from thrift.transport.TTransport import TTransportException

            try:
                return method(*args)
            except TTransportException as e:
                raise self._transport_failed(name, e) from None
            except TApplicationException as e:
                raise CtlError(f"{name}: the bridge failed the call: {e.message or e}"
                               ) from None
            except OSError as e:
                raise unreachable(f"{name}: connection to {self.target.where} failed: "
                                  f"{e.strerror or e}") from None

        return call

    def _transport_failed(self, name: str, error: Exception) -> CtlError:
        from thrift.transport.TTransport import TTransportException

        kind = getattr(error, "type", None)
        where = self.target.where
        if kind == TTransportException.TIMED_OUT:
            return unreachable(f"{name}: timed out: no answer from {where} within "
                               f"{self.target.timeout:g} s")
        if kind == TTransportException.END_OF_FILE:
            hint = " (is its endpoint TLS? drop --plain)" if self.target.plain else ""
            return unreachable(f"{name}: {where} closed the connection without an answer"
                               f"{hint}")
        return unreachable(f"{name}: connection to {where} failed: {error}")

"""The TLS certificate of the OTS API (and of the RDP server, which reads the
same ``ssl.certificate``/``ssl.key`` pair over ICP), and completing endpoint
strings with it.

ogon's session manager generates a self-signed pair at startup when the
files are missing; so does the bridge, with the ``cryptography`` package.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

from twisted.internet.endpoints import quoteStringArgument
from twisted.logger import Logger

from bridge.endpoints import StartupError, split_endpoint

log = Logger(namespace="bridge.security.tls")

#: ogon's defaults for the pair, used when the bridge runs as root.
OGON_CERTIFICATE = Path("/etc/ssl/certs/ogon.crt")
OGON_KEY = Path("/etc/ssl/private/ogon.key")
#: Years a generated certificate is valid (clients do not verify it; the
#: date only has to stay valid).
_VALIDITY_DAYS = 10 * 365


def default_pair(running_as_root: bool, state_dir: Path) -> tuple[Path, Path]:
    """Where the pair lives unless ``ssl.certificate``/``ssl.key`` say."""
    if running_as_root:
        return OGON_CERTIFICATE, OGON_KEY
    return state_dir / "tls" / "ogon.crt", state_dir / "tls" / "ogon.key"


def _readable(path: Path, option: str) -> bool:
    """True if ``path`` exists and can be read; False if it does not exist;
    StartupError (one line naming the option) when it exists but cannot be
    read or is not a regular file."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        raise StartupError(f"{option}: {path} is a directory, not a PEM file") from None
    except OSError as e:
        raise StartupError(f"{option}: cannot read {path}: {e.strerror}") from None
    return True


def ensure_pair(certificate: Path, key: Path) -> bool:
    """Make sure the pair exists: keep readable files, generate both when
    both are missing. Returns True if it generated them. A pair with only
    one half, or a file that cannot be read, stops startup."""
    have_cert = _readable(certificate, "ssl.certificate")
    have_key = _readable(key, "ssl.key")
    if have_cert and have_key:
        return False
    if have_cert or have_key:
        present, missing = (certificate, key) if have_cert else (key, certificate)
        raise StartupError(
            f"TLS pair incomplete: {present} exists but {missing} does not; provide both "
            f"(ssl.certificate / ssl.key) or remove {present} to have a pair generated")
    try:
        generate_pair(certificate, key)
    except OSError as e:
        raise StartupError(f"cannot create the TLS pair {certificate} / {key}: "
                           f"{e.strerror or e}") from None
    log.info("generated a self-signed TLS certificate {certificate} (key {key})",
             certificate=str(certificate), key=str(key))
    return True


def generate_pair(certificate: Path, key: Path) -> None:
    """Write a new self-signed RSA-2048 certificate for this host (and
    localhost) and its key: key mode 0600, certificate 0644."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    # RSA, not EC: RDP clients of every age accept RSA server certificates.
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    host = socket.gethostname() or "localhost"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "icp-bridge")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.IPAddress(ipaddress.ip_address("::1"))]
    if host != "localhost":
        alt_names.insert(0, x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    from bridge.security.auth import atomic_write

    for path, mode in ((key, 0o700), (certificate, 0o755)):
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=mode)
    atomic_write(key, key_pem, mode=0o600)
    atomic_write(certificate, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def with_certificate(description: str, certificate: Path, key: Path) -> str:
    """An ``ssl:`` endpoint string with ``certKey``/``privateKey`` added
    when it names neither; anything else unchanged."""
    parts = split_endpoint(description)
    if parts[0] != "ssl":
        return description
    names = {part.split("=", 1)[0] for part in parts[1:] if "=" in part}
    if "privateKey" in names or "certKey" in names:
        return description
    return (f"{description}:privateKey={quoteStringArgument(str(key))}"
            f":certKey={quoteStringArgument(str(certificate))}")


def endpoint_certificate(description: str) -> Path | None:
    """The certificate file an ``ssl:`` endpoint string names (``certKey``,
    else ``privateKey``, which then holds both, as Twisted reads it); None
    for another kind of endpoint or one that names neither."""
    from twisted.internet.endpoints import _parse  # the endpoint string grammar

    parts = split_endpoint(description)
    if parts[0] != "ssl":
        return None
    _, options = _parse(description[len("ssl:"):])
    named = options.get("certKey") or options.get("privateKey")
    return Path(named) if named else None


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def openssl_time(text: str) -> datetime.datetime:
    """A time as OpenSSL prints it in a decoded certificate ("Dec  2 05:51:55
    2027 GMT"), what ssl.cert_time_to_seconds reads. Read here without
    time.strptime, whose first use (importing _strptime, its locale data
    and patterns) cost every start ~3 ms; ValueError when it is not one."""
    month, day, clock, year, zone = text.split()
    hour, minute, second = clock.split(":")
    if zone != "GMT" or month.title() not in _MONTHS:
        raise ValueError(f"not a certificate time: {text!r}")
    return datetime.datetime(int(year), _MONTHS.index(month.title()) + 1, int(day), int(hour),
                             int(minute), int(second), tzinfo=datetime.UTC)


def certificate_not_after(path: Path) -> datetime.datetime | None:
    """When the (first) certificate in a PEM file expires; None when the
    file cannot be read or holds no certificate.

    Read with the ssl module's own certificate decoder (what
    ``SSLSocket.getpeercert`` answers with) where Python has it: importing
    ``cryptography`` for one date costs the bridge 12 MB for its life."""
    import ssl

    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is not None:
        try:
            return openssl_time(decode(str(path))["notAfter"])
        except (OSError, ssl.SSLError, KeyError, ValueError):
            return None
    from cryptography import x509

    try:
        data = path.read_bytes()
        return x509.load_pem_x509_certificate(data).not_valid_after_utc
    except (OSError, ValueError):
        return None


def uses_default_pair(description: str) -> bool:
    """Whether an endpoint string will be served with the properties' pair."""
    parts = split_endpoint(description)
    names = {part.split("=", 1)[0] for part in parts[1:] if "=" in part}
    return parts[0] == "ssl" and not names & {"privateKey", "certKey"}



def check_endpoint_options(description: str, option: str) -> None:
    """Check an ``ssl:`` endpoint string that will be completed with the
    properties' pair without loading anything (the pair may not exist yet,
    and a start refused for a typo must not have generated it): its port
    and its option names, as Twisted's parser takes them. Other endpoint
    strings are checked whole when the service parses them."""
    if not uses_default_pair(description):
        return
    import inspect

    from twisted.internet.endpoints import _parse, _parseSSL

    args, options = _parse(description[len("ssl:"):])
    known = [name for name in inspect.signature(_parseSSL).parameters
             if name not in ("factory", "port")]
    unknown = sorted(set(options) - set(known))
    if len(args) != 1 or not args[0].isdigit() or unknown:
        what = f"unknown option {unknown[0]!r} (known: {', '.join(known)})" if unknown \
            else "expected ssl:PORT[:option=value...]"
        raise StartupError(f"{option}: bad endpoint {description!r}: {what}")

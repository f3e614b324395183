"""A small test / development PKI for the broker's TLS listeners (``edgefleet broker make-certs``,
the benchmarks' TLS variants, the tests).

``make_pki(directory, hostname=...)`` writes, with ``cryptography`` (EC P-256 keys, 0600 key files):

- ``ca.crt`` / ``ca.key``: a self-signed CA;
- ``server.crt`` / ``server.key``: the broker's certificate, SAN 127.0.0.1, localhost and ``hostname``;
- ``server-expired.crt`` / ``server-expired.key``: the same names, expired yesterday (tests);
- ``client-NAME.crt`` / ``.key`` for each client name (CN = NAME, the broker username it stands for),
  and ``client-expired.crt`` / ``.key`` when clients are asked for.

Not a production CA: its key sits next to the certificates, unencrypted. ``cryptography`` (the edge
and cloud extras) is imported only when a function runs, as in ``shared.signing``: ``shared`` is
installed on devices, which do not have it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from shared.files import write_private_file

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

DEFAULT_DAYS: Final = 365
EXPIRED_CLIENT: Final = "expired"
KEY_FILE_MODE: Final = 0o600


@dataclass(frozen=True, slots=True)
class Issued:
    """A key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, mode 0600 (``shared.files.write_private_file``)."""
    write_private_file(path, text, mode=KEY_FILE_MODE)


def _name(common_name: str) -> x509.Name:
    from cryptography import x509  # noqa: PLC0415  (edge/cloud extra, not on devices)
    from cryptography.x509.oid import NameOID  # noqa: PLC0415  (edge/cloud extra, not on devices)

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "edgefleet test CA", *, days: int = DEFAULT_DAYS) -> Issued:
    """A self-signed CA certificate and its key."""
    from cryptography import x509  # noqa: PLC0415  (edge/cloud extra, not on devices)
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415  (edge/cloud extra, not on devices)
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415  (edge/cloud extra, not on devices)

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(
    ca: Issued,
    common_name: str,
    *,
    server: bool,
    hostnames: tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
    expired: bool = False,
) -> Issued:
    """A certificate signed by ``ca``: a server's (SANs: IP addresses and DNS names from ``hostnames``)
    or a client's; ``expired`` makes one that ended yesterday."""
    from cryptography import x509  # noqa: PLC0415  (edge/cloud extra, not on devices)
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415  (edge/cloud extra, not on devices)
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415  (edge/cloud extra, not on devices)
    from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: PLC0415  (edge/cloud extra, not on devices)

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (
        (now - dt.timedelta(days=30), now - dt.timedelta(days=1))
        if expired
        else (
            now - dt.timedelta(minutes=5),
            now + dt.timedelta(days=days),
        )
    )
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if hostnames:
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hostnames):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return Issued(key, builder.sign(ca.key, hashes.SHA256()))


def write_issued(directory: Path, stem: str, issued: Issued) -> tuple[Path, Path]:
    """Write ``STEM.crt`` (0644) and ``STEM.key`` (0600) into ``directory``."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415  (edge/cloud extra, not on devices)

    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    key_pem = issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(key_path, key_pem.decode())
    return cert_path, key_path


def make_pki(
    directory: Path,
    *,
    hostname: str = "localhost",
    days: int = DEFAULT_DAYS,
    clients: tuple[str, ...] = (),
    ca_name: str = "edgefleet test CA",
) -> dict[str, Path]:
    """Write a CA, a server certificate (and an expired one), and client certificates; return
    ``{"ca": ca.crt, "ca_key": ..., "server": ..., "server_key": ..., "server_expired": ..., ...,
    "client-NAME": ..., "client-NAME_key": ...}``."""
    ca = make_ca(ca_name, days=days)
    paths: dict[str, Path] = {}
    paths["ca"], paths["ca_key"] = write_issued(directory, "ca", ca)
    hostnames = ("127.0.0.1", "localhost", hostname)
    server = issue(ca, hostname, server=True, hostnames=hostnames, days=days)
    paths["server"], paths["server_key"] = write_issued(directory, "server", server)
    expired = issue(ca, hostname, server=True, hostnames=hostnames, expired=True)
    paths["server_expired"], paths["server_expired_key"] = write_issued(directory, "server-expired", expired)
    for name in clients:
        client = issue(ca, name, server=False, days=days)
        paths[f"client-{name}"], paths[f"client-{name}_key"] = write_issued(
            directory, f"client-{name}", client
        )
    if clients:
        old = issue(ca, clients[0], server=False, expired=True)
        stem = f"client-{EXPIRED_CLIENT}"
        paths[stem], paths[f"{stem}_key"] = write_issued(directory, stem, old)
    return paths


def certificate_problem(path: Path, *, now: dt.datetime | None = None) -> str | None:
    """Why the PEM certificate at ``path`` cannot serve now (unreadable, not yet valid, expired), or None."""
    from cryptography import x509  # noqa: PLC0415  (edge/cloud extra, not on devices)

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        return f"{path}: not a readable PEM certificate ({exc})"
    now = now or dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        return f"{path}: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if cert.not_valid_before_utc > now:
        return f"{path}: the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    return None

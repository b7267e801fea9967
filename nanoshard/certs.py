"""``nanoshard certs``: a private CA and one TLS certificate per host, for a LAN swarm.

Writes ``ca.pem`` (give it to everyone: ``--tls-ca``), ``ca.key`` (keep it; it signs more
hosts later) and, per host, ``HOST.pem`` + ``HOST.key`` (that host's ``--tls-cert`` and
``--tls-key``). A host may be a name or an IP address; the certificate names it as such.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nanoshard.errors import InvalidArgument

HOST = re.compile(r"^[A-Za-z0-9.\-:]{1,253}$")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _load_ca(ca_pem: Path, ca_key_pem: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA a folder holds, to sign more hosts with: never half of one replaced by a
    new CA (the swarm's nodes trust the old ``ca.pem``), nor a key that is not its own."""
    missing = [p for p in (ca_pem, ca_key_pem) if not p.is_file()]
    if missing:
        raise InvalidArgument(
            f"{ca_pem.parent} holds a CA without {missing[0].name}: put it back to sign more "
            "hosts with it, or write to an empty folder for a new CA"
        )
    try:
        cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{ca_pem} is not a readable PEM certificate: {exc}") from None
    try:
        key = serialization.load_pem_private_key(ca_key_pem.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: a passphrase-protected key
        raise InvalidArgument(
            f"{ca_key_pem} is not an unencrypted private key in PEM: {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise InvalidArgument(f"{ca_key_pem} is not the key of {ca_pem}: they are two CAs'")
    return cert, key


MAX_DAYS = 36500  # a certificate's days of validity, at most


def make_certs(folder: Path, hosts: list[str], days: int = 825) -> list[Path]:
    """A CA in ``folder`` (reused if ``ca.pem`` + ``ca.key`` are there) and a certificate
    for each of ``hosts``; returns the files written."""
    bad = [h for h in hosts if not HOST.match(h)]
    if not hosts or bad:
        raise InvalidArgument(f"--hosts needs host names or IP addresses, got {bad or hosts}")
    if not 1 <= days <= MAX_DAYS:
        raise InvalidArgument(f"--days must be 1 to {MAX_DAYS} (100 years)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidArgument(f"cannot write certificates to {folder}: {exc}") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    start, until = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    written: list[Path] = []
    ca_pem, ca_key_pem = folder / "ca.pem", folder / "ca.key"
    if ca_pem.exists() or ca_key_pem.exists():
        ca_cert, ca_key = _load_ca(ca_pem, ca_key_pem)
    else:
        ca_key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nanoshard swarm CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        _write(ca_pem, ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(ca_key_pem, _pem_key(ca_key), private=True)  # type: ignore[arg-type]
        written += [ca_pem, ca_key_pem]
    for host in hosts:
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        stem = host.replace(":", "_")
        _write(folder / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write(folder / f"{stem}.key", _pem_key(key), private=True)
        written += [folder / f"{stem}.pem", folder / f"{stem}.key"]
    return written

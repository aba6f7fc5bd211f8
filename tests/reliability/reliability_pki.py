"""A throwaway PKI, generated per test session with `cryptography` (no key is ever committed).

`make_pki(folder)` writes a CA, a server certificate for localhost / 127.0.0.1 / ::1, a client
certificate from the same CA, and a client certificate from an unrelated CA (for "a certificate
the server does not trust"). EC P-256 keys: generating them takes microseconds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    untrusted_ca_cert: Path  # a CA that signed neither the server nor the trusted client
    untrusted_client_cert: Path  # signed by the untrusted CA
    untrusted_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "augsvc reliability tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _cert(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
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
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def make_pki(folder: Path) -> Pki:
    """Write fresh certificates and keys under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("augsvc test CA", ca_key.public_key(), _name("augsvc test CA"), ca_key, ca=True)
    other = _cert("someone else's CA", other_key.public_key(), _name("someone else's CA"), other_key, ca=True)
    ca_cert, _ = _write(folder, "ca", ca, ca_key)
    untrusted_ca_cert, _ = _write(folder, "untrusted-ca", other, other_key)
    keys = {stem: ec.generate_private_key(ec.SECP256R1()) for stem in ("server", "client", "untrusted")}
    server = _write(
        folder,
        "server",
        _cert("localhost", keys["server"].public_key(), ca.subject, ca_key, ca=False, server=True),
        keys["server"],
    )
    client = _write(
        folder,
        "client",
        _cert("trainer", keys["client"].public_key(), ca.subject, ca_key, ca=False),
        keys["client"],
    )
    untrusted = _write(
        folder,
        "untrusted",
        _cert("trainer", keys["untrusted"].public_key(), other.subject, other_key, ca=False),
        keys["untrusted"],
    )
    return Pki(
        ca_cert=ca_cert,
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        untrusted_ca_cert=untrusted_ca_cert,
        client_key=client[1],
        untrusted_client_cert=untrusted[0],
        untrusted_client_key=untrusted[1],
    )

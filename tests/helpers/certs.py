"""A throwaway PKI for TLS tests, generated per run into a temporary folder (never committed).

`make_pki(folder)` writes a CA, a server certificate for 127.0.0.1 / ::1 / localhost, a client
certificate signed by the CA, and a second, unrelated CA with its own client certificate (for
the "signed by someone else" cases). EC P-256 keys: generating them takes microseconds.
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
    other_ca_cert: Path         # a CA the servers do not trust
    rogue_client_cert: Path     # a client certificate signed by other_ca
    rogue_client_key: Path


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "augsvc tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
             ) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _ca(common_name: str) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(common_name, _name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _Issued(cert, key)


def _leaf(ca: _Issued, common_name: str, *, server: bool) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(common_name, ca.cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                              critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]), critical=False)
    return _Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def make_pki(folder: Path) -> Pki:
    """Write a fresh CA, server and client certificates (and an untrusted CA) under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca, other = _ca("augsvc test CA"), _ca("someone else's CA")
    server = _leaf(ca, "localhost", server=True)
    client = _leaf(ca, "trainer", server=False)
    rogue = _leaf(other, "trainer", server=False)
    return Pki(
        ca_cert=_write_cert(folder / "ca.pem", ca.cert),
        server_cert=_write_cert(folder / "server.pem", server.cert),
        server_key=_write_key(folder / "server.key", server.key),
        client_cert=_write_cert(folder / "client.pem", client.cert),
        client_key=_write_key(folder / "client.key", client.key),
        other_ca_cert=_write_cert(folder / "other-ca.pem", other.cert),
        rogue_client_cert=_write_cert(folder / "rogue.pem", rogue.cert),
        rogue_client_key=_write_key(folder / "rogue.key", rogue.key),
    )

"""Certificates for TLS tests: a CA, and server and client certificates it signs (or
self-signed ones, as a stranger would bring), made with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class Authority:
    def __init__(self, directory: Path, name: str = "xenpool test CA") -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(self.key, hashes.SHA256())
        )
        self.trust = (
            directory / f"{name.replace(' ', '-')}-trust"
        )  # caCertsDir, trustRoots
        self.trust.mkdir(parents=True)
        (self.trust / "ca.pem").write_bytes(
            self.certificate.public_bytes(serialization.Encoding.PEM)
        )

    def issue(self, common_name: str, address: str = "127.0.0.1") -> tuple[Path, Path]:
        """(certificate, key) files for ``common_name``, valid for ``address`` too."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
            )
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(common_name),
                        x509.IPAddress(ipaddress.ip_address(address)),
                    ]
                ),
                False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.directory / f"{common_name}.pem"
        key_path = self.directory / f"{common_name}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

"""`fedrec certs`: a development CA, a SuperLink certificate and SuperNode key pairs.

For production, use your organisation's CA; Flower only needs the PEM files. Node keys are
ECDSA P-384 in OpenSSH format, the form Flower registers (`flwr supernode register`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedrec.atomic import atomic_file


@dataclass(frozen=True)
class ServerTLS:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, folder: str | Path) -> "ServerTLS":
        folder = Path(folder)
        return cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(data)
    if private:
        path.chmod(0o600)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def create_dev_pki(out: str | Path, hosts: list[str] | None = None, days: int = 365) -> ServerTLS:
    """A CA and a server certificate valid for `hosts` (default: 127.0.0.1 and localhost)."""
    out = Path(out)
    hosts = hosts or ["127.0.0.1", "localhost"]
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fedrec development CA"))
               .issuer_name(_name("fedrec development CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    tls = ServerTLS.in_dir(out)
    pem = serialization.Encoding.PEM
    _write(tls.ca, ca_cert.public_bytes(pem))
    _write(tls.cert, cert.public_bytes(pem))
    _write(tls.key, key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()), private=True)
    _write(out / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                serialization.NoEncryption()), private=True)
    return tls


def create_node_key(out: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair: `name` (private, stays with the region) and `name.pub` (registered)."""
    out = Path(out)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public

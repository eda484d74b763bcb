"""Development TLS certificates and SuperNode authentication keys, for local federations.

Everything comes from pyca ``cryptography``: a dev CA and a server certificate for
``127.0.0.1`` / ``localhost`` (TLS between SuperNodes and the SuperLink), and one EC
key per hospital in OpenSSH format (Flower's SuperNode authentication). Private keys
are written owner-only. The dev CA is for local runs only; docs/deployment.md says
what a real deployment uses.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bract.flower.files import write_private_bytes

__all__ = ["LOOPBACK", "NodeKeyFiles", "TlsFiles", "generate_dev_certificates",
           "generate_supernode_key"]

#: Loopback only: the one address local federations bind to and connect to.
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a development CA and the server certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def generate_dev_certificates(
    directory: Path,
    hosts: Sequence[str] = (LOOPBACK, "localhost"),
    days: int = 7,
) -> TlsFiles:
    """Create a throw-away CA and a server certificate for ``hosts``, as PEM files.

    Writes ``ca.crt`` (self-signed CA, path length 0), ``server.pem`` (signed by
    the CA, valid for TLS server authentication, with every entry of ``hosts`` in
    its subject alternative names — IP addresses as IP SANs, names as DNS SANs)
    and ``server.key`` (mode 0600) into ``directory``. Keys are EC P-256. The CA
    key is never written to disk, so no further certificate can be signed with it.

    These are development certificates: valid for ``days`` days, for one machine.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bract dev CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    write_private_bytes(
        files.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return files


@dataclass(frozen=True)
class NodeKeyFiles:
    """A SuperNode's authentication key pair, in the OpenSSH formats Flower reads."""

    name: str
    private_key: Path
    public_key: Path


def generate_supernode_key(directory: Path, name: str) -> NodeKeyFiles:
    """Create SuperNode ``name``'s authentication key pair (EC P-384, OpenSSH format).

    Flower 1.41 authenticates SuperNodes with EC keys on a NIST curve:
    ``flower-supernode --auth-supernode-private-key`` reads an OpenSSH private
    key (written here as ``<name>`` with mode 0600, unencrypted), and ``flwr
    supernode register`` reads the OpenSSH public key (``<name>.pub``). Only
    the public key ever leaves the hospital.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"key name {name!r} must be a plain file name")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    files = NodeKeyFiles(name, directory / name, directory / f"{name}.pub")
    write_private_bytes(
        files.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    files.public_key.write_bytes(public + f" {name}\n".encode())
    return files

"""Credentials for a secure Flower deployment, made with the ``cryptography`` package.

``fedlora flower APP_DIR CONFIG --tls DIR`` writes into DIR:

- ``ca.crt`` / ``ca.key``: a private certificate authority (P-384, ten years) whose certificate every
  SuperNode and ``flwr`` trust (``--root-certificates``; ``root-certificates`` in the connection);
- ``superlink.crt`` / ``superlink.key``: the SuperLink's TLS certificate, signed by that CA, for the host
  names and addresses given (``--ssl-certfile`` / ``--ssl-keyfile`` / ``--ssl-ca-certfile``);
- ``supernode-<i>`` / ``supernode-<i>.pub``: one OpenSSH EC P-384 key pair per client, for SuperNode
  authentication: the SuperLink runs with ``--enable-supernode-auth``, each public key is registered with
  ``flwr supernode register``, and a node proves its identity with ``--auth-supernode-private-key``. A node
  whose key was not registered is refused by the SuperLink.

Private keys are written with mode 0600. Nothing here is fedlora-specific except the file names.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Credentials:
    folder: Path
    nodes: int

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def superlink_cert(self) -> Path:
        return self.folder / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.folder / "superlink.key"

    def node_key(self, i: int) -> Path:
        return self.folder / f"supernode-{i}"

    def node_public_key(self, i: int) -> Path:
        return self.folder / f"supernode-{i}.pub"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def node_key_pair(private_path: Path, public_path: Path) -> None:
    """An OpenSSH EC P-384 key pair (what ``flower-supernode`` and ``flwr supernode register`` read)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_path, private, private=True)
    _write(public_path, public + b"\n")


def make_credentials(
    folder: Path, nodes: int, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> Credentials:
    """A CA, a SuperLink certificate for ``hosts`` and ``nodes`` SuperNode key pairs under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    creds = Credentials(folder, nodes)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedlora CA"))
        .issuer_name(_name("fedlora CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(folder / "ca.key", _pem_key(ca_key), private=True)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    link_key = ec.generate_private_key(ec.SECP384R1())
    link_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(link_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(creds.superlink_cert, link_cert.public_bytes(serialization.Encoding.PEM))
    _write(creds.superlink_key, _pem_key(link_key), private=True)
    for i in range(nodes):
        node_key_pair(creds.node_key(i), creds.node_public_key(i))
    return creds


def _claim(nonce: str, partition: int) -> bytes:
    return f"fedlora-partition-claim:{nonce}:{partition}".encode()


def sign_claim(private_key_path: Path, nonce: str, partition: int) -> str:
    """A node's proof that it holds partition ``partition``: the server's query nonce and the partition,
    signed (ECDSA, SHA-384) with the node's SuperNode key (the one bound to that partition), hex."""
    key = serialization.load_ssh_private_key(Path(private_key_path).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey), f"{private_key_path}: not an EC key"
    return key.sign(_claim(nonce, partition), ec.ECDSA(hashes.SHA384())).hex()


def verify_claim(public_key: str, nonce: str, partition: int, signature: str) -> bool:
    """Whether ``signature`` is :func:`sign_claim` of (nonce, partition) by the holder of ``public_key``
    (OpenSSH text)."""
    from cryptography.exceptions import InvalidSignature

    key = serialization.load_ssh_public_key(public_key.strip().encode())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    try:
        key.verify(bytes.fromhex(signature), _claim(nonce, partition), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True


def bound_keys(credentials: Credentials) -> dict[int, str]:
    """Partition i -> the public key of ``supernode-<i>`` (what the server checks each node's claim against)."""
    return {i: credentials.node_public_key(i).read_text().strip() for i in range(credentials.nodes)}

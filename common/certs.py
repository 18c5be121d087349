"""Certificates and keys for a real federation, made with the ``cryptography`` package.

* ``init_ca_and_server``: a private CA and the SuperLink's TLS certificate (SANs for every host name and IP the
  institutions will dial). The CA certificate is what each institution passes as ``--ca``.
* ``init_node``: an institution's two key pairs. An EC P-256 pair for Flower's SuperNode authentication (the
  private key in OpenSSH format, which ``flower-supernode`` loads, the public key in OpenSSH format, which the
  operator registers with the SuperLink), and an Ed25519 pair that signs its updates for the ``zk`` layer.

Private keys are created with mode 0600 and renamed into place, so they are never readable by others, not even
for a moment.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825


class CertificateError(ValueError):
    """A certificate or key file is missing or unusable; the message names the file."""


@dataclass(frozen=True)
class ServerFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeFiles:
    auth_key: Path
    auth_pub: Path
    sign_key: Path
    sign_pub: Path


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def init_ca_and_server(out: Path, server_names: list[str]) -> ServerFiles:
    """A CA and a server certificate valid for ``server_names`` (DNS names and/or IP addresses)."""
    if not server_names:
        raise CertificateError("--server-name needs at least one host name or IP address")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "finlora federation CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
                   .add_extension(_san(server_names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    files = ServerFiles(out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key")
    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, _pem_key(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def init_node(out: Path, name: str, write_signing_pair: Callable[[Path, Path], None]) -> NodeFiles:
    """An institution's SuperNode-auth key pair (OpenSSH) and its zk signing key pair, which
    ``write_signing_pair(private_path, public_path)`` makes (``zk.signing.write_key_pair``: ``common`` does not
    import the ``zk`` layer)."""
    if not name or "/" in name or name.startswith("."):
        raise CertificateError(f"--name '{name}' is not a usable institution name")
    files = NodeFiles(out / f"{name}.auth.key", out / f"{name}.auth.pub", out / f"{name}.key", out / f"{name}.pub.pem")
    auth = ec.generate_private_key(ec.SECP256R1())
    _write(files.auth_key, auth.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()), private=True)
    _write(files.auth_pub, auth.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH) + b"\n", private=False)
    write_signing_pair(files.sign_key, files.sign_pub)
    return files


def check_ca_certificate(path: Path) -> x509.Certificate:
    """Load a CA certificate, failing with the file's name and what is wrong."""
    if not Path(path).is_file():
        raise CertificateError(f"{path}: CA certificate not found")
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError as exc:
        raise CertificateError(f"{path}: not a PEM certificate ({exc})") from exc
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertificateError(f"{path}: not a CA certificate (BasicConstraints ca=false)")
    if cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
        raise CertificateError(f"{path}: expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert


def check_node_auth_key(path: Path) -> None:
    """The SuperNode-auth private key must be an OpenSSH EC key on a NIST curve (what Flower loads)."""
    if not Path(path).is_file():
        raise CertificateError(f"{path}: node key not found")
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except ValueError as exc:
        raise CertificateError(f"{path}: not an OpenSSH private key ({exc}); make one with 'finlora certs node'") \
            from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{path}: expected an EC key on a NIST curve, got {type(key).__name__}")

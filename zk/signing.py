"""Ed25519 identities of institutions: key files, a key registry, and the signed update statement.

The statement binds a commitment to (run, round, node, example count), so a signed update cannot be replayed
in another round or run, or claimed by another node, or reweighted.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from finlora.common.io import atomic_write_private, atomic_write_text

STATEMENT_TAG = b"finlora-zk/update-statement/v1"
PUBLIC_SUFFIX = ".pub.pem"


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def update_statement(run_id: str, round_num: int, node_id: str | int, commitments_digest: bytes,
                     num_examples: int) -> bytes:
    """Canonical bytes of (run id, round, node id, commitments digest, example count), each length-prefixed
    behind a domain tag, so no two different tuples encode the same."""
    if round_num < 0 or num_examples < 0:
        raise ValueError("round and num_examples must be non-negative")
    if len(commitments_digest) != 32:
        raise ValueError("commitments digest must be 32 bytes (sha256)")
    return _field(STATEMENT_TAG) + b"".join(_field(f) for f in (
        str(run_id).encode(), int(round_num).to_bytes(8, "big"), str(node_id).encode(),
        bytes(commitments_digest), int(num_examples).to_bytes(8, "big")))


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def sign(key: Ed25519PrivateKey, statement: bytes) -> bytes:
    """64-byte Ed25519 signature."""
    return key.sign(statement)


def verify(public_key: Ed25519PublicKey, statement: bytes, signature: bytes) -> bool:
    try:
        public_key.verify(bytes(signature), statement)
    except InvalidSignature:
        return False
    return True


def public_key_raw(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of a public key (what the ledger pins)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_raw(data: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes(data))


def save_private_key(key: Ed25519PrivateKey, path: Path) -> None:
    """PKCS#8 PEM, unencrypted, created with mode 0600 and renamed into place (never readable by others)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_private(Path(path), pem)


def save_public_key(key: Ed25519PublicKey | Ed25519PrivateKey, path: Path) -> None:
    """SubjectPublicKeyInfo PEM (the file an institution hands to the server ahead of the run)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_text(Path(path), pem.decode())


def write_key_pair(private_path: Path, public_path: Path) -> None:
    """A fresh Ed25519 signing pair: the private key (0600) and the public key an institution publishes."""
    key = generate_key()
    save_private_key(key, private_path)
    save_public_key(key, public_path)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM public key, or a file holding the 32 raw bytes or their 64 hex digits."""
    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{path}: not an Ed25519 public key")
        return key
    if len(data) == 32:
        return public_key_from_raw(data)
    return public_key_from_raw(bytes.fromhex(data.decode().strip()))


def load_key_registry(path: Path) -> dict[str, Ed25519PublicKey]:
    """Node/institution name -> public key, registered ahead of the run.

    ``path`` is either a JSON object {"name": "key file", ...} (relative files are resolved against the JSON's
    folder), or a directory where every ``<name>.pub.pem`` file is the key of ``<name>``.
    """
    path = Path(path)
    if path.is_dir():
        return {f.name[: -len(PUBLIC_SUFFIX)]: load_public_key(f) for f in sorted(path.glob(f"*{PUBLIC_SUFFIX}"))}
    mapping = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected a JSON object name -> key file")
    return {str(name): load_public_key(path.parent / str(file)) for name, file in mapping.items()}

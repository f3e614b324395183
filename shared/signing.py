"""ed25519 signatures over model manifests. The cloud signs; edges verify with the public key.

Keys are stored PEM-encoded (PKCS#8 private, SubjectPublicKeyInfo public). ``cryptography`` is
imported lazily so the device agent never needs it.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from shared.schemas import ModelManifest


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (private key mode 0600); return the key id."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415  (edge/cloud extra, not on devices)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415  (edge/cloud extra, not on devices)

    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_path.touch(mode=0o600)
    private_path.write_bytes(private_pem)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_path.write_bytes(public_pem)
    return key_id(public_pem)


def key_id(public_pem: bytes) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its PEM's sha256."""
    return hashlib.sha256(public_pem).hexdigest()[:16]


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an ed25519 private key from a PEM file (``SignatureError`` if it is not one)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415  (edge/cloud extra, not on devices)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415  (edge/cloud extra, not on devices)

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot load private key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an ed25519 public key from a PEM file (``SignatureError`` if it is not one)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415  (edge/cloud extra, not on devices)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: PLC0415  (edge/cloud extra, not on devices)

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot load public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an ed25519 public key")
    return key


def sign_manifest(
    manifest: ModelManifest, private_key: Ed25519PrivateKey, *, key_id: str | None = None
) -> ModelManifest:
    """Return a copy of ``manifest`` with ``key_id`` set and signed over its canonical bytes."""
    unsigned = manifest.model_copy(update={"signature": None, "key_id": key_id})
    signature = private_key.sign(unsigned.signing_bytes())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


def verify_manifest(manifest: ModelManifest, public_key: Ed25519PublicKey) -> None:
    """Raise ``SignatureError`` unless ``manifest`` carries a valid signature by ``public_key``."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415  (edge/cloud extra, not on devices)

    if manifest.signature is None:
        raise SignatureError(f"model {manifest.ref} is unsigned")
    try:
        signature = base64.b64decode(manifest.signature, validate=True)
    except ValueError as exc:
        raise SignatureError(f"model {manifest.ref}: signature is not base64") from exc
    try:
        public_key.verify(signature, manifest.signing_bytes())
    except InvalidSignature as exc:
        raise SignatureError(
            f"model {manifest.ref}: signature does not verify with the configured key"
        ) from exc

"""ed25519 signatures over model manifests, desired-state orders and key announcements. The cloud
signs; edges verify with the public keys of their key ring.

Keys are stored PEM-encoded (PKCS#8 private, SubjectPublicKeyInfo public) and named by ``key_id``
(the first 16 hex digits of the public PEM's sha256). ``cryptography`` is imported lazily so the
device agent never needs it.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Final

from shared.errors import SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    from shared.schemas import DesiredState, KeyAnnouncement, ModelManifest

# How long a signed desired-state order stays valid (``CloudSettings.desired_ttl_s`` overrides it).
# An edge refuses an order after its ``expires_at``; the rollout engine re-issues orders of targets
# still waiting before that.
ORDER_LIFETIME_S: Final = 24 * 3600.0


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


def public_key_from_pem(pem: bytes) -> Ed25519PublicKey:
    """An ed25519 public key from PEM bytes (``SignatureError`` if they are not one)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415  (edge/cloud extra, not on devices)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: PLC0415  (edge/cloud extra, not on devices)

    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise SignatureError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("not an ed25519 public key")
    return key


def public_pem(private_key: Ed25519PrivateKey) -> bytes:
    """The SubjectPublicKeyInfo PEM of ``private_key``'s public half (what ``key_id`` hashes)."""
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415  (edge/cloud extra, not on devices)

    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _verify(signature: str | None, data: bytes, public_key: Ed25519PublicKey, what: str) -> None:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415  (edge/cloud extra, not on devices)

    if signature is None:
        raise SignatureError(f"{what} is unsigned")
    try:
        raw = base64.b64decode(signature, validate=True)
    except ValueError as exc:
        raise SignatureError(f"{what}: signature is not base64") from exc
    try:
        public_key.verify(raw, data)
    except InvalidSignature as exc:
        raise SignatureError(f"{what}: signature does not verify") from exc


def sign_desired(desired: DesiredState, private_key: Ed25519PrivateKey, *, key_id: str) -> DesiredState:
    """Return a copy of ``desired`` naming its model by digest and ``key_id``, signed as a whole.

    Every field but ``signature`` is covered (edge id, revision, action, model and its digest,
    rollback target, issue and expiry times, key id): change one and the signature fails."""
    from shared.schemas import manifest_digest  # noqa: PLC0415  (schemas imports nothing of this module; keeps it light)

    digest = manifest_digest(desired.model) if desired.model is not None else None
    unsigned = desired.model_copy(update={"signature": None, "key_id": key_id, "model_digest": digest})
    signature = private_key.sign(unsigned.signing_bytes())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


def verify_desired(desired: DesiredState, public_key: Ed25519PublicKey) -> None:
    """Raise ``SignatureError`` unless ``desired`` carries a valid signature by ``public_key``."""
    _verify(desired.signature, desired.signing_bytes(), public_key, f"desired state r{desired.revision}")


def sign_announcement(
    announcement: KeyAnnouncement, private_key: Ed25519PrivateKey, *, signer_key_id: str
) -> KeyAnnouncement:
    """Return a copy of ``announcement`` signed by ``private_key`` (named ``signer_key_id``)."""
    unsigned = announcement.model_copy(update={"signature": None, "signer_key_id": signer_key_id})
    signature = private_key.sign(unsigned.signing_bytes())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


def verify_announcement(announcement: KeyAnnouncement, public_key: Ed25519PublicKey) -> None:
    """Raise ``SignatureError`` unless ``announcement`` carries a valid signature by ``public_key``."""
    _verify(
        announcement.signature,
        announcement.signing_bytes(),
        public_key,
        f"key announcement #{announcement.seq}",
    )

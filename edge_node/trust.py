"""The edge's key ring: which cloud public keys it trusts to sign desired-state orders and models.

It starts from the configured public key (``model.public_key``) and the keys of
``model.trusted_keys_dir``, then follows the cloud's ``KeyRing`` (retained on the keys topic): an
announcement is applied only if it is signed by a key the ring trusts at that point of the chain
(never by the key a revocation revokes), each at most once (``seq``). A revoked key never comes back.
The ring is persisted in ``<data_dir>/trust/ring.json`` so that a restart keeps what was learned
(and, above all, what was revoked).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from shared.errors import SignatureError
from shared.schemas import KeyAction, KeyAnnouncement, KeyRing
from shared.signing import key_id, public_key_from_pem, verify_announcement

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

logger = logging.getLogger(__name__)

RING_FILE: Final = "ring.json"
KEY_SUFFIXES: Final = (".pub", ".pem")


@dataclass
class RingUpdate:
    """What one ``KeyRing`` message changed: keys added and revoked, announcements refused (why)."""

    added: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Whether the ring is different now."""
        return bool(self.added or self.revoked)


class TrustRing:
    """Trusted (and revoked) cloud public keys by key id; thread-confined to the model manager."""

    def __init__(self, store: Path, configured: Path | None, trusted_dir: Path | None = None) -> None:
        self.path = store / RING_FILE
        self.keys: dict[str, bytes] = {}  # key id -> public PEM (revoked ones stay: models they signed)
        self.revoked: set[str] = set()
        self.seq = 0  # the last announcement applied
        self._parsed: dict[str, Ed25519PublicKey] = {}
        self._load(configured, trusted_dir)

    # -- loading and saving -------------------------------------------------------------------------
    def _load(self, configured: Path | None, trusted_dir: Path | None) -> None:
        sources: list[Path] = [configured] if configured is not None else []
        if trusted_dir is not None:
            try:
                sources += sorted(p for p in trusted_dir.iterdir() if p.suffix in KEY_SUFFIXES)
            except OSError as exc:
                logger.warning("trusted keys directory %s unreadable: %s", trusted_dir, exc)
        for path in sources:
            try:
                pem = path.read_bytes()
                public_key_from_pem(pem)
            except (OSError, SignatureError) as exc:
                if path == configured:  # the root of trust: a broken one must not pass silently
                    raise SignatureError(f"cannot load public key {path}: {exc}") from exc
                logger.warning("trusted key %s skipped: %s", path, exc)
                continue
            self.keys[key_id(pem)] = pem
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.keys.update({kid: pem.encode() for kid, pem in data.get("keys", {}).items()})
                self.revoked = set(data.get("revoked", []))
                self.seq = int(data.get("seq", 0))
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                logger.warning(
                    "key ring %s unreadable (%s): starting from the configured keys", self.path, exc
                )

    def save(self) -> None:
        """Write the ring (atomically) to ``<data_dir>/trust/ring.json``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {
            "keys": {kid: pem.decode() for kid, pem in sorted(self.keys.items())},
            "revoked": sorted(self.revoked),
            "seq": self.seq,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)

    # -- reading --------------------------------------------------------------------------------
    def _key(self, kid: str) -> Ed25519PublicKey:
        if kid not in self._parsed:
            self._parsed[kid] = public_key_from_pem(self.keys[kid])
        return self._parsed[kid]

    def active_ids(self) -> list[str]:
        """Ids of the keys that may sign orders and announcements now."""
        return sorted(k for k in self.keys if k not in self.revoked)

    def is_revoked(self, kid: str) -> bool:
        """Whether ``kid`` was revoked."""
        return kid in self.revoked

    def active(self, kid: str | None) -> Ed25519PublicKey | None:
        """The key ``kid`` if the ring trusts it now (known and not revoked), else None."""
        if kid is None or kid not in self.keys or kid in self.revoked:
            return None
        return self._key(kid)

    def known(self, kid: str | None) -> list[Ed25519PublicKey]:
        """Keys that may have signed a model manifest: ``kid`` if known (revoked or not), or every
        known key when the manifest names none. A revoked key's old manifests stay deployable, but
        only inside an order signed by an active key (which names the manifest by digest)."""
        if kid is not None:
            return [self._key(kid)] if kid in self.keys else []
        return [self._key(k) for k in sorted(self.keys)]

    # -- following the cloud ----------------------------------------------------------------------
    def apply(self, ring: KeyRing) -> RingUpdate:
        """Apply the announcements of ``ring`` not applied yet, in order; each must be signed by a key
        active at that point (a revocation by another key than the one it revokes). Saved if changed."""
        update = RingUpdate()
        for ann in sorted(ring.announcements, key=lambda a: a.seq):
            if ann.seq <= self.seq:
                continue
            why = self._refusal(ann)
            if why is not None:
                update.refused.append(f"#{ann.seq} ({ann.action.value} {ann.key_id}): {why}")
                continue
            if ann.action is KeyAction.ADD:
                assert ann.public_key is not None  # the schema requires it for 'add'
                self.keys[ann.key_id] = ann.public_key.encode()
                update.added.append(ann.key_id)
            else:
                self.revoked.add(ann.key_id)
                self._parsed.pop(ann.key_id, None)
                update.revoked.append(ann.key_id)
            self.seq = ann.seq
        if update.changed:
            self.save()
        return update

    def _refusal(self, ann: KeyAnnouncement) -> str | None:
        signer = self.active(ann.signer_key_id)
        if signer is None:
            state = "revoked" if ann.signer_key_id in self.revoked else "not in the ring"
            return f"signer {ann.signer_key_id} is {state}"
        if ann.action is KeyAction.REVOKE and ann.signer_key_id == ann.key_id:
            return "a key cannot revoke itself: another trusted key must sign the revocation"
        try:
            verify_announcement(ann, signer)
        except SignatureError as exc:
            return str(exc)
        if ann.action is KeyAction.ADD:
            pem = (ann.public_key or "").encode()
            try:
                public_key_from_pem(pem)
            except SignatureError as exc:
                return f"public key: {exc}"
            if key_id(pem) != ann.key_id:
                return f"key id {ann.key_id} is not the id of the announced key ({key_id(pem)})"
            if ann.key_id in self.revoked:
                return "the key was revoked: it never comes back"
        return None

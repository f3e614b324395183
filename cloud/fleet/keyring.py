"""The cloud's signing key ring: key pairs by key id, the newest active one signs.

The ring lives in ``<keys dir>/ring.json`` (``CloudSettings.resolved_keys_dir``: the signing key's
directory by default) beside the rotated key pairs (``<key id>.key`` / ``<key id>.pub``). Without a
ring file, the ring is the configured pair alone (``signing_private_key`` / dev-mode keys), so
``edgefleet cloud keygen`` and existing setups work unchanged.

- ``rotate``: a new pair becomes the signing key; its public key is announced (``KeyAnnouncement``
  ``add``) signed by the key that signed until then.
- ``revoke KEY_ID``: announced (``revoke``) signed by another active key; the last active key
  cannot be revoked.

Every announcement so far is retained on the keys topic as one ``KeyRing`` (edges that missed some
replay the chain from the key they were configured with); ``published_seq`` records what the broker
acknowledged, so a ring changed while the broker was away is published with the next order.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cloud.errors import PublishError
from shared.errors import SignatureError
from shared.schemas import KeyAction, KeyAnnouncement, KeyRing, encode_message
from shared.signing import generate_keypair, key_id, load_private_key, sign_announcement

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.mqtt import MqttLink
    from shared.settings.cloud import CloudSettings

logger = logging.getLogger(__name__)

RING_FILE: Final = "ring.json"
PUBACK_TIMEOUT_S: Final = 10.0


@dataclass
class RingKey:
    """One key pair of the ring."""

    key_id: str
    private: str  # path of the private key (PEM)
    public: str  # path of the public key (PEM)
    created_at: float
    state: str = "active"  # active | revoked
    revoked_at: float | None = None


class CloudKeyRing:
    """The ring as stored; ``save()`` writes it back (atomically)."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.dir = settings.resolved_keys_dir
        self.path = self.dir / RING_FILE
        self.keys: list[RingKey] = []
        self.announcements: list[KeyAnnouncement] = []
        self.published_seq = 0
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self.keys = [RingKey(**k) for k in data.get("keys", [])]
            self.announcements = [KeyAnnouncement.model_validate(a) for a in data.get("announcements", [])]
            self.published_seq = int(data.get("published_seq", 0))
        else:
            private, public = ensure_pair(settings)
            self.keys = [
                RingKey(
                    key_id=key_id(public.read_bytes()),
                    private=str(private),
                    public=str(public),
                    created_at=public.stat().st_mtime,
                )
            ]

    # -- reading ------------------------------------------------------------------------------------
    @property
    def active(self) -> list[RingKey]:
        """The active keys, oldest first."""
        return [k for k in self.keys if k.state == "active"]

    @property
    def current(self) -> RingKey:
        """The signing key: the newest active one."""
        active = self.active
        if not active:
            raise SignatureError(f"the key ring {self.path} has no active key")
        return max(active, key=lambda k: k.created_at)

    def get(self, kid: str) -> RingKey:
        """The key ``kid`` (``SignatureError`` if the ring has none)."""
        for key in self.keys:
            if key.key_id == kid:
                return key
        raise SignatureError(f"key {kid} is not in the ring ({', '.join(k.key_id for k in self.keys)})")

    def signer(self) -> tuple[Ed25519PrivateKey, str]:
        """The private key that signs now, and its id."""
        current = self.current
        return load_private_key(Path(current.private)), current.key_id

    def message(self) -> KeyRing:
        """Every announcement so far, as retained on the keys topic."""
        return KeyRing(announcements=list(self.announcements))

    def describe(self) -> list[dict[str, Any]]:
        """The keys as JSON-able dicts (``keys list --json``), newest first, the signing one marked."""
        current = self.current.key_id if self.active else None
        return [
            {**asdict(k), "signing": k.key_id == current}
            for k in sorted(self.keys, key=lambda k: k.created_at, reverse=True)
        ]

    # -- changing -----------------------------------------------------------------------------------
    def save(self) -> None:
        """Write ``ring.json`` (atomically; mode 0600 like the private keys it names)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {
            "keys": [asdict(k) for k in self.keys],
            "announcements": [a.model_dump(mode="json") for a in self.announcements],
            "published_seq": self.published_seq,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)

    def _announce(self, action: KeyAction, subject: str, public_pem: str | None, signer: RingKey) -> None:
        announcement = KeyAnnouncement(
            seq=len(self.announcements) + 1, action=action, key_id=subject, public_key=public_pem
        )
        self.announcements.append(
            sign_announcement(
                announcement, load_private_key(Path(signer.private)), signer_key_id=signer.key_id
            )
        )

    def rotate(self) -> RingKey:
        """A new key pair becomes the signing key, announced signed by the current one. Saved."""
        previous = self.current
        stem = self.dir / f"pending-{os.getpid()}"
        kid = generate_keypair(stem.with_suffix(".key"), stem.with_suffix(".pub"))
        private, public = self.dir / f"{kid}.key", self.dir / f"{kid}.pub"
        os.replace(stem.with_suffix(".key"), private)
        os.replace(stem.with_suffix(".pub"), public)
        # Strictly newer than every key so far, even within one clock tick.
        created = max([time.time(), *(k.created_at + 1e-3 for k in self.keys)])
        key = RingKey(key_id=kid, private=str(private), public=str(public), created_at=created)
        self._announce(KeyAction.ADD, kid, public.read_text(), previous)
        self.keys.append(key)
        self.save()
        return key

    def revoke(self, kid: str) -> RingKey:
        """Revoke ``kid``, announced signed by another active key (the newest); the last active key
        cannot be revoked. Saved."""
        key = self.get(kid)
        if key.state == "revoked":
            raise SignatureError(f"key {kid} is already revoked")
        others = [k for k in self.active if k.key_id != kid]
        if not others:
            raise SignatureError(
                f"key {kid} is the last active key: rotate first (edgefleet cloud keys rotate), "
                "then revoke it"
            )
        signer = max(others, key=lambda k: k.created_at)
        self._announce(KeyAction.REVOKE, kid, None, signer)
        key.state, key.revoked_at = "revoked", time.time()
        self.save()
        return key

    # -- publishing ---------------------------------------------------------------------------------
    def publish(self, link: MqttLink, *, timeout: float = PUBACK_TIMEOUT_S) -> bool:
        """Retain the ring on the keys topic (QoS1, PUBACK awaited); record it as published. False if
        there is nothing to announce."""
        if not self.announcements:
            return False
        topic = self.settings.broker.topics.keys()
        if not link.publish(topic, encode_message(self.message()), qos=1, retain=True).wait(timeout):
            raise PublishError(f"the key ring was not acknowledged by the broker in {timeout:.0f} s")
        self.published_seq = self.announcements[-1].seq
        self.save()
        logger.info("key ring (%d announcements) published on %s", len(self.announcements), topic)
        return True

    @property
    def unpublished(self) -> bool:
        """Whether the broker has not acknowledged the latest announcement yet."""
        return bool(self.announcements) and self.published_seq < self.announcements[-1].seq


def ensure_pair(settings: CloudSettings) -> tuple[Path, Path]:
    """The configured key pair; in dev mode a missing pair is generated under ``data_dir``."""
    private, public = settings.key_paths()
    if not private.exists():
        if not settings.dev_mode:
            raise PublishError(
                f"signing key {private} does not exist: create one with 'edgefleet cloud keygen'"
            )
        generate_keypair(private, public)
        logger.warning("dev mode: generated a signing key pair at %s", private.parent)
    return private, public


def publish_if_needed(settings: CloudSettings, link: MqttLink) -> None:
    """Publish the ring if the broker has not acknowledged its latest announcement (before an order
    signed by a new key goes out, edges must be able to learn that key)."""
    if not (settings.resolved_keys_dir / RING_FILE).exists():
        return
    ring = CloudKeyRing(settings)
    if ring.unpublished:
        ring.publish(link)

"""ed25519 manifest signatures: verify, and every kind of tampering or missing signature refused."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from shared.errors import SignatureError
from shared.signing import generate_keypair, load_private_key, load_public_key, sign_manifest, verify_manifest
from tests.shared.test_schemas import MANIFEST


@pytest.fixture
def keys(tmp_path):
    key_id = generate_keypair(tmp_path / "keys" / "private.pem", tmp_path / "keys" / "public.pem")
    return (
        key_id,
        load_private_key(tmp_path / "keys" / "private.pem"),
        load_public_key(tmp_path / "keys" / "public.pem"),
    )


def test_sign_then_verify(keys, tmp_path):
    key_id, private, public = keys
    signed = sign_manifest(MANIFEST, private, key_id=key_id)
    assert signed.key_id == key_id
    assert len(key_id) == 16
    assert len(base64.b64decode(signed.signature)) == 64
    verify_manifest(signed, public)
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "private.pem").st_mode) == 0o600


def test_another_key_fails(keys, tmp_path):
    key_id, private, _ = keys
    generate_keypair(tmp_path / "other.pem", tmp_path / "other.pub")
    signed = sign_manifest(MANIFEST, private, key_id=key_id)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(signed, load_public_key(tmp_path / "other.pub"))


@pytest.mark.parametrize(
    "change",
    [
        {"sha256": "cd" * 32},
        {"version": "v4"},
        {"url": "http://127.0.0.1:8000/evil.tflite"},
        {"size_bytes": 12_346},
        {"key_id": "ffffffffffffffff"},
        {"metrics": {"accuracy": 0.99}},
    ],
)
def test_any_manifest_change_fails(keys, change):
    key_id, private, public = keys
    tampered = sign_manifest(MANIFEST, private, key_id=key_id).model_copy(update=change)
    with pytest.raises(SignatureError):
        verify_manifest(tampered, public)


def test_every_flipped_byte_of_the_signed_bytes_fails(keys):
    """Flip each byte of the canonical manifest JSON in turn: none verifies."""
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415

    key_id, private, public = keys
    signed = sign_manifest(MANIFEST, private, key_id=key_id)
    signature = base64.b64decode(signed.signature)
    message = bytearray(signed.signing_bytes())
    for i in range(len(message)):
        message[i] ^= 0x01
        with pytest.raises(InvalidSignature):
            public.verify(signature, bytes(message))
        message[i] ^= 0x01
    public.verify(signature, bytes(message))


def test_every_flipped_signature_byte_fails(keys):
    key_id, private, public = keys
    signed = sign_manifest(MANIFEST, private, key_id=key_id)
    raw = bytearray(base64.b64decode(signed.signature))
    for i in range(len(raw)):
        raw[i] ^= 0x80
        bad = signed.model_copy(update={"signature": base64.b64encode(bytes(raw)).decode()})
        with pytest.raises(SignatureError):
            verify_manifest(bad, public)
        raw[i] ^= 0x80


def test_unsigned_and_garbled_signatures_are_refused(keys):
    _, _, public = keys
    with pytest.raises(SignatureError, match="unsigned"):
        verify_manifest(MANIFEST.model_copy(update={"signature": None}), public)
    with pytest.raises(SignatureError, match="base64"):
        verify_manifest(MANIFEST.model_copy(update={"signature": "not base64!"}), public)
    with pytest.raises(SignatureError):
        verify_manifest(
            MANIFEST.model_copy(update={"signature": base64.b64encode(b"short").decode()}), public
        )


def test_bad_key_files(tmp_path, keys):
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(SignatureError, match="cannot load"):
        load_private_key(tmp_path / "junk.pem")
    with pytest.raises(SignatureError, match="cannot load"):
        load_public_key(tmp_path / "missing.pem")
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    with pytest.raises(SignatureError):
        load_public_key(tmp_path / "k.pem")  # a private key where a public one is expected

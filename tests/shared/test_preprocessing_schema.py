"""``Preprocessing`` in the signed manifest: validated, signed with the rest, and absent from the JSON
when unset, so manifests signed before it existed still verify."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.errors import SignatureError
from shared.schemas import (
    DesiredState,
    ModelManifest,
    Preprocessing,
    decode_message,
    encode_message,
    manifest_digest,
)
from shared.signing import generate_keypair, load_private_key, load_public_key, sign_manifest, verify_manifest
from tests.shared.test_schemas import MANIFEST


def keys(tmp_path: Path) -> tuple[str, Any, Any]:
    key_id = generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    return key_id, load_private_key(tmp_path / "k.pem"), load_public_key(tmp_path / "k.pub")


def with_pre(**fields: Any) -> dict[str, Any]:
    data = MANIFEST.model_dump(mode="json")
    data.update(fields)
    return data


def test_preprocessing_is_strict_and_frozen() -> None:
    pre = Preprocessing(normalize="per_series", length="pad", max_input_length=120)
    assert pre.pad_value == 0.0
    with pytest.raises(ValidationError):
        Preprocessing.model_validate({"normalize": "zscore"})
    with pytest.raises(ValidationError):
        Preprocessing.model_validate({"normalize": "none", "length": "crop"})
    with pytest.raises(ValidationError, match="extra"):
        Preprocessing.model_validate({"normalize": "none", "channel_order": ["x"]})
    with pytest.raises(ValidationError):
        Preprocessing(normalize="none", max_input_length=0)
    with pytest.raises(ValidationError):
        Preprocessing(normalize="none", pad_value=float("nan"))
    with pytest.raises(ValidationError):
        pre.normalize = "none"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"preprocessing": {"normalize": "fitted"}, "normalization": None},
            "needs the manifest's normalization",
        ),
        ({"preprocessing": {"normalize": "per_series"}}, "excludes a fitted normalization"),
        (
            {
                "preprocessing": {"normalize": "none", "length": "pad"},
                "normalization": None,
                "input_shape": [8, 8, 3],
            },
            "needs \\(time, channels\\)",
        ),
        (
            {"preprocessing": {"normalize": "fitted", "max_input_length": 120}},
            "needs length 'pad' or 'resample'",
        ),
        (
            {"preprocessing": {"normalize": "fitted", "length": "pad", "max_input_length": 50}},
            "below the input length 100",
        ),
        ({"preprocessing": {"normalize": "fitted"}, "channels": ["x", "y"]}, "do not match input_shape"),
    ],
)
def test_manifest_preprocessing_must_agree_with_the_rest(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelManifest.model_validate(with_pre(**fields))


def test_manifest_with_preprocessing_round_trips_and_signs_it(tmp_path: Path) -> None:
    key_id, private, public = keys(tmp_path)
    pre = {"normalize": "fitted", "length": "pad", "pad_value": 0.0, "max_input_length": 120}
    manifest = ModelManifest.model_validate(with_pre(preprocessing=pre))
    signed = sign_manifest(manifest, private, key_id=key_id)
    back = decode_message(encode_message(signed), ModelManifest)
    assert back.preprocessing == Preprocessing(**pre)
    verify_manifest(back, public)
    tampered = back.model_copy(update={"preprocessing": Preprocessing(normalize="fitted", length="resample")})
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(tampered, public)


def test_manifests_signed_before_preprocessing_existed_still_verify(tmp_path: Path) -> None:
    key_id, private, public = keys(tmp_path)
    # What the old code signed: the canonical JSON of every field but the signature, no preprocessing key.
    old = MANIFEST.model_dump(mode="json")
    assert "preprocessing" not in old
    old = {**old, "key_id": key_id, "signature": None}
    unsigned = {k: v for k, v in old.items() if k != "signature"}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    old["signature"] = base64.b64encode(private.sign(canonical)).decode()
    decoded = ModelManifest.model_validate_json(json.dumps(old))
    assert decoded.preprocessing is None
    assert decoded.signing_bytes() == canonical
    verify_manifest(decoded, public)
    # A signed desired state names the manifest by the digest of its old JSON: unchanged too.
    digest = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert manifest_digest(decoded) == digest
    order = DesiredState(edge_id="edge-1", revision=1, model=decoded, model_digest=digest)
    assert "preprocessing" not in json.loads(order.signing_bytes())["model"]

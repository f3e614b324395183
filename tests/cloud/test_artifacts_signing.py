"""Publishing: the signed manifest verifies with the public key and fails with another key or a
flipped byte; the artifact server answers Range requests; keys only from config or dev mode."""

from __future__ import annotations

import base64
import hashlib
import urllib.request
from pathlib import Path

import pytest

from cloud.artifacts import ArtifactServer, ArtifactStore
from cloud.errors import PublishError
from cloud.fleet.desired_state import ensure_keys, sign
from shared.errors import ConfigError, SignatureError
from shared.schemas import ModelManifest
from shared.settings import CloudSettings
from shared.signing import generate_keypair, load_public_key, verify_manifest


def _manifest(data: bytes, url: str) -> ModelManifest:
    return ModelManifest(
        name="m",
        version="r1-int8",
        quantization="int8",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        url=url,
        input_shape=[100, 3],
        input_dtype="int8",
        output_shape=[4],
        output_dtype="int8",
        class_names=["a", "b", "c", "d"],
        normalization={"mean": [0, 0, 0], "std": [1, 1, 1]},
    )


def test_signature_verifies_and_rejects_other_key_and_flipped_byte(tmp_path: Path) -> None:
    settings = CloudSettings(data_dir=tmp_path, dev_mode=True)
    signed = sign(_manifest(b"model", "file:///x"), settings)
    _, public = settings.key_paths()
    verify_manifest(signed, load_public_key(public))

    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    with pytest.raises(SignatureError):
        verify_manifest(signed, load_public_key(tmp_path / "other.pub"))

    raw = bytearray(base64.b64decode(signed.signature or ""))
    raw[0] ^= 0x01
    flipped = signed.model_copy(update={"signature": base64.b64encode(bytes(raw)).decode()})
    with pytest.raises(SignatureError):
        verify_manifest(flipped, load_public_key(public))

    tampered = signed.model_copy(update={"size_bytes": signed.size_bytes + 1})
    with pytest.raises(SignatureError):
        verify_manifest(tampered, load_public_key(public))


def test_no_signing_key_outside_dev_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CloudSettings(data_dir=tmp_path).key_paths()
    settings = CloudSettings(
        data_dir=tmp_path, signing_private_key=tmp_path / "k", signing_public_key=tmp_path / "p"
    )
    with pytest.raises(PublishError, match="keygen"):
        ensure_keys(settings)


def test_store_refuses_wrong_hash_and_server_supports_range(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    source = tmp_path / "a.tflite"
    source.write_bytes(data)
    server = ArtifactServer(tmp_path / "store", access=None)  # open: this test is about Range
    server.start()
    try:
        store = ArtifactStore(tmp_path / "store", base_url=server.url)
        with pytest.raises(PublishError):
            store.put(source, name="m", version="v1", sha256="0" * 64)
        store.put(source, name="m", version="v1", sha256=hashlib.sha256(data).hexdigest())
        url = store.url("m", "v1")
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url) as response:
            assert response.read() == data
            assert response.headers["Accept-Ranges"] == "bytes"
        request = urllib.request.Request(url, headers={"Range": "bytes=100-199"})
        with urllib.request.urlopen(request) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
            assert response.read() == data[100:200]
        request = urllib.request.Request(url, headers={"Range": "bytes=10000-"})
        with urllib.request.urlopen(request) as response:
            assert response.read() == data[10000:]
        request = urllib.request.Request(url, headers={"Range": "bytes=99999-"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request)
        assert err.value.code == 416
        err.value.close()
    finally:
        server.stop()

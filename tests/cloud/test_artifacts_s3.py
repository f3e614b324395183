"""The S3-compatible artifact store against a real S3 HTTP server (moto's standalone server on a free
loopback port): the artifact and its signed manifest go to the bucket, an edge downloads them over
HTTP from the manifest's URL, a re-put uploads nothing, a wrong hash is refused before any upload,
and a missing bucket or an unreachable endpoint fails with a PublishError naming bucket and key."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from cloud.artifacts import ArtifactStore, S3ArtifactStore, store_for
from cloud.errors import PublishError
from cloud.fleet.desired_state import sign
from edge_node.models import fetch_artifact
from shared.private_broker import free_port
from shared.schemas import ModelManifest
from shared.settings import CloudSettings
from shared.settings.cloud import S3Settings
from shared.signing import load_public_key, verify_manifest
from tests.support.brokers import wait_port

BUCKET = "edgefleet-artifacts"
KEY_ID = "AKIAEDGEFLEETTEST"
SECRET = "edgefleet-test-secret"  # a throwaway credential for the local test server


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible HTTP server on 127.0.0.1, with a public-read bucket."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        admin = _client(endpoint)
        admin.create_bucket(Bucket=BUCKET)
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": "s3:GetObject",
                    "Resource": f"arn:aws:s3:::{BUCKET}/*",
                }
            ],
        }
        admin.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(policy))
        yield endpoint
    finally:
        server.stop()


def _client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )


def _s3(endpoint: str, *, bucket: str = BUCKET, **extra: Any) -> S3Settings:
    return S3Settings(
        endpoint_url=endpoint,
        bucket=bucket,
        prefix="/fleet/models/",
        region="us-east-1",
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        addressing_style="path",
        public_base_url=f"{endpoint}/{bucket}",
        **extra,
    )


def _manifest(data: bytes, *, url: str, version: str) -> ModelManifest:
    return ModelManifest(
        name="vib",
        version=version,
        quantization="int8",
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        url=url,
        input_shape=[128, 3],
        input_dtype="int8",
        output_shape=[4],
        output_dtype="int8",
        class_names=["a", "b", "c", "d"],
    )


def test_settings_from_environment_select_the_s3_store(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_S3__BUCKET", BUCKET)
    monkeypatch.setenv("EDGEFLEET_S3__ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("EDGEFLEET_S3__PUBLIC_BASE_URL", f"{s3_endpoint}/{BUCKET}/")
    monkeypatch.setenv("EDGEFLEET_S3__ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("EDGEFLEET_S3__SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("EDGEFLEET_S3__PREFIX", "models")
    settings = CloudSettings(data_dir=tmp_path)
    assert settings.s3 is not None
    assert SECRET not in repr(settings)
    store = store_for(settings)
    assert isinstance(store, S3ArtifactStore)
    assert store.url("vib", "r1") == f"{s3_endpoint}/{BUCKET}/models/vib/r1/model.tflite"
    assert store.root == settings.resolved_artifact_dir
    assert type(store_for(CloudSettings(data_dir=tmp_path, s3=None))) is ArtifactStore

    with pytest.raises(ValueError, match="go together"):
        S3Settings(bucket=BUCKET, public_base_url="https://cdn.example", access_key_id=KEY_ID)
    with pytest.raises(ValueError, match="http"):
        S3Settings(bucket=BUCKET, public_base_url="s3://bucket")


def test_publish_download_reput_and_wrong_hash(s3_endpoint: str, tmp_path: Path) -> None:
    settings = CloudSettings(data_dir=tmp_path, dev_mode=True, s3=_s3(s3_endpoint))
    store = store_for(settings)
    assert isinstance(store, S3ArtifactStore)
    data = bytes(range(256)) * 300  # 76.8 kB
    source = tmp_path / "candidate.tflite"
    source.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()

    # What the pipeline does: sign a manifest carrying store.url(), then put the artifact and manifest.
    manifest = sign(_manifest(data, url=store.url("vib", "r1-int8"), version="r1-int8"), settings)
    assert manifest.url == f"{s3_endpoint}/{BUCKET}/fleet/models/vib/r1-int8/model.tflite"
    local = store.put(source, name="vib", version="r1-int8", sha256=sha)
    store.write_manifest(manifest)
    assert local == store.path("vib", "r1-int8")
    assert local.read_bytes() == data  # the local copy stays for the cloud's own artifact endpoint
    assert store.uploads == 2

    # An edge: the manifest and the artifact over plain HTTP from the public URL.
    manifest_url = store.object_url(store.key("vib", "r1-int8", "manifest.json"))
    with urllib.request.urlopen(manifest_url, timeout=10) as response:
        fetched = ModelManifest.model_validate_json(response.read())
    _, public = settings.key_paths()
    verify_manifest(fetched, load_public_key(public))
    content = fetch_artifact(fetched.url, fetched.size_bytes, 10.0)
    assert len(content) == fetched.size_bytes
    assert hashlib.sha256(content).hexdigest() == fetched.sha256 == sha

    head = _client(s3_endpoint).head_object(Bucket=BUCKET, Key=store.key("vib", "r1-int8"))
    assert head["Metadata"]["sha256"] == sha
    etag = head["ETag"]

    # A retried publish: nothing is uploaded, the object is untouched.
    store.put(source, name="vib", version="r1-int8", sha256=sha)
    store.write_manifest(manifest)
    assert (store.uploads, store.skipped) == (2, 2)
    again = _client(s3_endpoint).head_object(Bucket=BUCKET, Key=store.key("vib", "r1-int8"))
    assert (again["ETag"], again["LastModified"]) == (etag, head["LastModified"])

    # The bucket, not the local copy, decides: an object lost remotely is uploaded again.
    _client(s3_endpoint).delete_object(Bucket=BUCKET, Key=store.key("vib", "r1-int8"))
    fresh = store_for(settings)
    assert isinstance(fresh, S3ArtifactStore)
    fresh.put(source, name="vib", version="r1-int8", sha256=sha)
    assert fresh.uploads == 1
    assert fetch_artifact(fresh.url("vib", "r1-int8"), len(data), 10.0) == data

    # Content that does not match its sha256 is refused before anything reaches the bucket.
    other = tmp_path / "other.tflite"
    other.write_bytes(b"not the model")
    with pytest.raises(PublishError, match="expected"):
        fresh.put(other, name="vib", version="r2-int8", sha256=sha)
    assert fresh.uploads == 1
    listed = _client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="fleet/models/vib/r2-int8/")
    assert listed["KeyCount"] == 0


def test_missing_bucket_and_unreachable_endpoint_are_publish_errors(s3_endpoint: str, tmp_path: Path) -> None:
    source = tmp_path / "m.tflite"
    source.write_bytes(b"model bytes")
    sha = hashlib.sha256(b"model bytes").hexdigest()

    missing = S3ArtifactStore(tmp_path / "a", _s3(s3_endpoint, bucket="no-such-bucket"))
    with pytest.raises(PublishError, match=r"s3://no-such-bucket/fleet/models/vib/r1/model\.tflite") as err:
        missing.put(source, name="vib", version="r1", sha256=sha)
    assert "NoSuchBucket" in str(err.value)
    assert err.value.__cause__ is not None

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    unreachable = S3ArtifactStore(tmp_path / "b", _s3(dead, max_attempts=1, timeout_s=2.0))
    with pytest.raises(PublishError, match=rf"s3://{BUCKET}/fleet/models/vib/r1/model\.tflite at {dead}"):
        unreachable.put(source, name="vib", version="r1", sha256=sha)

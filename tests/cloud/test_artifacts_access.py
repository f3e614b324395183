"""The artifact server (``edgefleet cloud serve-artifacts``) with edge authentication: an edge logs in
with its enrollment identity (HTTP Basic, checked against the registry's hash) and downloads only the
models sent to it; no listing; 401/403/404 with JSON bodies. Real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from cloud.artifacts import ArtifactServer, ArtifactStore, EdgeArtifactAccess
from cloud.registry import crud, identities
from cloud.registry.db import engine_for, session_scope, upgrade
from edge_node.errors import DeployError
from edge_node.models import fetch_artifact
from shared.identity import broker_hash

FAST = 1_000  # hash iterations: these tests check who gets what, not the hash's cost
SECRETS = {"edge-1": "edge-1-secret", "edge-2": "edge-2-secret", "pump-1": "pump-1-secret", "ops-ann": "ann"}
KINDS = {"edge-1": "edge", "edge-2": "edge", "pump-1": "device", "ops-ann": "operator"}
CONTENT = {"r1": b"model r1 " * 100, "r2": b"model r2 " * 100, "r3": b"model r3 " * 100}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A registry with two edges, a device and an operator; vibration@r1 was deployed to edge-1 (and
    replaced by r2, its current desired state), r3 went to edge-2 only."""
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    store = ArtifactStore(tmp_path / "artifacts")
    with session_scope(url) as session:
        for identity_id, secret in SECRETS.items():
            identities.enroll(
                session,
                identity_id=identity_id,
                kind=KINDS[identity_id],
                secret_hash=broker_hash(secret, iterations=FAST),
            )
        ids = {}
        for version, content in CONTENT.items():
            source = tmp_path / f"{version}.tflite"
            source.write_bytes(content)
            path = store.put(source, name="vibration", version=version, sha256=_sha(content))
            model = crud.create_model_version(
                session, name="vibration", version=version, variant="int8", artifact_path=str(path)
            )
            ids[version] = model.id
        for edge, version, revision in (("edge-1", "r1", 1), ("edge-1", "r2", 2), ("edge-2", "r3", 1)):
            crud.record_desired(
                session, edge_id=edge, revision=revision, model_version_id=ids[version], payload={}
            )
            crud.create_deployment(session, model_version_id=ids[version], targets={edge: revision})
        crud.create_model_version(session, name="vibration", version="r9", variant="int8")  # never sent
    yield url
    engine_for(url).dispose()


@pytest.fixture
def server(registry: str, tmp_path: Path) -> Iterator[ArtifactServer]:
    served = ArtifactServer(tmp_path / "artifacts", access=EdgeArtifactAccess(registry))
    served.start()
    yield served
    served.stop()


def _sha(content: bytes) -> str:
    import hashlib  # noqa: PLC0415

    return hashlib.sha256(content).hexdigest()


def _get(
    server: ArtifactServer, path: str, *, user: str | None = None, secret: str | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(server.url + path, headers=headers)
    if user is not None:
        pair = base64.b64encode(f"{user}:{secret if secret is not None else SECRETS[user]}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _detail(body: bytes) -> str:
    return str(json.loads(body)["detail"])


def test_an_edge_downloads_its_current_model_whole_and_by_range(server: ArtifactServer) -> None:
    status, _, body = _get(server, "/vibration/r2/model.tflite", user="edge-1")
    assert (status, body) == (200, CONTENT["r2"])
    status, headers, body = _get(server, "/vibration/r2/model.tflite", user="edge-1", Range="bytes=10-19")
    assert (status, body) == (206, CONTENT["r2"][10:20])
    assert headers["Content-Range"] == f"bytes 10-19/{len(CONTENT['r2'])}"


def test_an_earlier_deployment_to_the_edge_stays_downloadable(server: ArtifactServer) -> None:
    # r1 was replaced by r2 on edge-1; a rollback to it must still find the artifact.
    status, _, body = _get(server, "/vibration/r1/model.tflite", user="edge-1")
    assert (status, body) == (200, CONTENT["r1"])


def test_a_connection_username_counts_as_its_identity(server: ArtifactServer) -> None:
    status, _, _ = _get(server, "/vibration/r2/model.tflite", user="edge-1/cloud", secret=SECRETS["edge-1"])
    assert status == 200


def test_no_credentials_is_401_with_a_basic_challenge(server: ArtifactServer) -> None:
    status, headers, body = _get(server, "/vibration/r2/model.tflite")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Basic realm="edgefleet artifacts"')
    assert headers["Content-Type"] == "application/json"
    assert "HTTP Basic" in _detail(body)


@pytest.mark.parametrize(
    ("user", "secret"), [("edge-1", "wrong"), ("edge-9", "edge-1-secret"), ("edge-1", "")]
)
def test_a_wrong_secret_or_unknown_identity_is_401(server: ArtifactServer, user: str, secret: str) -> None:
    status, _, body = _get(server, "/vibration/r2/model.tflite", user=user, secret=secret)
    assert status == 401
    assert "secret" in _detail(body) or "HTTP Basic" in _detail(body)


@pytest.mark.parametrize("user", ["pump-1", "ops-ann"])
def test_identities_that_are_not_edges_are_403(server: ArtifactServer, user: str) -> None:
    status, _, body = _get(server, "/vibration/r2/model.tflite", user=user)
    assert status == 403
    assert "only edges download artifacts" in _detail(body)


def test_an_edge_may_not_fetch_another_edges_model(server: ArtifactServer) -> None:
    status, _, body = _get(server, "/vibration/r3/model.tflite", user="edge-1")
    assert status == 403
    assert _detail(body) == "vibration@r3 was never sent to edge 'edge-1'"
    status, _, body = _get(server, "/vibration/r9/model.tflite", user="edge-2")  # sent to nobody
    assert status == 403
    assert (_get(server, "/vibration/r3/model.tflite", user="edge-2")[0]) == 200


@pytest.mark.parametrize(
    "path",
    ["/", "/vibration/", "/vibration/r2/", "/vibration/r2", "/registry.db", "/vibration/../registry.db"],
)
def test_no_listing_and_nothing_but_artifacts(server: ArtifactServer, path: str) -> None:
    status, _, body = _get(server, path, user="edge-1")
    assert status == 404
    assert _detail(body) == "no such artifact"
    assert b"<html" not in body.lower()


def test_an_unknown_model_is_404(server: ArtifactServer) -> None:
    status, _, body = _get(server, "/other/r1/model.tflite", user="edge-1")
    assert status == 404
    assert _detail(body) == "no artifact other@r1"


def test_verified_credentials_are_cached_and_a_revocation_applies_after_the_ttl(
    registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    access = EdgeArtifactAccess(registry, cache_ttl_s=3600)
    verified: list[str] = []
    real_verify = access._verify

    def counting(username: str, secret: str) -> object:
        verified.append(username)
        return real_verify(username, secret)

    monkeypatch.setattr(access, "_verify", counting)
    assert access.authenticate("edge-1", SECRETS["edge-1"]) == "edge-1"
    assert access.authenticate("edge-1", SECRETS["edge-1"]) == "edge-1"
    assert verified == ["edge-1"]  # the second answer came from the cache
    with session_scope(registry) as session:
        identities.revoke(session, identity_id="edge-1")
    assert access.authenticate("edge-1", SECRETS["edge-1"]) == "edge-1"  # cached until the TTL
    uncached = EdgeArtifactAccess(registry, cache_ttl_s=0)
    refusal = uncached.authenticate("edge-1", SECRETS["edge-1"])
    assert not isinstance(refusal, str)
    assert refusal.status == 401


def test_the_edge_downloader_authenticates_with_its_identity(server: ArtifactServer) -> None:
    url = f"{server.url}/vibration/r2/model.tflite"
    content = fetch_artifact(
        url, 1 << 20, 10, basic=("edge-1", SECRETS["edge-1"]), sha256=_sha(CONTENT["r2"])
    )
    assert content == CONTENT["r2"]
    with pytest.raises(DeployError, match=r"identity 'edge-1' was refused\): vibration@r3 was never sent"):
        fetch_artifact(
            f"{server.url}/vibration/r3/model.tflite", 1 << 20, 10, basic=("edge-1", SECRETS["edge-1"])
        )
    with pytest.raises(DeployError, match=r"HTTP 401: no download token configured"):
        fetch_artifact(url, 1 << 20, 10)


def test_an_open_server_is_explicit_and_still_lists_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    source = tmp_path / "m.tflite"
    source.write_bytes(b"x" * 10)
    store.put(source, name="m", version="v1", sha256=_sha(b"x" * 10))
    served = ArtifactServer(tmp_path / "artifacts", access=None)
    served.start()
    try:
        assert _get(served, "/m/v1/model.tflite")[:3:2] == (200, b"x" * 10)
        assert _get(served, "/")[0] == 404
        assert _get(served, "/m/")[0] == 404
    finally:
        served.stop()


def test_healthz_answers_without_credentials(server: ArtifactServer) -> None:
    status, _, body = _get(server, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_the_edge_logs_in_with_its_cloud_links_identity_unless_a_token_is_set() -> None:
    from pydantic import SecretStr  # noqa: PLC0415

    from edge_node.models import download_identity  # noqa: PLC0415
    from shared.settings import EdgeSettings, MqttSettings  # noqa: PLC0415

    enrolled = MqttSettings(username="edge-1", password=SecretStr(SECRETS["edge-1"]))
    settings = EdgeSettings(edge_id="edge-1", site_broker=enrolled)
    assert download_identity(settings) == ("edge-1", SECRETS["edge-1"])
    with_token = settings.model_copy(
        update={"model": settings.model.model_copy(update={"download_token": SecretStr("eft_x")})}
    )
    assert download_identity(with_token) is None  # the API's bearer token wins
    assert download_identity(EdgeSettings(edge_id="edge-1")) is None  # no identity: no credentials


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in for a bucket or CDN: records Authorization headers; 200, or a 401 of another realm."""

    seen: ClassVar[list[str | None]] = []
    challenge: ClassVar[str | None] = None

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        if self.challenge is None:
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"data")
            return
        self.send_response(401)
        self.send_header("WWW-Authenticate", self.challenge)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("challenge", [None, 'Basic realm="some bucket"', "Bearer"])
def test_the_edges_identity_goes_only_to_a_server_that_asks_for_it(challenge: str | None) -> None:
    from cloud.artifacts import BASIC_REALM  # noqa: PLC0415
    from edge_node.models import ARTIFACT_REALM  # noqa: PLC0415

    assert ARTIFACT_REALM == BASIC_REALM  # the edge answers exactly the cloud artifact server's challenge
    _Recorder.seen = []
    _Recorder.challenge = challenge
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/m/v1/model.tflite"
        if challenge is None:
            assert fetch_artifact(url, 100, 10, basic=("edge-1", SECRETS["edge-1"])) == b"data"
        else:
            with pytest.raises(DeployError, match="authentication failed"):
                fetch_artifact(url, 100, 10, basic=("edge-1", SECRETS["edge-1"]))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert _Recorder.seen == [None]  # asked once, without credentials

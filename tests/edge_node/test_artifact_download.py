"""Edges download published models through the cloud API with their own ``edge`` token.

Real services only: the admin API under uvicorn on a free loopback port, a SQLite registry, a real
mosquitto, a real ``EdgeNode`` and real .tflite models. The cloud publishes with
``artifact_base_url = <api>/v1/artifacts`` (the signed manifests name the API), tokens are made and
revoked with ``edgefleet admin token``, and desired state goes out as the cloud sends it
(``publish_desired_state``). Also: Range requests on the manifest's URL, and ``fetch_artifact``
resuming a transfer a real HTTP server cuts off."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud.bench.rollout import register
from cloud.fleet.desired_state import ensure_keys, publish_desired_state
from cloud.registry import crud
from cloud.registry.db import session_scope, upgrade
from edge_node.errors import DeployError
from edge_node.models import DOWNLOAD_RESUMES, fetch_artifact
from shared.private_broker import free_port
from shared.schemas import DeploymentProgress, DeployStage
from shared.settings import CloudSettings, EdgeSettings, MqttSettings, load_settings
from shared.settings.edge import ModelSettings
from shared.topics import EdgeTopic, Topics
from tests.support.api_server import run_cli, running_api
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    FakeDevice,
    Wire,
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    running_node,
    wait_for,
)

TOPICS = Topics()


@dataclass
class Api:
    settings: CloudSettings  # artifact_base_url = <api>/v1/artifacts
    client: httpx.Client
    public_key: Path  # what edges trust


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("api-downloads")
    port = free_port()
    settings = CloudSettings(
        dev_mode=True,  # signing keys generated; the API itself has no dev-mode token
        data_dir=root / "cloud",
        broker=MqttSettings(url="mqtt://127.0.0.1:1"),  # each test points it at its mosquitto
        artifact_base_url=f"http://127.0.0.1:{port}/v1/artifacts",
    )
    _, public = ensure_keys(settings)
    upgrade(settings.resolved_database_url)
    with (
        running_api(settings, port) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield Api(settings, client, public)


def _edge_token(api: Api, name: str) -> str:
    return run_cli(api.settings, "admin", "token", "create", name, "--role", "edge").strip()


def _verdict(ops: Wire, revision: int) -> DeploymentProgress | None:
    done = [
        p
        for p in ops.decoded("/deploy", DeploymentProgress)
        if p.revision == revision and p.stage in (DeployStage.SWAPPED, DeployStage.FAILED)
    ]
    return done[-1] if done else None


class _Edge:
    """A running EdgeNode (edge-1) with its ops wire and a device, deploying what the cloud publishes."""

    def __init__(self, api: Api, mosquitto: Mosquitto, node: Any, ops: Wire, device: FakeDevice) -> None:
        self.cloud = api.settings.model_copy(update={"broker": MqttSettings(url=mosquitto.url)})
        self.node, self.ops, self.device = node, ops, device
        self.sent = 0

    def deploy(self, ref: str) -> DeploymentProgress:
        (desired,) = publish_desired_state(settings=self.cloud, edge_ids=["edge-1"], model_ref=ref)
        verdict: DeploymentProgress = wait_for(
            lambda: _verdict(self.ops, desired.revision), f"the verdict on {ref}"
        )
        return verdict

    def serves(self) -> str:
        """Windows are still classified; the version that serves them."""
        self.sent += 1
        self.device.send(self.sent)
        wait_for(lambda: self.node.stats.windows_total >= self.sent, "a window classified")
        return str(self.node.holder.current.version)


@pytest.fixture
def edge_factory(
    api: Api, mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> Iterator[Any]:
    opened: list[Any] = []

    def start(token: str | None) -> _Edge:
        settings = edge_settings(
            mosquitto.url, tmp_path / f"edge-{len(opened)}", edge_models["float32"], public_key=api.public_key
        )
        if token is not None:  # as from edge.yaml's model.download_token / EDGEFLEET_MODEL__DOWNLOAD_TOKEN
            section = settings.model.model_dump() | {"download_token": token}
            settings = settings.model_copy(update={"model": ModelSettings.model_validate(section)})
        ops = Wire(mosquitto.url, f"ops-{len(opened)}", [TOPICS.edge("edge-1", EdgeTopic.DEPLOY)])
        device = FakeDevice(mosquitto.url, "dev-1")
        context = running_node(settings)
        node = context.__enter__()
        opened.append((context, ops, device))
        return _Edge(api, mosquitto, node, ops, device)

    yield start
    for context, ops, device in reversed(opened):
        context.__exit__(None, None, None)
        device.close()
        ops.close()


def test_manifests_point_at_the_api_which_answers_ranges_and_states_the_sha256(
    api: Api, edge_models: dict[str, Path]
) -> None:
    source = edge_models["float32_v2"]
    content = source.read_bytes()
    ref = register(api.settings, source, "1.0.0")
    with session_scope(api.settings.resolved_database_url) as session:
        manifest = crud.get_model_version(session, ref=ref).manifest  # signed, sent to edges
    assert manifest is not None
    url = manifest["url"]
    assert url == f"{api.settings.artifact_base_url}/vib/1.0.0/model.tflite"
    assert api.client.get(url).status_code == 401
    headers = {"Authorization": f"Bearer {_edge_token(api, 'edge-ranges')}"}
    full = api.client.get(url, headers=headers)
    assert full.status_code == 200
    assert full.content == content
    assert full.headers["x-checksum-sha256"] == hashlib.sha256(content).hexdigest()
    assert full.headers["accept-ranges"] == "bytes"
    size = len(content)
    tail = api.client.get(url, headers={**headers, "Range": f"bytes={size - 100}-"})
    assert tail.status_code == 206
    assert tail.content == content[-100:]
    assert tail.headers["content-range"] == f"bytes {size - 100}-{size - 1}/{size}"
    assert tail.headers["x-checksum-sha256"] == hashlib.sha256(content).hexdigest()
    middle = api.client.get(url, headers={**headers, "Range": "bytes=10-19"})
    assert (middle.status_code, middle.content) == (206, content[10:20])
    assert api.client.get(url, headers={**headers, "Range": f"bytes={size + 10}-"}).status_code == 416


def test_edge_with_its_token_deploys_through_the_api_until_the_token_is_revoked(
    api: Api, edge_factory: Any, edge_models: dict[str, Path]
) -> None:
    first = register(api.settings, edge_models["float32_v2"], "2.0.0")
    second = register(api.settings, edge_models["float32"], "2.0.1")
    token = _edge_token(api, "edge-1-downloads")
    edge = edge_factory(token)
    original = edge.serves()

    swapped = edge.deploy(first)
    assert swapped.stage is DeployStage.SWAPPED, swapped
    assert edge.serves() == "2.0.0" != original

    run_cli(api.settings, "admin", "token", "revoke", "edge-1-downloads")
    refused = edge.deploy(second)
    assert refused.stage is DeployStage.FAILED
    assert "authentication failed (HTTP 401: the download token was refused)" in (refused.reason or "")
    assert token not in (refused.reason or "")
    assert edge.serves() == "2.0.0"  # the deployed model keeps serving
    assert edge.node.manager.deploys_failed == 1


@pytest.mark.parametrize(
    ("token", "why"),
    [(None, "no download token configured"), ("eft_not-a-real-token", "the download token was refused")],
    ids=["no-token", "wrong-token"],
)
def test_edge_without_a_valid_token_is_refused_and_keeps_serving(
    api: Api, edge_factory: Any, edge_models: dict[str, Path], token: str | None, why: str
) -> None:
    ref = f"vib@3.0.{0 if token is None else 1}"
    register(api.settings, edge_models["float32_v2"], ref.split("@")[1])
    edge = edge_factory(token)
    original = edge.serves()
    refused = edge.deploy(ref)
    assert refused.stage is DeployStage.FAILED
    assert not refused.ok
    assert f"authentication failed (HTTP 401: {why})" in (refused.reason or "")
    assert edge.serves() == original
    assert edge.node.manager.reported().last_deploy_ok is False


# -- resuming an interrupted download -------------------------------------------------------------------

BODY = bytes(range(256)) * 64


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Cuts the first ``cut`` responses off halfway (full Content-Length, half the body, close);
    answers ``Range: bytes=N-`` with 206 unless ``honour_range`` is off (then a full 200)."""

    cut = 1
    honour_range = True
    requests: list[str | None] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        header = self.headers.get("Range")
        type(self).requests.append(header)
        start = int(header.removeprefix("bytes=").rstrip("-")) if header and self.honour_range else 0
        body = BODY[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Checksum-SHA256", hashlib.sha256(BODY).hexdigest())
        self.end_headers()
        if type(self).cut > 0:
            type(self).cut -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def flaky() -> Iterator[tuple[str, type[_Flaky]]]:
    handler = type("Flaky", (_Flaky,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/model.tflite", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_cut_off_download_resumes_with_a_range_request(flaky: tuple[str, type[_Flaky]]) -> None:
    url, handler = flaky
    handler.cut = 2
    digest = hashlib.sha256(BODY).hexdigest()
    assert fetch_artifact(url, len(BODY), 10, sha256=digest) == BODY
    half = len(BODY) // 2
    assert handler.requests == [None, f"bytes={half}-", f"bytes={half + (len(BODY) - half) // 2}-"]


def test_a_server_ignoring_the_range_is_read_from_the_start(flaky: tuple[str, type[_Flaky]]) -> None:
    url, handler = flaky
    handler.honour_range = False
    assert fetch_artifact(url, len(BODY), 10) == BODY
    assert handler.requests == [None, f"bytes={len(BODY) // 2}-"]


def test_a_download_cut_off_every_time_fails_after_the_resumes(flaky: tuple[str, type[_Flaky]]) -> None:
    url, handler = flaky
    handler.cut = 100
    with pytest.raises(DeployError, match=rf"cut off after \d+ bytes, {DOWNLOAD_RESUMES} resumes"):
        fetch_artifact(url, len(BODY), 10)
    assert len(handler.requests) == DOWNLOAD_RESUMES + 1


def test_the_download_token_is_a_secret_set_by_yaml_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("edge_id: edge-7\nmodel:\n  download_token: eft_from-yaml\n")
    from_yaml = load_settings(EdgeSettings, config)
    assert from_yaml.model.download_token is not None
    assert from_yaml.model.download_token.get_secret_value() == "eft_from-yaml"
    assert "eft_from-yaml" not in repr(from_yaml) + str(from_yaml.model_dump())
    monkeypatch.setenv("EDGEFLEET_MODEL__DOWNLOAD_TOKEN", "eft_from-env")
    from_env = load_settings(EdgeSettings, config)
    assert from_env.model.download_token is not None
    assert from_env.model.download_token.get_secret_value() == "eft_from-env"
    monkeypatch.delenv("EDGEFLEET_MODEL__DOWNLOAD_TOKEN")
    assert load_settings(EdgeSettings, None, edge_id="edge-7").model.download_token is None  # no default


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers ``/moved`` with a redirect to ``target`` and anything else with BODY; records what
    Authorization header each request carried."""

    target = ""
    seen: list[tuple[str, str | None]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", self.target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)


def test_the_token_is_not_forwarded_to_a_redirect_target() -> None:
    handler = type("Recorder", (_Recorder,), {"seen": []})
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        handler.target = f"http://127.0.0.1:{servers[1].server_address[1]}/elsewhere"
        url = f"http://127.0.0.1:{servers[0].server_address[1]}/moved"
        assert fetch_artifact(url, len(BODY), 10, token="eft_secret") == BODY
        assert handler.seen == [("/moved", "Bearer eft_secret"), ("/elsewhere", None)]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(5)

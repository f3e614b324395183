"""The admin API: bearer auth (missing, wrong, revoked, under-privileged tokens refused), tokens stored
hashed, artifact download with range requests and the sha256 header, and the OpenAPI document."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from cloud.api.auth import create_token
from cloud.fleet import rollouts
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope, upgrade
from edge_node.errors import DeployError
from edge_node.models import fetch_artifact
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from tests.support.api_server import run_cli, running_api

ARTIFACT = bytes(range(256)) * 40


def _viewer(settings: CloudSettings) -> dict[str, str]:
    """Headers of a fresh viewer token: the API's description (/openapi.json, /docs) needs one."""
    token = create_token(
        database_url=settings.resolved_database_url, name=f"docs-{secrets.token_hex(4)}", role="viewer"
    )
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def api_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CloudSettings, httpx.Client, Path]]:
    root = tmp_path_factory.mktemp("api")
    settings = CloudSettings(
        data_dir=root / "cloud",
        database_url=f"sqlite:///{root / 'registry.db'}",
        broker=MqttSettings(url="mqtt://127.0.0.1:1"),
    )
    upgrade(settings.resolved_database_url)
    artifact = root / "model.tflite"
    artifact.write_bytes(ARTIFACT)
    with session_scope(settings.resolved_database_url) as session:
        model = crud.create_model_version(
            session,
            name="vib",
            version="1.0.0",
            variant="int8",
            artifact_path=str(artifact),
            quantization="int8",
        )
        model.artifact_sha256 = hashlib.sha256(ARTIFACT).hexdigest()
        model.artifact_size = len(ARTIFACT)
        crud.upsert_edge(session, edge_id="edge-1", state="online", reported={"model_version": "1.0.0"})
    with (
        running_api(settings) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        yield settings, client, root


def test_tokens_are_stored_hashed_and_refused_when_missing_wrong_or_revoked(
    api_env: tuple[CloudSettings, httpx.Client, Path],
) -> None:
    settings, client, _ = api_env
    secret = run_cli(settings, "admin", "token", "create", "ops").strip()
    assert secret.startswith("eft_")
    with session_scope(settings.resolved_database_url) as session:
        stored = fleet.list_tokens(session)
        assert [t.name for t in stored] == ["ops"]
        assert stored[0].token_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in json.dumps([t.token_hash + t.prefix for t in stored])

    assert client.get("/v1/fleet/edges").status_code == 401
    assert client.get("/v1/fleet/edges", headers={"Authorization": "Bearer eft_wrong"}).status_code == 401
    assert client.get("/v1/fleet/edges", headers={"Authorization": f"Basic {secret}"}).status_code == 401
    good = client.get("/v1/fleet/edges", headers={"Authorization": f"Bearer {secret}"})
    assert good.status_code == 200
    assert good.json()[0]["edge_id"] == "edge-1"

    run_cli(settings, "admin", "token", "revoke", "ops")
    revoked = client.get("/v1/fleet/edges", headers={"Authorization": f"Bearer {secret}"})
    assert revoked.status_code == 401
    assert "revoked" in revoked.json()["detail"]
    listing = json.loads(run_cli(settings, "admin", "token", "list", "--json"))
    assert listing[0]["revoked"] is True
    assert "token_hash" not in listing[0]

    # Who did it is in the audit log, read through the API (a new admin token) and the CLI.
    auditor = run_cli(settings, "admin", "token", "create", "auditor").strip()
    entries = client.get(
        "/v1/audit", params={"action": "token_revoke"}, headers={"Authorization": f"Bearer {auditor}"}
    ).json()
    assert [(e["action"], e["target"]) for e in entries] == [("token_revoke", "ops")]
    assert entries[0]["actor"].startswith("cli")
    shown = json.loads(run_cli(settings, "admin", "audit", "--json", "--limit", "3"))
    assert [(e["action"], e["target"]) for e in shown] == [
        ("token_create", "auditor"),
        ("api_auth_failed", "GET /v1/fleet/edges"),  # the revoked token tried once more
        ("token_revoke", "ops"),
    ]
    assert shown[1]["actor"] == "client:127.0.0.1"
    assert secret not in json.dumps(shown)


def test_edge_token_downloads_artifacts_with_ranges_but_is_not_an_admin(
    api_env: tuple[CloudSettings, httpx.Client, Path],
) -> None:
    settings, client, _ = api_env
    edge_secret = run_cli(settings, "admin", "token", "create", "edge-1-download", "--role", "edge").strip()
    headers = {"Authorization": f"Bearer {edge_secret}"}
    assert client.get("/v1/artifacts/vib/1.0.0").status_code == 401
    full = client.get("/v1/artifacts/vib/1.0.0", headers=headers)
    assert full.status_code == 200
    assert full.content == ARTIFACT
    assert full.headers["x-checksum-sha256"] == hashlib.sha256(ARTIFACT).hexdigest()
    assert full.headers["accept-ranges"] == "bytes"
    part = client.get("/v1/artifacts/vib/1.0.0", headers={**headers, "Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == ARTIFACT[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(ARTIFACT)}"
    assert client.get("/v1/artifacts/vib/9.9.9", headers=headers).status_code == 404
    assert client.get("/v1/fleet/edges", headers=headers).status_code == 403  # an edge token is no admin


def test_edge_downloads_through_the_api_with_its_token(
    api_env: tuple[CloudSettings, httpx.Client, Path],
) -> None:
    """The edge's own download code against the real API: manifests can point at
    ``<api>/v1/artifacts/<name>/<version>/model.tflite`` (``artifact_base_url = <api>/v1/artifacts``);
    the edge's ``model.download_token`` gets it the bytes, a missing or wrong token a DeployError
    naming authentication (the model manager then keeps serving its current model)."""
    settings, client, _ = api_env
    secret = run_cli(settings, "admin", "token", "create", "edge-1-models", "--role", "edge").strip()
    url = f"{client.base_url}/v1/artifacts/vib/1.0.0/model.tflite"
    digest = hashlib.sha256(ARTIFACT).hexdigest()
    assert fetch_artifact(url, len(ARTIFACT), 30, token=secret, sha256=digest) == ARTIFACT
    with pytest.raises(DeployError, match=r"authentication failed \(HTTP 401: no download token"):
        fetch_artifact(url, len(ARTIFACT), 30, sha256=digest)
    with pytest.raises(DeployError, match=r"authentication failed .*the download token was refused"):
        fetch_artifact(url, len(ARTIFACT), 30, token="eft_wrong", sha256=digest)
    with pytest.raises(DeployError, match="serves sha256"):  # the header is checked before the body
        fetch_artifact(url, len(ARTIFACT), 30, token=secret, sha256="0" * 64)
    run_cli(settings, "admin", "token", "revoke", "edge-1-models")
    with pytest.raises(DeployError, match="authentication failed"):
        fetch_artifact(url, len(ARTIFACT), 30, token=secret, sha256=digest)


def test_openapi_lists_every_route_and_the_bearer_requirement(
    api_env: tuple[CloudSettings, httpx.Client, Path],
) -> None:
    settings, client, _ = api_env
    viewer = _viewer(settings)
    spec = client.get("/openapi.json", headers=viewer).json()
    paths = set(spec["paths"])
    assert {
        "/healthz",
        "/v1/fleet/edges",
        "/v1/fleet/edges/{edge_id}",
        "/v1/fleet/devices",
        "/v1/fleet/devices/{device_id}",
        "/v1/fleet/devices/{device_id}/config",
        "/v1/commands",
        "/v1/models",
        "/v1/models/{ref}",
        "/v1/models/rollback",
        "/v1/rollouts",
        "/v1/rollouts/{rollout_id}",
        "/v1/rollouts/{rollout_id}/{action}",
        "/v1/artifacts/{name}/{version}",
        "/v1/audit",
    } <= paths
    assert client.get("/healthz").json() == {"status": "ok"}
    docs = client.get("/docs", headers=viewer)  # the Swagger UI over the same document
    assert docs.status_code == 200
    assert "/openapi.json" in docs.text
    assert "RolloutRequest" in spec["components"]["schemas"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/rollouts"]["post"]["security"] == [{"HTTPBearer": []}]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path != "/healthz":
                assert operation.get("security") == [{"HTTPBearer": []}], (method, path)
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_every_operation_declares_a_typed_success_response(
    api_env: tuple[CloudSettings, httpx.Client, Path],
) -> None:
    """The OpenAPI document is complete: every operation's 2xx answer has a schema (a component
    ``$ref``, an array of them, or a typed value such as the artifact download's binary string)."""
    settings, client, _ = api_env
    spec = client.get("/openapi.json", headers=_viewer(settings)).json()
    components = spec["components"]["schemas"]
    checked = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            success = {code: r for code, r in operation["responses"].items() if code.startswith("2")}
            assert success, (method, path)
            for code, response in success.items():
                contents = response.get("content") or {}
                assert contents, (method, path, code)
                for media_type, content in contents.items():
                    schema = content.get("schema") or {}
                    typed = schema.get("$ref") or schema.get("items", {}).get("$ref") or schema.get("type")
                    assert typed, (method, path, code, media_type, schema)
                    for ref in (schema.get("$ref"), schema.get("items", {}).get("$ref")):
                        if ref:
                            assert ref.removeprefix("#/components/schemas/") in components, ref
                    checked += 1
    assert checked >= 17
    assert spec["paths"]["/v1/rollouts"]["post"]["responses"]["201"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/RolloutStatus"}
    edge_row = components["EdgeRow"]["properties"]
    assert {"edge_id", "desired_version", "reported_version", "in_sync", "health"} <= set(edge_row)


def test_answers_carry_every_key_the_registry_returns(
    api_env: tuple[CloudSettings, httpx.Client, Path],
) -> None:
    """The response models drop nothing: each answer is the registry function's own output."""
    settings, client, _ = api_env
    url = settings.resolved_database_url
    token = create_token(database_url=url, name="shape-check")
    headers = {"Authorization": f"Bearer {token}"}
    with session_scope(url) as session:
        seen = {
            "device_id": "pump-9",
            "state": "online",
            "since": 1.5,
            "last_seen": 2.5,
            "agent_version": "1.0",
            "sensor": "simulated",
            "config": {"rate_hz": 10.0, "sensor": {"options": {"seed": 1}}},
            "config_revision": 1,
            "outbox_depth": 3,
            "dropped_windows": 0,
        }
        fleet.record_device_seen(session, edge_id="edge-1", seen=seen)
        fleet.set_device_config(session, device_id="pump-9", changes={"rate_hz": 20}, actor="test")
        crud.add_metrics(
            session, edge_id="edge-1", ts=3.0, model_version="1.0.0", windows_total=5, data={"windows": 5}
        )
        model = crud.get_model_version(session, ref="vib@1.0.0")
        fleet.create_rollout(
            session,
            rollout_id="ro-shape",
            model=model,
            plan=[["edge-1"]],
            gates={"error_rate": 0.05, "deploy_failures": 0},
            params={"min_windows": 200, "soak_s": 30.0},
            created_by="test",
        )

    def registry(read: Callable[[Session], Any]) -> Any:
        with session_scope(url) as session:
            return json.loads(json.dumps(read(session)))

    def api(path: str) -> Any:
        answer = client.get(path, headers=headers)
        assert answer.status_code == 200, answer.text
        return answer.json()

    assert api("/v1/fleet/edges") == registry(fleet.fleet_edges)
    edge = api("/v1/fleet/edges/edge-1")
    assert edge == registry(lambda s: fleet.fleet_edge(s, edge_id="edge-1"))
    assert edge["metrics"] == {"windows": 5}
    assert edge["devices"] == ["pump-9"]
    assert api("/v1/fleet/devices") == registry(fleet.fleet_devices)
    device = api("/v1/fleet/devices/pump-9")
    assert device == registry(lambda s: fleet.fleet_device(s, device_id="pump-9"))
    assert device["config_diff"] == {"rate_hz": {"desired": 20, "reported": 10.0}}
    assert api("/v1/audit?limit=5") == registry(
        lambda s: [fleet.audit_row(a) for a in fleet.audit_entries(s)][:5]
    )
    assert api("/v1/rollouts/ro-shape") == registry(
        lambda s: rollouts.describe(fleet.get_rollout(s, rollout_id="ro-shape"))
    )
    assert api("/v1/rollouts") == registry(lambda s: [rollouts.describe(r) for r in fleet.list_rollouts(s)])
    assert api("/v1/models/vib@1.0.0") == {
        "ref": "vib@1.0.0",
        "variant": "int8",
        "status": "candidate",
        "quantization": "int8",
        "sha256": hashlib.sha256(ARTIFACT).hexdigest(),
        "size": len(ARTIFACT),
        "signed": False,
        "created_at": api("/v1/models")[0]["created_at"],
        "manifest": None,
        "metrics": {},
    }
    refused = client.post("/v1/rollouts/ro-shape/explode", headers=headers)
    assert (refused.status_code, refused.json()) == (404, {"detail": "no rollout action 'explode'"})
    missing = client.get("/v1/fleet/edges/nowhere", headers=headers)
    assert (missing.status_code, missing.json()) == (404, {"detail": "edge nowhere is not in the registry"})
    with session_scope(url) as session:
        fleet.revoke_token(session, name="shape-check")

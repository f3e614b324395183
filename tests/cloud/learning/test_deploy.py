"""``PipelineConfig.deploy``: how ``publish`` sends a published model to ``deploy_edges``. In rollout
mode it starts a staged rollout (recorded in the registry; beat's tick publishes), once per model
version however often the task is retried; a newer model pauses the older model's running rollout;
a first model (no production predecessor) is deployed directly unless asked otherwise. Real SQLite
registry and real signed manifests; the direct path publishes to a real mosquitto."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from cloud.artifacts import sha256_file, store_for
from cloud.fleet import rollouts
from cloud.fleet.desired_state import ensure_keys, sign
from cloud.learning import steps
from cloud.learning.pipeline import PipelineConfig
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope, upgrade
from cloud.registry.models import DesiredRevision, PipelineRun
from shared.settings import CloudSettings, MqttSettings
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import manifest_for

EDGES = ["edge-1", "edge-2", "edge-3"]


@pytest.fixture
def settings(tmp_path: Path) -> CloudSettings:
    settings = CloudSettings(data_dir=tmp_path, dev_mode=True)
    ensure_keys(settings)
    upgrade(settings.resolved_database_url)
    return settings


def _config(**deploy: object) -> PipelineConfig:
    return PipelineConfig.model_validate({"model_name": "vib", "deploy_edges": EDGES, "deploy": deploy})


def _published_run(settings: CloudSettings, config: PipelineConfig, *, parent: bool) -> tuple[int, int, str]:
    """A run whose base model (``parent``: trained while a production model existed) and signed
    int8 model are in the registry, as after ``sign``. Returns run id, int8 model id and ref."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        run_id = crud.create_run(session, model_name="vib", config=config.model_dump(mode="json")).id
        production = crud.production_model(session, name="vib")
        assert (production is not None) == parent
    artifact = settings.data_dir / f"r{run_id}.tflite"
    artifact.write_bytes(b"not a real model, never loaded here " * 8)
    store = store_for(settings)
    version = f"r{run_id}-int8"
    manifest = sign(manifest_for(artifact, version, url=store.url("vib", version)), settings)
    with session_scope(url) as session:
        base = crud.create_model_version(
            session,
            name="vib",
            version=f"r{run_id}-float32",
            variant="float32",
            run_id=run_id,
            parent_id=production.id if production is not None else None,
        )
        model = crud.create_model_version(
            session,
            name="vib",
            version=version,
            variant="int8",
            run_id=run_id,
            parent_id=base.id,
            artifact_path=str(artifact),
            quantization="int8",
        )
        model.manifest = manifest.model_dump(mode="json")
        model.signature = manifest.signature
        model.key_id = manifest.key_id
        model.artifact_sha256 = sha256_file(artifact)
        model.artifact_size = artifact.stat().st_size
        crud.promote(session, model_id=model.id)
        return run_id, model.id, model.ref


def _rollouts(settings: CloudSettings) -> list[dict[str, object]]:
    with session_scope(settings.resolved_database_url) as session:
        return [
            {
                "id": r.rollout_id,
                "model": r.model.ref,
                "state": r.state,
                "waves": [[t.edge_id for t in r.targets if t.wave == w] for w in range(r.waves)],
                "gates": dict(r.gates),
                "params": dict(r.params),
                "created_by": r.created_by,
            }
            for r in reversed(fleet.list_rollouts(session))
        ]


def test_deploy_config_defaults_and_validation() -> None:
    assert PipelineConfig().deploy.mode == "direct"
    # Existing callers: deploy_edges alone still means "every edge at once".
    legacy = PipelineConfig.model_validate({"deploy_edges": ["e1"]})
    assert legacy.deploy.mode == "direct"
    assert legacy.deploy_edges == ["e1"]
    with pytest.raises(ValidationError, match="unknown gates"):
        PipelineConfig.model_validate({"deploy": {"mode": "rollout", "gates": {"acuracy_drop": 0.1}}})
    with pytest.raises(ValidationError, match="unknown rollout params"):
        PipelineConfig.model_validate({"deploy": {"mode": "rollout", "params": {"soak": 1}}})
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate({"deploy": {"mode": "canary"}})


def test_publish_starts_one_rollout_per_model_version(settings: CloudSettings) -> None:
    config = _config(
        mode="rollout", canary=1, waves=2, gates={"accuracy_drop": 0.3}, params={"min_windows": 50}
    )
    _published_run(settings, config, parent=False)  # the production model the next run retrains
    run_id, model_id, ref = _published_run(settings, config, parent=True)

    steps.deploy(settings, config, run_id=run_id, model_id=model_id, ref=ref)
    steps.deploy(settings, config, run_id=run_id, model_id=model_id, ref=ref)  # a retried publish

    [rollout] = _rollouts(settings)
    assert rollout["model"] == ref
    assert rollout["state"] == "running"
    assert rollout["waves"] == [["edge-1"], ["edge-2"], ["edge-3"]]
    assert rollout["gates"]["accuracy_drop"] == pytest.approx(0.3)
    assert rollout["gates"]["teacher_agreement"] == pytest.approx(0.8)  # the defaults fill the rest
    assert rollout["params"]["min_windows"] == 50
    assert rollout["created_by"] == f"pipeline run {run_id}"
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(PipelineRun, run_id)
        assert run is not None
        recorded = [s.detail for s in run.steps if s.step == "rollout"]
        # Nothing is published before the engine's first tick.
        assert session.scalars(select(DesiredRevision)).all() == []
    assert recorded == [{"rollout_id": rollout["id"], "edges": EDGES, "superseded": []}]


def test_newer_model_pauses_the_older_running_rollout(settings: CloudSettings) -> None:
    config = _config(mode="rollout", canary=0.34, waves=1)
    _published_run(settings, config, parent=False)
    first = _published_run(settings, config, parent=True)
    steps.deploy(settings, config, run_id=first[0], model_id=first[1], ref=first[2])
    second = _published_run(settings, config, parent=True)
    steps.deploy(settings, config, run_id=second[0], model_id=second[1], ref=second[2])

    old, new = _rollouts(settings)
    assert (old["model"], old["state"]) == (first[2], "paused")
    assert (new["model"], new["state"]) == (second[2], "running")
    assert new["waves"] == [["edge-1"], ["edge-2", "edge-3"]]
    with session_scope(settings.resolved_database_url) as session:
        run = session.get(PipelineRun, second[0])
        assert run is not None
        [detail] = [s.detail for s in run.steps if s.step == "rollout"]
        audit = [a.actor for a in crud.list_audit(session, limit=100) if a.action == "rollout_pause"]
    assert detail["superseded"] == [old["id"]]
    assert audit == [f"superseded by {new['id']}"]


def test_first_model_can_be_rolled_out_when_asked(settings: CloudSettings) -> None:
    config = _config(mode="rollout", first_model="rollout")
    run_id, model_id, ref = _published_run(settings, config, parent=False)
    steps.deploy(settings, config, run_id=run_id, model_id=model_id, ref=ref)
    [rollout] = _rollouts(settings)
    assert rollout["model"] == ref


def test_first_model_goes_direct_in_rollout_mode(settings: CloudSettings, mosquitto: Mosquitto) -> None:
    settings = settings.model_copy(update={"broker": MqttSettings(url=mosquitto.url)})
    config = _config(mode="rollout")
    run_id, model_id, ref = _published_run(settings, config, parent=False)
    steps.deploy(settings, config, run_id=run_id, model_id=model_id, ref=ref)
    assert _rollouts(settings) == []
    with session_scope(settings.resolved_database_url) as session:
        desired = {d.edge_id: d.payload["model"]["version"] for d in session.scalars(select(DesiredRevision))}
    assert desired == dict.fromkeys(EDGES, ref.split("@")[1])


def test_halted_pipeline_rollout_withdraws_the_promotion(settings: CloudSettings) -> None:
    """The pipeline promotes at publish; when the rollout it started halts, the candidate is withdrawn
    and the version the fleet still serves is production again (what the next run trains from and
    is gated against). An operator's own rollout halting changes nothing about production."""

    config = _config(mode="rollout", canary=1, waves=1)
    _, _, first_ref = _published_run(settings, config, parent=False)
    run_id, model_id, ref = _published_run(settings, config, parent=True)
    steps.deploy(settings, config, run_id=run_id, model_id=model_id, ref=ref)
    [pipeline_rollout] = _rollouts(settings)
    url = settings.resolved_database_url
    with session_scope(url) as session:
        rollouts._halt(session, fleet.get_rollout(session, rollout_id=str(pipeline_rollout["id"])), "test")
    with session_scope(url) as session:
        assert crud.get_model_version(session, model_id=model_id).status == "withdrawn"
        production = crud.production_model(session, name="vib")
        assert production is not None
        assert production.ref == first_ref
        [entry] = [a for a in crud.list_audit(session, limit=100) if a.action == "withdraw"]
        assert entry.target == ref
        assert entry.detail["restored"] == first_ref

    operator_rollout = rollouts.start_rollout(
        settings=settings, model_ref=first_ref, edge_ids=EDGES, canary=1, waves=1, actor="alice"
    )
    with session_scope(url) as session:
        rollouts._halt(session, fleet.get_rollout(session, rollout_id=operator_rollout), "test")
    with session_scope(url) as session:
        production = crud.production_model(session, name="vib")
        assert production is not None
        assert production.ref == first_ref

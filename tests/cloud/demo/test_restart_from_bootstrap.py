"""``edgefleet demo`` on a kept registry starts every run from the bootstrap model (issue 12, item 7):
``cloud.demo.runtime.restart_from_bootstrap`` against a real registry, a private mosquitto, the real
ingest and a real edge node that serves the retrained model the previous run ended on.

The previous run is left as a demo stopped mid-loop leaves it: the retrained model in production and on
the edge, a retraining run still "running" and a rollout of the retrained model still "running". After
the restart the bootstrap model is production again, the edge serves it through a signed rollback
order, the stale run and rollout are closed, and a ``restart`` trigger marks where the retraining
triggers count edge signals from."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.demo import runtime as rt
from cloud.fleet import rollouts
from cloud.fleet.desired_state import publish_desired_state
from cloud.ingest import Ingest
from cloud.registry import crud, fleet
from cloud.registry.db import session_scope, upgrade
from edge_node.node import EdgeNode
from shared.schemas import DeploymentProgress, DeployStage
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from shared.topics import EdgeTopic, Topics
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    Wire,
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    wait_for,
)
from tests.support.identities import enroll_fleet
from tests.support.rollout_fleet import register_signed_model

EDGE = "edge-1"
NAME = "vib"


def _model_of_run(settings: CloudSettings, ref: str, *, include_samples: bool) -> None:
    """Attach ``ref`` to a finished pipeline run as the demo's runs record them: the bootstrap run
    trains on the base data alone, every retraining run adds the uplinked samples."""
    with session_scope(settings.resolved_database_url) as session:
        run = crud.create_run(
            session,
            model_name=NAME,
            config={"dataset": "vibration", "include_samples": include_samples, "deploy_edges": [EDGE]},
        )
        crud.finish_run(session, run_id=run.id, state="published")
        crud.get_model_version(session, ref=ref).run_id = run.id


@pytest.fixture(name="previous_run")
def previous_run_fixture(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> Iterator[tuple[CloudSettings, EdgeNode, dict[str, str]]]:
    settings = CloudSettings(
        data_dir=tmp_path / "cloud",
        database_url=f"sqlite:///{tmp_path / 'registry.db'}",
        broker=MqttSettings(url=mosquitto.url),
        dev_mode=True,
    )
    upgrade(settings.resolved_database_url)
    enroll_fleet(settings.resolved_database_url, edges=[EDGE])
    models = {
        "bootstrap": register_signed_model(settings, edge_models["float32"], "r1-int8", name=NAME),
        "retrained": register_signed_model(settings, edge_models["float32_v2"], "r2-int8", name=NAME),
    }
    _model_of_run(settings, models["bootstrap"], include_samples=False)
    _model_of_run(settings, models["retrained"], include_samples=True)
    with session_scope(settings.resolved_database_url) as session:
        crud.promote(session, model_id=crud.get_model_version(session, ref=models["retrained"]).id)
    ingest = Ingest(settings)
    ingest_thread = threading.Thread(target=ingest.run, daemon=True)
    ingest_thread.start()
    _, public_key = settings.key_paths()
    node = EdgeNode(
        edge_settings(mosquitto.url, tmp_path / EDGE, None, cloud_url=mosquitto.url, public_key=public_key)
    )
    node.start()
    try:
        # The previous run ended on the retrained model: the edge serves it and the registry knows.
        publish_desired_state(
            settings=settings, edge_ids=[EDGE], model_ref=models["retrained"], actor="tests"
        )
        wait_for(lambda: _reported(settings).get("model_version") == "r2-int8", "the edge reporting r2-int8")
        # ... and stopped mid-loop: a retraining run never finished, a rollout never completed.
        with session_scope(settings.resolved_database_url) as session:
            crud.create_run(
                session, model_name=NAME, config={"include_samples": True, "deploy_edges": [EDGE]}
            )
        models["rollout"] = rollouts.start_rollout(
            settings=settings,
            model_ref=models["retrained"],
            edge_ids=[EDGE],
            canary=1,
            waves=1,
            actor="pipeline run 2",  # as the pipeline's publish starts it
        )
        yield settings, node, models
    finally:
        node.stop()
        ingest.stop_event.set()
        ingest_thread.join(10)
        ingest.close()


def _reported(settings: CloudSettings) -> dict[str, object]:
    with session_scope(settings.resolved_database_url) as session:
        edge = fleet.get_edge(session, edge_id=EDGE)
        return dict(edge.reported or {}) if edge is not None else {}


def test_a_new_run_restarts_from_the_bootstrap_model(
    previous_run: tuple[CloudSettings, EdgeNode, dict[str, str]], mosquitto: Mosquitto
) -> None:
    settings, node, models = previous_run
    ops = Wire(mosquitto.url, "ops", [Topics().edge(EDGE, EdgeTopic.DEPLOY)])
    try:
        found = rt.find_bootstrap(settings, model_name=NAME, edge_ids=[EDGE], dataset="vibration")
        assert found == (models["bootstrap"], "r1-int8")  # not the retrained production model
        assert rt.find_bootstrap(settings, model_name=NAME, edge_ids=["edge-9"], dataset="vibration") is None

        restart = rt.restart_from_bootstrap(
            settings, model_name=NAME, bootstrap=models["bootstrap"], edge_ids=[EDGE]
        )

        assert restart.model == models["bootstrap"]
        assert restart.replaced == models["retrained"]
        assert restart.rollouts_aborted == [models["rollout"]]
        assert len(restart.runs_failed) == 1
        # The edge goes back to the bootstrap model through a signed rollback order naming it.
        wait_for(
            lambda: node.holder.current is not None and node.holder.current.version == "r1-int8",
            "the edge serving the bootstrap model again",
        )
        rolled_back = wait_for(
            lambda: [
                p
                for p in ops.decoded("/deploy", DeploymentProgress)
                if p.stage is DeployStage.ROLLED_BACK and p.model_version == "r1-int8"
            ],
            "the edge's rolled_back progress",
        )
        assert rolled_back[-1].ok
        with session_scope(settings.resolved_database_url) as session:
            production = crud.production_model(session, name=NAME)
            assert production is not None
            assert production.ref == models["bootstrap"]
            # Its rollout aborted, the retrained model is withdrawn (as any aborted pipeline rollout's);
            # it stays in the registry.
            assert crud.get_model_version(session, ref=models["retrained"]).status == "withdrawn"
            assert crud.run_in_progress(session, model_name=NAME) is None
            assert fleet.get_rollout(session, rollout_id=models["rollout"]).state == "aborted"
            trigger = crud.last_trigger(session, model_name=NAME)
            assert trigger is not None
            assert trigger.kind == rt.RESTART_TRIGGER_KIND  # edge signals count from the restart
        # The registry is kept: the retrained version is still there, and a second restart finds the
        # same bootstrap model (nothing to replace any more).
        again = rt.restart_from_bootstrap(
            settings, model_name=NAME, bootstrap=models["bootstrap"], edge_ids=[EDGE]
        )
        assert again.replaced is None
        assert again.rollouts_aborted == []
    finally:
        ops.close()

"""Retraining triggers over a real (SQLite) registry: periodic, accuracy drift, confidence drift and
new labelled samples, each recorded with its reason; nothing fires while a run is in progress."""

from __future__ import annotations

import time
from pathlib import Path

from cloud.registry import crud
from cloud.registry.db import session_scope, upgrade
from cloud.worker.triggers import check_and_fire, evaluate_triggers
from shared.settings.cloud import Thresholds
from tests.support.identities import enroll_fleet


def _registry(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    with session_scope(url) as s:
        run = crud.create_run(s, model_name="vib", config={"model_name": "vib", "dataset": "digits"})
        crud.finish_run(s, run_id=run.id, state="published")
        model = crud.create_model_version(
            s,
            name="vib",
            version="r1-int8",
            variant="int8",
            run_id=run.id,
            metrics={"accuracy": 0.95, "confidence_mean": 0.9},
        )
        crud.promote(s, model_id=model.id)
    return url


def _metrics(url: str, *, correct: int, confidence: float, labelled: int = 300) -> None:
    with session_scope(url) as s:
        crud.add_metrics(
            s,
            edge_id="e1",
            ts=time.time(),
            model_version="r1-int8",
            windows_total=labelled,
            confidence_mean=confidence,
            labelled_windows=labelled,
            labelled_correct=correct,
            data={},
        )


def test_quiet_fleet_fires_nothing(tmp_path: Path) -> None:
    url = _registry(tmp_path)
    _metrics(url, correct=285, confidence=0.9)
    with session_scope(url) as s:
        assert evaluate_triggers(s, model_name="vib", thresholds=Thresholds()) == []


def test_accuracy_and_confidence_drift_fire_with_reasons(tmp_path: Path) -> None:
    url = _registry(tmp_path)
    _metrics(url, correct=240, confidence=0.7)  # 0.80 accuracy vs 0.95; confidence 0.7 vs 0.9
    with session_scope(url) as s:
        firings = evaluate_triggers(s, model_name="vib", thresholds=Thresholds())
    kinds = {f.kind: f for f in firings}
    assert set(kinds) == {"drift_accuracy", "drift_confidence"}
    assert "0.8000" in kinds["drift_accuracy"].reason
    assert "0.9500" in kinds["drift_accuracy"].reason

    launched: list[tuple[dict[str, object], int]] = []
    started = check_and_fire(
        database_url=url, thresholds=Thresholds(), launch=lambda cfg, tid: launched.append((cfg, tid)) or tid
    )
    assert len(started) == 1
    config, trigger_id = launched[0]
    assert config["include_samples"] is True
    assert config["model_name"] == "vib"
    with session_scope(url) as s:
        recorded = crud.list_triggers(s)
        assert {t.kind for t in recorded} == {"drift_accuracy", "drift_confidence"}
        assert trigger_id in {t.id for t in recorded}
        # Signals are counted from the last trigger on: the same metrics do not fire again.
        assert evaluate_triggers(s, model_name="vib", thresholds=Thresholds()) == []


def test_too_few_labelled_windows_is_not_drift(tmp_path: Path) -> None:
    url = _registry(tmp_path)
    _metrics(url, correct=5, confidence=0.9, labelled=10)
    with session_scope(url) as s:
        assert evaluate_triggers(s, model_name="vib", thresholds=Thresholds()) == []


def test_new_labelled_samples_and_periodic(tmp_path: Path) -> None:
    url = _registry(tmp_path)
    enroll_fleet(url, label_trusted=["d1"], migrate=False)  # only trusted labellers' labels count
    with session_scope(url) as s:
        for i in range(3):
            crud.add_sample(
                s,
                sample_id=f"s{i}",
                edge_id="e1",
                device_id="d1",
                seq=i,
                ts=1.0,
                predicted="normal",
                confidence=0.5,
                reason="random",
                privacy="none",
                label="normal",
                label_source="device",
                label_trusted=True,
            )
    with session_scope(url) as s:
        firings = evaluate_triggers(s, model_name="vib", thresholds=Thresholds(new_labelled_samples=3))
        assert [f.kind for f in firings] == ["new_samples"]
        later = time.time() + 7200
        firings = evaluate_triggers(
            s, model_name="vib", thresholds=Thresholds(periodic_retrain_s=3600), now=later
        )
        assert [f.kind for f in firings] == ["periodic"]


def test_no_trigger_while_a_run_is_in_progress(tmp_path: Path) -> None:
    url = _registry(tmp_path)
    _metrics(url, correct=100, confidence=0.5)
    with session_scope(url) as s:
        crud.create_run(s, model_name="vib", config={})
    with session_scope(url) as s:
        assert evaluate_triggers(s, model_name="vib", thresholds=Thresholds()) == []

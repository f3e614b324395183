"""Retraining triggers, checked by Celery beat: periodic retraining, drift of the edges' uplinked
accuracy or confidence past a threshold, and N new labelled samples (only labels that may train:
a teacher's, an operator's or a trusted labeller device's). Each fired trigger is recorded with its
reason and the run it started."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from cloud.registry import crud
from cloud.registry.db import session_scope
from cloud.registry.models import ModelVersion
from cloud.worker.app import app, get_settings
from shared.settings.cloud import Thresholds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Firing:
    """A trigger that fires for a model: its kind, the reason recorded, and the figures behind it."""

    kind: str
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


def _since(session: Session, production: ModelVersion) -> float:
    """Signals count from the later of production's creation and this model's last trigger."""
    last = crud.last_trigger(session, model_name=production.name)
    return max(production.created_at, last.ts if last is not None else 0.0)


def _labelled_increments(session: Session, *, since: float, version: str) -> tuple[int, int]:
    """Labelled and correct windows decided by ``version`` after ``since``. Edges report cumulative
    counters (per edge process): each report adds its increase over that edge's previous report,
    the last one before ``since`` included; a decrease means the edge restarted and counts from 0."""
    previous: dict[str, tuple[int, int]] = {}
    labelled = correct = 0
    for m in crud.recent_metrics(session, since=since):
        if m.edge_id not in previous:
            before = crud.last_metrics_before(session, edge_id=m.edge_id, ts=since)
            previous[m.edge_id] = (before.labelled_windows, before.labelled_correct) if before else (0, 0)
        base_l, base_c = previous[m.edge_id]
        if m.labelled_windows < base_l or m.labelled_correct < base_c:
            base_l, base_c = 0, 0
        if m.model_version in (None, version):
            labelled += m.labelled_windows - base_l
            correct += m.labelled_correct - base_c
        previous[m.edge_id] = (m.labelled_windows, m.labelled_correct)
    return labelled, correct


def evaluate_triggers(
    session: Session, *, model_name: str, thresholds: Thresholds, now: float | None = None
) -> list[Firing]:
    """Which triggers fire now for ``model_name`` (pure over the registry; nothing recorded)."""
    now = time.time() if now is None else now
    production = crud.production_model(session, name=model_name)
    if production is None:
        return []
    if crud.run_in_progress(session, model_name=model_name) is not None:
        return []  # one retraining at a time
    since = _since(session, production)
    firings: list[Firing] = []

    if now - since >= thresholds.periodic_retrain_s:
        firings.append(
            Firing(
                "periodic",
                f"no retraining for {now - since:.0f} s (period {thresholds.periodic_retrain_s:.0f} s)",
            )
        )

    metrics = [
        m for m in crud.recent_metrics(session, since=since) if m.model_version in (None, production.version)
    ]
    labelled, correct = _labelled_increments(session, since=since, version=production.version)
    baseline_acc = production.metrics.get("accuracy")
    if labelled >= thresholds.min_metrics_windows and baseline_acc is not None:
        accuracy = correct / labelled
        if baseline_acc - accuracy >= thresholds.drift_accuracy_drop:
            firings.append(
                Firing(
                    "drift_accuracy",
                    f"edge accuracy {accuracy:.4f} over {labelled} labelled windows is "
                    f"{baseline_acc - accuracy:.4f} below production's {baseline_acc:.4f} "
                    f"(threshold {thresholds.drift_accuracy_drop:.4f})",
                    {"accuracy": accuracy, "baseline": baseline_acc, "labelled_windows": labelled},
                )
            )
    confidences = [(m.confidence_mean, m.windows_total) for m in metrics if m.confidence_mean is not None]
    baseline_conf = production.metrics.get("confidence_mean")
    if confidences and baseline_conf is not None:
        # Each report's mean, weighted by its windows; at least min_metrics_windows windows.
        windows = sum(max(1, w) for _, w in confidences)
        if windows >= thresholds.min_metrics_windows:
            confidence = sum(c * max(1, w) for c, w in confidences) / windows
            if baseline_conf - confidence >= thresholds.drift_confidence_drop:
                firings.append(
                    Firing(
                        "drift_confidence",
                        f"edge mean confidence {confidence:.4f} is {baseline_conf - confidence:.4f} below "
                        f"production's {baseline_conf:.4f} "
                        f"(threshold {thresholds.drift_confidence_drop:.4f})",
                        {"confidence": confidence, "baseline": baseline_conf},
                    )
                )

    # Only labels that may train count (teachers', operators', trusted labeller devices'): an
    # untrusted device cannot make the cloud retrain by sending labels.
    new_labels = crud.count_samples(session, labelled=True, training=True, since=since)
    if new_labels >= thresholds.new_labelled_samples:
        firings.append(
            Firing(
                "new_samples",
                f"{new_labels} new labelled samples that may train since {since:.0f} "
                f"(threshold {thresholds.new_labelled_samples})",
                {"new_labelled": new_labels},
            )
        )
    return firings


def retrain_config(session: Session, *, production: ModelVersion) -> dict[str, Any]:
    """Production's own run config, with uplinked labelled samples added to its data."""
    from cloud.learning.pipeline import PipelineConfig  # noqa: PLC0415  (numpy, learning code: only when a trigger fires)

    run = crud.run_of(session, model=production)
    config = (
        PipelineConfig.model_validate(run.config)
        if run is not None
        else PipelineConfig(model_name=production.name)
    )
    return config.model_copy(update={"include_samples": True}).model_dump(mode="json")


def check_and_fire(*, database_url: str, thresholds: Thresholds, launch: Any) -> list[int]:
    """Record every firing trigger and start one retraining per model (``launch(config, trigger_id)``)."""
    started: list[int] = []
    with session_scope(database_url) as session:
        names = sorted({m.name for m in crud.list_model_versions(session, status="production", limit=1000)})
    for name in names:
        with session_scope(database_url) as session:
            firings = evaluate_triggers(session, model_name=name, thresholds=thresholds)
            if not firings:
                continue
            production = crud.production_model(session, name=name)
            assert production is not None
            config = retrain_config(session, production=production)
            records = [
                crud.record_trigger(session, kind=f.kind, reason=f.reason, model_name=name, detail=f.detail)
                for f in firings
            ]
            trigger_id = records[0].id
        for firing in firings:
            logger.info("retrain %s: %s trigger: %s", name, firing.kind, firing.reason)
        started.append(launch(config, trigger_id))
    return started


def _launch_via_celery(config: dict[str, Any], trigger_id: int) -> int:
    from cloud.worker.tasks import pipeline  # noqa: PLC0415  (the learning tasks: only when a retraining starts)

    pipeline.delay(config, trigger_id)
    return trigger_id


_check_task: Callable[[Callable[..., Any]], Any] = app.task(
    name="edgefleet.triggers.check", ignore_result=True
)


@_check_task
def check() -> list[int]:
    """Beat's periodic check of every production model's triggers."""
    settings = get_settings()
    return check_and_fire(
        database_url=settings.resolved_database_url, thresholds=settings.thresholds, launch=_launch_via_celery
    )

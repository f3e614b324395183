"""Celery tasks of the learning pipeline (thin, named wrappers over ``cloud.learning.steps``) and of
model selection (``edgefleet.learning.cv_trial`` over ``cloud.learning.selection``). Each
takes ids (never ORM objects), is idempotent (the step it runs is), has time limits, and retries only
on transient errors (lost database or broker connections). ``pipeline`` chains them as a canvas."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, chain, group
from celery.result import AsyncResult
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from cloud.learning import selection, steps
from cloud.learning.pipeline import PipelineConfig
from cloud.worker.app import app, get_settings

logger = logging.getLogger(__name__)

TRANSIENT = (OperationalError, InterfaceError, DisconnectionError, RedisConnectionError, RedisTimeoutError)
TASK_OPTIONS: dict[str, Any] = {
    "autoretry_for": TRANSIENT,
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "retry_kwargs": {"max_retries": 5},
    "acks_late": True,
}


def _task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``app.task`` with a type (Celery ships none); every task gets the configured time limits."""
    decorator: Callable[[Callable[..., Any]], Any] = app.task(**_limits(), **options)
    return decorator


def _limits() -> dict[str, float]:
    limit = get_settings().task_time_limit_s
    return {"soft_time_limit": limit, "time_limit": limit + 60}


@_task(name="edgefleet.pipeline.prepare_dataset", **TASK_OPTIONS)
def prepare_dataset(run_id: int) -> int:
    """Freeze the run's dataset and register it (``steps.prepare_dataset``)."""
    return steps.prepare_dataset(get_settings(), run_id)


@_task(name="edgefleet.pipeline.train", **TASK_OPTIONS)
def train(run_id: int) -> int:
    """Train the base model (``steps.train``), reporting epochs as the task's PROGRESS state."""

    def on_epoch(epoch: int, epochs: int, logs: dict[str, float]) -> None:  # noqa: ARG001
        if train.request.id is not None:
            train.update_state(state="PROGRESS", meta={"epoch": epoch, "epochs": epochs})

    return steps.train(get_settings(), run_id, on_epoch=on_epoch)


@_task(name="edgefleet.pipeline.compress", **TASK_OPTIONS)
def compress(run_id: int, variant: str) -> int:
    """Build one variant's ``.tflite`` (``steps.compress``)."""
    return steps.compress(get_settings(), run_id, variant)


@_task(name="edgefleet.pipeline.evaluate", **TASK_OPTIONS)
def evaluate(run_id: int, variant: str) -> dict[str, float]:
    """Evaluate one variant on the held-out split (``steps.evaluate``)."""
    return steps.evaluate(get_settings(), run_id, variant)


@_task(name="edgefleet.pipeline.gate", **TASK_OPTIONS)
def gate(run_id: int) -> bool:
    """Compare the deploy variant with production (``steps.gate``)."""
    return steps.gate(get_settings(), run_id)


@_task(name="edgefleet.pipeline.sign", **TASK_OPTIONS)
def sign(run_id: int) -> str | None:
    """Sign the manifest of a candidate that passed the gate (``steps.sign``)."""
    return steps.sign(get_settings(), run_id)


@_task(name="edgefleet.pipeline.publish", **TASK_OPTIONS)
def publish(run_id: int) -> str:
    """Publish, promote and deploy the signed candidate (``steps.publish``)."""
    return steps.publish(get_settings(), run_id)


@_task(name="edgefleet.pipeline.failed")
def mark_failed(request: Any, exc: BaseException, traceback: Any, run_id: int) -> None:  # noqa: ARG001
    """Errback of the canvas: the run is marked failed with the error that stopped it."""
    steps.mark_failed(get_settings(), run_id, exc)
    logger.error("pipeline run %d failed: %s", run_id, exc)


# -- the canvas ------------------------------------------------------------------------------------


def pipeline_canvas(run_id: int, variants: list[str]) -> Any:
    """prepare -> train -> (compress -> evaluate per variant, in parallel) -> gate -> sign -> publish."""
    per_variant = group(chain(compress.si(run_id, v), evaluate.si(run_id, v)) for v in variants)
    return chain(
        prepare_dataset.si(run_id),
        train.si(run_id),
        per_variant,
        gate.si(run_id),
        sign.si(run_id),
        publish.si(run_id),
    ).on_error(mark_failed.s(run_id=run_id))


def start_pipeline(*, config: PipelineConfig, trigger_id: int | None = None) -> tuple[int, AsyncResult]:
    """Record a run and launch its canvas; returns the run id and the canvas result."""
    run_id = steps.create_run(get_settings(), config=config, trigger_id=trigger_id)
    result = pipeline_canvas(run_id, steps.variants_for(config)).apply_async()
    return run_id, result


@_task(name="edgefleet.pipeline.start", **TASK_OPTIONS)
def pipeline(config: dict[str, Any], trigger_id: int | None = None) -> int:
    """Start a whole pipeline run from a config dict (what beat and the triggers send)."""
    run_id, _ = start_pipeline(config=PipelineConfig.model_validate(config), trigger_id=trigger_id)
    return run_id


# -- model selection -------------------------------------------------------------------------------

CV_TRIAL = "edgefleet.learning.cv_trial"


@_task(name=CV_TRIAL, **TASK_OPTIONS)
def cv_trial(trial_id: int) -> dict[str, Any]:
    """Train and score one model-selection trial (one candidate, one fold) unless it is finished,
    taken by another worker or past its search's budget (``selection.run_trial``)."""
    outcome = selection.run_trial(get_settings(), trial_id, worker=cv_trial.request.hostname)
    return outcome.as_dict()


def trial_dispatcher(celery_app: Celery | None = None) -> Callable[[int], Any]:
    """Send a trial id to the workers as a ``cv_trial`` task (through ``celery_app``, default this
    process's app): the ``dispatch`` of ``selection.run_search``."""
    target = celery_app or app

    def dispatch(trial_id: int) -> Any:
        return target.send_task(CV_TRIAL, args=[trial_id])

    return dispatch


def run_search(**kwargs: Any) -> selection.SearchResult:
    """``selection.run_search`` with this process's settings, its trials run by the Celery workers."""
    return selection.run_search(get_settings(), dispatch=trial_dispatcher(), **kwargs)

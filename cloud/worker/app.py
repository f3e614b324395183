"""The Celery application: broker and results on Redis (``EDGEFLEET_REDIS_URL``), or kombu's
``sqla+sqlite://`` transport when no Redis is reachable (set ``EDGEFLEET_CELERY_BROKER_URL``)."""

from __future__ import annotations

import fcntl
import logging
import os
from functools import lru_cache
from pathlib import Path

from celery import Celery
from kombu.connection import Connection

from cloud.fleet.device_config import REPUBLISH_CHECK_S
from cloud.fleet.rollouts import TICK_S
from shared.settings import load_settings
from shared.settings.cloud import CloudSettings

logger = logging.getLogger(__name__)

CONFIG_ENV = "EDGEFLEET_CLOUD_CONFIG"


_override: list[CloudSettings] = []


@lru_cache(maxsize=1)
def _from_environment() -> CloudSettings:
    return load_settings(CloudSettings, os.environ.get(CONFIG_ENV))


def get_settings() -> CloudSettings:
    """Settings of this process: those given to ``use_settings``, else the YAML file named by
    ``EDGEFLEET_CLOUD_CONFIG`` and the environment (read once)."""
    return _override[-1] if _override else _from_environment()


def use_settings(settings: CloudSettings | None) -> None:
    """Make the task functions use ``settings`` when they run in this process (the in-process CLI);
    ``None`` goes back to the environment's."""
    _override[:] = [settings] if settings is not None else []


def result_backend_for(settings: CloudSettings) -> str:
    """Where task results go: ``celery_result_url``, else SQLite beside the registry with the
    SQLite broker, else Redis."""
    if settings.celery_result_url:
        return settings.celery_result_url
    if settings.resolved_broker_url.startswith("sqla+"):
        # No Redis: keep results in a SQLite file next to the registry.
        return f"db+sqlite:///{(settings.data_dir / 'celery-results.db').resolve()}"
    return settings.redis_url


# SQLite's busy timeout for the broker file: a publish waits for the worker's poll transaction
# instead of failing with "database is locked".
SQLITE_BROKER_BUSY_TIMEOUT_S = 30.0
SQLITE_BROKER_QUEUE = "celery"


def sqlite_broker_transport_options() -> dict[str, object]:
    """kombu options for the SQLite broker: a busy timeout, so a publish waits for the lock."""
    return {"connect_args": {"timeout": SQLITE_BROKER_BUSY_TIMEOUT_S}}


def prepare_sqlite_broker(broker_url: str) -> None:
    """Create kombu's tables and the task queue's row in a ``sqla+sqlite`` broker file, once.

    kombu creates them lazily with only an in-process lock, so a worker and a client starting on a
    fresh file race (``UNIQUE constraint failed: kombu_queue.name``), and kombu's retry of that
    publish then fails on a closed channel. A file lock serialises the processes of this machine."""
    path = Path(broker_url.removeprefix("sqla+sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+b") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        options = sqlite_broker_transport_options()
        with Connection(broker_url, transport_options=options) as conn:  # type: ignore[no-untyped-call]
            conn.default_channel._get_or_create(SQLITE_BROKER_QUEUE)


def make_app(settings: CloudSettings | None = None) -> Celery:
    """The Celery app for ``settings``: broker, result backend, the task modules and beat's schedule."""
    settings = settings or get_settings()
    app = Celery(
        "edgefleet", include=["cloud.worker.tasks", "cloud.worker.triggers", "cloud.worker.fleet_tasks"]
    )
    transport_options: dict[str, object] = {}
    if settings.resolved_broker_url.startswith("sqla+sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        prepare_sqlite_broker(settings.resolved_broker_url)
        transport_options = sqlite_broker_transport_options()
    app.conf.update(
        broker_transport_options=transport_options,
        task_default_queue=SQLITE_BROKER_QUEUE,
        broker_url=settings.resolved_broker_url,
        result_backend=result_backend_for(settings),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,  # a task whose worker dies is redelivered (tasks are idempotent)
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_expires=7 * 86400,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        timezone="UTC",
        beat_schedule={
            "check-retrain-triggers": {
                "task": "edgefleet.triggers.check",
                "schedule": settings.thresholds.trigger_check_s,
            },
            "tick-rollouts": {"task": "edgefleet.rollouts.tick", "schedule": TICK_S},
            "republish-device-config": {
                "task": "edgefleet.devices.republish_config",
                "schedule": REPUBLISH_CHECK_S,
            },
        },
    )
    return app


app = make_app()

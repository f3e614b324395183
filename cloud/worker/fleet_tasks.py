"""Celery tasks of the fleet's reconcilers, run by beat: the rollout engine (every
``cloud.fleet.rollouts.TICK_S``) and the publishing of desired device configs the broker did not take or
a device did not get (every ``cloud.fleet.device_config.REPUBLISH_CHECK_S``)."""

from __future__ import annotations

import contextlib
from typing import Any

from cloud.fleet import device_config
from cloud.fleet.rollouts import tick
from cloud.worker.app import app, get_settings

LOCK_NAME = "edgefleet:rollouts:tick"
LOCK_TIMEOUT_S = 110  # longer than the task's time limit: a killed tick's lock expires by itself


@app.task(name="edgefleet.rollouts.tick", time_limit=120, soft_time_limit=100, expires=30)  # type: ignore[untyped-decorator]
def tick_task(rollout_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Advance the rollouts (all that have work, or ``rollout_ids``); overlapping ticks skip a rollout
    another tick holds (a lease in the registry)."""
    settings = get_settings()
    if settings.resolved_broker_url.startswith("redis"):
        import redis  # noqa: PLC0415  (redis: only with a Redis broker)

        client = redis.Redis.from_url(settings.resolved_broker_url)
        lock = client.lock(LOCK_NAME, timeout=LOCK_TIMEOUT_S)
        try:
            if not lock.acquire(blocking=False):
                return []  # another tick is running; beat sends the next one shortly
            try:
                summaries = tick(settings=settings, rollout_ids=rollout_ids, lease=False)
            finally:
                with contextlib.suppress(redis.exceptions.LockError):
                    lock.release()
        finally:
            client.close()
    else:
        summaries = tick(settings=settings, rollout_ids=rollout_ids)
    return [
        {"rollout_id": s["rollout_id"], "state": s["state"], "wave": s["current_wave"]} for s in summaries
    ]


@app.task(name="edgefleet.devices.republish_config", time_limit=60, soft_time_limit=50, expires=15)  # type: ignore[untyped-decorator]
def republish_device_config_task() -> list[str]:
    """Publish the desired device configs the broker did not take, or an online device has not picked
    up (idempotent: a device applies each revision once)."""
    return device_config.republish_pending(settings=get_settings())

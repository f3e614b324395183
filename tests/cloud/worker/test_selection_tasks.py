"""Model selection on a real Celery worker (subprocess) and a real Redis: every trial is an
``edgefleet.learning.cv_trial`` task with its result in the registry, the best candidate is picked,
a done trial sent again is not retrained, and a spent budget skips what has not started."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud.learning import selection
from cloud.learning.selection import Candidate
from cloud.learning.training import TrainingConfig
from cloud.registry import selection as registry
from cloud.registry.db import session_scope
from cloud.worker.app import make_app
from cloud.worker.tasks import CV_TRIAL, trial_dispatcher
from shared.settings.cloud import CloudSettings
from tests.support.brokers import RedisServer
from tests.support.celery_worker import celery_worker

SEARCH_TIMEOUT_S = 180.0


def tiny_split_dataset(path: Path, *, n_train: int = 24, n_test: int = 20, length: int = 32) -> Path:
    """Two classes (sine, square) of noisy windows with a published split (0 train, 1 test)."""
    rng = np.random.default_rng(2)
    t = np.arange(length) / length
    xs, ys = [], []
    for i in range(n_train + n_test):
        k = i % 2
        wave = np.sin(2 * np.pi * 3 * t + rng.uniform(0, 6.28))
        if k:
            wave = np.sign(wave)
        xs.append((wave + rng.normal(0, 0.2, length))[:, None].astype(np.float32))
        ys.append(["sine", "square"][k])
    split = np.array([0] * n_train + [1] * n_test, dtype=np.int8)
    np.savez(path, X=np.stack(xs), y=np.array(ys), split=split)
    return path


def tiny_candidates() -> list[Candidate]:
    base = TrainingConfig(
        architecture="cnn1d", filters=[4], dense_units=0, dropout=0.0, epochs=3, batch_size=8,
        early_stopping_patience=0, learning_rate=0.01,
    )  # fmt: skip
    return [
        Candidate(name="narrow", config=base),
        Candidate(name="wide", config=base.model_copy(update={"filters": [8, 8]})),
    ]


@pytest.fixture
def cloud(tmp_path: Path, redis_server: RedisServer) -> tuple[CloudSettings, dict[str, str]]:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    env = {
        **os.environ,
        "EDGEFLEET_DATA_DIR": str(tmp_path / "cloud"),
        "EDGEFLEET_DATABASE_URL": url,
        "EDGEFLEET_REDIS_URL": redis_server.url,
        "EDGEFLEET_TF_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.pop("EDGEFLEET_CLOUD_CONFIG", None)
    subprocess.run(
        [sys.executable, "-m", "shared.cli", "cloud", "db", "upgrade"],
        env=env,
        check=True,
        capture_output=True,
    )
    settings = CloudSettings(data_dir=tmp_path / "cloud", database_url=url, redis_url=redis_server.url)
    return settings, env


@pytest.fixture
def worker(cloud: tuple[CloudSettings, dict[str, str]], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with celery_worker(cloud[1], tmp_path / "worker.log", name="selection") as proc:
        yield proc


def test_search_runs_its_trials_as_celery_tasks(
    cloud: tuple[CloudSettings, dict[str, str]], worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    settings, _env = cloud
    data = tiny_split_dataset(tmp_path / "tiny.npz")
    app = make_app(settings)
    try:
        result = selection.run_search(
            settings,
            dataset=str(data),
            candidates=tiny_candidates(),
            dispatch=trial_dispatcher(app),
            folds=2,
            seed=0,
            timeout_s=SEARCH_TIMEOUT_S,
        )
        log = (tmp_path / "worker.log").read_text(errors="replace")[-4000:]
        assert result.status_counts() == {"done": 4}, log
        assert result.best is not None
        assert result.best_score is not None
        assert result.best_score.complete
        assert result.workers()
        assert all(w.startswith("selection-") for w in result.workers())
        with session_scope(settings.resolved_database_url) as s:
            search = registry.get_search(s, search_id=result.search_id)
            assert (search.state, search.folds, search.best_candidate) == ("done", 2, result.best)
            trials = registry.list_trials(s, search_id=result.search_id)
            assert all(t.status == "done" and t.val_accuracy is not None for t in trials)
            assert all(t.epochs_run == 3 and t.params and t.pid for t in trials)
            finished = {t.id: t.finished_at for t in trials}
        scores = {s.candidate: s.mean_accuracy for s in result.scores}
        assert scores[result.best] == max(scores.values())

        # Sent again (a redelivery, a second driver): answered from the registry, not retrained.
        again = [app.send_task(CV_TRIAL, args=[trial_id]) for trial_id in finished]
        outcomes = [r.get(timeout=60) for r in again]
        assert all(o["status"] == "done" and o["trained"] is False for o in outcomes)
        with session_scope(settings.resolved_database_url) as s:
            assert {
                t.id: t.finished_at for t in registry.list_trials(s, search_id=result.search_id)
            } == finished
            assert all(t.attempts == 1 for t in registry.list_trials(s, search_id=result.search_id))

        # A budget spent before any worker starts a trial: every trial skipped, nothing chosen.
        spent = selection.run_search(
            settings,
            dataset=str(data),
            candidates=tiny_candidates(),
            dispatch=trial_dispatcher(app),
            folds=2,
            budget_s=0.001,
            grace_s=30.0,
        )
        assert spent.status_counts() == {"skipped": 4}
        assert spent.best is None
        with session_scope(settings.resolved_database_url) as s:
            assert registry.get_search(s, search_id=spent.search_id).state == "failed"
    finally:
        app.close()
    assert worker.poll() is None

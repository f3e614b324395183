"""Task functions called in-process (no TensorFlow needed for these): the dataset step freezes and
registers the data, adds labelled uplinked samples when asked, and builds a dataset from samples alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud.errors import DatasetError
from cloud.learning import steps
from cloud.learning.pipeline import PipelineConfig
from cloud.registry import crud
from cloud.registry.db import session_scope, upgrade
from shared.codec import encode_window
from shared.settings import CloudSettings
from tests.support.identities import enroll_fleet


@pytest.fixture
def settings(tmp_path: Path) -> CloudSettings:
    settings = CloudSettings(data_dir=tmp_path, dev_mode=True)
    upgrade(settings.resolved_database_url)
    return settings


def _toy(path: Path) -> Path:
    x = np.random.default_rng(0).normal(size=(40, 20, 2)).astype(np.float32)
    np.savez(path, X=x, y=np.arange(40) % 2, class_names=np.array(["low", "high"]))
    return path


def _add_samples(settings: CloudSettings, shapes: list[tuple[int, int]]) -> None:
    # d1 is a trusted labeller: its labels train (an untrusted device's would only evaluate).
    enroll_fleet(settings.resolved_database_url, label_trusted=["d1"], migrate=False)
    with session_scope(settings.resolved_database_url) as s:
        for i, shape in enumerate(shapes):
            window = encode_window(
                device_id="d1",
                seq=i,
                ts=1.0,
                sample_rate_hz=10.0,
                channels=("a", "b")[: shape[1]],
                values=np.full(shape, i, dtype=np.float32),
            )
            crud.add_sample(
                s,
                sample_id=f"s{i}",
                edge_id="e1",
                device_id="d1",
                seq=i,
                ts=1.0,
                predicted="low",
                confidence=0.5,
                reason="random",
                privacy="full",
                window=window,
                label="high" if i % 2 else "low",
                label_source="device",
                label_trusted=True,
            )
        crud.add_sample(
            s,
            sample_id="unlabelled",
            edge_id="e1",
            device_id="d1",
            seq=99,
            ts=1.0,
            predicted="low",
            confidence=0.5,
            reason="random",
            privacy="none",
        )


def test_dataset_step_freezes_and_adds_labelled_samples(settings: CloudSettings, tmp_path: Path) -> None:
    _add_samples(settings, [(20, 2)] * 5 + [(30, 2)])  # the odd-shaped one is skipped
    config = PipelineConfig(model_name="toy", dataset=str(_toy(tmp_path / "toy.npz")), include_samples=True)
    run_id = steps.create_run(settings, config=config)
    dataset_id = steps.prepare_dataset(settings, run_id)
    assert steps.prepare_dataset(settings, run_id) == dataset_id  # idempotent: same content, same record
    with session_scope(settings.resolved_database_url) as s:
        dataset = crud.get_dataset(s, dataset_id=dataset_id)
        assert dataset.n_samples == 45
        assert dataset.source.endswith("+samples")
        assert dataset.params["uplinked_samples"] == 5
        assert dataset.path is not None
        assert Path(dataset.path).name == f"{dataset.sha256}.npz"
        run = crud.get_run(s, run_id=run_id)
        assert run.dataset_id == dataset_id
        assert [e.step for e in run.steps] == ["dataset"]


def test_samples_only_dataset_needs_a_production_model(settings: CloudSettings) -> None:
    _add_samples(settings, [(20, 2)] * 4)
    run_id = steps.create_run(settings, config=PipelineConfig(model_name="toy", dataset="samples"))
    with pytest.raises(DatasetError, match="production"):
        steps.prepare_dataset(settings, run_id)
    with session_scope(settings.resolved_database_url) as s:
        model = crud.create_model_version(s, name="toy", version="r0-int8", variant="int8")
        model.manifest = {"class_names": ["low", "high"]}
        crud.promote(s, model_id=model.id)
    dataset_id = steps.prepare_dataset(settings, run_id)
    with session_scope(settings.resolved_database_url) as s:
        dataset = crud.get_dataset(s, dataset_id=dataset_id)
        assert dataset.n_samples == 4
        assert dataset.input_shape == [20, 2]
        assert dataset.class_names == ["low", "high"]

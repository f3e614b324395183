"""Task functions called in-process: the dataset step freezes and registers the data, adds labelled
uplinked samples when asked, and builds a dataset from samples alone (no TensorFlow needed for
these); the gate re-scores production on the held-out rows prepared as production itself takes
them (TensorFlow only to build the tiny production models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud.errors import DatasetError
from cloud.learning import steps
from cloud.learning.compression import convert
from cloud.learning.pipeline import PipelineConfig
from cloud.learning.training import quiet_tensorflow
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


def _ramps(path: Path) -> Path:
    """40 windows (20, 2), channels a, b: ``high`` rows ramp up around 15 in a, ``low`` rows ramp
    down around 5; b is noise. The candidate's fitted statistics of a are about mean 10, std 5."""
    rng = np.random.default_rng(1)
    t = np.linspace(-1.0, 1.0, 20)
    y = np.arange(40) % 2
    x = rng.normal(scale=0.1, size=(40, 20, 2))
    x[:, :, 0] += np.where(y == 1, 15.0, 5.0)[:, None] + np.where(y == 1, 3.0, -3.0)[:, None] * t
    np.savez(
        path,
        X=x.astype(np.float32),
        y=y,
        class_names=np.array(["low", "high"]),
        channels=np.array(["a", "b"]),
    )
    return path


def _linear_tflite(path: Path, input_shape: tuple[int, int], kernel: np.ndarray, bias: np.ndarray) -> Path:
    """Flatten -> Dense(2, softmax) with the given weights, as a float32 ``.tflite``."""
    quiet_tensorflow()
    import keras  # noqa: PLC0415  (keras: loads TensorFlow, only for the gate tests)

    model = keras.Sequential(
        [keras.Input(shape=input_shape), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")]
    )
    model.layers[-1].set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    path.write_bytes(convert(model, "float32"))
    return path


def _mean_of(channel: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights for: ``high`` iff the mean of ``channel`` over the window is above 10 (raw units)."""
    kernel = np.zeros((length * 2, 2))
    kernel[channel::2] = [-1.0 / length, 1.0 / length]
    return kernel, np.array([10.0, -10.0])


def _slope_of(channel: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights for: ``high`` iff ``channel`` rises over the window."""
    kernel = np.zeros((length * 2, 2))
    centred = np.arange(length) - (length - 1) / 2
    kernel[channel::2] = np.stack([-centred, centred], axis=1)
    return kernel, np.zeros(2)


FITTED_OWN_STATS = {  # raw units (mean 0, std 1), channels stored b, a: not the candidate's a, b
    "normalization": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
    "preprocessing": {"normalize": "fitted", "length": "exact"},
    "input_shape": [20, 2],
    "channels": ["b", "a"],
    "class_names": ["low", "high"],
}
PER_SERIES_RESAMPLED = {  # per-series z-normalised, resampled to 10 samples: the candidate's (20, 2) fits not
    "normalization": None,
    "preprocessing": {"normalize": "per_series", "length": "resample"},
    "input_shape": [10, 2],
    "channels": ["a", "b"],
    "class_names": ["low", "high"],
}
LEGACY = {"normalization": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}, "class_names": ["low", "high"]}


@pytest.mark.parametrize(
    ("training_config", "weights", "input_shape"),
    [
        (FITTED_OWN_STATS, _mean_of(1, 20), (20, 2)),
        (PER_SERIES_RESAMPLED, _slope_of(0, 10), (10, 2)),
        (LEGACY, _mean_of(0, 20), (20, 2)),  # trained before preprocessing was recorded
    ],
    ids=["fitted-own-stats", "per-series-resampled", "legacy"],
)
def test_gate_rescores_production_on_its_own_inputs(
    settings: CloudSettings,
    tmp_path: Path,
    training_config: dict[str, object],
    weights: tuple[np.ndarray, np.ndarray],
    input_shape: tuple[int, int],
) -> None:
    """The candidate (fitted on this run's train part) is compared with production scored on the same
    held-out rows prepared by production's own preprocessing and statistics: production classifies
    every one of them right (on the candidate's inputs it could not: 0.5, or not at all)."""
    artifact = _linear_tflite(tmp_path / "production.tflite", input_shape, *weights)
    config = PipelineConfig(model_name="toy", dataset=str(_ramps(tmp_path / "ramps.npz")))
    run_id = steps.create_run(settings, config=config)
    steps.prepare_dataset(settings, run_id)
    with session_scope(settings.resolved_database_url) as s:
        production = crud.create_model_version(
            s,
            name="toy",
            version="r0-float32",
            variant="float32",
            training_config=training_config,
            metrics={"accuracy": 0.25},  # what it recorded on its own run
            artifact_path=str(artifact),
        )
        crud.promote(s, model_id=production.id)
        crud.create_model_version(
            s,
            name="toy",
            version=steps.version_name(run_id, config.deploy_variant),
            variant=config.deploy_variant,
            run_id=run_id,
            metrics={"accuracy": 0.9},
        )
    assert steps.gate(settings, run_id) is False  # 0.9 < production's 1.0 - margin
    with session_scope(settings.resolved_database_url) as s:
        gate_step = next(e for e in crud.get_run(s, run_id=run_id).steps if e.step == "gate")
        assert gate_step.detail["production_accuracy"] == 1.0
        assert "re-evaluated" in gate_step.detail["reason"]

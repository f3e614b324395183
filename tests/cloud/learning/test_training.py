"""The training recipe on tiny synthetic data: every architecture builds, trains, predicts, converts
to full-int8 TFLite and runs in LiteRT; augmentation is seeded and keeps shapes; balanced class
weights; the time budget stops a fit; best weights are restored; the same seed gives the same
weights; the candidate lists fit the size limit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from cloud.learning import augmentation
from cloud.learning.compression import convert
from cloud.learning.evaluation import LiteRTModel
from cloud.learning.training import (
    TrainingConfig,
    build_model,
    class_weights,
    default_candidates,
    fit_classifier,
    predict,
    recipe_for,
    train_classifier,
)


def _windows(
    n: int = 48, length: int = 32, channels: int = 2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two classes told apart by frequency: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    t = np.arange(length)[np.newaxis, :, np.newaxis]
    freq = np.where(y == 0, 0.1, 0.3)[:, np.newaxis, np.newaxis]
    x = np.sin(2 * np.pi * freq * t + rng.uniform(0, 6, size=(n, 1, channels)))
    return (x + rng.normal(0, 0.1, size=x.shape)).astype(np.float32), y


SMALL = {"dense_units": 0, "dropout": 0.0, "batch_size": 16, "early_stopping_patience": 0}


@pytest.mark.parametrize(
    ("architecture", "filters", "shape"),
    [
        ("cnn1d", [8, 8], (32, 2)),
        ("fcn", [8, 16, 8], (32, 2)),
        ("resnet", [8, 16, 16], (32, 2)),
        ("cnn2d", [8, 8], (8, 8, 1)),
    ],
)
def test_architecture_trains_and_runs_as_int8_in_litert(
    architecture: str, filters: list[int], shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(1)
    if len(shape) == 2:
        x, y = _windows(length=shape[0], channels=shape[1])
    else:
        y = np.arange(48) % 2
        x = rng.normal(size=(48, *shape)).astype(np.float32) + y[:, None, None, None].astype(np.float32)
    config = TrainingConfig(
        architecture=architecture,
        filters=filters,
        epochs=3,
        augment=["jitter", "window_warp"],  # ignored for cnn2d images
        lr_schedule="cosine",
        **SMALL,
    )
    model = train_classifier(config, x[:40], y[:40], x[40:], y[40:], n_classes=2)
    assert model.name == f"{architecture}_classifier"
    probabilities = predict(model, x)
    assert probabilities.shape == (48, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    flatbuffer = convert(model, "int8", representative=x[:16])
    lite = LiteRTModel(flatbuffer, num_threads=1)
    assert (lite.input_dtype, lite.output_dtype) == ("int8", "int8")
    lite_probabilities = lite.predict(x)
    assert lite_probabilities.shape == (48, 2)
    # int8 follows the float model (a few quantization steps apart on an untrained-ish model).
    assert np.abs(lite_probabilities - probabilities).max() < 0.2


def test_fcn_and_resnet_widths_come_from_filters() -> None:
    fcn = build_model(TrainingConfig(architecture="fcn", filters=[4, 6, 5], dense_units=0), [20, 3], 2)
    assert [layer.filters for layer in fcn.layers if type(layer).__name__ == "Conv1D"] == [4, 6, 5]
    assert [layer.kernel_size[0] for layer in fcn.layers if type(layer).__name__ == "Conv1D"] == [8, 5, 3]
    resnet = TrainingConfig(architecture="resnet", filters=[8, 16, 16], dense_units=0)
    full = build_model(resnet, [20, 3], 2).count_params()
    half = build_model(resnet.scaled(0.5), [20, 3], 2).count_params()
    assert half < full / 3  # conv weights shrink with the square of the width
    with pytest.raises(ValueError, match="windows"):
        build_model(TrainingConfig(architecture="fcn"), [8, 8, 1], 2)


def test_augmentation_is_seeded_and_keeps_shape() -> None:
    x, _ = _windows(n=10, length=50, channels=3)
    for method in augmentation.AUGMENT_METHODS:
        first = augmentation.METHODS[method](x, np.random.default_rng(7))
        again = augmentation.METHODS[method](x, np.random.default_rng(7))
        other = augmentation.METHODS[method](x, np.random.default_rng(8))
        assert first.shape == x.shape
        assert first.dtype == x.dtype
        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, other), method
        assert not np.array_equal(first, x), method
    batch = augmentation.augment_batch(x, ["jitter", "window_slice"], np.random.default_rng(0))
    assert batch.shape == x.shape
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmentation.augment_batch(x, ["mixup"], np.random.default_rng(0))
    with pytest.raises(ValidationError):
        TrainingConfig.model_validate({"augment": ["mixup"]})


def test_time_warps_keep_the_ends_and_order_of_a_ramp() -> None:
    ramp = np.tile(np.arange(40, dtype=np.float32)[np.newaxis, :, np.newaxis], (5, 1, 1))
    warped = augmentation.window_warp(ramp, np.random.default_rng(0))
    assert np.all(np.diff(warped[:, :, 0], axis=1) >= 0)  # a warp moves time, never reverses it
    np.testing.assert_allclose(warped[:, 0, 0], 0)
    np.testing.assert_allclose(warped[:, -1, 0], 39)
    sliced = augmentation.window_slice(ramp, np.random.default_rng(0))
    span = sliced[:, -1, 0] - sliced[:, 0, 0]
    np.testing.assert_allclose(span, 35, atol=1)  # 90 % of the series, stretched back to 40 steps


def test_balanced_class_weights() -> None:
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    weights = class_weights(y, 4)
    np.testing.assert_allclose(weights, [12 / (3 * 6), 12 / (3 * 2), 12 / (3 * 4), 0.0])
    # Every present class then weighs the same in the loss.
    per_class = [weights[c] * np.sum(y == c) for c in range(3)]
    np.testing.assert_allclose(per_class, per_class[0])


def test_time_budget_stops_the_fit() -> None:
    x, y = _windows()
    config = TrainingConfig(architecture="fcn", filters=[8, 8, 8], epochs=10_000, max_seconds=2.0, **SMALL)
    result = fit_classifier(config, x[:40], y[:40], x[40:], y[40:], n_classes=2)
    assert result.stopped == "time_budget"
    assert result.epochs_run < 10_000


def test_early_stopping_restores_the_best_epoch() -> None:
    x, y = _windows()
    config = TrainingConfig(
        architecture="fcn",
        filters=[8, 8, 8],
        epochs=60,
        monitor="val_accuracy",
        lr_schedule="plateau",
        **{**SMALL, "early_stopping_patience": 5},
    )
    result = fit_classifier(config, x[:40], y[:40], x[40:], y[40:], n_classes=2)
    assert result.stopped in ("early_stopping", "epochs")
    assert 1 <= result.best_epoch <= result.epochs_run
    assert result.best_val_accuracy == max(result.history["val_accuracy"])
    restored = float(np.mean(predict(result.model, x[40:]).argmax(axis=1) == y[40:]))
    assert restored == pytest.approx(result.best_val_accuracy)


def test_fit_without_validation_data() -> None:
    x, y = _windows()
    config = TrainingConfig(architecture="resnet", filters=[4, 8, 8], epochs=2, **SMALL)
    result = fit_classifier(config, x, y, n_classes=2)
    assert result.epochs_run == 2
    assert result.best_val_accuracy is None
    assert "val_loss" not in result.history


def test_same_seed_same_weights() -> None:
    x, y = _windows()
    config = TrainingConfig(
        architecture="resnet",
        filters=[4, 8, 8],
        epochs=2,
        augment=["jitter", "scaling", "window_slice"],
        class_weight="balanced",
        **SMALL,
    )
    first = fit_classifier(config, x[:40], y[:40], x[40:], y[40:], n_classes=2).model.get_weights()
    second = fit_classifier(config, x[:40], y[:40], x[40:], y[40:], n_classes=2).model.get_weights()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "n_train", "n_classes"),
    [([251, 1], 36, 3), ([150, 1], 50, 2), ([427, 1], 200, 6), ([100, 6], 40, 4), ([29, 12], 270, 9)],
)
def test_default_candidates_fit_the_edge(shape: list[int], n_train: int, n_classes: int) -> None:
    candidates = default_candidates(shape, n_train, n_classes)
    assert 2 <= len(candidates) <= 4
    assert len({c.model_dump_json() for c in candidates}) == len(candidates)
    for config in candidates:
        assert config.architecture in ("fcn", "resnet")
        assert config.max_seconds is not None
        # int8 weights take a byte a parameter: well under the 512 KB limit with the flatbuffer's overhead.
        assert build_model(config, shape, n_classes).count_params() < 400_000


def test_recipe_scales_epochs_and_early_stopping_with_the_data() -> None:
    tiny = recipe_for(36, 251, 1)
    assert tiny.early_stopping_patience == 0  # a validation part of 7 rows picks epochs by chance
    assert tiny.augment
    large = recipe_for(4000, 100, 3)
    assert large.early_stopping_patience > 0
    assert large.epochs < tiny.epochs  # an epoch of 200 batches: fewer of them for the same steps


def test_thread_knob_reaches_tensorflow() -> None:
    code = (
        "from cloud.learning.training import quiet_tensorflow\n"
        "tf = quiet_tensorflow()\n"
        "print(tf.config.threading.get_intra_op_parallelism_threads(),"
        " tf.config.threading.get_inter_op_parallelism_threads())\n"
    )
    env = {**os.environ, "EDGEFLEET_TF_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split()[-2:] == ["1", "1"]

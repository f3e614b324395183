"""The model contract's preprocessing at the edge: one ``prepare_window`` for edge and cloud, and ingest
converting (or dead-lettering) windows as the active manifest says."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest

from edge_node.ingest import DeadLetters, Deduplicator, Ingest
from edge_node.preprocessing import (
    InputSpec,
    WindowRejectedError,
    normalize_fitted,
    prepare_batch,
    prepare_window,
)
from shared.codec import encode_window
from shared.mqtt import Received
from shared.schemas import ModelManifest, Normalization, Preprocessing, Quantization
from shared.topics import Topics

TOPICS = Topics()
CHANNELS = ["x", "y", "z"]


def manifest(
    preprocessing: Preprocessing | None,
    *,
    length: int = 10,
    normalization: Normalization | None = None,
) -> ModelManifest:
    return ModelManifest(
        name="m",
        version="v1",
        quantization=Quantization.FLOAT32,
        sha256="ab" * 32,
        size_bytes=1,
        url="file:///m.tflite",
        input_shape=[length, 3],
        input_dtype="float32",
        output_shape=[2],
        output_dtype="float32",
        class_names=["a", "b"],
        normalization=normalization,
        channels=CHANNELS,
        preprocessing=preprocessing,
    )


def window(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(3.0, 2.0, size=(n, 3)).astype(np.float32)


def test_channels_are_reordered_by_name() -> None:
    m = manifest(Preprocessing(normalize="none"))
    values = window(10)
    out = prepare_window(values[:, [2, 0, 1]], ["z", "x", "y"], m)
    assert out.dtype == np.float32
    assert out.shape == (10, 3)
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize(
    ("channels", "kind", "message"),
    [
        (["x", "y", "w"], "channels", "do not match the model's"),
        (["x", "x", "y"], "channels", "do not match the model's"),
    ],
)
def test_other_channel_names_are_rejected(channels: list[str], kind: str, message: str) -> None:
    m = manifest(Preprocessing(normalize="none"))
    with pytest.raises(WindowRejectedError, match=message) as info:
        prepare_window(window(10), channels, m)
    assert info.value.kind == kind
    assert isinstance(info.value, ValueError)


def test_wrong_channel_count_and_rank_are_shape_errors() -> None:
    m = manifest(Preprocessing(normalize="none"))
    with pytest.raises(WindowRejectedError, match="2 channels") as info:
        prepare_window(np.zeros((10, 2), np.float32), None, m)
    assert info.value.kind == "shape"
    with pytest.raises(WindowRejectedError, match="does not match the model input"):
        prepare_window(np.zeros(10, np.float32), None, m)


def test_pad_appends_pad_value_after_the_window() -> None:
    m = manifest(Preprocessing(normalize="none", length="pad", pad_value=-1.5))
    values = window(6)
    out = prepare_window(values, CHANNELS, m)
    assert out.shape == (10, 3)
    np.testing.assert_array_equal(out[:6], values)
    assert (out[6:] == -1.5).all()


def test_pad_cuts_up_to_max_input_length_and_rejects_longer() -> None:
    m = manifest(Preprocessing(normalize="none", length="pad", max_input_length=12))
    values = window(12)
    np.testing.assert_array_equal(prepare_window(values, CHANNELS, m), values[:10])
    with pytest.raises(WindowRejectedError, match="13 samples x 3 channels is longer than the 12") as info:
        prepare_window(window(13), CHANNELS, m)
    assert info.value.kind == "shape"
    strict = manifest(Preprocessing(normalize="none", length="pad"))
    with pytest.raises(WindowRejectedError, match="longer than the 10 samples"):
        prepare_window(window(11), CHANNELS, strict)


def test_exact_length_rejects_other_lengths() -> None:
    m = manifest(Preprocessing(normalize="none"))
    with pytest.raises(WindowRejectedError, match="window of 9 samples x 3 channels does not match"):
        prepare_window(window(9), CHANNELS, m)


def test_resample_is_linear_and_keeps_both_ends() -> None:
    m = manifest(Preprocessing(normalize="none", length="resample"))
    values = window(4)
    out = prepare_window(values, CHANNELS, m)
    assert out.shape == (10, 3)
    grid = np.linspace(0, 3, 10)
    for c in range(3):
        np.testing.assert_allclose(out[:, c], np.interp(grid, np.arange(4), values[:, c]), rtol=1e-6)
    np.testing.assert_array_equal(out[[0, -1]], values[[0, -1]])
    longer = prepare_window(window(25), CHANNELS, m)  # down-sampling works the same way
    assert longer.shape == (10, 3)
    one = prepare_window(values[:1], CHANNELS, m)
    assert (one == values[0]).all()
    bounded = manifest(Preprocessing(normalize="none", length="resample", max_input_length=20))
    with pytest.raises(WindowRejectedError, match="longer than the 20 samples"):
        prepare_window(window(21), CHANNELS, bounded)


def test_per_series_normalises_the_true_samples_before_padding() -> None:
    m = manifest(Preprocessing(normalize="per_series", length="pad"))
    values = window(7)
    values[:, 2] = 5.0  # a flat channel: zeros, not NaN
    out = prepare_window(values, CHANNELS, m)
    np.testing.assert_allclose(out[:7, :2].mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:7, :2].std(axis=0), 1.0, atol=1e-5)
    assert (out[:, 2] == 0).all()
    assert (out[7:] == 0).all()


def test_manifests_without_preprocessing_keep_the_exact_contract() -> None:
    legacy = manifest(None)
    values = window(10)
    np.testing.assert_array_equal(prepare_window(values, CHANNELS, legacy), values)
    with pytest.raises(WindowRejectedError, match="channels"):
        prepare_window(values[:, [1, 0, 2]], ["y", "x", "z"], legacy)
    with pytest.raises(WindowRejectedError, match="does not match"):
        prepare_window(window(8), CHANNELS, legacy)


@pytest.mark.parametrize(
    "pre",
    [
        Preprocessing(normalize="per_series", length="pad", max_input_length=14),
        Preprocessing(normalize="none", length="resample"),
        Preprocessing(normalize="per_series", length="resample"),
        Preprocessing(normalize="fitted", length="pad", pad_value=0.5, max_input_length=14),
    ],
)
def test_batch_path_equals_the_per_window_path(pre: Preprocessing) -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 15, size=40)
    x = np.full((40, 14, 3), np.nan, dtype=np.float32)
    for i, n in enumerate(lengths):
        x[i, :n] = rng.normal(size=(n, 3))
    spec = InputSpec((10, 3), tuple(CHANNELS), pre)
    reordered = x[..., [2, 0, 1]]
    batch = prepare_batch(reordered, ["z", "x", "y"], spec, lengths=lengths)
    for i, n in enumerate(lengths):
        one = prepare_window(reordered[i, :n], ["z", "x", "y"], spec)
        np.testing.assert_array_equal(batch[i], one)
    assert np.isfinite(batch).all()


def test_fixed_length_batches_take_the_fast_path_with_the_same_result() -> None:
    x = np.stack([window(10, seed) for seed in range(5)])
    spec = InputSpec((10, 3), tuple(CHANNELS), Preprocessing(normalize="fitted"))
    batch = prepare_batch(x[..., [1, 2, 0]], ["y", "z", "x"], spec)
    np.testing.assert_array_equal(batch, x)
    mean, std = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 0.5])
    np.testing.assert_allclose(normalize_fitted(batch, mean, std), (x - mean) / std, rtol=1e-6)


def received(values: np.ndarray, channels: tuple[str, ...], seq: int) -> Received:
    payload = encode_window(
        device_id="d1", seq=seq, ts=time.time(), sample_rate_hz=50.0, channels=channels, values=values
    )
    return Received(TOPICS.telemetry("d1"), payload, 1, False, received_at=float(seq))


def make_ingest(m: ModelManifest | None) -> tuple[Ingest, list[dict[str, Any]]]:
    letters: list[dict[str, Any]] = []
    dead = DeadLetters("e1", lambda payload: letters.append(json.loads(payload)))
    return Ingest(TOPICS, Deduplicator(64, 10), dead, lambda: m), letters


def test_ingest_pads_a_shorter_window_when_the_manifest_says_pad() -> None:
    m = manifest(
        Preprocessing(normalize="fitted", length="pad", max_input_length=12),
        normalization=Normalization(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]),
    )
    ingest, letters = make_ingest(m)
    short = window(7)
    item = ingest.handle(received(short[:, [2, 1, 0]], ("z", "y", "x"), 1))
    assert item is not None
    assert item.values.shape == (10, 3)
    np.testing.assert_array_equal(item.values[:7], short)
    assert (item.values[7:] == 0).all()
    assert ingest.handle(received(window(12), tuple(CHANNELS), 2)) is not None  # cut to 10
    assert ingest.handle(received(window(13), tuple(CHANNELS), 3)) is None
    assert ingest.handle(received(window(7), ("x", "y", "w"), 4)) is None
    assert ingest.dead.by_reason == {"shape": 1, "channels": 1}
    assert letters[0]["reason"].startswith("shape: window of 13 samples x 3 channels is longer")
    assert letters[1]["reason"].startswith("channels: channels ['x', 'y', 'w']")
    assert ingest.accepted == 2


def test_ingest_without_preprocessing_dead_letters_other_lengths_as_before() -> None:
    ingest, letters = make_ingest(manifest(None))
    assert ingest.handle(received(window(7), tuple(CHANNELS), 1)) is None
    assert ingest.handle(received(window(10)[:, [1, 0, 2]], ("y", "x", "z"), 2)) is None
    assert ingest.dead.by_reason == {"shape": 1, "channels": 1}
    assert "does not match the model input [10, 3]" in letters[0]["reason"]
    item = ingest.handle(received(window(10), tuple(CHANNELS), 3))
    assert item is not None
    assert item.values.shape == (10, 3)

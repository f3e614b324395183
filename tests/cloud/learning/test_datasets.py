"""Datasets (.npz of any shape, built-ins, uplinked samples) and the pure parts of compression and gating."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from cloud.errors import DatasetError
from cloud.learning import datasets
from cloud.learning.compression import magnitude_mask, polynomial_sparsity, quantization_of
from cloud.learning.promotion import decide
from shared.codec import encode_window


def test_npz_of_any_shape_with_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "img.npz"
    x = np.random.default_rng(0).normal(size=(30, 5, 7, 2)).astype(np.float64)
    y = np.array(["cat", "dog", "eel"] * 10)
    np.savez(path, X=x, y=y)
    ds = datasets.load(str(path))
    assert ds.input_shape == [5, 7, 2]
    assert ds.X.dtype == np.float32
    assert ds.class_names == ["cat", "dog", "eel"]
    assert set(ds.y.tolist()) == {0, 1, 2}
    splits = datasets.split(ds, seed=0)
    assert len(splits.y_train) + len(splits.y_val) + len(splits.y_test) == 30
    again = datasets.split(ds, seed=0)
    assert np.array_equal(splits.y_test, again.y_test)
    mean, std = datasets.channel_stats(splits.x_train)
    assert len(mean) == 2
    assert all(s > 0 for s in std)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((4, 3))}, "needs arrays 'X' and 'y'"),
        ({"X": np.zeros(4), "y": np.zeros(4, dtype=int)}, "at least one feature axis"),
        ({"X": np.zeros((4, 3)), "y": np.zeros(3, dtype=int)}, "one label per row"),
        ({"X": np.full((4, 3), np.nan), "y": np.zeros(4, dtype=int)}, "NaN"),
        ({"X": np.zeros((4, 3)), "y": np.array([0, 1, 2, 3]), "class_names": np.array(["a"])}, "no entry"),
        (
            {
                "X": np.zeros((4, 3)),
                "y": np.array(["a", "b", "c", "z"]),
                "class_names": np.array(["a", "b", "c"]),
            },
            "not in class_names",
        ),
    ],
)
def test_bad_npz_errors_name_the_problem(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=message):
        datasets.load_npz(path)


def test_unknown_and_missing_datasets() -> None:
    with pytest.raises(DatasetError, match="neither a built-in"):
        datasets.load("nope")
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.load("/no/such/file.npz")


def test_digits_are_images() -> None:
    ds = datasets.load("digits")
    assert ds.input_shape == [8, 8, 1]
    assert len(ds.class_names) == 10


def test_vibration_comes_from_the_agent_simulator() -> None:
    ds = datasets.load("vibration", n_windows=40, seed=3)
    assert ds.input_shape == [100, 3]
    assert ds.class_names == ["normal", "imbalance", "misalignment", "bearing_fault"]
    assert ds.sample_rate_hz == 100.0
    assert ds.sha256() == datasets.load("vibration", n_windows=40, seed=3).sha256()


def test_basicmotions_needs_aeon() -> None:
    if importlib.util.find_spec("aeon") is not None:
        assert datasets.load("basicmotions").input_shape[1] == 6
    else:
        with pytest.raises(DatasetError, match="edgefleet\\[datasets\\]"):
            datasets.load("basicmotions")


def test_uplinked_samples_become_a_dataset() -> None:
    rows = []
    for i, label in enumerate(["a", "b", "zzz", "a"]):
        values = np.full((10, 2), i, dtype=np.float32)
        payload = encode_window(
            device_id="d1", seq=i, ts=1.0, sample_rate_hz=50.0, channels=("x", "y"), values=values
        )
        rows.append((payload, label))
    rows.append((b"garbage", "a"))
    ds = datasets.samples_dataset(rows, class_names=["a", "b"])
    assert ds.input_shape == [10, 2]
    assert ds.y.tolist() == [0, 1, 0]
    with pytest.raises(DatasetError):
        datasets.samples_dataset([(b"garbage", "a")], class_names=["a"])


def test_sparsity_schedule_and_mask() -> None:
    assert polynomial_sparsity(0, 100, 0.8) == 0.0
    assert polynomial_sparsity(100, 100, 0.8) == pytest.approx(0.8)
    assert polynomial_sparsity(50, 100, 0.8) > 0.4  # fast early, slow late
    weights = np.arange(1, 101, dtype=np.float32).reshape(10, 10)
    mask = magnitude_mask(weights, 0.75)
    assert mask.sum() == 25
    assert mask.ravel()[-1] == 1
    assert mask.ravel()[0] == 0
    assert quantization_of("pruned_int8") == "int8"
    with pytest.raises(ValueError, match="unknown variant"):
        quantization_of("int4")


def test_gate_decides_with_reasons() -> None:
    first = decide(candidate_accuracy=0.9, production_accuracy=None, margin=0.01)
    assert first.passed
    assert "no production" in first.reason
    ok = decide(candidate_accuracy=0.895, production_accuracy=0.9, margin=0.01, production_ref="m@r1")
    assert ok.passed
    assert "m@r1" in ok.reason
    worse = decide(candidate_accuracy=0.85, production_accuracy=0.9, margin=0.01)
    assert not worse.passed
    assert "0.8500 < production 0.9000" in worse.reason
    floor = decide(candidate_accuracy=0.5, production_accuracy=None, margin=0.01, min_accuracy=0.6)
    assert not floor.passed

"""Datasets (.npz of any shape, built-ins, uplinked samples) and the pure parts of compression and gating."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from cloud.errors import DatasetError
from cloud.learning import datasets, pipeline
from cloud.learning.compression import magnitude_mask, polynomial_sparsity, quantization_of
from cloud.learning.promotion import decide
from edge_node.preprocessing import normalize_fitted, prepare_window
from shared.codec import encode_window
from shared.schemas import ModelManifest, Normalization, Preprocessing, Quantization


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


# -- published splits, unequal lengths, aeon, and preprocessing shared with the edge -----------------

aeon_only = pytest.mark.skipif(importlib.util.find_spec("aeon") is None, reason="needs the datasets extra")


def _windows(n: int = 40, *, length: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = rng.normal(size=(n, length, 3)) + y[:, None, None]
    return x.astype(np.float32), y


def test_npz_split_and_lengths_round_trip(tmp_path: Path) -> None:
    x, y = _windows()
    split_rows = (np.arange(40) >= 28).astype(np.int8)
    lengths = np.full(40, 12)
    lengths[::3] = 7
    x[lengths == 7, 7:] = np.nan  # NaN beyond a row's length is allowed
    path = tmp_path / "w.npz"
    np.savez(path, X=x, y=y, split=split_rows, lengths=lengths, channels=np.array(["a", "b", "c"]))
    ds = datasets.load_npz(path)
    assert ds.split is not None
    assert ds.split.dtype == np.int8
    assert ds.lengths is not None
    assert ds.lengths.tolist() == lengths.tolist()
    ds.save(tmp_path / "again.npz")
    again = datasets.load_npz(tmp_path / "again.npz")
    assert again.split is not None
    assert again.lengths is not None
    assert np.array_equal(again.split, ds.split)
    assert np.array_equal(again.lengths, ds.lengths)
    assert again.sha256() == ds.sha256()
    # The split and lengths are part of a snapshot's identity; datasets without them hash as before.
    plain = datasets.Dataset("w", "t", ds.X, ds.y, ds.class_names)
    assert plain.sha256() != ds.sha256()
    np.savez(tmp_path / "nosplit.npz", X=np.nan_to_num(x), y=y)
    assert datasets.load_npz(tmp_path / "nosplit.npz").split is None


@pytest.mark.parametrize(
    ("split_rows", "message"),
    [
        (np.zeros((40, 1), dtype=np.int8), "1-D with one entry per row"),
        (np.zeros(39, dtype=np.int8), "one entry per row of X \\(40\\)"),
        (np.array([0, 1, 2, 0] * 10), "holds \\[2\\]: only 0 \\(train\\) and 1 \\(test\\)"),
        (np.zeros(40, dtype=np.int8), "no test \\(1\\) rows"),
        (np.ones(40, dtype=np.int8), "no train \\(0\\) rows"),
        (np.array([0.0, 1.0] * 20), "integers 0 \\(train\\) and 1 \\(test\\)"),
    ],
)
def test_bad_split_arrays_are_named(tmp_path: Path, split_rows: np.ndarray, message: str) -> None:
    x, y = _windows()
    path = tmp_path / "bad.npz"
    np.savez(path, X=x, y=y, split=split_rows)
    with pytest.raises(DatasetError, match=message):
        datasets.load_npz(path)


@pytest.mark.parametrize(
    ("lengths", "nan_at", "message"),
    [
        (np.full(40, 12), (0, 3), "NaN or infinite values within a row's length"),
        (np.full(40, 13), None, "lengths must be in \\[1, 12\\]"),
        (np.zeros(40, dtype=int), None, "lengths must be in \\[1, 12\\]"),
        (np.full(39, 12), None, "one per row of X"),
        (None, (0, 11), "X holds NaN"),
    ],
)
def test_nan_only_beyond_a_rows_length(
    tmp_path: Path, lengths: np.ndarray | None, nan_at: tuple[int, int] | None, message: str
) -> None:
    x, y = _windows()
    if nan_at is not None:
        x[nan_at] = np.nan
    path = tmp_path / "bad.npz"
    if lengths is None:
        np.savez(path, X=x, y=y)
    else:
        np.savez(path, X=x, y=y, lengths=lengths)
    with pytest.raises(DatasetError, match=message):
        datasets.load_npz(path)


def _check_published_split(ds: datasets.Dataset, parts: datasets.Splits) -> None:
    assert ds.split is not None
    assert parts.train_index is not None
    assert parts.val_index is not None
    assert parts.test_index is not None
    test_rows = set(np.flatnonzero(ds.split == 1).tolist())
    assert set(parts.test_index.tolist()) == test_rows
    fit = set(parts.train_index.tolist()) | set(parts.val_index.tolist())
    assert not fit & test_rows
    assert fit == set(np.flatnonzero(ds.split == 0).tolist())
    assert not set(parts.train_index.tolist()) & set(parts.val_index.tolist())
    # The arrays are exactly those rows (row identity, not just counts).
    assert np.array_equal(parts.x_test, ds.X[parts.test_index], equal_nan=True)
    assert np.array_equal(parts.x_train, ds.X[parts.train_index], equal_nan=True)
    assert np.array_equal(parts.y_val, ds.y[parts.val_index])
    test_bytes = {ds.X[i].tobytes() for i in test_rows}
    assert not any(row.tobytes() in test_bytes for row in np.concatenate([parts.x_train, parts.x_val]))


def test_published_split_keeps_test_rows_out_of_training(tmp_path: Path) -> None:
    x, y = _windows(60)
    split_rows = np.zeros(60, dtype=np.int8)
    split_rows[[5, 17, 22, 40, 41, 42, 59]] = 1
    path = tmp_path / "s.npz"
    np.savez(path, X=x, y=y, split=split_rows)
    ds = datasets.load(str(path))
    parts = datasets.split(ds, seed=4, validation_fraction=0.2)
    _check_published_split(ds, parts)
    assert len(parts.y_val) == 11  # ceil(0.2 * 53)
    assert set(parts.y_val.tolist()) == {0, 1, 2, 3}  # stratified: every class validated
    again = datasets.split(ds, seed=4)
    assert parts.val_index is not None
    assert again.val_index is not None
    assert np.array_equal(parts.val_index, again.val_index)
    x_cv, y_cv = datasets.train_rows(ds)
    assert len(y_cv) == 53
    assert np.array_equal(x_cv, ds.X[split_rows == 0])


def test_validation_is_not_stratified_when_a_class_has_one_train_row(tmp_path: Path) -> None:
    x, y = _windows(20)
    y[0] = 4  # a fifth class with a single (train) row
    split_rows = np.array([0] * 15 + [1] * 5, dtype=np.int8)
    ds = datasets.Dataset("d", "t", x, y, [str(i) for i in range(5)], split=split_rows)
    parts = datasets.split(ds, seed=0)
    _check_published_split(ds, parts)
    assert len(parts.y_val) == 3
    tiny = datasets.Dataset("t", "t", x[:3], y[:3], ["0", "1", "2"], split=np.array([0, 1, 1], np.int8))
    with pytest.raises(DatasetError, match="too few to carve a validation part"):
        datasets.split(tiny, seed=0)


def test_train_rows_without_a_split_are_train_and_validation() -> None:
    ds = datasets.load("vibration", n_windows=60, seed=1)
    parts = datasets.split(ds, seed=2)
    x_cv, y_cv = datasets.train_rows(ds, seed=2)
    assert len(y_cv) == len(parts.y_train) + len(parts.y_val)
    assert parts.test_index is not None
    assert not any(np.array_equal(row, ds.X[i]) for i in parts.test_index for row in x_cv[:3])


AEON_SIZES = {
    "ArrowHead": (36, 175, 3, [251, 1]),
    "GunPoint": (50, 150, 2, [150, 1]),
    "OSULeaf": (200, 242, 6, [427, 1]),
    "BasicMotions": (40, 40, 4, [100, 6]),
    "JapaneseVowels": (270, 370, 9, [29, 12]),
}


@aeon_only
@pytest.mark.parametrize("name", sorted(AEON_SIZES))
def test_aeon_datasets_load_with_their_published_split(name: str) -> None:
    n_train, n_test, n_classes, shape = AEON_SIZES[name]
    ds = datasets.load(f"aeon:{name}")
    assert ds.split is not None
    assert ((ds.split == 0).sum(), (ds.split == 1).sum()) == (n_train, n_test)
    assert len(ds.class_names) == n_classes
    assert ds.class_names == sorted(ds.class_names)
    assert ds.input_shape == shape
    assert ds.sample_rate_hz is None
    assert ds.channels is not None
    assert len(ds.channels) == shape[1]
    parts = datasets.split(ds, seed=0)
    _check_published_split(ds, parts)
    assert set(parts.y_val.tolist()) == set(range(n_classes))


@aeon_only
def test_aeon_unequal_lengths_are_kept_raw_and_padded_or_resampled() -> None:
    ds = datasets.load("aeon:JapaneseVowels")
    assert ds.lengths is not None
    assert (int(ds.lengths.min()), int(ds.lengths.max())) == (7, 29)
    assert np.isnan(ds.X[ds.lengths < 29]).any()
    assert ds.params == {"length": "pad", "input_length": 26, "min_length": 7, "max_length": 29}
    prepared = pipeline.prepare(ds, seed=0)
    assert prepared.input_shape == [26, 12]  # the longest train row
    assert prepared.preprocessing == Preprocessing(normalize="fitted", length="pad", max_input_length=29)
    assert prepared.x_test.shape == (370, 26, 12)
    assert np.isfinite(prepared.x_test).all()
    resampled = datasets.load("aeon:JapaneseVowels", length="resample", input_length=20)
    assert resampled.params["length"] == "resample"
    assert resampled.params["input_length"] == 20
    config = pipeline.PreprocessingConfig(normalize="per_series", length="resample", input_length=20)
    prepared = pipeline.prepare(ds, seed=0, preprocessing=config)
    assert prepared.input_shape == [20, 12]
    assert prepared.preprocessing == Preprocessing(normalize="per_series", length="resample")
    assert prepared.normalization is None
    x_cv, y_cv = datasets.train_rows(ds)
    assert x_cv.shape == (270, 26, 12)
    assert len(y_cv) == 270


@aeon_only
def test_aeon_errors_and_basicmotions_builtin() -> None:
    with pytest.raises(
        DatasetError, match=r"not shipped with aeon: choose one of .*GunPoint.*JapaneseVowels"
    ):
        datasets.load("aeon:NoSuchSet")
    builtin = datasets.load("basicmotions")
    assert builtin.split is not None
    assert int((builtin.split == 1).sum()) == 40
    assert builtin.channels == ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]
    assert builtin.sample_rate_hz == 10.0


def _manifest_of(prepared: pipeline.Prepared) -> ModelManifest:
    """The manifest ``steps.sign`` would write for ``prepared`` (artifact fields made up)."""
    return ModelManifest(
        name="m",
        version="v1",
        quantization=Quantization.FLOAT32,
        sha256="ab" * 32,
        size_bytes=1,
        url="file:///m.tflite",
        input_shape=prepared.input_shape,
        input_dtype="float32",
        output_shape=[prepared.n_classes],
        output_dtype="float32",
        class_names=prepared.dataset.class_names,
        normalization=Normalization(**prepared.normalization) if prepared.normalization else None,
        channels=prepared.dataset.channels,
        preprocessing=prepared.preprocessing,
    )


@pytest.mark.parametrize(
    "config",
    [
        pipeline.PreprocessingConfig(),
        pipeline.PreprocessingConfig(normalize="per_series"),
        pipeline.PreprocessingConfig(normalize="none", length="resample", input_length=9),
    ],
)
def test_cloud_inputs_equal_what_the_edge_computes_per_window(config: pipeline.PreprocessingConfig) -> None:
    rng = np.random.default_rng(5)
    n, width = 48, 14
    lengths = rng.integers(5, width + 1, size=n)
    y = np.arange(n) % 3
    x = np.full((n, width, 2), np.nan, dtype=np.float32)
    for i, k in enumerate(lengths):
        x[i, :k] = rng.normal(y[i], 1.0 + y[i], size=(k, 2))
    split_rows = (np.arange(n) >= 36).astype(np.int8)
    ds = datasets.Dataset(
        "u", "t", x, y, ["a", "b", "c"], channels=["p", "q"], split=split_rows, lengths=lengths
    )
    prepared = pipeline.prepare(ds, seed=0, preprocessing=config)
    manifest = _manifest_of(prepared)
    assert prepared.splits.test_index is not None
    for row, i in enumerate(prepared.splits.test_index):
        # A device replays the true-length row, channels in another order; the edge prepares it.
        raw = x[i, : lengths[i]][:, [1, 0]]
        edge = prepare_window(raw, ["q", "p"], manifest)
        if manifest.normalization is not None:
            norm = manifest.normalization
            edge = normalize_fitted(edge, np.asarray(norm.mean), np.asarray(norm.std))
        np.testing.assert_array_equal(prepared.x_test[row], edge)
    assert prepared.representative(4).shape == (4, *prepared.input_shape)


def test_fixed_length_datasets_keep_todays_inputs() -> None:
    ds = datasets.load("vibration", n_windows=80, seed=2)
    prepared = pipeline.prepare(ds, seed=1)
    parts = datasets.split(ds, seed=1)
    mean, std = datasets.channel_stats(parts.x_train)
    assert prepared.mean == mean
    np.testing.assert_array_equal(prepared.x_test, datasets.normalize(parts.x_test, mean, std))
    assert prepared.preprocessing == Preprocessing(normalize="fitted", length="exact")
    assert _manifest_of(prepared).preprocessing is not None

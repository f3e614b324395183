"""Datasets: ``.npz`` files (``X``, ``y``, optional ``class_names``, ``split``, ``lengths``) of any
window or image shape; ``aeon:NAME``, a UCR/UEA classification dataset shipped inside the aeon
package (the ``datasets`` extra) with its published train/test split; and built-ins: ``vibration``
(the agent's simulated sensor physics), ``digits`` (scikit-learn's real 8x8 images) and
``basicmotions`` (aeon's BasicMotions smartwatch IMU data with its split).

Unequal-length data (e.g. JapaneseVowels) keeps its raw rows: ``X`` padded with NaN to the longest
row and ``lengths``; ``input_spec`` and ``inputs`` bring them to the model's input length through
``edge_node.preprocessing``, the very code the edge runs.

numpy only: no TensorFlow here."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cloud.errors import DatasetError
from cloud.learning.vibration_dataset import generate_dataset
from device_agent.sensors.vibration import CLASS_NAMES
from edge_node.preprocessing import InputSpec, WindowRejectedError, normalize_fitted, prepare_batch
from shared.codec import decode_window
from shared.errors import CodecError
from shared.schemas import Preprocessing

logger = logging.getLogger(__name__)

BUILTINS = ("vibration", "digits", "basicmotions")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # train, validation, held-out test
AEON_PREFIX = "aeon:"
TRAIN, TEST = 0, 1  # values of ``Dataset.split``
LengthPolicy = Literal["pad", "resample"]
NormalizePolicy = Literal["fitted", "per_series", "none"]


@dataclass
class Dataset:
    """Inputs ``X`` (n, *input_shape) float32, integer labels ``y`` in [0, len(class_names))."""

    name: str
    source: str
    X: np.ndarray
    y: np.ndarray
    class_names: list[str]
    sample_rate_hz: float | None = None
    channels: list[str] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # Published split, int8 per row: TRAIN (0) or TEST (1); None: ``split()`` draws one.
    split: np.ndarray | None = None
    # True length of each row when rows differ in length (X holds them NaN-padded to the longest).
    lengths: np.ndarray | None = None

    @property
    def input_shape(self) -> list[int]:
        """The shape of one stored row: a window's (time, channels) or an image's (h, w, channels);
        for unequal-length data the longest row's (the model's input length is ``input_spec``'s)."""
        return [int(d) for d in self.X.shape[1:]]

    def sha256(self) -> str:
        """Hash of inputs, labels, class names (and the split and lengths when set): the identity of a
        dataset snapshot in the registry. Datasets without either hash as they always did."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.X).tobytes())
        digest.update(np.ascontiguousarray(self.y).tobytes())
        digest.update("\0".join(self.class_names).encode())
        if self.split is not None:
            digest.update(b"\0split")
            digest.update(np.ascontiguousarray(self.split, dtype=np.int8).tobytes())
        if self.lengths is not None:
            digest.update(b"\0lengths")
            digest.update(np.ascontiguousarray(self.lengths, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def save(self, path: Path) -> None:
        """Write the dataset atomically as a compressed ``.npz`` that ``load_npz`` reads back."""
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        extras: dict[str, Any] = {}
        if self.sample_rate_hz is not None:
            extras["sample_rate_hz"] = np.float64(self.sample_rate_hz)
        if self.channels is not None:
            extras["channels"] = np.array(self.channels)
        if self.split is not None:
            extras["split"] = np.asarray(self.split, dtype=np.int8)
        if self.lengths is not None:
            extras["lengths"] = np.asarray(self.lengths, dtype=np.int64)
        np.savez_compressed(buffer, X=self.X, y=self.y, class_names=np.array(self.class_names), **extras)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(path)


@dataclass
class Splits:
    """The train, validation and held-out test arrays of one dataset."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    # Row indices into the dataset (its ``X``, ``y``, ``lengths``) of each part.
    train_index: np.ndarray | None = None
    val_index: np.ndarray | None = None
    test_index: np.ndarray | None = None


def load_npz(path: Path | str, *, name: str | None = None) -> Dataset:
    """Load a user's dataset; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = set(data.files)
            if "X" not in files or "y" not in files:
                raise DatasetError(f"{path}: needs arrays 'X' and 'y' (has {sorted(files)})")
            x = np.asarray(data["X"])
            y_raw = np.asarray(data["y"])
            names = [str(c) for c in data["class_names"]] if "class_names" in files else None
            rate = float(data["sample_rate_hz"]) if "sample_rate_hz" in files else None
            channels = [str(c) for c in data["channels"]] if "channels" in files else None
            split_raw = np.asarray(data["split"]) if "split" in files else None
            lengths_raw = np.asarray(data["lengths"]) if "lengths" in files else None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file: {exc}") from exc
    if x.ndim < 2:
        raise DatasetError(f"{path}: X must be (samples, ...) with at least one feature axis, got {x.shape}")
    if y_raw.ndim != 1 or len(y_raw) != len(x):
        raise DatasetError(f"{path}: y must be 1-D with one label per row of X ({len(x)}), got {y_raw.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{path}: X must be numeric, got {x.dtype}")
    x = x.astype(np.float32)
    lengths = _check_lengths(lengths_raw, x, where=str(path)) if lengths_raw is not None else None
    if lengths is None and not np.all(np.isfinite(x)):
        raise DatasetError(f"{path}: X holds NaN or infinite values")
    split_rows = _check_split(split_raw, len(x), where=str(path)) if split_raw is not None else None
    y, names = _encode_labels(y_raw, names, where=str(path))
    return Dataset(
        name=name or path.stem,
        source=str(path.resolve()),
        X=x,
        y=y,
        class_names=names,
        sample_rate_hz=rate,
        channels=channels,
        split=split_rows,
        lengths=lengths,
    )


def _check_split(raw: np.ndarray, n_rows: int, *, where: str) -> np.ndarray:
    """A published split: 1-D, one per row, only 0 (train) and 1 (test), both present."""
    if raw.ndim != 1 or len(raw) != n_rows:
        raise DatasetError(
            f"{where}: split must be 1-D with one entry per row of X ({n_rows}), got {raw.shape}"
        )
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.bool_)):
        raise DatasetError(f"{where}: split must hold integers 0 (train) and 1 (test), got {raw.dtype}")
    values = set(np.unique(raw).tolist())
    if not values <= {TRAIN, TEST}:
        raise DatasetError(
            f"{where}: split holds {sorted(values - {TRAIN, TEST})}: only 0 (train) and 1 (test)"
        )
    if values != {TRAIN, TEST}:
        missing = "train (0)" if TRAIN not in values else "test (1)"
        raise DatasetError(f"{where}: split has no {missing} rows")
    return raw.astype(np.int8)


def _check_lengths(raw: np.ndarray, x: np.ndarray, *, where: str) -> np.ndarray:
    """True row lengths of windows (n, time, channels): in [1, time], X finite within each."""
    if x.ndim != 3:
        raise DatasetError(f"{where}: lengths need windows X (samples, time, channels), got {x.shape}")
    if raw.ndim != 1 or len(raw) != len(x) or not np.issubdtype(raw.dtype, np.integer):
        raise DatasetError(
            f"{where}: lengths must be 1-D integers, one per row of X ({len(x)}), got {raw.shape}"
        )
    lengths = raw.astype(np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > x.shape[1]):
        raise DatasetError(f"{where}: lengths must be in [1, {x.shape[1]}] (the rows' time axis)")
    inside = np.arange(x.shape[1])[None, :] < lengths[:, None]
    if not np.all(np.isfinite(x[inside])):
        raise DatasetError(f"{where}: X holds NaN or infinite values within a row's length")
    return lengths


def _encode_labels(y_raw: np.ndarray, names: list[str] | None, *, where: str) -> tuple[np.ndarray, list[str]]:
    if np.issubdtype(y_raw.dtype, np.integer):
        y = y_raw.astype(np.int64)
        if len(y) and y.min() < 0:
            raise DatasetError(f"{where}: integer labels must be >= 0")
        n_classes = int(y.max()) + 1 if len(y) else 0
        if names is None:
            names = [str(i) for i in range(n_classes)]
        elif len(names) < n_classes:
            raise DatasetError(f"{where}: label {n_classes - 1} has no entry in class_names ({len(names)})")
        return y, names
    # String labels: class_names fixes the order when given.
    labels = [str(v) for v in y_raw]
    if names is None:
        names = sorted(set(labels))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DatasetError(f"{where}: labels {unknown[:5]} are not in class_names")
    return np.array([index[v] for v in labels], dtype=np.int64), names


def load_builtin(
    name: str,
    *,
    seed: int = 0,
    n_windows: int = 4000,
    drift: float = 0.0,
    options: dict[str, Any] | None = None,
) -> Dataset:
    """``options`` go to the vibration generator (e.g. ``noise``, ``severity_range``)."""
    if name == "digits":
        return _digits()
    if name == "vibration":
        return _vibration(n_windows=n_windows, seed=seed, drift=drift, options=options or {})
    if name == "basicmotions":
        return _basicmotions()
    raise DatasetError(
        f"unknown built-in dataset {name!r}: choose one of {', '.join(BUILTINS)} or a .npz path"
    )


def load(
    spec: str,
    *,
    seed: int = 0,
    n_windows: int = 4000,
    drift: float = 0.0,
    options: dict[str, Any] | None = None,
    length: LengthPolicy = "pad",
    input_length: int | None = None,
) -> Dataset:
    """A built-in name, ``aeon:NAME`` or a path to an ``.npz`` file.

    ``length`` and ``input_length`` are recorded in the params of unequal-length datasets: how rows
    are brought to the model's input length (``pad`` at the end, or ``resample`` linearly) and that
    length (None: the longest train row)."""
    if spec.startswith(AEON_PREFIX):
        dataset = load_aeon(spec[len(AEON_PREFIX) :])
    elif spec in BUILTINS:
        dataset = load_builtin(spec, seed=seed, n_windows=n_windows, drift=drift, options=options)
    elif spec.endswith(".npz") or Path(spec).exists():
        dataset = load_npz(spec)
    else:
        raise DatasetError(
            f"dataset {spec!r} is neither a built-in ({', '.join(BUILTINS)}), aeon:NAME nor an .npz file"
        )
    if dataset.lengths is not None:
        if input_length is not None and input_length < 1:
            raise DatasetError(f"input_length must be >= 1, got {input_length}")
        spec_of = input_spec(dataset, length=length, input_length=input_length, seed=seed)
        dataset.params = {
            **dataset.params,
            "length": length,
            "input_length": spec_of.input_shape[0],
            "min_length": int(dataset.lengths.min()),
            "max_length": int(dataset.lengths.max()),
        }
    return dataset


def _aeon_dir() -> Path:
    try:
        import aeon.datasets  # noqa: PLC0415  (aeon: the datasets extra, only for its shipped files)
    except ImportError as exc:
        raise DatasetError(
            "aeon datasets need the optional 'aeon' package: pip install 'edgefleet[datasets]'"
        ) from exc
    return Path(aeon.datasets.__file__).parent / "data"


def _is_classification(ts_file: Path) -> bool:
    """A ``.ts`` file whose header says it carries class labels."""
    with ts_file.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            low = line.strip().lower()
            if low.startswith("@classlabel"):
                return low.split()[1:2] == ["true"]
            if low.startswith("@data"):
                return False
    return False


def aeon_datasets() -> list[str]:
    """The classification datasets shipped inside the installed aeon package (train and test files)."""
    root = _aeon_dir()
    return [
        d.name
        for d in sorted(root.iterdir())
        if (d / f"{d.name}_TRAIN.ts").is_file()
        and (d / f"{d.name}_TEST.ts").is_file()
        and _is_classification(d / f"{d.name}_TRAIN.ts")
    ]


def load_aeon(name: str) -> Dataset:
    """A UCR/UEA dataset shipped with aeon, read from its files (no network) with the published split:
    train rows first (``split`` 0), then test rows (``split`` 1)."""
    root = _aeon_dir()
    shipped = aeon_datasets()
    if name not in shipped:
        raise DatasetError(
            f"aeon dataset {name!r} is not shipped with aeon: choose one of {', '.join(shipped)}"
        )
    from aeon.datasets import load_from_ts_file  # noqa: PLC0415  (aeon: the datasets extra)

    parts = []
    for part in ("TRAIN", "TEST"):
        path = root / name / f"{name}_{part}.ts"
        try:
            parts.append(load_from_ts_file(str(path)))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"aeon dataset {name}: cannot read {path}: {exc}") from exc
    # aeon gives (n, channels, time) arrays, or a list of (channels, length) for unequal lengths;
    # windows here are (n, time, channels).
    rows = [np.asarray(r, dtype=np.float32).T for (x, _y) in parts for r in x]
    split_rows = np.concatenate([np.full(len(x), s, dtype=np.int8) for s, (x, _y) in enumerate(parts)])
    labels = np.concatenate([np.asarray(y) for (_x, y) in parts])
    y, names = _encode_labels(np.array([str(v) for v in labels]), None, where=f"aeon:{name}")
    row_lengths = np.array([r.shape[0] for r in rows], dtype=np.int64)
    n_channels = {r.shape[1] for r in rows}
    if len(n_channels) != 1:
        raise DatasetError(f"aeon dataset {name}: rows differ in channel count {sorted(n_channels)}")
    width = int(row_lengths.max())
    x = np.full((len(rows), width, n_channels.pop()), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        x[i, : r.shape[0]] = r
    unequal = bool(row_lengths.min() != width)
    if not unequal and not np.all(np.isfinite(x)):
        raise DatasetError(f"aeon dataset {name}: missing values are not supported")
    return Dataset(
        name=name,
        source=f"aeon:{name}",
        X=x,
        y=y,
        class_names=names,
        channels=[f"c{i}" for i in range(x.shape[2])],
        split=split_rows,
        lengths=row_lengths if unequal else None,
    )


def _digits() -> Dataset:
    from sklearn.datasets import load_digits  # noqa: PLC0415  (scikit-learn: slow import, only this dataset)

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[..., np.newaxis]  # (n, 8, 8, 1): an image with one channel
    return Dataset(
        name="digits",
        source="builtin:digits",
        X=images,
        y=bunch.target.astype(np.int64),
        class_names=[str(c) for c in bunch.target_names],
        channels=["intensity"],
    )


def _vibration(*, n_windows: int, seed: int, drift: float, options: dict[str, Any]) -> Dataset:
    window, rate = 100, 100.0
    windows, y = generate_dataset(n_windows, window=window, rate_hz=rate, drift=drift, seed=seed, **options)
    return Dataset(
        name="vibration",
        source="builtin:vibration",
        X=np.asarray(windows, dtype=np.float32),
        y=np.asarray(y, dtype=np.int64),
        class_names=list(CLASS_NAMES),
        sample_rate_hz=rate,
        channels=["x", "y", "z"],
        params={"n_windows": n_windows, "seed": seed, "drift": drift, "window": window, **options},
    )


def _basicmotions() -> Dataset:
    dataset = load_aeon("BasicMotions")
    dataset.name = "basicmotions"
    dataset.source = "builtin:basicmotions"
    dataset.sample_rate_hz = 10.0
    dataset.channels = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]
    return dataset


def split(dataset: Dataset, *, seed: int = 0, validation_fraction: float = 0.2) -> Splits:
    """Train / validation / test parts, fixed by ``seed``; rows stay raw (see ``inputs``).

    With a published split (``dataset.split``) the test part is exactly its test rows and the
    validation part (``validation_fraction`` of the train rows, stratified when every class has two
    train rows or more, at least one row per class then) is carved from its train rows only: no
    test row reaches training, early stopping or model selection. Without one: a stratified
    70/15/15 split."""
    if dataset.split is not None:
        train_index, val_index, test_index = _published_split(dataset, seed, validation_fraction)
    else:
        train_index, val_index, test_index = _drawn_split(dataset, seed)
    x, y = dataset.X, dataset.y
    return Splits(
        x[train_index],
        y[train_index],
        x[val_index],
        y[val_index],
        x[test_index],
        y[test_index],
        train_index=train_index,
        val_index=val_index,
        test_index=test_index,
    )


def _published_split(
    dataset: Dataset, seed: int, validation_fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split  # noqa: PLC0415  (scikit-learn: slow import, only to split)

    if not 0 < validation_fraction < 1:
        raise DatasetError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    assert dataset.split is not None
    train_rows = np.flatnonzero(dataset.split == TRAIN)
    test_index = np.flatnonzero(dataset.split == TEST)
    y_train = dataset.y[train_rows]
    counts = np.bincount(y_train)
    present = int((counts > 0).sum())
    stratify = y_train if counts[counts > 0].min() >= 2 else None
    n_val = int(np.ceil(validation_fraction * len(train_rows)))
    if stratify is not None:
        # One validation row per class at least, while every class keeps one training row.
        n_val = min(max(n_val, present), len(train_rows) - present)
    if n_val < 1 or n_val >= len(train_rows):
        raise DatasetError(
            f"dataset {dataset.name}: {len(train_rows)} train rows are too few to carve a validation part"
        )
    try:
        fit_index, val_index = train_test_split(
            train_rows, test_size=n_val, random_state=seed, stratify=stratify
        )
    except ValueError as exc:
        raise DatasetError(f"dataset {dataset.name}: cannot carve validation rows: {exc}") from exc
    return np.sort(fit_index), np.sort(val_index), test_index


def _drawn_split(dataset: Dataset, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split  # noqa: PLC0415  (scikit-learn: slow import, only to split)

    rows = np.arange(len(dataset.y))
    counts = np.bincount(dataset.y)
    stratify = dataset.y if counts[counts > 0].min() >= 3 else None
    _train_frac, val_frac, test_frac = SPLIT_FRACTIONS
    try:
        # The same draws as splitting X and y themselves: the split depends on n, labels and seed only.
        train_index, rest, _y_train, y_rest = train_test_split(
            rows, dataset.y, test_size=val_frac + test_frac, random_state=seed, stratify=stratify
        )
        rest_counts = np.bincount(y_rest)
        stratify_rest = y_rest if stratify is not None and rest_counts[rest_counts > 0].min() >= 2 else None
        val_index, test_index = train_test_split(
            rest,
            test_size=test_frac / (val_frac + test_frac),
            random_state=seed,
            stratify=stratify_rest,
        )
    except ValueError as exc:
        raise DatasetError(
            f"dataset {dataset.name}: too small to split ({len(dataset.y)} rows): {exc}"
        ) from exc
    return train_index, val_index, test_index


def input_spec(
    dataset: Dataset,
    *,
    normalize: NormalizePolicy = "fitted",
    length: LengthPolicy | None = None,
    input_length: int | None = None,
    rows: np.ndarray | None = None,
    seed: int = 0,
) -> InputSpec:
    """How rows of ``dataset`` become model inputs (the manifest's ``preprocessing`` and input shape).

    Equal-length rows keep their length (``exact``). Unequal-length rows are brought to
    ``input_length`` (default: the dataset params', else the longest of ``rows``: the train part,
    by default the published train rows or the train and validation parts of ``split``), by
    ``length`` (default: the params', else ``pad``); with ``pad``, longer rows up to the longest
    of the whole dataset are cut to it (``max_input_length``). Equal-length windows go to another
    length only when ``input_length`` asks for one."""
    windows = dataset.X.ndim == 3
    if normalize == "per_series" and not windows:
        raise DatasetError(f"dataset {dataset.name}: per_series normalisation needs windows (time, channels)")
    channels = tuple(dataset.channels) if dataset.channels is not None else None
    lengths = dataset.lengths
    if lengths is None and windows and input_length is not None and input_length != dataset.X.shape[1]:
        # Equal-length windows brought to another length (e.g. resampled shorter for a smaller model).
        lengths = np.full(len(dataset.X), dataset.X.shape[1], dtype=np.int64)
    if lengths is None:
        return InputSpec(
            input_shape=tuple(dataset.input_shape),
            channels=channels,
            preprocessing=Preprocessing(normalize=normalize, length="exact"),
        )
    policy: LengthPolicy = length or dataset.params.get("length", "pad")
    target = input_length or dataset.params.get("input_length")
    if target is None:
        if rows is None:
            rows = np.flatnonzero(dataset.split == TRAIN) if dataset.split is not None else None
        if rows is None:
            parts = split(dataset, seed=seed)
            assert parts.train_index is not None
            assert parts.val_index is not None
            rows = np.concatenate([parts.train_index, parts.val_index])
        target = int(lengths[rows].max())
    longest = int(lengths.max())
    return InputSpec(
        input_shape=(int(target), int(dataset.X.shape[2])),
        channels=channels,
        preprocessing=Preprocessing(
            normalize=normalize,
            length=policy,
            max_input_length=longest if policy == "pad" and longest > target else None,
        ),
    )


def inputs(dataset: Dataset, index: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Rows ``index`` of ``dataset`` as model inputs (n, *spec.input_shape) float32, through the
    edge's own ``prepare_window`` (fitted normalisation excepted: ``normalize``)."""
    lengths = dataset.lengths[index] if dataset.lengths is not None else None
    try:
        return prepare_batch(dataset.X[index], dataset.channels, spec, lengths=lengths)
    except WindowRejectedError as exc:
        raise DatasetError(f"dataset {dataset.name}: {exc}") from exc


def train_rows(
    dataset: Dataset, *, seed: int = 0, spec: InputSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The train part for cross-validation: the published train rows (``split`` 0), or without a
    published split the train and validation parts of ``split(dataset, seed=seed)`` (never its
    test part); as inputs of ``spec`` (default ``input_spec(dataset)``: fixed length, per-series
    normalisation if asked, fitted statistics not applied: fit them per fold) and labels."""
    if dataset.split is not None:
        rows = np.flatnonzero(dataset.split == TRAIN)
    else:
        parts = split(dataset, seed=seed)
        assert parts.train_index is not None
        assert parts.val_index is not None
        rows = np.sort(np.concatenate([parts.train_index, parts.val_index]))
    spec = spec or input_spec(dataset, rows=rows)
    return inputs(dataset, rows, spec), dataset.y[rows]


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel (last axis) mean and std of training inputs; std floored so it stays > 0."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    std = np.maximum(x.std(axis=axes), 1e-6)
    return [float(v) for v in np.atleast_1d(mean)], [float(v) for v in np.atleast_1d(std)]


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Standardize ``x`` per channel with the training ``mean`` and ``std``, as float32: the edge
    runner's own function (``edge_node.preprocessing.normalize_fitted``)."""
    return normalize_fitted(x, np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32))


def samples_dataset(
    rows: list[tuple[bytes, str]], *, class_names: list[str], name: str = "uplink"
) -> Dataset:
    """Labelled uplinked windows (binary codec bytes, label) as a dataset; bad rows are skipped and logged."""
    index = {n: i for i, n in enumerate(class_names)}
    xs: list[np.ndarray] = []
    ys: list[int] = []
    rate: float | None = None
    channels: list[str] | None = None
    shape: tuple[int, ...] | None = None
    for payload, label in rows:
        if label not in index:
            logger.warning("uplinked sample with label %r not in %s skipped", label, class_names)
            continue
        try:
            window = decode_window(payload)
        except CodecError as exc:
            logger.warning("uplinked sample skipped: %s", exc)
            continue
        values = np.asarray(window.values, dtype=np.float32)
        if shape is None:
            shape, rate, channels = values.shape, window.sample_rate_hz, list(window.channels)
        elif values.shape != shape:
            logger.warning("uplinked sample of shape %s skipped (dataset shape %s)", values.shape, shape)
            continue
        xs.append(values)
        ys.append(index[label])
    if not xs:
        raise DatasetError("no usable labelled uplinked samples")
    return Dataset(
        name=name,
        source=f"samples:{name}",
        X=np.stack(xs),
        y=np.array(ys, dtype=np.int64),
        class_names=list(class_names),
        sample_rate_hz=rate,
        channels=channels,
    )

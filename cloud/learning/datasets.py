"""Datasets: ``.npz`` files (``X``, ``y``, optional ``class_names``) of any window or image shape, and
built-ins: ``vibration`` (the agent's simulated sensor physics), ``digits`` (scikit-learn's real 8x8
images) and ``basicmotions`` (real smartwatch IMU data from aeon, an optional extra).

numpy only: no TensorFlow here."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud.errors import DatasetError
from cloud.learning.vibration_dataset import generate_dataset
from device_agent.sensors.vibration import CLASS_NAMES
from shared.codec import decode_window
from shared.errors import CodecError

logger = logging.getLogger(__name__)

BUILTINS = ("vibration", "digits", "basicmotions")
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # train, validation, held-out test


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

    @property
    def input_shape(self) -> list[int]:
        """The shape of one input: a window's (time, channels) or an image's (h, w, channels)."""
        return [int(d) for d in self.X.shape[1:]]

    def sha256(self) -> str:
        """Hash of inputs, labels and class names: the identity of a dataset snapshot in the registry."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.X).tobytes())
        digest.update(np.ascontiguousarray(self.y).tobytes())
        digest.update("\0".join(self.class_names).encode())
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
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file: {exc}") from exc
    if x.ndim < 2:
        raise DatasetError(f"{path}: X must be (samples, ...) with at least one feature axis, got {x.shape}")
    if y_raw.ndim != 1 or len(y_raw) != len(x):
        raise DatasetError(f"{path}: y must be 1-D with one label per row of X ({len(x)}), got {y_raw.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{path}: X must be numeric, got {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DatasetError(f"{path}: X holds NaN or infinite values")
    y, names = _encode_labels(y_raw, names, where=str(path))
    return Dataset(
        name=name or path.stem,
        source=str(path.resolve()),
        X=x,
        y=y,
        class_names=names,
        sample_rate_hz=rate,
        channels=channels,
    )


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
) -> Dataset:
    """A built-in name or a path to an ``.npz`` file."""
    if spec in BUILTINS:
        return load_builtin(spec, seed=seed, n_windows=n_windows, drift=drift, options=options)
    if spec.endswith(".npz") or Path(spec).exists():
        return load_npz(spec)
    raise DatasetError(f"dataset {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor an .npz file")


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
    try:
        from aeon.datasets import load_basic_motions  # noqa: PLC0415  (aeon: the datasets extra)
    except ImportError as exc:
        raise DatasetError(
            "the basicmotions dataset needs the optional 'aeon' package: pip install 'edgefleet[datasets]'"
        ) from exc
    x_train, y_train = load_basic_motions(split="train")
    x_test, y_test = load_basic_motions(split="test")
    # aeon gives (n, channels, time); windows here are (n, time, channels).
    windows = np.concatenate([x_train, x_test]).transpose(0, 2, 1).astype(np.float32)
    y, names = _encode_labels(np.concatenate([y_train, y_test]), None, where="basicmotions")
    return Dataset(
        name="basicmotions",
        source="builtin:basicmotions",
        X=windows,
        y=y,
        class_names=names,
        sample_rate_hz=10.0,
        channels=["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"],
    )


def split(dataset: Dataset, *, seed: int = 0) -> Splits:
    """A stratified train / validation / held-out test split, fixed by ``seed``."""
    from sklearn.model_selection import train_test_split  # noqa: PLC0415  (scikit-learn: slow import, only to split)

    counts = np.bincount(dataset.y)
    stratify = dataset.y if counts[counts > 0].min() >= 3 else None
    _train_frac, val_frac, test_frac = SPLIT_FRACTIONS
    try:
        x_train, x_rest, y_train, y_rest = train_test_split(
            dataset.X, dataset.y, test_size=val_frac + test_frac, random_state=seed, stratify=stratify
        )
        rest_counts = np.bincount(y_rest)
        stratify_rest = y_rest if stratify is not None and rest_counts[rest_counts > 0].min() >= 2 else None
        x_val, x_test, y_val, y_test = train_test_split(
            x_rest,
            y_rest,
            test_size=test_frac / (val_frac + test_frac),
            random_state=seed,
            stratify=stratify_rest,
        )
    except ValueError as exc:
        raise DatasetError(
            f"dataset {dataset.name}: too small to split ({len(dataset.y)} rows): {exc}"
        ) from exc
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test)


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel (last axis) mean and std of training inputs; std floored so it stays > 0."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    std = np.maximum(x.std(axis=axes), 1e-6)
    return [float(v) for v in np.atleast_1d(mean)], [float(v) for v in np.atleast_1d(std)]


def normalize(x: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """Standardize ``x`` per channel with the training ``mean`` and ``std``, as float32."""
    return ((x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)).astype(np.float32)


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

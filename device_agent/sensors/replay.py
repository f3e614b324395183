"""``replay``: stream a recorded dataset at the configured rate, looping, with its labels.

- ``.npz`` with ``X`` of shape (n, samples, channels) (windows, played back to back) or
  (samples, channels), ``y`` (one label per window, or per sample for 2-D ``X``) and optional
  ``class_names``. Reading ``.npz`` needs numpy (``pip install numpy``); it is imported only here.
- ``.csv`` with one sample per row: numeric columns are channels, an optional label column
  (``label_column``) gives the ground truth. A header row names the channels. No numpy needed.
"""

from __future__ import annotations

import array
import csv
import math
from pathlib import Path
from typing import Any

from pydantic import Field

from device_agent.errors import SensorError
from device_agent.sensors.base import Row, Sensor, SensorOptions, register_sensor


class ReplayOptions(SensorOptions):
    """Options of the ``replay`` sensor: the recorded file and its columns."""

    path: Path = Field(description=".npz or .csv file")
    label_column: str = Field(default="label", description="CSV column holding the ground truth, if present")
    channels: list[str] | None = Field(default=None, description="channel names (default: header or c0..)")


@register_sensor("replay")
class ReplaySensor(Sensor):
    """Plays a recorded .npz or .csv file back at the sampling rate, looping at its end."""

    Options = ReplayOptions

    def __init__(self, options: SensorOptions, *, rate_hz: float) -> None:
        super().__init__(options, rate_hz=rate_hz)
        assert isinstance(options, ReplayOptions)
        self._opts = options
        self._values = array.array("d")  # flat, row-major
        self._labels: list[str | None] = []  # one per sample
        self._channels: tuple[str, ...] = ()
        self._pos = 0
        self._label: str | None = None
        self.loops = 0

    @property
    def channels(self) -> tuple[str, ...]:
        """The channel names."""
        return self._channels

    @property
    def label(self) -> str | None:
        """The recorded ground truth of the last sample read, if the file has one."""
        return self._label

    @property
    def samples(self) -> int:
        """How many samples the file holds."""
        return len(self._labels)

    def open(self) -> None:
        """Load the file; ``SensorError`` when it is missing or malformed."""
        path = self._opts.path
        if not path.is_file():
            raise SensorError(f"replay file {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".npz":
            names = self._load_npz(path)
        elif suffix in (".csv", ".txt"):
            names = self._load_csv(path)
        else:
            raise SensorError(f"replay file {path}: expected .npz or .csv")
        if not self._labels:
            raise SensorError(f"replay file {path} holds no samples")
        if self._opts.channels is not None:
            if len(self._opts.channels) != len(names):
                raise SensorError(
                    f"replay: {len(self._opts.channels)} channel names for {len(names)} channels in {path}"
                )
            names = list(self._opts.channels)
        self._channels = tuple(names)
        self._pos = 0

    def _load_npz(self, path: Path) -> list[str]:
        try:
            import numpy as np  # noqa: PLC0415  (only replay of .npz needs numpy)
        except ImportError as exc:
            raise SensorError("replay of .npz needs numpy: pip install numpy (or replay a .csv)") from exc
        try:
            with np.load(path, allow_pickle=False) as data:
                x = np.asarray(data["X"], dtype=np.float64)
                y = np.asarray(data["y"]) if "y" in data else None
                class_names = [str(c) for c in data["class_names"]] if "class_names" in data else None
        except (OSError, ValueError, KeyError) as exc:
            raise SensorError(f"replay file {path}: cannot read X/y: {exc}") from exc
        if x.ndim == 2:
            x = x[None, :, :]
            per_sample = True
        elif x.ndim == 3:
            per_sample = False
        else:
            raise SensorError(f"replay file {path}: X has shape {x.shape}; expected (n, samples, channels)")
        if not np.isfinite(x).all():
            raise SensorError(f"replay file {path}: X contains NaN or infinity")
        n, samples, n_channels = x.shape

        def name(label: Any) -> str:
            if class_names is not None and np.issubdtype(type(label), np.integer):
                if not 0 <= int(label) < len(class_names):
                    raise SensorError(f"replay file {path}: label {label} outside class_names")
                return class_names[int(label)]
            return str(label)

        if y is None:
            self._labels = [None] * (n * samples)
        elif per_sample:
            if len(y) != samples:
                raise SensorError(f"replay file {path}: {len(y)} labels for {samples} samples")
            self._labels = [name(v) for v in y]
        else:
            if len(y) != n:
                raise SensorError(f"replay file {path}: {len(y)} labels for {n} windows")
            self._labels = [lab for v in y for lab in [name(v)] * samples]
        self._values = array.array("d", x.reshape(-1).tolist())
        return [f"c{i}" for i in range(n_channels)]

    def _load_csv(self, path: Path) -> list[str]:
        label_col = self._opts.label_column
        with path.open(newline="") as handle:
            rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
        if not rows:
            raise SensorError(f"replay file {path} is empty")
        header: list[str] | None = None
        if not _numeric(rows[0], skip=None):
            header = [c.strip() for c in rows[0]]
            rows = rows[1:]
        label_idx = header.index(label_col) if header is not None and label_col in header else None
        width = len(rows[0]) if rows else 0
        names = [c for i, c in enumerate(header or [f"c{i}" for i in range(width)]) if i != label_idx]
        for line_no, row in enumerate(rows, start=2 if header else 1):
            if len(row) != width:
                raise SensorError(f"replay file {path}, row {line_no}: {len(row)} columns, expected {width}")
            try:
                values = [float(v) for i, v in enumerate(row) if i != label_idx]
            except ValueError as exc:
                raise SensorError(f"replay file {path}, row {line_no}: {exc}") from exc
            if not all(map(math.isfinite, values)):
                raise SensorError(f"replay file {path}, row {line_no}: NaN or infinity")
            self._values.extend(values)
            self._labels.append(row[label_idx].strip() or None if label_idx is not None else None)
        return names

    def read(self, n_samples: int) -> list[Row]:
        """The next ``n_samples`` rows, wrapping around at the end of the recording."""
        width = len(self._channels)
        total = len(self._labels)
        values = self._values
        out: list[Row] = []
        pos = self._pos
        for _ in range(n_samples):
            base = pos * width
            out.append(tuple(values[base : base + width]))
            pos += 1
            if pos == total:
                pos = 0
                self.loops += 1
        self._label = self._labels[pos - 1] if pos else self._labels[-1]
        self._pos = pos
        return out

    def restart(self) -> None:
        """Start again from the first sample."""
        self._pos = 0
        self._label = None

    def stats(self) -> dict[str, int]:
        """How many times the recording looped."""
        return {"loops": self.loops}


def _numeric(row: list[str], skip: int | None) -> bool:
    try:
        for i, v in enumerate(row):
            if i != skip:
                float(v)
    except ValueError:
        return False
    return True

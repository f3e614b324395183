"""``replay``: stream a recorded dataset at the configured rate, looping, with its labels.

- ``.npz`` with ``X`` of shape (n, samples, channels) (rows, e.g. a dataset's windows, played back
  to back) or (samples, channels), ``y`` (one label per row, or per sample for 2-D ``X``) and
  optional ``class_names``. Reading ``.npz`` needs numpy (``pip install numpy``); it is imported only
  here.
- ``.csv`` with one sample per row: numeric columns are channels, an optional label column
  (``label_column``) gives the ground truth. A header row names the channels. No numpy needed.

**Rows and windows.** A 3-D ``X`` is a sequence of rows of ``row_length`` samples. With the agent's
``window`` equal to the row length and ``hop`` equal to the window, every window is exactly one row,
from its first sample to its last, labelled with that row's label: the agent reads at most what the
window still needs (never across a window boundary), the sensor starts at a row boundary, and after
any gap (the agent fell behind, a rate or window change) the agent calls ``realign`` so the next
window starts at the next row boundary. Changing ``path`` at runtime (``set_config {"sensor":
{"options": {"path": ...}}}``) switches files at the next row boundary, so no window mixes two files.
Rows of unequal length (NaN-padded ``X``) are not supported: the file is refused. ``loop: false``
plays the file once (each row exactly one window), then the sensor gives no more samples.
"""

from __future__ import annotations

import array
import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from device_agent.errors import CommandError, SensorError
from device_agent.sensors.base import Row, Sensor, SensorOptions, register_sensor

logger = logging.getLogger(__name__)


class ReplayOptions(SensorOptions):
    """Options of the ``replay`` sensor: the recorded file and its columns."""

    path: Path = Field(description=".npz or .csv file")
    label_column: str = Field(default="label", description="CSV column holding the ground truth, if present")
    channels: list[str] | None = Field(default=None, description="channel names (default: header or c0..)")
    loop: bool = Field(
        default=True, description="start again at the end; false: play the file once, then send nothing"
    )


@dataclass
class Recording:
    """A loaded file: samples (flat, row-major), one label per sample, channel names, row length."""

    values: array.array[float] = field(default_factory=lambda: array.array("d"))
    labels: list[str | None] = field(default_factory=list)
    channels: tuple[str, ...] = ()
    row_length: int | None = None  # samples per row of a 3-D .npz; None: a plain sample stream


@register_sensor("replay")
class ReplaySensor(Sensor):
    """Plays a recorded .npz or .csv file back at the sampling rate, looping at its end."""

    Options = ReplayOptions

    def __init__(self, options: SensorOptions, *, rate_hz: float) -> None:
        super().__init__(options, rate_hz=rate_hz)
        assert isinstance(options, ReplayOptions)
        self._opts = options
        self._rec = Recording()
        self._pending: Recording | None = None  # a new file, played from the next row boundary
        self._pos = 0
        self._label: str | None = None
        self.loops = 0
        self.realigned = 0
        self.finished = False  # played to the end with loop: false

    @property
    def channels(self) -> tuple[str, ...]:
        """The channel names."""
        return self._rec.channels

    @property
    def label(self) -> str | None:
        """The recorded ground truth of the last sample read, if the file has one."""
        return self._label

    @property
    def samples(self) -> int:
        """How many samples the file holds."""
        return len(self._rec.labels)

    @property
    def row_length(self) -> int | None:
        """Samples per row (a 3-D .npz): the window length that makes each window one row."""
        return self._rec.row_length

    @property
    def position(self) -> int:
        """Index of the next sample to be read."""
        return self._pos

    def open(self) -> None:
        """Load the file; ``SensorError`` when it is missing or malformed."""
        self._rec = load_recording(self._opts)
        self._pending = None
        self._pos = 0

    def read(self, n_samples: int) -> list[Row]:
        """The next ``n_samples`` rows, wrapping around at the end of the recording."""
        rec = self._rec
        out: list[Row] = []
        pos = self._pos
        for _ in range(n_samples):
            if self._pending is not None and (rec.row_length is None or pos % rec.row_length == 0):
                rec = self._switch()
                pos = 0
            if self.finished:
                break  # a short read: the agent makes no window of it
            width = len(rec.channels)
            base = pos * width
            out.append(tuple(rec.values[base : base + width]))
            self._label = rec.labels[pos]
            pos += 1
            if pos == len(rec.labels):
                pos = 0
                self.loops += 1
                self.finished = not self._opts.loop
        self._pos = pos
        return out

    def _switch(self) -> Recording:
        assert self._pending is not None
        logger.info("replay: now playing %s", self._opts.path)
        self._rec, self._pending = self._pending, None
        self.loops = 0
        self.finished = False
        return self._rec

    def realign(self) -> None:
        """After a gap in the agent's windows: skip to the next row boundary (rows are never split)."""
        row = self._rec.row_length
        if row is None or self._pos % row == 0:
            return
        self._pos = (self._pos // row + 1) * row
        if self._pos >= len(self._rec.labels):
            self._pos = 0
            self.loops += 1
            self.finished = not self._opts.loop
        self.realigned += 1

    def apply_options(self, options: SensorOptions) -> None:
        """A new ``path`` (and columns): loaded now, played from the next row boundary; the new file
        must have the same channels and row length (the agent's window stays the same)."""
        assert isinstance(options, ReplayOptions)
        try:
            new = load_recording(options)
        except SensorError as exc:
            raise CommandError(str(exc)) from exc
        if len(new.channels) != len(self._rec.channels) or new.row_length != self._rec.row_length:
            raise CommandError(
                f"replay: {options.path} has {len(new.channels)} channels and rows of {new.row_length} "
                f"samples; the running file has {len(self._rec.channels)} and {self._rec.row_length}"
            )
        self._opts = options
        self._pending = new

    def restart(self) -> None:
        """Start again from the first sample (of a pending new file, if any)."""
        if self._pending is not None:
            self._switch()
        self._pos = 0
        self._label = None
        self.finished = False

    def stats(self) -> dict[str, int]:
        """How many times the recording looped, gaps realigned to a row boundary, and whether a file
        played once (``loop: false``) is finished."""
        return {"loops": self.loops, "realigned": self.realigned, "finished": int(self.finished)}


def load_recording(options: ReplayOptions) -> Recording:
    """Read the file ``options`` names; ``SensorError`` when it is missing or malformed."""
    path = options.path
    if not path.is_file():
        raise SensorError(f"replay file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        rec = _load_npz(path)
    elif suffix in (".csv", ".txt"):
        rec = _load_csv(path, options.label_column)
    else:
        raise SensorError(f"replay file {path}: expected .npz or .csv")
    if not rec.labels:
        raise SensorError(f"replay file {path} holds no samples")
    if options.channels is not None:
        if len(options.channels) != len(rec.channels):
            raise SensorError(
                f"replay: {len(options.channels)} channel names for {len(rec.channels)} channels in {path}"
            )
        rec.channels = tuple(options.channels)
    return rec


def _load_npz(path: Path) -> Recording:
    try:
        import numpy as np  # noqa: PLC0415  (only replay of .npz needs numpy)
    except ImportError as exc:
        raise SensorError("replay of .npz needs numpy: pip install numpy (or replay a .csv)") from exc
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.asarray(data["X"], dtype=np.float64)
            y = np.asarray(data["y"]) if "y" in data else None
            class_names = [str(c) for c in data["class_names"]] if "class_names" in data else None
            channel_names = [str(c) for c in data["channels"]] if "channels" in data else None
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
        if x.ndim == 3 and np.isnan(x).any():
            raise SensorError(
                f"replay file {path}: X holds NaN (rows of unequal length, NaN-padded?): replaying rows of "
                "unequal length is not supported yet"
            )
        raise SensorError(f"replay file {path}: X contains NaN or infinity")
    n, samples, n_channels = x.shape

    def name(label: Any) -> str:
        if class_names is not None and np.issubdtype(type(label), np.integer):
            if not 0 <= int(label) < len(class_names):
                raise SensorError(f"replay file {path}: label {label} outside class_names")
            return class_names[int(label)]
        return str(label)

    labels: list[str | None]
    if y is None:
        labels = [None] * (n * samples)
    elif per_sample:
        if len(y) != samples:
            raise SensorError(f"replay file {path}: {len(y)} labels for {samples} samples")
        labels = [name(v) for v in y]
    else:
        if len(y) != n:
            raise SensorError(f"replay file {path}: {len(y)} labels for {n} windows")
        labels = [lab for v in y for lab in [name(v)] * samples]
    if channel_names is None or len(channel_names) != n_channels:
        channel_names = [f"c{i}" for i in range(n_channels)]
    return Recording(
        values=array.array("d", x.reshape(-1).tolist()),
        labels=labels,
        channels=tuple(channel_names),
        row_length=None if per_sample else samples,
    )


def _load_csv(path: Path, label_col: str) -> Recording:
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
    rec = Recording(channels=tuple(names))
    for line_no, row in enumerate(rows, start=2 if header else 1):
        if len(row) != width:
            raise SensorError(f"replay file {path}, row {line_no}: {len(row)} columns, expected {width}")
        try:
            values = [float(v) for i, v in enumerate(row) if i != label_idx]
        except ValueError as exc:
            raise SensorError(f"replay file {path}, row {line_no}: {exc}") from exc
        if not all(map(math.isfinite, values)):
            raise SensorError(f"replay file {path}, row {line_no}: NaN or infinity")
        rec.values.extend(values)
        rec.labels.append(row[label_idx].strip() or None if label_idx is not None else None)
    return rec


def _numeric(row: list[str], skip: int | None) -> bool:
    try:
        for i, v in enumerate(row):
            if i != skip:
                float(v)
    except ValueError:
        return False
    return True

"""A raw window -> the model's input, as the signed manifest's ``preprocessing`` says: one
implementation for the edge (ingest) and the cloud (training, evaluation, int8 calibration), so
the two cannot disagree (``shared.schemas.Preprocessing`` documents the order of the steps).

numpy only: no TensorFlow, nothing of the cloud. Fitted normalisation (the manifest's
``normalization``) is not applied here but by the model runner on whole batches
(``edge_node.runtime.ModelRunner``), with ``normalize_fitted`` below, after these steps."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np

from shared.schemas import PER_SERIES_STD_FLOOR, ModelManifest, Preprocessing

logger = logging.getLogger(__name__)

RejectKind = Literal["shape", "channels"]
# Manifests without ``preprocessing`` keep their old contract: exact shape, exact channel order.
_LEGACY: Final = Preprocessing(normalize="none", length="exact")


class WindowRejectedError(ValueError):
    """A window the model cannot take; ``kind`` is the dead-letter reason (``shape`` or ``channels``)."""

    def __init__(self, kind: RejectKind, message: str) -> None:
        super().__init__(message)
        self.kind: RejectKind = kind


@dataclass(frozen=True, slots=True)
class InputSpec:
    """What ``prepare_window`` needs of a manifest; the cloud builds one before any manifest exists."""

    input_shape: tuple[int, ...]
    channels: tuple[str, ...] | None
    preprocessing: Preprocessing
    reorder: bool = True  # False for manifests without preprocessing: channels must match exactly

    @classmethod
    def of(cls, manifest: ModelManifest) -> InputSpec:
        """The spec a manifest describes (its old exact-shape contract when it has no preprocessing)."""
        return cls(
            input_shape=tuple(manifest.input_shape),
            channels=tuple(manifest.channels) if manifest.channels is not None else None,
            preprocessing=manifest.preprocessing or _LEGACY,
            reorder=manifest.preprocessing is not None,
        )

    @property
    def trivial(self) -> bool:
        """Windows of exactly the input shape, in the model's channel order, pass through unchanged."""
        return self.preprocessing.normalize != "per_series"

    def channel_order(self, channels: Sequence[str] | None, n_channels: int) -> list[int] | None:
        """The column order that puts ``channels`` in the model's order (``None``: already in it)."""
        if self.channels is None or channels is None:
            if n_channels != self.input_shape[-1]:
                raise WindowRejectedError(
                    "shape", f"window has {n_channels} channels; the model input has {self.input_shape[-1]}"
                )
            return None
        got = tuple(channels)
        if got == self.channels:
            return None
        if self.reorder and len(got) == len(set(got)) and set(got) == set(self.channels):
            position = {name: i for i, name in enumerate(got)}
            return [position[name] for name in self.channels]
        raise WindowRejectedError(
            "channels", f"channels {list(got)} do not match the model's {list(self.channels)}"
        )


def prepare_window(
    values: np.ndarray, channels: Sequence[str] | None, manifest: ModelManifest | InputSpec
) -> np.ndarray:
    """``values`` (time, channels) as the model's input: exactly ``input_shape``, float32.

    Raises ``WindowRejectedError`` (a ``ValueError``) naming what does not fit."""
    spec = manifest if isinstance(manifest, InputSpec) else InputSpec.of(manifest)
    x = np.asarray(values, dtype=np.float32)
    shape = spec.input_shape
    # The edge's hot path: a window already the model's input passes as is (~0.5 us instead of ~4).
    if (
        x.shape == shape
        and spec.trivial
        and (channels is None or spec.channels is None or tuple(channels) == spec.channels)
    ):
        return x
    if x.ndim != len(shape) or x.ndim < 2:
        raise WindowRejectedError(
            "shape", f"window of shape {list(x.shape)} does not match the model input {list(shape)}"
        )
    order = spec.channel_order(channels, int(x.shape[-1]))
    if order is not None:
        x = x[..., order]
    if list(x.shape[1:]) != list(shape[1:]):
        raise WindowRejectedError(
            "shape", f"window of shape {list(x.shape)} does not match the model input {list(shape)}"
        )
    pre = spec.preprocessing
    if pre.normalize == "per_series":
        x = _per_series(x)
    return _to_length(x, spec)


def prepare_batch(
    x: np.ndarray,
    channels: Sequence[str] | None,
    spec: InputSpec,
    *,
    lengths: np.ndarray | None = None,
) -> np.ndarray:
    """Rows of ``x`` (n, time, ...), each cut to its true length (``lengths``; rows are padded
    beyond it) and passed through ``prepare_window``: (n, *input_shape) float32. The same code path
    row by row, so cloud inputs equal what the edge computes; windows already of the input shape
    with nothing to normalise per series skip the loop (only the channel order applies)."""
    n = len(x)
    if lengths is None and spec.trivial and list(x.shape[1:]) == list(spec.input_shape):
        order = spec.channel_order(channels, int(x.shape[-1]))
        out = x if order is None else x[..., order]
        return np.ascontiguousarray(out, dtype=np.float32)
    result = np.empty((n, *spec.input_shape), dtype=np.float32)
    for i in range(n):
        row = x[i] if lengths is None else x[i, : int(lengths[i])]
        result[i] = prepare_window(row, channels, spec)
    return result


def normalize_fitted(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per channel (last axis), float32: the manifest's fitted normalisation."""
    mean32 = mean.astype(np.float32, copy=False)
    std32 = std.astype(np.float32, copy=False)
    out: np.ndarray = ((x - mean32) / std32).astype(np.float32, copy=False)
    return out


def _per_series(x: np.ndarray) -> np.ndarray:
    # float64 statistics: a long window of large values keeps its precision.
    wide = x.astype(np.float64)
    mean = wide.mean(axis=0)
    std = np.maximum(wide.std(axis=0), PER_SERIES_STD_FLOOR)
    out: np.ndarray = ((wide - mean) / std).astype(np.float32)
    return out


def _to_length(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    target = spec.input_shape[0]
    n = int(x.shape[0])
    pre = spec.preprocessing
    if n == target:
        return np.ascontiguousarray(x, dtype=np.float32)
    where = f"window of {n} samples x {x.shape[-1]} channels"
    if pre.length == "exact" or n < 1:
        raise WindowRejectedError("shape", f"{where} does not match the model input {list(spec.input_shape)}")
    if pre.length == "pad":
        longest = pre.max_input_length or target
        if n > longest:
            raise WindowRejectedError(
                "shape", f"{where} is longer than the {longest} samples the model accepts (pad to {target})"
            )
        if n > target:
            return np.ascontiguousarray(x[:target], dtype=np.float32)  # within max_input_length: cut
        padded = np.full((target, *x.shape[1:]), pre.pad_value, dtype=np.float32)
        padded[:n] = x
        return padded
    if pre.max_input_length is not None and n > pre.max_input_length:
        raise WindowRejectedError(
            "shape", f"{where} is longer than the {pre.max_input_length} samples the model accepts"
        )
    return _resample(x, target)


def _resample(x: np.ndarray, target: int) -> np.ndarray:
    """Linear interpolation of every channel onto ``target`` evenly spaced points (ends kept)."""
    n = int(x.shape[0])
    if n == 1:
        return np.repeat(x, target, axis=0).astype(np.float32)
    pos = np.linspace(0.0, n - 1.0, target)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo).reshape(-1, *([1] * (x.ndim - 1)))
    wide = x.astype(np.float64)
    out: np.ndarray = (wide[lo] * (1.0 - frac) + wide[hi] * frac).astype(np.float32)
    return out

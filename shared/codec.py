"""Binary codec for sensor windows (the ``telemetry`` topic). Spec: docs/telemetry-codec.md.

A window is a fixed 36-byte little-endian header, the device id, the channel names, an optional
ground-truth label (evaluation metadata), then ``samples x channels`` values, row-major::

    magic "EF" | version u8 | flags u8 | dtype u8 | device_id_len u8 | channels u16 | samples u32
    | seq u64 | ts f64 | sample_rate_hz f32 | scale f32
    | device_id | (name_len u8, name) * channels | [label_len u8, label] | values

dtype 1 is float32; dtype 2 is int16 with ``value = raw * scale``. Decoding validates every field
and raises ``CodecError`` naming the one that was wrong. Encoding needs no numpy (devices);
decoding uses numpy when it is installed (edge, cloud) and ``array`` otherwise.

- ``encode_window`` / ``decode_window``: one window, fully validated.
- ``WindowDecoder``: the same decoding for a hot receive path (the edge's ingest): what a device
  sends identically in every window is validated once and cached (an LRU bounded in bytes, the
  label not part of its key); errors stay ``decode_window``'s.
- ``with_ts``: an encoded window with a new timestamp (benchmarks stamp windows at send time).
"""

from __future__ import annotations

import array
import contextlib
import math
import re
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any, Final

from shared.errors import CodecError
from shared.schemas import MAX_SAMPLE_RATE_HZ as MAX_SAMPLE_RATE_HZ  # noqa: PLC0414  (part of the codec's API)
from shared.schemas import MAX_WINDOW_SAMPLES, SEQ_LIMIT, TelemetryWindow
from shared.topics import ID_PATTERN

MAGIC: Final = b"EF"
VERSION: Final = 1
FLAG_LABEL: Final = 0x01
DTYPE_FLOAT32: Final = 1
DTYPE_INT16: Final = 2
_DTYPE_NAMES: Final = {DTYPE_FLOAT32: "float32", DTYPE_INT16: "int16"}
_ITEMSIZE: Final = {DTYPE_FLOAT32: 4, DTYPE_INT16: 2}
HEADER: Final = struct.Struct("<2sBBBBHIQdff")
# Header bytes magic .. samples: with the device id and channel names after the header they make a
# window's descriptor, the part a device sends identically in every window (WindowDecoder); the
# label that may follow is per-window data.
_DESCRIPTOR_HEAD: Final = struct.calcsize("<2sBBBBHI")
_TS_OFFSET: Final = struct.calcsize("<2sBBBBHIQ")
_TS: Final = struct.Struct("<d")
MAX_CHANNELS: Final = 64
MAX_SAMPLES: Final = MAX_WINDOW_SAMPLES  # the contract's (shared/schemas.py)
DEFAULT_MAX_PAYLOAD: Final = 1_048_576
# WindowDecoder's descriptor cache, in (estimated) bytes: ~50,000 devices of a few channels each.
DESCRIPTOR_CACHE_MAX_BYTES: Final = 16 * 1024 * 1024
# Per cached descriptor beyond its key and strings: the entry tuple, the OrderedDict node and slot.
_ENTRY_OVERHEAD: Final = 200
_ID_RE: Final = re.compile(ID_PATTERN)
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,32}$")
_LITTLE: Final = sys.byteorder == "little"


@cache
def _numpy() -> ModuleType | None:
    try:
        import numpy as np  # noqa: PLC0415  (optional dependency, only where installed)
    except ImportError:
        return None
    return np


def _short_str(raw: bytes, field: str, pattern: re.Pattern[str] | None) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CodecError(field, "is not valid UTF-8") from exc
    if pattern is not None and not pattern.match(text):
        raise CodecError(field, f"{text!r} does not match {pattern.pattern}")
    return text


def encode_window(
    *,
    device_id: str,
    seq: int,
    ts: float,
    sample_rate_hz: float,
    channels: Sequence[str],
    values: Any,
    label: str | None = None,
    dtype: str = "float32",
    scale: float = 1.0,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> bytes:
    """Encode one window. ``values`` is a (samples, channels) array or a flat row-major sequence."""
    if not _ID_RE.match(device_id):
        raise CodecError("device_id", f"{device_id!r} does not match {ID_PATTERN}")
    if not 0 <= seq < SEQ_LIMIT:
        raise CodecError("seq", f"{seq} is outside [0, 2**63)")
    if not math.isfinite(ts) or ts < 0:
        raise CodecError("ts", f"{ts} must be a finite, non-negative epoch time")
    if not math.isfinite(sample_rate_hz) or not 0 < sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise CodecError(
            "sample_rate_hz", f"{sample_rate_hz} must be finite, > 0 and <= {MAX_SAMPLE_RATE_HZ:g}"
        )
    if _as_float32(sample_rate_hz, "sample_rate_hz") <= 0:
        raise CodecError("sample_rate_hz", f"{sample_rate_hz} is 0 as a float32")
    n_channels = len(channels)
    if not 1 <= n_channels <= MAX_CHANNELS:
        raise CodecError("channels", f"{n_channels} channels; allowed 1..{MAX_CHANNELS}")
    for name in channels:
        if not _NAME_RE.match(name):
            raise CodecError("channels", f"channel name {name!r} does not match {_NAME_RE.pattern}")
    if dtype not in ("float32", "int16"):
        raise CodecError("dtype", f"{dtype!r} is not one of 'float32', 'int16'")
    if dtype == "int16" and (not math.isfinite(scale) or scale <= 0 or _as_float32(scale, "scale") <= 0):
        raise CodecError("scale", f"{scale} must be finite and > 0 (as a float32) for int16")

    flat = _flatten(values)
    if len(flat) == 0 or len(flat) % n_channels:
        raise CodecError("values", f"{len(flat)} values do not fill whole rows of {n_channels} channels")
    n_samples = len(flat) // n_channels
    if n_samples > MAX_SAMPLES:
        raise CodecError("values", f"{n_samples} samples exceeds {MAX_SAMPLES}")
    body: array.array[Any]
    if dtype == "float32":
        body = array.array("f", flat)
        if not all(map(math.isfinite, body)):
            raise CodecError("values", "contains NaN or infinity")
        code = DTYPE_FLOAT32
    else:
        try:
            body = array.array("h", (round(v / scale) for v in flat))
        except (OverflowError, ValueError) as exc:
            raise CodecError("values", f"do not fit int16 at scale {scale}: {exc}") from exc
        code = DTYPE_INT16
    if not _LITTLE:
        body.byteswap()

    flags = 0
    parts = [b"", device_id.encode()]
    parts.extend(bytes([len(n)]) + n.encode() for n in channels)
    if label is not None:
        raw_label = label.encode()
        if not 1 <= len(raw_label) <= 255:
            raise CodecError("label", "must be 1..255 bytes of UTF-8")
        flags |= FLAG_LABEL
        parts.append(bytes([len(raw_label)]) + raw_label)
    parts[0] = HEADER.pack(
        MAGIC,
        VERSION,
        flags,
        code,
        len(parts[1]),
        n_channels,
        n_samples,
        seq,
        ts,
        sample_rate_hz,
        scale if dtype == "int16" else 1.0,
    )
    parts.append(body.tobytes())
    payload = b"".join(parts)
    if len(payload) > max_payload:
        raise CodecError("payload", f"{len(payload)} bytes exceeds the {max_payload}-byte limit")
    return payload


def _as_float32(value: float, field: str) -> float:
    """``value`` as the header stores it (a float32); too large to store is a ``CodecError``."""
    try:
        stored: float = struct.unpack("<f", struct.pack("<f", value))[0]
    except (OverflowError, struct.error) as exc:
        raise CodecError(field, f"{value} does not fit a float32") from exc
    return stored


def _flatten(values: Any) -> Sequence[float]:
    # An ndarray implies numpy is loaded: never import it here (devices run without numpy).
    ndarray = getattr(sys.modules.get("numpy"), "ndarray", None)
    if ndarray is not None and isinstance(values, ndarray):
        if values.ndim not in (1, 2):
            raise CodecError("values", f"array has {values.ndim} dimensions; expected 1 or 2")
        return values.astype("float64", copy=False).ravel().tolist()  # type: ignore[no-any-return]
    if isinstance(values, array.array):
        return values
    out: list[float] = []
    for row in values:
        if isinstance(row, int | float):
            out.append(float(row))
        else:
            out.extend(float(v) for v in row)
    return out


def decode_window(payload: bytes, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> TelemetryWindow:
    """Decode and validate one window; ``values`` is float32 of shape (samples, channels)."""
    size = len(payload)
    if size > max_payload:
        raise CodecError("payload", f"{size} bytes exceeds the {max_payload}-byte limit")
    if size < HEADER.size:
        raise CodecError("header", f"payload of {size} bytes is shorter than the {HEADER.size}-byte header")
    (magic, version, flags, code, id_len, n_channels, n_samples, seq, ts, rate, scale) = HEADER.unpack_from(
        payload
    )
    if magic != MAGIC:
        raise CodecError("magic", f"{magic!r} is not {MAGIC!r}")
    if version != VERSION:
        raise CodecError("version", f"{version} is not supported (this codec reads {VERSION})")
    if flags & ~FLAG_LABEL:
        raise CodecError("flags", f"unknown bits set in {flags:#04x}")
    if code not in _DTYPE_NAMES:
        raise CodecError("dtype", f"code {code} is unknown (1 = float32, 2 = int16)")
    if not 1 <= n_channels <= MAX_CHANNELS:
        raise CodecError("channels", f"{n_channels} channels; allowed 1..{MAX_CHANNELS}")
    if not 1 <= n_samples <= MAX_SAMPLES:
        raise CodecError("samples", f"{n_samples} samples; allowed 1..{MAX_SAMPLES}")
    if seq >= SEQ_LIMIT:
        raise CodecError("seq", f"{seq} is outside [0, 2**63)")
    if not math.isfinite(ts) or ts < 0:
        raise CodecError("ts", f"{ts} must be a finite, non-negative epoch time")
    if not math.isfinite(rate) or not 0 < rate <= MAX_SAMPLE_RATE_HZ:
        raise CodecError("sample_rate_hz", f"{rate} must be finite, > 0 and <= {MAX_SAMPLE_RATE_HZ:g}")
    if code == DTYPE_INT16 and (not math.isfinite(scale) or scale <= 0):
        raise CodecError("scale", f"{scale} must be finite and > 0 for int16")

    pos = HEADER.size
    if pos + id_len > size:
        raise CodecError("device_id", "truncated")
    device_id = _short_str(payload[pos : pos + id_len], "device_id", _ID_RE)
    pos += id_len
    channels = []
    for i in range(n_channels):
        if pos >= size:
            raise CodecError(f"channels[{i}]", "truncated")
        length = payload[pos]
        if pos + 1 + length > size:
            raise CodecError(f"channels[{i}]", "truncated")
        channels.append(_short_str(payload[pos + 1 : pos + 1 + length], f"channels[{i}]", _NAME_RE))
        pos += 1 + length
    label = None
    if flags & FLAG_LABEL:
        if pos >= size:
            raise CodecError("label", "truncated")
        length = payload[pos]
        if length == 0 or pos + 1 + length > size:
            raise CodecError("label", "empty or truncated")
        label = _short_str(payload[pos + 1 : pos + 1 + length], "label", None)
        pos += 1 + length
    expected = n_samples * n_channels * _ITEMSIZE[code]
    if size - pos != expected:
        raise CodecError(
            "values",
            f"{size - pos} bytes for {n_samples}x{n_channels} {_DTYPE_NAMES[code]} (need {expected})",
        )
    values = _decode_values(payload, pos, code, shape=(n_samples, n_channels), scale=scale)
    return TelemetryWindow.model_construct(
        device_id=device_id,
        seq=seq,
        ts=ts,
        sample_rate_hz=rate,
        channels=tuple(channels),
        values=values,
        label=label,
    )


def _decode_values(payload: bytes, pos: int, code: int, *, shape: tuple[int, int], scale: float) -> Any:
    n_samples, n_channels = shape
    np = _numpy()
    if np is not None:
        if code == DTYPE_FLOAT32:
            arr = np.frombuffer(payload, dtype="<f4", offset=pos, count=n_samples * n_channels)
        else:
            raw = np.frombuffer(payload, dtype="<i2", offset=pos, count=n_samples * n_channels)
            arr = raw.astype(np.float32) * np.float32(scale)
        if not np.isfinite(arr).all():
            raise CodecError("values", "contains NaN or infinity")
        return arr.reshape(n_samples, n_channels)
    body: array.array[Any] = array.array("f" if code == DTYPE_FLOAT32 else "h")
    body.frombytes(payload[pos:])
    if not _LITTLE:
        body.byteswap()
    if code == DTYPE_INT16:
        body = array.array("f", (v * scale for v in body))
    if not all(map(math.isfinite, body)):
        raise CodecError("values", "contains NaN or infinity")
    return [list(body[i * n_channels : (i + 1) * n_channels]) for i in range(n_samples)]


def with_ts(payload: bytes, ts: float) -> bytes:
    """The same encoded window with its ``ts`` replaced (the rest is not re-validated)."""
    if not math.isfinite(ts) or ts < 0:
        raise CodecError("ts", f"{ts} must be a finite, non-negative epoch time")
    if len(payload) < HEADER.size:
        raise CodecError(
            "header", f"payload of {len(payload)} bytes is shorter than the {HEADER.size}-byte header"
        )
    stamped = bytearray(payload)
    _TS.pack_into(stamped, _TS_OFFSET, ts)
    return bytes(stamped)


@dataclass(frozen=True, slots=True)
class WindowView:
    """A decoded window: the fields of ``TelemetryWindow`` without a pydantic object per window."""

    device_id: str
    seq: int
    ts: float
    sample_rate_hz: float
    channels: tuple[str, ...]
    values: Any  # float32 (samples, channels): a numpy array where numpy is installed, else rows
    label: str | None

    @classmethod
    def of(cls, window: TelemetryWindow) -> WindowView:
        """The view of a window ``decode_window`` returned."""
        return cls(
            window.device_id,
            window.seq,
            window.ts,
            window.sample_rate_hz,
            window.channels,
            window.values,
            window.label,
        )


class WindowDecoder:
    """``decode_window`` with a cache of validated descriptors, for a hot receive path.

    A payload's descriptor (magic, version, flags, dtype, sizes, device id, channel names) is
    validated by ``decode_window`` the first time it is seen; later payloads with the same
    descriptor bytes only get the per-window checks (seq, ts, rate, scale, label, size, finite
    values). The label is per-window data, not schema: it is not part of the key, so a device
    varying its labels adds no entries. Any failure is handed back to ``decode_window``, so errors
    are exactly its own. Without numpy every payload goes through ``decode_window``.

    The cache is bounded in bytes, whatever a device sends: an LRU of at most ``max_bytes``
    (estimated from each entry's key, strings and containers), the least recently used descriptors
    evicted first (counted in ``evictions``). A hit is a dict lookup and ``move_to_end``, lock-free;
    a miss (already a full ``decode_window``) takes a lock to insert and evict.
    """

    def __init__(
        self, max_bytes: int = DESCRIPTOR_CACHE_MAX_BYTES, *, max_payload: int = DEFAULT_MAX_PAYLOAD
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self.max_payload = max_payload
        self._np = _numpy()
        # descriptor bytes -> (device id, channels, values item size, numpy dtype, entry cost in bytes)
        self._known: OrderedDict[bytes, tuple[str, tuple[str, ...], int, Any, int]] = OrderedDict()
        self._lock = threading.Lock()  # inserts and evictions only (the miss path)
        self._bytes = 0
        self.evictions = 0

    @property
    def cache_bytes(self) -> int:
        """Estimated bytes held by the descriptor cache (always <= ``max_bytes``)."""
        return self._bytes

    @property
    def cache_entries(self) -> int:
        """Descriptors cached."""
        return len(self._known)

    def decode(self, payload: bytes) -> WindowView:
        """Decode and validate one window, like ``decode_window``; ``CodecError`` when malformed."""
        np = self._np
        size = len(payload)
        if np is None or size < HEADER.size or size > self.max_payload:
            return self._slow(payload)
        (_, _, flags, code, id_len, n_channels, n_samples, seq, ts, rate, scale) = HEADER.unpack_from(payload)
        pos = HEADER.size + id_len
        for _ in range(n_channels):
            if pos >= size:
                return self._slow(payload)
            pos += 1 + payload[pos]
        key = payload[:_DESCRIPTOR_HEAD] + payload[HEADER.size : pos]
        known = self._known.get(key)
        if known is None:
            window = decode_window(payload, max_payload=self.max_payload)  # validates this descriptor
            self._remember(key, window, code)
            return WindowView.of(window)
        with contextlib.suppress(KeyError):  # evicted by another thread meanwhile: still valid here
            self._known.move_to_end(key)
        device_id, channels, itemsize, dtype, _ = known
        label = None
        if flags & FLAG_LABEL:
            if pos >= size:
                return self._slow(payload)
            length = payload[pos]
            end = pos + 1 + length
            if length == 0 or end > size:
                return self._slow(payload)
            try:
                label = payload[pos + 1 : end].decode("utf-8")
            except UnicodeDecodeError:
                return self._slow(payload)
            pos = end
        if (
            size - pos != n_samples * n_channels * itemsize
            or seq >= SEQ_LIMIT
            or not (ts >= 0 and math.isfinite(ts))
            or not 0 < rate <= MAX_SAMPLE_RATE_HZ
            or (code == DTYPE_INT16 and not (scale > 0 and math.isfinite(scale)))
        ):
            return self._slow(payload)
        values = np.ndarray((n_samples, n_channels), dtype=dtype, buffer=payload, offset=pos)
        if code == DTYPE_INT16:
            values = values.astype(np.float32) * np.float32(scale)
        if not np.isfinite(values).all():
            return self._slow(payload)
        return WindowView(device_id, seq, ts, rate, channels, values, label)

    def _remember(self, key: bytes, window: TelemetryWindow, code: int) -> None:
        """Cache a descriptor ``decode_window`` has just validated, evicting the least recently used
        ones to stay within ``max_bytes`` (an entry larger than that is not cached)."""
        np = self._np
        assert np is not None
        channels = window.channels
        cost = (
            _ENTRY_OVERHEAD
            + sys.getsizeof(key)
            + sys.getsizeof(window.device_id)
            + sys.getsizeof(channels)
            + sum(map(sys.getsizeof, channels))
        )
        if cost > self.max_bytes:
            return
        entry = (
            window.device_id,
            channels,
            _ITEMSIZE[code],
            np.dtype("<f4") if code == DTYPE_FLOAT32 else np.dtype("<i2"),
            cost,
        )
        known = self._known
        with self._lock:
            old = known.pop(key, None)
            if old is not None:
                self._bytes -= old[-1]
            while known and self._bytes + cost > self.max_bytes:
                _, evicted = known.popitem(last=False)
                self._bytes -= evicted[-1]
                self.evictions += 1
            known[key] = entry
            self._bytes += cost

    def _slow(self, payload: bytes) -> WindowView:
        return WindowView.of(decode_window(payload, max_payload=self.max_payload))


def window_to_json(window: TelemetryWindow, *, with_values: bool = False) -> dict[str, Any]:
    """A JSON-friendly view of a decoded window (for ``edgefleet tail``)."""
    values = window.values
    out: dict[str, Any] = {
        "type": window.type,
        "schema_version": window.schema_version,
        "device_id": window.device_id,
        "seq": window.seq,
        "ts": window.ts,
        "sample_rate_hz": window.sample_rate_hz,
        "channels": list(window.channels),
        "samples": len(values),
    }
    if window.label is not None:
        out["label"] = window.label
    if with_values:
        out["values"] = values.tolist() if hasattr(values, "tolist") else values
    return out

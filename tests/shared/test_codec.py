"""The binary telemetry codec: round trips, fuzzing, and every single-field corruption rejected by name."""

from __future__ import annotations

import contextlib
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from shared.codec import (
    DEFAULT_MAX_PAYLOAD,
    FLAG_LABEL,
    HEADER,
    MAX_CHANNELS,
    MAX_SAMPLE_RATE_HZ,
    decode_window,
    encode_window,
    window_to_json,
)
from shared.errors import CodecError
from shared.topics import ID_PATTERN

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.from_regex(ID_PATTERN, fullmatch=True)
channel_names = st.from_regex(r"[A-Za-z0-9_.:-]{1,32}", fullmatch=True)
labels = st.text(min_size=1, max_size=40).filter(lambda s: 1 <= len(s.encode()) <= 255)
f32_values = st.floats(width=32, allow_nan=False, allow_infinity=False)


def f32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


@st.composite
def windows(draw: st.DrawFn, dtype: str = "float32") -> dict:
    n_channels = draw(st.integers(1, 6))
    n_samples = draw(st.integers(1, 40))
    if dtype == "float32":
        values = draw(st.lists(f32_values, min_size=n_samples * n_channels, max_size=n_samples * n_channels))
        scale = 1.0
    else:
        scale = draw(st.sampled_from([0.001, 0.01, 0.25, 1.0, 3.5]))
        raw = draw(
            st.lists(
                st.integers(-32768, 32767), min_size=n_samples * n_channels, max_size=n_samples * n_channels
            )
        )
        values = [r * scale for r in raw]
    return {
        "device_id": draw(ids),
        "seq": draw(st.integers(0, 2**63 - 1)),
        "ts": draw(st.floats(0, 4e9)),
        "sample_rate_hz": draw(st.floats(0.001, MAX_SAMPLE_RATE_HZ)),
        "channels": draw(st.lists(channel_names, min_size=n_channels, max_size=n_channels)),
        "values": [values[i * n_channels : (i + 1) * n_channels] for i in range(n_samples)],
        "label": draw(st.none() | labels),
        "dtype": dtype,
        "scale": scale,
    }


def assert_round_trip(spec: dict) -> None:
    payload = encode_window(**spec)
    window = decode_window(payload)
    assert window.type == "telemetry"
    assert window.device_id == spec["device_id"]
    assert window.seq == spec["seq"]
    assert window.ts == spec["ts"]
    assert window.sample_rate_hz == f32(spec["sample_rate_hz"])
    assert window.channels == tuple(spec["channels"])
    assert window.label == spec["label"]
    assert window.values.dtype == np.float32
    assert window.values.shape == (len(spec["values"]), len(spec["channels"]))
    if spec["dtype"] == "float32":
        assert window.values.tolist() == spec["values"]  # float32 in, float32 out: exact
    else:
        expected = np.asarray(spec["values"], dtype=np.float64)
        np.testing.assert_allclose(window.values, expected, rtol=1e-6, atol=spec["scale"] * 1e-6)


@FUZZ
@given(windows())
def test_float32_windows_round_trip(spec):
    assert_round_trip(spec)


@FUZZ
@given(windows(dtype="int16"))
def test_int16_windows_round_trip(spec):
    assert_round_trip(spec)


def test_numpy_arrays_and_flat_sequences_encode_the_same():
    rows = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    common = {"device_id": "d1", "seq": 1, "ts": 1.0, "sample_rate_hz": 100.0, "channels": ("x", "y", "z")}
    as_rows = encode_window(**common, values=rows)
    assert encode_window(**common, values=np.asarray(rows)) == as_rows
    assert encode_window(**common, values=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == as_rows
    assert len(as_rows) == HEADER.size + 2 + 3 * 2 + 6 * 4  # compact: 4 bytes a float32 value


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_codec_error(payload):
    error = None
    try:
        decode_window(payload)
    except CodecError as exc:
        error = exc
    if error is not None:
        assert error.field
        assert str(error).startswith(error.field)


@FUZZ
@given(windows(), st.data())
def test_random_corruption_of_valid_windows_raises_only_codec_error(spec, data):
    payload = bytearray(encode_window(**spec))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(payload) - 1))
        payload[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    with contextlib.suppress(CodecError):
        decode_window(bytes(payload[:cut]))


def _valid(label: str | None = "normal", dtype: str = "float32") -> bytes:
    return encode_window(
        device_id="pump-1",
        seq=5,
        ts=1_700_000_000.0,
        sample_rate_hz=100.0,
        channels=("x", "y"),
        values=[[1.0, 2.0], [3.0, 4.0]],
        label=label,
        dtype=dtype,
        scale=0.5,
    )


def _header_fields(payload: bytes) -> list:
    return list(HEADER.unpack_from(payload))


def _with_header(payload: bytes, index: int, value: object) -> bytes:
    fields = _header_fields(payload)
    fields[index] = value
    return HEADER.pack(*fields) + payload[HEADER.size :]


# Header field order: magic, version, flags, dtype, id_len, channels, samples, seq, ts, rate, scale.
HEADER_CORRUPTIONS = [
    ("magic", 0, b"XX"),
    ("version", 1, 2),
    ("flags", 2, 0x80 | FLAG_LABEL),
    ("dtype", 3, 9),
    ("channels", 5, 0),
    ("channels", 5, MAX_CHANNELS + 1),
    ("samples", 6, 0),
    ("seq", 7, 2**63),
    ("ts", 8, math.nan),
    ("ts", 8, -1.0),
    ("ts", 8, math.inf),
    ("sample_rate_hz", 9, 0.0),
    ("sample_rate_hz", 9, math.nan),
    ("sample_rate_hz", 9, 2 * MAX_SAMPLE_RATE_HZ),
]


@pytest.mark.parametrize(("field", "index", "value"), HEADER_CORRUPTIONS)
def test_each_header_field_corruption_is_rejected_naming_it(field, index, value):
    with pytest.raises(CodecError) as info:
        decode_window(_with_header(_valid(), index, value))
    assert info.value.field == field


def test_int16_scale_corruption_is_rejected():
    for scale in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(CodecError) as info:
            decode_window(_with_header(_valid(dtype="int16"), 10, scale))
        assert info.value.field == "scale"


def test_body_corruptions_are_rejected_naming_the_field():
    good = _valid()
    id_at = HEADER.size
    names_at = id_at + len("pump-1")
    label_at = names_at + 2 * 2
    cases = {
        "device_id": good[:id_at] + b"pump/1" + good[names_at:],  # '/' may not be in a topic level
        "channels[0]": good[:names_at] + b"\x01 " + good[names_at + 2 :],
        "channels[1]": good[: names_at + 2] + b"\x05y" + good[names_at + 4 :],  # length past its bytes
        "label": good[:label_at] + b"\x00" + good[label_at + 1 :],  # empty label with the flag set
        "values": good[:-1],  # one byte short
    }
    for field, payload in cases.items():
        with pytest.raises(CodecError) as info:
            decode_window(payload)
        assert info.value.field == field, (field, info.value)
    with pytest.raises(CodecError, match="values") as info:
        decode_window(good + b"\x00")
    nan_body = good[: -4 * 4] + struct.pack("<4f", 1.0, math.nan, 2.0, 3.0)
    with pytest.raises(CodecError, match="NaN") as info:
        decode_window(nan_body)
    assert info.value.field == "values"
    non_utf8_label = good[: label_at + 1] + b"\xff\xfe\xfd\xfc\xfb\xfa" + good[label_at + 7 :]
    with pytest.raises(CodecError) as info:
        decode_window(non_utf8_label)
    assert info.value.field == "label"
    with pytest.raises(CodecError) as info:
        decode_window(good[: HEADER.size - 1])
    assert info.value.field == "header"


def test_payload_size_limit_is_enforced_both_ways():
    good = _valid()
    with pytest.raises(CodecError) as info:
        decode_window(good, max_payload=len(good) - 1)
    assert info.value.field == "payload"
    big = [[0.0] * 8] * 40_000  # 1.28 MB of float32
    with pytest.raises(CodecError) as info:
        encode_window(
            device_id="d", seq=0, ts=0, sample_rate_hz=1, channels=[f"c{i}" for i in range(8)], values=big
        )
    assert info.value.field == "payload"
    assert DEFAULT_MAX_PAYLOAD == 1_048_576


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("device_id", {"device_id": "bad id"}),
        ("seq", {"seq": -1}),
        ("ts", {"ts": math.nan}),
        ("sample_rate_hz", {"sample_rate_hz": 0.0}),
        ("sample_rate_hz", {"sample_rate_hz": 1e39}),
        ("sample_rate_hz", {"sample_rate_hz": 1e-50}),
        ("channels", {"channels": ()}),
        ("channels", {"channels": ("x", "bad name")}),
        ("dtype", {"dtype": "float64"}),
        ("scale", {"dtype": "int16", "scale": 0.0}),
        ("scale", {"dtype": "int16", "scale": 1e39}),
        ("values", {"values": [[1.0, 2.0], [3.0]]}),
        ("values", {"values": [[1.0, math.inf], [3.0, 4.0]]}),
        ("values", {"values": [[1.0, 1e39], [3.0, 4.0]]}),  # overflows float32
        ("values", {"dtype": "int16", "scale": 0.001, "values": [[40.0, 0.0], [0.0, 0.0]]}),
        ("values", {"dtype": "int16", "values": [[math.nan, 0.0], [0.0, 0.0]]}),
        ("label", {"label": ""}),
        ("label", {"label": "x" * 256}),
    ],
)
def test_encode_rejects_bad_input_naming_the_field(field, kwargs):
    spec = {
        "device_id": "pump-1",
        "seq": 0,
        "ts": 1.0,
        "sample_rate_hz": 100.0,
        "channels": ("x", "y"),
        "values": [[1.0, 2.0], [3.0, 4.0]],
    }
    with pytest.raises(CodecError) as info:
        encode_window(**{**spec, **kwargs})
    assert info.value.field == field


@given(windows())
@FUZZ
def test_window_to_json_is_json_ready(spec):
    assume(spec["label"] is None or spec["label"].isprintable())
    view = window_to_json(decode_window(encode_window(**spec)), with_values=True)
    assert view["samples"] == len(spec["values"])
    assert view["values"] == spec["values"]
    assert all(isinstance(v, float) for row in view["values"] for v in row)

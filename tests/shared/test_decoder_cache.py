"""WindowDecoder's descriptor cache: keyed without the label, bounded in bytes, decoding unchanged."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shared.codec import DESCRIPTOR_CACHE_MAX_BYTES, WindowDecoder, decode_window, encode_window
from shared.errors import CodecError


def window(
    device: str, seq: int, *, label: str | None, samples: int, channels: list[str], dtype: str
) -> bytes:
    rng = np.random.default_rng(seq)
    values = rng.normal(size=(samples, len(channels))).astype(np.float32)
    return encode_window(
        device_id=device,
        seq=seq,
        ts=1_700_000_000.0 + seq,
        sample_rate_hz=100.0,
        channels=channels,
        values=values,
        label=label,
        dtype=dtype,
        scale=0.01,
    )


def same(a: object, b: object) -> None:
    for name in ("device_id", "seq", "ts", "sample_rate_hz", "channels", "label"):
        assert getattr(a, name) == getattr(b, name), name
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))  # type: ignore[attr-defined]


def test_distinct_labels_and_shapes_stay_within_the_byte_cap_and_decode_correctly() -> None:
    cap = 32 * 1024
    decoder = WindowDecoder(cap)
    rand = random.Random(7)
    for seq in range(3000):
        n_channels = rand.randint(1, 6)
        payload = window(
            f"dev-{rand.randint(0, 40)}",
            seq,
            label=f"label-{seq}-" + "x" * rand.randint(0, 200),  # every window its own label
            samples=rand.randint(1, 64),
            channels=[f"ch{seq % 97}_{i}" for i in range(n_channels)],  # and many channel sets
            dtype=rand.choice(["float32", "int16"]),
        )
        same(decoder.decode(payload), decode_window(payload))
        assert decoder.cache_bytes <= cap
    assert decoder.evictions > 0  # the cap was reached: the least recently used went
    assert decoder.cache_entries > 0
    assert decoder.cache_bytes <= cap


def test_labels_are_not_part_of_the_key() -> None:
    decoder = WindowDecoder()
    channels = ["x", "y", "z"]
    for seq in range(500):
        payload = window("dev-1", seq, label=f"attack-{seq}", samples=16, channels=channels, dtype="float32")
        view = decoder.decode(payload)
        assert view.label == f"attack-{seq}"
    unlabelled = window("dev-1", 999, label=None, samples=16, channels=channels, dtype="float32")
    assert decoder.decode(unlabelled).label is None
    assert decoder.cache_entries == 2  # one descriptor with a label, one without: not 501
    assert decoder.evictions == 0


def test_a_cached_descriptor_still_gets_the_label_checked_like_decode_window() -> None:
    decoder = WindowDecoder()
    good = window("dev-1", 1, label="ok", samples=4, channels=["x"], dtype="float32")
    decoder.decode(good)  # caches the descriptor
    label_at = good.index(b"\x02ok")
    bad_utf8 = good[:label_at] + b"\x02\xff\xfe" + good[label_at + 3 :]
    empty = good[:label_at] + b"\x00" + good[label_at + 1 :]
    longer = good[:label_at] + b"\x03ok" + good[label_at + 3 :]  # the label eats a value byte
    for payload in (bad_utf8, empty, longer):
        with pytest.raises(CodecError) as hot:
            decoder.decode(payload)
        with pytest.raises(CodecError) as cold:
            decode_window(payload)
        assert str(hot.value) == str(cold.value)


def test_the_cache_is_an_lru_and_can_be_turned_off() -> None:
    payloads = [
        window(f"dev-{i}", i, label=None, samples=8, channels=["x"], dtype="float32") for i in range(3)
    ]
    probe = WindowDecoder()
    probe.decode(payloads[0])
    one = probe.cache_bytes
    decoder = WindowDecoder(2 * one)  # room for two of these descriptors
    decoder.decode(payloads[0])
    decoder.decode(payloads[1])
    decoder.decode(payloads[0])  # dev-0 is now the most recently used
    decoder.decode(payloads[2])  # evicts dev-1
    assert decoder.evictions == 1
    assert decoder.cache_entries == 2
    before = decoder.evictions
    decoder.decode(payloads[0])  # still cached: no eviction
    assert decoder.evictions == before
    off = WindowDecoder(0)
    for payload in payloads:
        same(off.decode(payload), decode_window(payload))
    assert (off.cache_entries, off.cache_bytes) == (0, 0)
    assert DESCRIPTOR_CACHE_MAX_BYTES >= 1024 * 1024

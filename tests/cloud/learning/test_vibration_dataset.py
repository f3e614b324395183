"""The cloud's vibration dataset: shape, balance, determinism, and the same physics as the agent's
streaming simulator."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.learning.vibration_dataset import generate_dataset
from device_agent.sensors.vibration import CLASS_NAMES, VibrationSimulator


def test_generate_dataset_shape_balance_and_speed():
    x, y = generate_dataset(400, window=100, rate_hz=100.0, drift=0.0, seed=0)
    assert x.shape == (400, 100, 3)
    assert x.dtype == np.float32
    assert y.dtype == np.int64
    assert np.bincount(y).tolist() == [100] * 4
    assert np.isfinite(x).all()
    x2, y2 = generate_dataset(400, seed=0)
    assert np.array_equal(x, x2)
    assert np.array_equal(y, y2)
    _, ys = generate_dataset(10, classes=("normal", "bearing_fault"), seed=1)
    assert set(ys.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="unknown class"):
        generate_dataset(10, classes=("normal", "nope"))


def test_generate_dataset_matches_simulator_statistics():
    """Same physics: per-class RMS of the dataset and of the streaming simulator agree."""
    x, y = generate_dataset(800, seed=5, rpm_spread=0.0, severity_range=(0.8, 0.8))
    for index, name in enumerate(CLASS_NAMES):
        sim = VibrationSimulator(rate_hz=100, rpm=450, gain=1, noise=0.03, drift=0, seed=11)
        if name != "normal":
            sim.set_fault(name, 0.8)
        sim.read(100)
        stream = np.asarray(sim.read(20_000))
        rms_stream = (stream - stream.mean(0)).std(0)
        windows = x[y == index]
        rms_data = (windows - windows.mean(1, keepdims=True)).std(1).mean(0)
        assert np.allclose(rms_stream, rms_data, rtol=0.35), (name, rms_stream, rms_data)

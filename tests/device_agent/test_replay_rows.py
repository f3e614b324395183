"""The replay sensor's rows: each window one dataset row (row boundaries kept across gaps and file
switches), and rows of unequal length refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_agent.errors import SensorError
from device_agent.sensors import create_sensor

CLASS_NAMES = ["normal", "imbalance", "misalignment", "bearing_fault"]


def test_replay_rows_align_with_windows_and_switch_files_at_a_row_boundary(tmp_path: Path):
    x = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)
    path = tmp_path / "rows.npz"
    np.savez(path, X=x, y=np.array([0, 1, 2]), class_names=np.array(CLASS_NAMES[:3]))
    sensor = create_sensor("replay", {"path": str(path)}, rate_hz=100)
    assert sensor.row_length == 4
    assert sensor.read(4) == [tuple(map(float, r)) for r in x[0]]
    assert sensor.label == CLASS_NAMES[0]
    # A gap mid-row (the agent dropped a partial window): the next read starts the next row.
    sensor.read(1)
    sensor.realign()
    assert sensor.read(4) == [tuple(map(float, r)) for r in x[2]]
    assert sensor.label == CLASS_NAMES[2]
    # A new file takes over at the next row boundary, never mid-row.
    other = tmp_path / "other.npz"
    np.savez(other, X=-x, y=np.array([2, 2, 2]), class_names=np.array(CLASS_NAMES[:3]))
    sensor.read(2)
    sensor.update_options({"path": str(other)})
    assert sensor.read(2) == [tuple(map(float, r)) for r in x[0][2:]]
    assert sensor.read(4) == [tuple(map(float, r)) for r in -x[0]]
    assert sensor.label == CLASS_NAMES[2]


def test_replay_refuses_nan_padded_rows(tmp_path: Path):
    x = np.zeros((2, 4, 1), dtype=np.float32)
    x[1, 3:] = np.nan
    path = tmp_path / "unequal.npz"
    np.savez(path, X=x, y=np.array([0, 1]))
    with pytest.raises(SensorError, match="unequal length is not supported"):
        create_sensor("replay", {"path": str(path)}, rate_hz=10)


def test_replay_once_plays_every_row_then_nothing(tmp_path: Path):
    x = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)
    path = tmp_path / "once.npz"
    np.savez(path, X=x, y=np.array([1, 0]))
    sensor = create_sensor("replay", {"path": str(path), "loop": False}, rate_hz=10)
    assert sensor.read(3) == [(0.0,), (1.0,), (2.0,)]
    assert sensor.label == "1"
    assert sensor.read(3) == [(3.0,), (4.0,), (5.0,)]
    assert sensor.read(3) == []
    assert sensor.stats()["finished"] == 1

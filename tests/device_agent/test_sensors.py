"""Sensors of the device agent: the vibration physics, replay, command, the registry."""

from __future__ import annotations

import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.errors import CommandError, SensorError
from device_agent.sensors import SENSORS, Sensor, SensorOptions, create_sensor, register_sensor
from device_agent.sensors.vibration import (
    BPFI_ORDER,
    BPFO_ORDER,
    CHANNELS,
    CLASS_NAMES,
    DEFAULT_RPM,
    VibrationSimulator,
)


def spectrum(
    rows: list[tuple[float, ...]] | np.ndarray, axis: int, rate: float = 100.0
) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(rows, dtype=np.float64)[:, axis]
    x = x - x.mean()
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x)))) / len(x)
    return np.fft.rfftfreq(len(x), 1.0 / rate), mag


def band(freqs: np.ndarray, mag: np.ndarray, center: float, width: float = 0.6) -> float:
    return float(mag[(freqs > center - width) & (freqs < center + width)].max())


def test_default_frequencies_fit_under_nyquist():
    shaft = DEFAULT_RPM / 60.0
    assert 3 * shaft < 50
    assert shaft * BPFO_ORDER < 50
    assert shaft * BPFI_ORDER * 1.1 < 50  # even at +10 % rpm


def test_simulator_classes_have_their_signatures():
    shaft = DEFAULT_RPM / 60.0
    n = 4096

    def run(fault: str | None) -> list[tuple[float, float, float]]:
        sim = VibrationSimulator(rate_hz=100, rpm=DEFAULT_RPM, gain=1, noise=0.03, drift=0, seed=7)
        if fault:
            sim.set_fault(fault, 0.8)
        assert sim.label == (fault or "normal")
        return sim.read(n)

    normal, imbalance, misalign, bearing = (
        run(None),
        run("imbalance"),
        run("misalignment"),
        run("bearing_fault"),
    )
    f, m_norm = spectrum(normal, 0)
    _, m_imb = spectrum(imbalance, 0)
    assert band(f, m_imb, shaft) > 4 * band(f, m_norm, shaft)  # imbalance: strong 1x radial
    _, mz_norm = spectrum(normal, 2)
    _, mz_mis = spectrum(misalign, 2)
    _, mx_mis = spectrum(misalign, 0)
    _, mx_norm = spectrum(normal, 0)
    assert band(f, mz_mis, 2 * shaft) > 5 * band(f, mz_norm, 2 * shaft)  # misalignment: axial 2x
    assert band(f, mx_mis, 2 * shaft) > 5 * band(f, mx_norm, 2 * shaft)  # ... and radial 2x
    _, mb = spectrum(bearing, 0)
    bpfo = shaft * BPFO_ORDER
    assert band(f, mb, bpfo) > 4 * band(f, m_norm, bpfo)  # bearing: the outer-race defect frequency
    assert max(abs(v) for row in normal for v in row) < 3  # plausible g levels
    assert abs(np.mean(np.asarray(normal)[:, 2]) - 1.0) < 0.05  # gravity on z


def test_simulator_stream_is_continuous_and_seeded():
    a = VibrationSimulator(rate_hz=100, rpm=450, gain=1, noise=0.03, drift=0, seed=3)
    b = VibrationSimulator(rate_hz=100, rpm=450, gain=1, noise=0.03, drift=0, seed=3)
    whole = a.read(100)
    parts = b.read(37) + b.read(63)
    assert np.allclose(whole, parts)
    assert all(len(row) == len(CHANNELS) for row in whole)


def test_simulator_fault_commands_and_drift():
    sim = VibrationSimulator(rate_hz=100, rpm=450, gain=1, noise=0.03, drift=0, seed=1)
    sim.set_fault("imbalance", 0.5)
    assert (sim.fault, sim.severity, sim.label) == ("imbalance", 0.5, "imbalance")
    sim.clear_fault()
    assert (sim.fault, sim.label) == (None, "normal")
    with pytest.raises(ValueError, match="unknown class"):
        sim.set_fault("melted", 1.0)
    with pytest.raises(ValueError, match="drift"):
        sim.drift = 1.5
    before = np.asarray(sim.read(2000))
    sim.drift = 1.0
    after = np.asarray(sim.read(2000))
    assert abs(after[:, 0].mean()) > abs(before[:, 0].mean()) + 0.2  # tilted mount: gravity leaks into x


def test_registry_and_options_validation(tmp_path: Path):
    assert {"simulated", "replay", "command"} <= set(SENSORS)
    with pytest.raises(SensorError, match="unknown sensor kind 'nope'"):
        create_sensor("nope", {}, rate_hz=100)
    with pytest.raises(SensorError, match="rmp"):
        create_sensor("simulated", {"rmp": 100}, rate_hz=100)
    sensor = create_sensor("simulated", {"seed": 1, "fault": "misalignment"}, rate_hz=100)
    assert sensor.label == "misalignment"
    assert len(sensor.read(5)) == 5
    sensor.update_options({"drift": 0.4})
    with pytest.raises(CommandError, match="drift"):
        sensor.update_options({"drift": 4})

    class ConstantOptions(SensorOptions):
        value: float = 1.0

    @register_sensor("test-constant")
    class Constant(Sensor):
        Options = ConstantOptions

        @property
        def channels(self) -> tuple[str, ...]:
            return ("v",)

        def read(self, n_samples: int) -> list[tuple[float, ...]]:
            assert isinstance(self.options, ConstantOptions)
            return [(self.options.value,)] * n_samples

    try:
        const = create_sensor("test-constant", {"value": 2.5}, rate_hz=10)
        assert const.read(2) == [(2.5,), (2.5,)]
        with pytest.raises(CommandError, match="does not simulate faults"):
            const.inject_fault("imbalance", 1.0)
    finally:
        SENSORS.pop("test-constant")


def test_replay_npz_loops_with_labels(tmp_path: Path):
    x = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    path = tmp_path / "d.npz"
    np.savez(path, X=x, y=np.array([0, 3]), class_names=np.array(CLASS_NAMES))
    sensor = create_sensor("replay", {"path": str(path)}, rate_hz=100)
    assert sensor.channels == ("c0", "c1", "c2")
    first = sensor.read(4)
    assert first == [tuple(map(float, r)) for r in x[0]]
    assert sensor.label == "normal"
    assert sensor.read(4)[0] == tuple(map(float, x[1, 0]))
    assert sensor.label == "bearing_fault"
    assert sensor.read(3) == [tuple(map(float, r)) for r in x[0, :3]]  # looped
    assert sensor.stats()["loops"] == 1
    with pytest.raises(CommandError):
        sensor.inject_fault("imbalance", 1.0)


def test_replay_csv_with_header_and_label(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text("ax,ay,label\n1,2,normal\n3,4,imbalance\n5,6,imbalance\n")
    sensor = create_sensor("replay", {"path": str(path)}, rate_hz=10)
    assert sensor.channels == ("ax", "ay")
    assert sensor.read(2) == [(1.0, 2.0), (3.0, 4.0)]
    assert sensor.label == "imbalance"
    assert sensor.read(2) == [(5.0, 6.0), (1.0, 2.0)]
    assert sensor.label == "normal"
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3,x\n")
    with pytest.raises(SensorError, match="row 2"):
        create_sensor("replay", {"path": str(bad)}, rate_hz=10)
    with pytest.raises(SensorError, match="does not exist"):
        create_sensor("replay", {"path": str(tmp_path / "missing.csv")}, rate_hz=10)


def test_command_sensor_parses_counts_bad_lines_and_restarts(tmp_path: Path):
    script = tmp_path / "emit.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            print("1.5 2.5 3.5")
            print("4,5,6")
            print("not numbers")
            print("7 8")
            print("9;10;11")
            sys.stdout.flush()
            """
        )
    )
    sensor = create_sensor(
        "command",
        {"argv": [sys.executable, str(script)], "channels": ["a", "b", "c"], "restart_delay_s": 0.1},
        rate_hz=10,
    )
    try:
        assert sensor.channels == ("a", "b", "c")
        rows: list[tuple[float, ...]] = []
        deadline = time.monotonic() + 20
        while len(rows) < 6 and time.monotonic() < deadline:  # two runs of the program
            rows += sensor.read(100)
            time.sleep(0.05)
        assert rows[:3] == [(1.5, 2.5, 3.5), (4.0, 5.0, 6.0), (9.0, 10.0, 11.0)]
        stats = sensor.stats()
        assert stats["bad_lines"] >= 2
        assert stats["starts"] >= 2  # it exited and was started again
        assert all(math.isfinite(v) for r in rows for v in r)
    finally:
        sensor.close()

"""``edgefleet agent run`` refuses bad settings with a message naming the field (no broker needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.settings import AgentSettings, load_settings

REPO = Path(__file__).resolve().parents[2]


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_agent", "run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )


def test_bad_sensor_option_is_named(tmp_path: Path):
    out = run_agent(
        "--device-id", "d1", "--broker", "mqtt://127.0.0.1:1", "--sensor", "simulated",
        "-o", "rmp=300", "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 2
    assert "rmp" in out.stderr
    assert "Extra inputs are not permitted" in out.stderr


def test_unknown_sensor_and_missing_config(tmp_path: Path):
    out = run_agent("--device-id", "d1", "--sensor", "thermometer", "--data-dir", str(tmp_path))
    assert out.returncode == 2
    assert "unknown sensor kind 'thermometer'" in out.stderr
    out = run_agent("--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr


def test_invalid_device_id_and_rate(tmp_path: Path):
    out = run_agent("--device-id", "bad id!", "--data-dir", str(tmp_path))
    assert out.returncode == 2
    assert "device_id" in out.stderr
    out = run_agent("--device-id", "d1", "--rate", "-3", "--data-dir", str(tmp_path))
    assert out.returncode == 2
    assert "rate_hz" in out.stderr


def test_example_config_is_valid():
    settings = load_settings(AgentSettings, REPO / "examples" / "agent.yaml")
    assert settings.device_id == "press-07"
    assert settings.sensor.kind == "simulated"

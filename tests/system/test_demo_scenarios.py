"""``edgefleet demo --scenario NAME``: each fault-injection scenario on the real topology (mosquitto,
redis-server, cloud ingest, 2 edge nodes, 6 simulated device processes) must exit 0 with nothing
lost uncounted and service back after the heal. The first model is trained once, by the first
scenario, in a data dir shared by the whole module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloud.demo.runner import SCENARIO_NAMES
from cloud.demo.scenarios import FLOOD_COUNT
from shared.private_broker import mosquitto_binary
from tests.system.test_demo import _leftovers

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]

SCENARIO_TIMEOUT_S = 600  # the first one trains the first model too


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scenarios") / "demo"


def _run(data_dir: Path, scenario: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "demo",
            "--headless",
            "--json",
            "--scenario",
            scenario,
            "--devices",
            "6",
            "--edges",
            "2",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT_S - 30,
        check=False,
    )
    try:
        summary = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON summary (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return done, summary


def _check_specific(name: str, s: dict[str, Any], windows: dict[str, int]) -> None:
    details, processed = s["details"], s["processed"]
    if name == "edge-kill":
        assert details["exit_code"] == -9, s
        assert processed["during_fault_as_reported"] > 0, s  # the other edge kept deciding
    elif name == "broker-restart":
        assert details["broker_exit_code"] == 0, s
    elif name == "cloud-partition":
        assert details["connections_refused_while_cut"] > 0, s
        assert details["samples_in_registry_at_end"] > details["samples_in_registry_at_heal"], s
        assert details["decisions_received_by_cloud_side"] >= details["decisions_made_by_edges"], s
    elif name == "device-offline":
        assert details["windows_made_while_offline_approx"] > 0, s
        assert details["outbox_depth_at_recovery"] == 0, s
        assert processed["during_fault_as_reported"] > 0, s  # the other devices went on
    elif name == "bad-model":
        for kind in ("corrupt_artifact", "unsigned"):
            assert set(details[kind]["rejected_by"]) == {"edge-1", "edge-2"}, s
        assert processed["during_fault_as_reported"] > 0, s  # the old model kept serving
    elif name == "malformed-flood":
        assert details["dead_letters_counted"] == FLOOD_COUNT, s
        assert windows["dead_letters"] == FLOOD_COUNT, s
        assert processed["during_fault_as_reported"] > 0, s


@pytest.mark.timeout(SCENARIO_TIMEOUT_S)
@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_scenario_loses_nothing_uncounted_and_recovers(data_dir: Path, name: str) -> None:
    done, summary = _run(data_dir, name)
    scenario, windows = summary["scenario"], summary["windows"]
    assert done.returncode == 0, (scenario["problems"], windows, done.stderr[-3000:])
    assert scenario["name"] == name
    assert scenario["ok"], scenario["problems"]
    assert windows["lost"] == 0, summary
    assert windows["sent"] > 0
    assert (
        windows["processed"] + windows["pending_on_devices"] + windows["dropped_counted_on_devices"]
        == windows["sent"]
    ), summary
    assert scenario["seconds_to_recover"] is not None, summary
    assert scenario["processed"]["after_heal"] > 0, summary
    assert set(summary["models"]["final_per_edge"].values()) == {summary["models"]["first"]}
    _check_specific(name, scenario, windows)
    assert _leftovers(data_dir) == []

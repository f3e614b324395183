"""``edgefleet edge run`` as a real process: starts, serves, reports status, stops on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from shared.schemas import Decision, EdgeStatus, OnlineState
from shared.topics import EdgeTopic, Topics
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    FakeDevice,
    Wire,
    edge_models_fixture,  # noqa: F401  (fixture)
    wait_for,
)

TOPICS = Topics()


def test_edge_run_from_options_and_config_file(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {name: any, class: class_0, min_probability: 0.0, command: {name: ping}}\n")
    config = tmp_path / "edge.yaml"
    config.write_text(json.dumps({"edge_id": "edge-cli", "batching": {"workers": 1}, "metrics": {"port": 0}}))
    status_topic = TOPICS.edge("edge-cli", EdgeTopic.STATUS)
    ops = Wire(mosquitto.url, "ops", [status_topic, TOPICS.edge("edge-cli", EdgeTopic.DECISION)])
    device = FakeDevice(mosquitto.url, "dev-1")
    log = (tmp_path / "edge.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "edge",
            "run",
            "--config",
            str(config),
            "--broker",
            mosquitto.url,
            "--model",
            str(edge_models["float32"]),  # no manifest: class_0..3
            "--rules",
            str(rules),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=log,
        stderr=log,
    )
    try:

        def online() -> bool:
            return any(
                EdgeStatus.model_validate_json(p).state is OnlineState.ONLINE for p in ops.on("/status")
            )

        wait_for(online, "the retained online status")
        device.send(1)
        decision = wait_for(lambda: ops.decoded("/decision", Decision), "a decision")[0]
        assert decision.class_name == "class_0"
        assert decision.model_version is not None
        assert decision.model_version.startswith("local-")
        wait_for(lambda: device.commands, "the command at the device")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.close()
    assert code == 0, (tmp_path / "edge.log").read_text()[-2000:]
    last = EdgeStatus.model_validate_json(wait_for(lambda: ops.on("/status")[-1:], "the final status")[0])
    wait_for(
        lambda: EdgeStatus.model_validate_json(ops.on("/status")[-1]).state is OnlineState.OFFLINE,
        "the offline status on shutdown",
    )
    assert last.edge_id == "edge-cli"
    ops.close()
    device.close()


def test_edge_run_rejects_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "edge.yaml"
    config.write_text("edge_id: e1\nbatching: {max_batch: 0}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "edge", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "batching.max_batch" in proc.stderr

"""docker-compose.yml and its smoke override: valid for Debian's docker-compose, and consistent with
the per-tier config files, the ACL and the smoke checker (running the topology is scripts/compose-smoke)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_node.rules import load_rules
from shared.settings import AgentSettings, EdgeSettings, load_settings
from shared.settings.cloud import CloudSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SMOKE = ROOT / "docker-compose.smoke.yml"
CONFIG = ROOT / "deploy" / "config"
SERVICES = {
    "mosquitto",
    "redis",
    "postgres",
    "cloud-bootstrap",
    "cloud-artifacts",
    "cloud-worker",
    "cloud-beat",
    "cloud-ingest",
    "cloud-api",
    "flower",
    "edge-node-1",
    "edge-node-2",
    "device-agent",
}


def _compose(*files: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/setup installs Debian's)")
    args = [exe]
    for f in files:
        args += ["-f", str(f)]
    return subprocess.run(
        [*args, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def _merged(*files: Path) -> dict[str, Any]:
    result = _compose(*files)
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


def test_compose_file_validates() -> None:
    result = _compose(COMPOSE)
    assert result.returncode == 0, result.stderr


def test_smoke_override_validates_and_adds_the_checker() -> None:
    services = _merged(COMPOSE, SMOKE)["services"]
    assert set(services) == SERVICES | {"smoke"}
    assert services["smoke"]["command"][-1] == "/etc/edgefleet/smoke/check.py"
    assert services["smoke"]["environment"]["SMOKE_CONSOLE_URL"] == "http://cloud-api:8080/signin"


def test_every_service_waits_for_healthy_dependencies() -> None:
    services = _merged(COMPOSE)["services"]
    assert set(services) == SERVICES
    for name in (
        "mosquitto",
        "redis",
        "postgres",
        "cloud-artifacts",
        "cloud-api",
        "edge-node-1",
        "edge-node-2",
    ):
        assert "healthcheck" in services[name], name
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            condition = spec["condition"]
            if "healthcheck" in services[dep]:
                assert condition == "service_healthy", (name, dep)
            elif dep == "cloud-bootstrap":
                assert condition == "service_completed_successfully", (name, dep)


def test_console_is_published_on_this_host_only() -> None:
    services = _merged(COMPOSE)["services"]
    api = services["cloud-api"]
    assert api["command"][-7:] == [
        "api",
        "--config",
        "/etc/edgefleet/config/cloud.yaml",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
    ]
    assert api["environment"] == services["cloud-worker"]["environment"]  # the same registry
    assert [str(p).removesuffix("/tcp") for p in api["ports"]] == ["127.0.0.1:8080:8080"]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    # Nothing of the topology is published beyond loopback.
    for name, service in services.items():
        for port in service.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_edges_split_devices_and_have_distinct_ids() -> None:
    services = _merged(COMPOSE)["services"]
    ids = {services[name]["environment"]["EDGEFLEET_EDGE_ID"] for name in ("edge-node-1", "edge-node-2")}
    assert ids == {"edge-1", "edge-2"}
    assert set(services["mosquitto"]["environment"]["MQTT_EDGE_USERS"].split()) == ids
    assert set(services["cloud-bootstrap"]["environment"]["EDGEFLEET_BOOTSTRAP_EDGES"].split()) == ids


def test_tier_config_files_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_DEVICE_ID", "dev-abc123")
    agent = load_settings(AgentSettings, CONFIG / "agent.yaml")
    assert agent.broker.address.host == "mosquitto"
    monkeypatch.setenv("EDGEFLEET_EDGE_ID", "edge-1")
    edge = load_settings(EdgeSettings, CONFIG / "edge.yaml")
    assert edge.share_group
    cloud = load_settings(CloudSettings, CONFIG / "cloud.yaml")
    assert cloud.artifact_base_url == "http://cloud-artifacts:8765"
    assert edge.rules_file is not None
    rules = load_rules(CONFIG / edge.rules_file.name)
    assert any(r.command is not None for r in rules)


def test_acl_confines_devices_to_their_own_topics() -> None:
    acl = (ROOT / "deploy" / "mosquitto" / "acl.template").read_text()
    patterns = [line.split() for line in acl.splitlines() if line.startswith("pattern ")]
    assert patterns
    for _, _access, topic in patterns:
        assert "%u" in topic, topic
    assert "allow_anonymous false" in (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()

"""docker-compose.yml and its smoke override: valid for Debian's docker-compose, consistent with the
per-tier config files and the smoke checker, and the trust rules of the topology (issue 11): networks
per service, no default secrets, Redis and Flower authenticated, identities from the registry (no
self-registration). Running the topology is scripts/compose-smoke."""

from __future__ import annotations

import os
import shutil
import stat
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
CLOUD_SERVICES = {"cloud-bootstrap", "cloud-worker", "cloud-beat", "cloud-ingest", "cloud-api"}
REQUIRED_SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_PASSWORD")
# Values the tests give the required variables; never a real deployment's.
TEST_SECRETS = {
    "POSTGRES_PASSWORD": "pg-test-secret",
    "REDIS_PASSWORD": "redis-test-secret",
    "FLOWER_PASSWORD": "fl-test",
}
DEV_DEFAULT = "edgefleet-dev-only"


def _compose(
    *files: Path, env: dict[str, str] | None = None, env_file: Path
) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/setup installs Debian's)")
    args = [exe, "--env-file", str(env_file)]  # never the checkout's own .env
    for f in files:
        args += ["-f", str(f)]
    base = {k: v for k, v in os.environ.items() if k not in REQUIRED_SECRETS and k != "FLOWER_USER"}
    return subprocess.run(
        [*args, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**base, **(TEST_SECRETS if env is None else env)},
    )


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def merged(empty_env_file: Path) -> dict[str, Any]:
    return _merged(COMPOSE, env_file=empty_env_file)


def _merged(*files: Path, env_file: Path) -> dict[str, Any]:
    result = _compose(*files, env_file=env_file)
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


def _raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _networks(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks") or {}
    return set(networks)


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    """Named volumes of a service: volume name -> 'target[:ro]'."""
    found: dict[str, str] = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            if entry.get("type") == "volume":
                found[entry["source"]] = entry["target"] + (":ro" if entry.get("read_only") else "")
            continue
        source, _, rest = str(entry).partition(":")
        if not source.startswith((".", "/")):
            found[source] = rest.removesuffix(":rw")
    return found


def test_compose_file_validates(empty_env_file: Path) -> None:
    result = _compose(COMPOSE, env_file=empty_env_file)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", REQUIRED_SECRETS)
def test_every_secret_is_required_and_has_no_default(missing: str, empty_env_file: Path) -> None:
    env = {k: v for k, v in TEST_SECRETS.items() if k != missing}
    result = _compose(COMPOSE, env=env, env_file=empty_env_file)
    assert result.returncode != 0
    assert f"set {missing} (run scripts/compose-env)" in result.stderr


def test_no_default_password_is_left_anywhere() -> None:
    text = COMPOSE.read_text() + SMOKE.read_text()
    assert DEV_DEFAULT not in text
    for name in REQUIRED_SECRETS:
        assert f"${{{name}:-" not in text, name  # a default would be ":-"
    for name in ("MQTT_DEVICE_PASSWORD", "MQTT_EDGE_PASSWORD", "MQTT_CLOUD_PASSWORD", "MQTT_OPS_PASSWORD"):
        assert name not in text, name  # MQTT identities come from the registry, not shared passwords


def test_smoke_override_validates_and_adds_the_checker(empty_env_file: Path) -> None:
    services = _merged(COMPOSE, SMOKE, env_file=empty_env_file)["services"]
    assert set(services) == SERVICES | {"smoke", "isolation"}
    smoke = services["smoke"]
    assert smoke["command"][-1] == "/etc/edgefleet/smoke/check.py"
    assert smoke["environment"]["SMOKE_CONSOLE_URL"] == "http://cloud-api:8080/signin"
    assert smoke["environment"]["SMOKE_DOCS_URL"] == "http://cloud-api:8080/openapi.json"
    assert "SMOKE_PASSWORD" not in smoke["environment"]
    assert _volumes(smoke)["ops-identity"] == "/var/lib/edgefleet/identity:ro"
    assert smoke["depends_on"]["isolation"]["condition"] == "service_completed_successfully"
    isolation = services["isolation"]
    assert _networks(isolation) == {"devices"}  # probes from where a device stands
    command = isolation["command"]
    reach = command[command.index("--reach") + 1 : command.index("--unreachable")]
    assert reach == ["mosquitto:1883"]
    unreachable = {target.split(":")[0] for target in command[command.index("--unreachable") + 1 :]}
    assert {
        "postgres",
        "redis",
        "cloud-artifacts",
        "cloud-api",
        "flower",
        "edge-node-1",
        "edge-node-2",
    } <= unreachable


def test_every_service_waits_for_healthy_dependencies(merged: dict[str, Any]) -> None:
    services = merged["services"]
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


def test_networks_confine_each_tier() -> None:
    raw = _raw()
    services = raw["services"]
    networks = raw["networks"]
    for name in ("devices", "edges", "cloud"):
        assert networks[name]["internal"] is True, name  # no route out
    assert not (networks.get("frontend") or {}).get("internal")  # carries the published ports only
    expected = {
        "device-agent": {"devices"},
        "edge-node-1": {"edges"},
        "edge-node-2": {"edges"},
        "mosquitto": {"devices", "edges", "cloud", "frontend"},
        "cloud-artifacts": {"cloud", "edges"},
        "postgres": {"cloud"},
        "redis": {"cloud"},
        "cloud-bootstrap": {"cloud"},
        "cloud-worker": {"cloud"},
        "cloud-beat": {"cloud"},
        "cloud-ingest": {"cloud"},
        "cloud-api": {"cloud", "frontend"},
        "flower": {"cloud", "frontend"},
    }
    anchor = raw["x-cloud"]["networks"]
    for name, want in expected.items():
        got = _networks(services[name]) or set(anchor if name in CLOUD_SERVICES else [])
        assert got == want, name
    # Who shares a network with whom: devices see only the broker; edges the broker and the artifacts.
    members: dict[str, set[str]] = {}
    for name, want in expected.items():
        for network in want:
            members.setdefault(network, set()).add(name)
    assert members["devices"] == {"device-agent", "mosquitto"}
    assert members["edges"] == {"edge-node-1", "edge-node-2", "mosquitto", "cloud-artifacts"}
    assert {"postgres", "redis"} & (members["devices"] | members["edges"] | members["frontend"]) == set()
    # Only what has a published port is on the frontend network.
    assert members["frontend"] == {name for name, s in services.items() if s.get("ports")}


def test_published_ports_are_on_this_host_only(merged: dict[str, Any]) -> None:
    services = merged["services"]
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
    published = set()
    for name, service in services.items():
        for port in service.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), (name, port)
            published.add(name)
    assert published == {"mosquitto", "cloud-api", "flower"}


def test_postgres_and_the_cloud_use_the_required_password(merged: dict[str, Any]) -> None:
    services = merged["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == TEST_SECRETS["POSTGRES_PASSWORD"]
    url = f"postgresql+psycopg2://edgefleet:{TEST_SECRETS['POSTGRES_PASSWORD']}@postgres:5432/edgefleet"
    for name in (*CLOUD_SERVICES, "cloud-artifacts", "mosquitto"):
        assert services[name]["environment"]["EDGEFLEET_DATABASE_URL"] == url, name


def test_redis_requires_its_password_and_celery_carries_it_in_the_environment(merged: dict[str, Any]) -> None:
    services = merged["services"]
    redis = services["redis"]
    assert redis["environment"]["REDIS_PASSWORD"] == TEST_SECRETS["REDIS_PASSWORD"]
    script = " ".join(redis["command"])
    assert "requirepass" in script
    assert TEST_SECRETS["REDIS_PASSWORD"] not in script  # read from the environment, not the command line
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])  # the healthcheck logs in too
    url = f"redis://:{TEST_SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    for name in ("cloud-worker", "cloud-beat", "cloud-ingest", "cloud-api", "cloud-bootstrap"):
        assert services[name]["environment"]["EDGEFLEET_REDIS_URL"] == url, name
    flower = services["flower"]
    assert flower["environment"]["CELERY_BROKER_URL"] == url
    for name, service in services.items():  # no URL with a password on any command line
        assert "redis://" not in " ".join(map(str, service.get("command") or [])), name


def test_flower_needs_basic_auth(merged: dict[str, Any]) -> None:
    flower = merged["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == f"admin:{TEST_SECRETS['FLOWER_PASSWORD']}"
    assert not any("basic" in str(part).lower() for part in flower["command"])  # not on the command line


def test_the_broker_follows_the_registry_and_devices_do_not_register_themselves(
    merged: dict[str, Any],
) -> None:
    services = merged["services"]
    mosquitto = services["mosquitto"]
    assert mosquitto["image"] == "edgefleet-cloud:dev"  # `edgefleet broker run`: Debian's mosquitto inside
    assert mosquitto["command"][-1] == "/etc/edgefleet/bin/broker-start"
    start = (ROOT / "deploy" / "bin" / "broker-start").read_text()
    assert "edgefleet broker run" in start
    assert "--port 1883 --cloud-port 1884" in start
    assert "broker-health" in " ".join(mosquitto["healthcheck"]["test"])
    text = COMPOSE.read_text() + SMOKE.read_text()
    assert "registrations" not in text
    assert not (ROOT / "deploy" / "mosquitto").exists()  # the generated password file and ACL are gone
    entrypoint = (ROOT / "deploy" / "bin" / "agent-entrypoint").read_text()
    assert "registrations" not in entrypoint
    assert "EDGEFLEET_BROKER__PASSWORD" not in text
    # A device gets a one-time claim token from the pool, nothing else of anyone's.
    device = services["device-agent"]
    assert _volumes(device) == {"device-tokens": "/var/lib/edgefleet/device-tokens"}
    assert "EDGEFLEET_CLAIM_TOKEN_FILE" in entrypoint
    assert 'mv "$candidate" "$mine"' in entrypoint  # taken by an atomic rename


def test_each_identity_bundle_reaches_only_its_owner(merged: dict[str, Any]) -> None:
    services = merged["services"]
    holders: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        for volume, target in _volumes(service).items():
            if volume.endswith("-identity"):
                holders.setdefault(volume, {})[name] = target
    writer = "cloud-bootstrap"
    assert holders["edge-1-identity"] == {
        writer: "/var/lib/edgefleet/identities/edge-1",
        "edge-node-1": "/var/lib/edgefleet/identity:ro",
    }
    assert holders["edge-2-identity"] == {
        writer: "/var/lib/edgefleet/identities/edge-2",
        "edge-node-2": "/var/lib/edgefleet/identity:ro",
    }
    cloud = holders["cloud-identity"]
    assert cloud.pop(writer) == "/var/lib/edgefleet/identity"
    assert set(cloud) == {"cloud-worker", "cloud-beat", "cloud-ingest", "cloud-api"}
    assert set(cloud.values()) == {"/var/lib/edgefleet/identity:ro"}
    assert holders["ops-identity"] == {writer: "/var/lib/edgefleet/ops"}  # + the smoke check (override)
    # The cloud services log in as the cloud service identity, through its bundle.
    for name in ("cloud-worker", "cloud-beat", "cloud-ingest", "cloud-api"):
        command = services[name]["command"]
        at = command.index("/etc/edgefleet/bin/with-identity")
        assert command[at + 1 : at + 3] == ["/var/lib/edgefleet/identity/cloud.json", "--"], name
    bootstrap = (ROOT / "deploy" / "bin" / "cloud-bootstrap").read_text()
    for enrolled in (
        "enroll_once cloud service",
        'enroll_once "$edge" edge',
        "enroll_once compose-ops operator",
    ):
        assert enrolled in bootstrap
    assert "edgefleet fleet enroll-token create" in bootstrap


def test_edges_split_devices_and_have_distinct_ids(merged: dict[str, Any]) -> None:
    services = merged["services"]
    ids = {services[name]["environment"]["EDGEFLEET_EDGE_ID"] for name in ("edge-node-1", "edge-node-2")}
    assert ids == {"edge-1", "edge-2"}
    for name in ("edge-node-1", "edge-node-2"):  # each logs in with its own bundle, from its own volume
        bundle = services[name]["environment"]["EDGEFLEET_ENROLLMENT_FILE"]
        assert bundle == "/var/lib/edgefleet/identity/enrollment.json"
        assert (
            _volumes(services[name])[f"{name.replace('-node', '')}-identity"]
            == "/var/lib/edgefleet/identity:ro"
        )
    assert set(services["cloud-bootstrap"]["environment"]["EDGEFLEET_BOOTSTRAP_EDGES"].split()) == ids


def test_tier_config_files_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_DEVICE_ID", "dev-abc123")
    agent = load_settings(AgentSettings, CONFIG / "agent.yaml")
    assert agent.broker.address.host == "mosquitto"
    monkeypatch.setenv("EDGEFLEET_EDGE_ID", "edge-1")
    edge = load_settings(EdgeSettings, CONFIG / "edge.yaml")
    assert edge.share_group
    assert edge.enrollment_file is None  # set per edge: compose and the demo give each edge its own bundle
    cloud = load_settings(CloudSettings, CONFIG / "cloud.yaml")
    assert cloud.artifact_base_url == "http://cloud-artifacts:8765"
    assert cloud.broker.address.port == 1884  # the broker's cloud listener
    assert cloud.enrollment.site_broker_url == "mqtt://mosquitto:1883"
    assert cloud.broker.password is None  # secrets come from the environment only
    assert cloud.redis_url == "redis://redis:6379/0"  # the password comes with EDGEFLEET_REDIS_URL
    assert edge.rules_file is not None
    rules = load_rules(CONFIG / edge.rules_file.name)
    assert any(r.command is not None for r in rules)


def test_compose_env_writes_random_private_secrets_once(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("POSTGRES_PASSWORD=kept\n")
    run = [str(ROOT / "scripts" / "compose-env"), str(env_file)]
    first = subprocess.run(run, capture_output=True, text=True, timeout=30, check=True)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert values["POSTGRES_PASSWORD"] == "kept"  # an existing value is never changed
    assert len(values["REDIS_PASSWORD"]) == 64
    assert values["REDIS_PASSWORD"] != values["FLOWER_PASSWORD"]
    assert values["REDIS_PASSWORD"] not in first.stdout + first.stderr  # only names are printed
    subprocess.run(run, capture_output=True, text=True, timeout=30, check=True)
    assert dict(line.split("=", 1) for line in env_file.read_text().splitlines()) == values

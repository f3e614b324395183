"""Settings: YAML < environment < overrides, and ConfigError messages that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import AgentSettings, MqttSettings, load_settings, parse_broker_url


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os  # noqa: PLC0415

    for key in list(os.environ):
        if key.startswith("EDGEFLEET_"):
            monkeypatch.delenv(key)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_yaml_then_env_then_overrides(tmp_path, monkeypatch):
    config = write(
        tmp_path / "agent.yaml",
        "device_id: from-yaml\nrate_hz: 50\nwindow: 64\n"
        "broker:\n  url: mqtt://yaml-host:1883\n  keepalive_s: 20\n",
    )
    only_yaml = load_settings(AgentSettings, config)
    assert (only_yaml.device_id, only_yaml.rate_hz, only_yaml.window) == ("from-yaml", 50, 64)
    assert only_yaml.broker.url == "mqtt://yaml-host:1883"

    monkeypatch.setenv("EDGEFLEET_RATE_HZ", "200")
    monkeypatch.setenv("EDGEFLEET_BROKER__URL", "mqtt://env-host:1884")
    with_env = load_settings(AgentSettings, config)
    assert with_env.rate_hz == 200
    assert with_env.broker.url == "mqtt://env-host:1884"
    assert with_env.broker.keepalive_s == 20  # nested fields merge across sources
    assert with_env.window == 64

    overridden = load_settings(AgentSettings, config, rate_hz=400, device_id="cli-id", window=None)
    assert (overridden.rate_hz, overridden.device_id) == (400, "cli-id")
    assert overridden.window == 64  # None overrides are ignored (an option not given)
    assert overridden.broker.url == "mqtt://env-host:1884"


def test_defaults_without_a_file():
    settings = load_settings(AgentSettings, device_id="d1")
    assert settings.broker.url == "mqtt://127.0.0.1:1883"
    assert settings.effective_hop == settings.window
    assert settings.broker.topics.telemetry("d1") == "ef/v1/dev/d1/telemetry"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist"):
        load_settings(AgentSettings, tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(AgentSettings, write(tmp_path / "a.yaml", "device_id: [unclosed\n"))


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(AgentSettings, write(tmp_path / "a.yaml", "- a\n- b\n"))


def test_invalid_values_name_the_file_and_every_field(tmp_path):
    config = write(tmp_path / "a.yaml", "device_id: bad/id\nrate_hz: -1\nbroker:\n  url: http://x\n")
    with pytest.raises(ConfigError) as info:
        load_settings(AgentSettings, config)
    text = str(info.value)
    assert "AgentSettings" in text
    assert str(config) in text
    assert "device_id" in text
    assert "rate_hz" in text
    assert "broker" in text


def test_unknown_keys_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="sensr"):
        load_settings(AgentSettings, write(tmp_path / "a.yaml", "device_id: d1\nsensr: {}\n"))
    with pytest.raises(ConfigError, match=r"broker\.port"):
        load_settings(AgentSettings, write(tmp_path / "b.yaml", "device_id: d1\nbroker:\n  port: 1\n"))


def test_bad_env_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("EDGEFLEET_WINDOW", "many")
    with pytest.raises(ConfigError, match="window"):
        load_settings(AgentSettings, device_id="d1")


def test_broker_urls():
    plain = parse_broker_url("mqtt://broker.local")
    assert (plain.host, plain.port, plain.tls, plain.username) == ("broker.local", 1883, False, None)
    tls = parse_broker_url("mqtts://u%40x:p%3As@10.0.0.1:9000")
    assert (tls.host, tls.port, tls.tls, tls.username, tls.password) == ("10.0.0.1", 9000, True, "u@x", "p:s")
    assert parse_broker_url("mqtts://h").port == 8883
    for bad, reason in (("http://h", "scheme"), ("mqtt://", "no host"), ("mqtt://h:99999", "port")):
        with pytest.raises(ConfigError, match=reason):
            parse_broker_url(bad)


def test_mqtt_settings_rules():
    settings = MqttSettings(url="mqtt://a:b@h:1", username="user", password="secret")
    assert settings.credentials() == ("user", "secret")
    assert MqttSettings(url="mqtt://a:b@h:1").credentials() == ("a", "b")
    assert "secret" not in repr(settings)
    assert MqttSettings(url="mqtt://h", tls_ca=Path("/ca.pem")).use_tls
    assert not MqttSettings(url="mqtt://h").use_tls
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        MqttSettings(tls_cert=Path("/c.pem"))
    with pytest.raises(ValueError, match="reconnect_max_s"):
        MqttSettings(reconnect_min_s=10, reconnect_max_s=1)
    with pytest.raises(ValueError, match="prefix"):
        MqttSettings(topic_prefix="bad/+")
    with pytest.raises(ValueError, match="extra"):
        MqttSettings(hostname="x")  # type: ignore[call-arg]

"""``edgefleet bench edge --security``: the secured brokers' config, and the whole matrix at tiny sizes
(keys and counts only, never timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edge_node.bench import (
    BROKER_MAX_INFLIGHT,
    BrokerAccess,
    bench_edge,
    broker_options,
    secured_config,
)
from shared.broker_auth import BrokerLayout, TlsFiles
from tests.support.edge_fixtures import edge_models_fixture  # noqa: F401  (fixture)

BENCH_TIMEOUT_S = 600


def test_secured_config_keeps_the_bench_settings_and_adds_the_broker_run_listener(tmp_path: Path) -> None:
    layout = BrokerLayout(data_dir=tmp_path, port=18999)
    lines = secured_config(layout, broker_options()).splitlines()
    assert lines[0] == "per_listener_settings true"  # before any security setting
    assert "allow_anonymous true" not in lines
    assert f"max_inflight_messages {BROKER_MAX_INFLIGHT}" in lines  # as the anonymous variant has it
    assert "set_tcp_nodelay true" in lines
    assert lines.count("listener 18999 127.0.0.1") == 1
    for line in (
        "allow_anonymous false",
        f"password_file {tmp_path.resolve() / 'passwd-site'}",
        f"acl_file {tmp_path.resolve() / 'acl-site'}",
        "use_username_as_clientid true",
    ):
        assert line in lines, line
    assert not any(line.startswith("certfile") for line in lines)
    tls = TlsFiles(cert=tmp_path / "s.crt", key=tmp_path / "s.key", ca=tmp_path / "ca.crt")
    tls_lines = secured_config(BrokerLayout(data_dir=tmp_path, port=18999, tls=tls), broker_options())
    assert f"certfile {(tmp_path / 's.crt').resolve()}" in tls_lines.splitlines()


def test_broker_access_logs_in_only_when_secured(tmp_path: Path) -> None:
    plain = BrokerAccess(1883)
    assert plain.settings("bench-pub").credentials() == (None, None)
    assert plain.broker_config("edge-1") == {"url": "mqtt://127.0.0.1:1883"}
    secured = BrokerAccess(8883, "tls", tmp_path / "ca.crt", {"edge-1": "s3cret"})
    assert secured.settings("edge-1").credentials() == ("edge-1", "s3cret")
    assert secured.settings("edge-1").use_tls
    assert secured.broker_config("edge-1", max_inflight=5) == {
        "url": "mqtts://127.0.0.1:8883",
        "username": "edge-1",
        "password": "s3cret",
        "tls_ca": str(tmp_path / "ca.crt"),
        "max_inflight": 5,
    }
    env = secured.subscriber_env("edge-1/site")
    assert env["BENCH_MQTT_USERNAME"] == "edge-1/site"
    assert env["BENCH_MQTT_PASSWORD"] == "s3cret"


def test_security_defaults_to_none() -> None:
    option = next(param for param in bench_edge.params if param.name == "security")
    assert option.default == "none"


def test_bench_edge_security_all_prints_every_variant(edge_models: dict[str, Path]) -> None:
    """Tiny sizes, one drain round: the anonymous figures at the top level as before, and
    ``security`` with none / auth / tls and the ratios."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "bench",
            "edge",
            "--seconds",
            "0.5",
            "--windows",
            "300",
            "--rounds",
            "1",
            "--security",
            "all",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("raw_broker_windows_per_s", "edge_windows_per_s", "latency_ms", "ratio_vs_raw", "rss_mb"):
        assert key in result, key
    security = result["security"]
    for variant in ("none", "auth", "tls"):
        figures = security[variant]
        assert figures["raw_broker_windows_per_s"] > 0
        assert figures["edge_windows_per_s"] > 0
        assert figures["latency_samples"] > 0
        assert set(figures["latency_ms"]) >= {"p50", "p90", "p99", "max"}
        assert figures["connect_ms"]["count"] > 0
        assert len(figures["drain_rounds"]["edge"]) == 1
    for ratio in ("auth_vs_none", "tls_vs_none"):
        assert set(security[ratio]) == {
            "raw_broker_windows_per_s",
            "edge_windows_per_s",
            "latency_p50",
            "latency_p99",
            "connect_ms_p50_added",
        }
    assert security["hash_iterations"] == 210_000

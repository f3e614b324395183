"""The fleet load generator: its MQTT client against a real mosquitto and a real edge node, and
``edgefleet bench fleet`` end to end (small and short: counts and keys, never timings)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from edge_node.fleet_bench import fleet_broker_options
from edge_node.loadgen import (
    device_ids,
    latency_summary,
    merge_results,
    parse_publish,
    publish_packet,
    read_packet,
    run_devices,
)
from edge_node.rules import RuleSpec
from shared.mqtt_packets import PUBLISH
from shared.private_broker import render_config
from tests.support.brokers import Mosquitto
from tests.support.edge_fixtures import (
    edge_models_fixture,  # noqa: F401  (fixture)
    edge_settings,
    running_node,
)

# A rule that fires on every window: each window comes back to its device as one command.
EVERY_WINDOW = RuleSpec.model_validate(
    {
        "name": "every-window",
        "class": "normal",
        "min_probability": 0.0,
        "severity": "info",
        "command": {"name": "ping"},
    }
)
BENCH_TIMEOUT_S = 240


def test_publish_packets_round_trip_through_the_reader() -> None:
    """Remaining lengths of 1, 2 and 3 bytes; topic, packet id and payload come back intact."""

    async def round_trip(payload: bytes) -> tuple[int, tuple[str, int | None, bytes]]:
        reader = asyncio.StreamReader()
        reader.feed_data(publish_packet("ef/v1/dev/d-1/cmd", payload, 513))
        reader.feed_eof()
        first, body = await read_packet(reader)
        return first, parse_publish(first, body)

    for size in (0, 100, 1_000, 20_000):
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        first, (topic, packet_id, got) = asyncio.run(round_trip(payload))
        assert first & 0xF0 == PUBLISH
        assert (topic, packet_id, got) == ("ef/v1/dev/d-1/cmd", 513, payload)


def test_every_window_of_fifty_devices_is_acked_and_decided_once(
    mosquitto: Mosquitto, edge_models: dict[str, Path], tmp_path: Path
) -> None:
    """50 devices on their own connections, one window each every 0.5 s for 3 s, against a real edge
    node with a rule that commands the device on every window: nothing lost, nothing twice."""
    settings = edge_settings(mosquitto.url, tmp_path / "edge", edge_models["int8"])
    ids = device_ids(50)
    with running_node(settings, rules=[EVERY_WINDOW]) as node:
        result = asyncio.run(
            run_devices(
                ids,
                list(range(len(ids))),
                len(ids),
                host="127.0.0.1",
                port=mosquitto.port,
                period=0.5,
                seconds=3.0,
                drain_s=60.0,  # a bound on the wait, not a speed requirement
            )
        )
        windows_total = node.stats.windows_total
    assert result["connected"] == 50
    assert result["disconnects"] == 0
    assert result["sent"] >= 50 * 5  # 6 or 7 per device, by where its first window falls
    assert result["acked"] == result["sent"]
    assert result["decided"] == result["sent"]
    assert windows_total == result["sent"]
    assert result["lost"] == 0
    assert result["duplicated"] == 0
    assert result["unmatched_commands"] == 0
    assert len(result["latencies_ms"]) == result["sent"]
    merged = merge_results([result, result])
    assert merged["sent"] == 2 * result["sent"]
    assert len(merged["latencies_ms"]) == 2 * result["sent"]
    assert set(latency_summary(merged["latencies_ms"])) == {"p50", "p90", "p99", "max"}


def test_fleet_broker_config_lifts_the_connection_cap_and_publishes_sys() -> None:
    """10,000 clients need no cap on connections; the peak count comes from $SYS every second."""
    lines = render_config(fleet_broker_options(), port=18832, workdir=Path("/tmp")).splitlines()
    assert "max_connections -1" in lines
    assert "sys_interval 1" in lines
    assert "set_tcp_nodelay true" in lines


def test_bench_fleet_cli_prints_one_json_object(edge_models: dict[str, Path]) -> None:
    """``edgefleet bench fleet`` at 200 devices for 5 s: every key there, no window lost."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "bench",
            "fleet",
            "--devices",
            "200",
            "--seconds",
            "5",
            "--period",
            "1",
            "--processes",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in (
        "devices",
        "period_s",
        "seconds",
        "windows",
        "latency_ms",
        "edge_rss_mb",
        "edge_processes",
        "broker_connections",
        "cpu",
        "connect_s",
        "load_avg_1m",
        "cpu_count",
    ):
        assert key in result, key
    assert result["devices"] == 200
    assert result["loadgen_processes"] == 2
    assert set(result["windows"]) >= {"sent", "decided", "lost", "duplicated"}
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert set(result["cpu"]) == {"broker", "edge", "loadgen"}
    assert set(result["load_avg_1m"]) == {"before", "after"}
    windows = result["windows"]
    assert windows["sent"] == 200 * 5
    assert windows["decided"] == windows["sent"]
    assert windows["lost"] == 0
    assert windows["duplicated"] == 0
    assert result["broker_connections"] >= 200
    assert result["edge_processes"] >= 1
    assert result["edge_rss_mb"] > 0
    assert result["edge_alive_at_end"]

"""``edgefleet bench``: each benchmark lives with its tier and prints one JSON object."""

from __future__ import annotations

from typing import Final

import click

from shared.cli import LazyGroup

BENCHMARKS: Final[dict[str, tuple[str, str]]] = {
    "agent": ("device_agent.bench:bench_agent", "Device agent CPU and RSS at 100 Hz x 3 axes."),
    "edge": (
        "edge_node.bench:bench_edge",
        "Edge pipeline vs raw broker vs naive pipeline; latency; RSS; --security: with auth, ACLs, TLS.",
    ),
    "fleet": (
        "edge_node.fleet_bench:bench_fleet",
        "One site: N devices on their own connections, one edge; lost windows, latency, RSS, CPU.",
    ),
    "compress": ("cloud.bench.compress:bench_compress", "Compression variants: size, accuracy, latency."),
    "rollout": (
        "cloud.bench.rollout:bench_rollout",
        "Rollout to N edges: time to all serving, lost windows; --security: on broker run, auth, TLS.",
    ),
    "learn": (
        "cloud.bench.learn:bench_learn",
        "Real data (aeon UCR/UEA): CV model selection on Celery workers, int8 test accuracy vs published.",
    ),
    "console": (
        "cloud.bench.console:bench_console",
        "Console fleet page over N devices: time to first byte (p50/p95/max) vs /healthz.",
    ),
}


@click.group(cls=LazyGroup, lazy=BENCHMARKS)
def bench() -> None:
    """Benchmarks that print JSON (compare ratios measured in the same run)."""

"""A synthetic fleet in the registry, for benchmarks (``edgefleet bench console``): N devices behind
N/100 edges, a few groups and tags, an hour of edge metrics, decisions, and a production model, so
that the console's pages have realistic content to page, sort and filter.

Rows go in with bulk ``INSERT``s (SQLAlchemy Core, many rows per statement), not one ORM object at a
time: 10 000 devices take seconds, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from cloud.registry.models import Decision, Device, EdgeMetricsRecord, EdgeNode, Group, ModelVersion

GROUPS = ("line-a", "line-b", "line-c", "warehouse")
TAGS = ("pump", "fan", "motor", "critical", "indoor", "outdoor")
CLASSES = ("normal", "imbalance", "misalignment", "bearing_fault")
MODEL_NAME = "vibration"
BATCH = 2000  # rows per INSERT statement


@dataclass(frozen=True)
class SyntheticFleet:
    """What ``populate`` wrote."""

    devices: int
    edges: int
    groups: int
    decisions: int
    metrics_records: int
    model: str


def device_id(index: int) -> str:
    """The ``index``-th synthetic device's id: ``dev-00000``, ... (five digits: ``dev-0123`` matches
    ``dev-01230`` ... ``dev-01239``)."""
    return f"dev-{index:05d}"


def edge_id(index: int) -> str:
    """The ``index``-th synthetic edge's id: ``edge-000``, ..."""
    return f"edge-{index:03d}"


def is_empty(session: Session) -> bool:
    """Whether the registry has no devices and no edges yet (``populate`` needs an empty one)."""
    return not session.scalar(select(func.count()).select_from(Device)) and not session.scalar(
        select(func.count()).select_from(EdgeNode)
    )


def _insert(session: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    for start in range(0, len(rows), BATCH):
        session.execute(insert(table), rows[start : start + BATCH])


def populate(
    session: Session,
    *,
    devices: int,
    devices_per_edge: int = 100,
    decisions_per_device: float = 2.0,
    metrics_minutes: int = 60,
    seed: int = 0,
    now: float | None = None,
) -> SyntheticFleet:
    """Add a synthetic fleet to an empty registry: ``devices`` devices spread over
    ``ceil(devices / devices_per_edge)`` edges (about 90 % online), groups and tags, one metrics report
    per edge per minute for ``metrics_minutes``, ``decisions_per_device`` decisions per device on
    average over the last hour, and a production model ``vibration@1.0.0`` the edges run."""
    rng = random.Random(seed)
    now = time.time() if now is None else now
    n_edges = max(1, -(-devices // devices_per_edge))
    version = "1.0.0"

    groups = [Group(name=name, description=f"synthetic {name}", created_at=now - 86400) for name in GROUPS]
    session.add_all(groups)
    session.flush()
    group_ids = [group.id for group in groups]

    session.add(
        ModelVersion(
            name=MODEL_NAME,
            version=version,
            variant="int8",
            status="production",
            quantization="int8",
            metrics={"accuracy": 0.97},
            created_at=now - 7200,
        )
    )

    edges: list[dict[str, Any]] = []
    for e in range(n_edges):
        online = rng.random() > 0.05
        edges.append(
            {
                "edge_id": edge_id(e),
                "group_id": group_ids[e % len(group_ids)],
                "tags": sorted(rng.sample(TAGS, 2)),
                "state": "online" if online else "offline",
                "version": "0.13.0",
                "model_version": version,
                "reported": {
                    "model_name": MODEL_NAME,
                    "model_version": version,
                    "last_good_version": version,
                    "desired_revision": 1,
                    "last_deploy_ok": True,
                },
                "last_seen": now - (rng.uniform(0, 5) if online else rng.uniform(600, 7200)),
                "created_at": now - 86400,
            }
        )
    _insert(session, EdgeNode, edges)

    rows: list[dict[str, Any]] = []
    for d in range(devices):
        edge = edges[d // devices_per_edge]
        roll = rng.random()
        state = "online" if roll < 0.9 else ("offline" if roll < 0.97 else "unreachable")
        if edge["state"] != "online" and state == "online":
            state = "unreachable"
        last_seen = now - (rng.uniform(0, 10) if state == "online" else rng.uniform(60, 86400))
        fault = CLASSES[d % len(CLASSES)] if rng.random() < 0.2 else None
        rows.append(
            {
                "device_id": device_id(d),
                "edge_id": edge["edge_id"],
                "group_id": group_ids[d % len(group_ids)] if rng.random() < 0.8 else None,
                "tags": sorted(rng.sample(TAGS, rng.randint(0, 3))),
                "state": state,
                "info": {
                    "since": now - rng.uniform(3600, 86400),
                    "agent_version": "0.13.0",
                    "sensor": "synthetic",
                    "rate_hz": 100.0,
                    "window": 256,
                    "hop": 128,
                    "config": {},
                    "config_revision": 0,
                    "config_error": None,
                    "fault": fault,
                    "outbox_depth": 0 if state == "online" else rng.randint(0, 500),
                    "dropped_windows": 0,
                    "status_reason": None if state == "online" else "lwt",
                    "reported_by": edge["edge_id"],
                },
                "last_seen": last_seen,
                "created_at": now - 86400,
            }
        )
    _insert(session, Device, rows)

    metrics: list[dict[str, Any]] = []
    for edge in edges:
        per_edge = min(devices_per_edge, devices)
        total = 0
        for minute in range(metrics_minutes, 0, -1):
            ts = now - minute * 60.0
            windows = int(per_edge * 60 * rng.uniform(0.9, 1.1))
            total += windows
            labelled = windows // 10
            correct = int(labelled * rng.uniform(0.85, 0.99))
            confidence = round(rng.uniform(0.8, 0.95), 4)
            metrics.append(
                {
                    "edge_id": edge["edge_id"],
                    "ts": ts,
                    "model_version": version,
                    "windows_total": total,
                    "confidence_mean": confidence,
                    "labelled_windows": labelled,
                    "labelled_correct": correct,
                    "data": {
                        "type": "edge_metrics",
                        "edge_id": edge["edge_id"],
                        "ts": ts,
                        "interval_s": 60.0,
                        "model_version": version,
                        "windows_total": total,
                        "windows_per_s": round(windows / 60.0, 2),
                        "inference_latency": {"p50_ms": 2.1, "p95_ms": 4.8, "p99_ms": 7.5},
                        "e2e_latency": {"p50_ms": 18.0, "p95_ms": 42.0, "p99_ms": 80.0},
                        "confidence_mean": confidence,
                        "labelled_windows": labelled,
                        "labelled_correct": correct,
                        "devices_seen": per_edge,
                    },
                }
            )
    _insert(session, EdgeMetricsRecord, metrics)

    n_decisions = int(devices * decisions_per_device)
    decisions = []
    for i in range(n_decisions):
        d = rng.randrange(devices)
        decisions.append(
            {
                "decision_id": f"syn-{i:08d}",
                "edge_id": edges[d // devices_per_edge]["edge_id"],
                "device_id": device_id(d),
                "rule": "fault-alert",
                "class_name": CLASSES[1 + i % (len(CLASSES) - 1)],
                "probability": round(rng.uniform(0.7, 0.99), 3),
                "severity": "warning" if i % 5 else "critical",
                "model_version": version,
                "ts": now - rng.uniform(0, 3600),
            }
        )
    _insert(session, Decision, decisions)
    session.flush()
    return SyntheticFleet(
        devices=devices,
        edges=n_edges,
        groups=len(GROUPS),
        decisions=n_decisions,
        metrics_records=len(metrics),
        model=f"{MODEL_NAME}@{version}",
    )

"""Registry queries of the console's fleet pages (fleet overview, device, edge): paged and filtered
in SQL, so a registry of 10,000 devices answers as fast as one of ten. Keyword-only; read-only.

Where the figures come from:
- tiles and edges table: ``EdgeNode`` / ``Device`` state counts, the newest ``EdgeMetricsRecord`` of
  each edge (its ``windows_per_s`` and latencies as the edge reported them), ``Decision`` rows of
  the last minute;
- the accuracy / throughput chart: deltas of each edge's cumulative ``windows_total``,
  ``labelled_windows`` and ``labelled_correct`` between consecutive metrics reports, summed per
  time bucket over the edges (accuracy = correct / labelled of the bucket, throughput = windows / s);
- alerts: offline edges, failed ``DeploymentTarget`` rows, dead-letter bursts, drift ``Trigger`` rows.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Text, and_, cast, func, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from cloud.errors import NotFoundError
from cloud.registry import fleet
from cloud.registry.models import (
    CommandRecord,
    DeadLetterRecord,
    Decision,
    Deployment,
    DeploymentTarget,
    Device,
    DeviceDesiredConfig,
    EdgeMetricsRecord,
    EdgeNode,
    Group,
    ModelVersion,
    Sample,
    Trigger,
)

DEVICE_PAGE_SIZE = 50
DEVICE_STATES = fleet.DEVICE_STATES
# ?sort= values of the devices table -> the column they order by (user input never reaches SQL).
DEVICE_SORTS: dict[str, Any] = {
    "device": Device.device_id,
    "state": Device.state,
    "edge": Device.edge_id,
    "group": Group.name,
    "last_seen": Device.last_seen,
}
DEFAULT_DEVICE_SORT = "device"
# A metrics report older than this does not count as the edge's current rate.
METRICS_FRESH_S = 60.0
# Dead letters of one source in DEAD_LETTER_WINDOW_S above this count are a burst (an alert).
DEAD_LETTER_BURST = 20
DEAD_LETTER_WINDOW_S = 300.0
# Failed deployments and drift triggers younger than this are alerts.
ALERT_RECENT_S = 24 * 3600.0
DRIFT_KINDS = ("drift_accuracy", "drift_confidence")
ALERT_LIMIT = 10


@dataclass(frozen=True)
class DeviceQuery:
    """The devices table's filters, sort and page, as the URL gave them (already validated)."""

    q: str = ""
    state: str = ""
    edge: str = ""
    group: str = ""
    sort: str = DEFAULT_DEVICE_SORT
    descending: bool = False
    page: int = 1

    @classmethod
    def parse(
        cls,
        *,
        q: str | None = None,
        state: str | None = None,
        edge: str | None = None,
        group: str | None = None,
        sort: str | None = None,
        page: str | int | None = None,
    ) -> DeviceQuery:
        """From raw query parameters: unknown sorts and states are dropped, the page is at least 1."""
        raw_sort = (sort or "").strip()
        descending = raw_sort.startswith("-")
        key = raw_sort.lstrip("-")
        if key not in DEVICE_SORTS:
            key, descending = DEFAULT_DEVICE_SORT, False
        clean_state = (state or "").strip()
        if clean_state not in fleet.DEVICE_STATES:
            clean_state = ""
        try:
            number = int(page) if page not in (None, "") else 1
        except (TypeError, ValueError):
            number = 1
        return cls(
            q=(q or "").strip()[:64],
            state=clean_state,
            edge=(edge or "").strip()[:64],
            group=(group or "").strip()[:64],
            sort=key,
            descending=descending,
            page=max(1, min(number, 10**6)),
        )

    @property
    def sort_param(self) -> str:
        """``last_seen`` or ``-last_seen``: the ``?sort=`` value of this query."""
        return f"-{self.sort}" if self.descending else self.sort

    def params(self, **overrides: Any) -> dict[str, str]:
        """The non-default URL parameters of this query, with ``overrides`` applied."""
        values: dict[str, Any] = {
            "q": self.q,
            "state": self.state,
            "edge": self.edge,
            "group": self.group,
            "sort": self.sort_param,
            "page": self.page,
        }
        values.update(overrides)
        defaults = {"sort": DEFAULT_DEVICE_SORT, "page": 1}
        return {k: str(v) for k, v in values.items() if v not in ("", None) and defaults.get(k) != v}


@dataclass
class DevicePage:
    """One page of the devices table: rows, how many match, which page of how many."""

    rows: list[dict[str, Any]]
    total: int
    page: int
    pages: int
    page_size: int
    query: DeviceQuery
    state_counts: dict[str, int] = field(default_factory=dict)

    @property
    def first(self) -> int:
        """1-based index of the first row shown (0 when none)."""
        return 0 if not self.rows else (self.page - 1) * self.page_size + 1

    @property
    def last(self) -> int:
        """1-based index of the last row shown."""
        return (self.page - 1) * self.page_size + len(self.rows)


def _group_names(session: Session) -> dict[int, str]:
    return {g.id: g.name for g in session.scalars(select(Group))}


def group_names(session: Session) -> list[str]:
    """Every group's name, sorted (the filter's suggestions)."""
    return sorted(_group_names(session).values())


def _tag_condition(column: Any, tag: str) -> ColumnElement[bool]:
    # Tags are a JSON list stored as text on SQLite and PostgreSQL's json alike: '["a", "b"]'.
    return cast(column, Text).contains(json.dumps(tag), autoescape=True)


def _device_conditions(query: DeviceQuery) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if query.q:
        conditions.append(Device.device_id.icontains(query.q, autoescape=True))
    if query.state:
        conditions.append(Device.state == query.state)
    if query.edge:
        conditions.append(Device.edge_id == query.edge)
    if query.group:
        in_group = Device.group_id.in_(select(Group.id).where(Group.name == query.group))
        conditions.append(or_(in_group, _tag_condition(Device.tags, query.group)))
    return conditions


def device_page(session: Session, *, query: DeviceQuery, page_size: int = DEVICE_PAGE_SIZE) -> DevicePage:
    """The devices matching ``query``, one page of them in its order; the page number is clamped to
    the pages there are. ``state_counts``: how many match per state (before the state filter)."""
    conditions = _device_conditions(query)
    total = int(session.scalar(select(func.count()).select_from(Device).where(*conditions)) or 0)
    pages = max(1, math.ceil(total / page_size))
    page = min(query.page, pages)
    column = DEVICE_SORTS[query.sort]
    order = column.desc() if query.descending else column.asc()
    if query.sort in ("last_seen", "group", "edge"):
        order = order.nulls_last()
    rows = session.execute(
        select(Device, DeviceDesiredConfig)
        .outerjoin(DeviceDesiredConfig, DeviceDesiredConfig.device_id == Device.device_id)
        .outerjoin(Group, Group.id == Device.group_id)
        .where(*conditions)
        .order_by(order, Device.device_id.asc())
        .offset((page - 1) * page_size)
        .limit(page_size)
    ).all()
    groups = _group_names(session)
    without_state = _device_conditions(DeviceQuery(q=query.q, edge=query.edge, group=query.group))
    counts = {
        str(state): int(count)
        for state, count in session.execute(
            select(Device.state, func.count()).where(*without_state).group_by(Device.state)
        )
    }
    return DevicePage(
        rows=[_table_row(device, groups, desired) for device, desired in rows],
        total=total,
        page=page,
        pages=pages,
        page_size=page_size,
        query=replace(query, page=page),
        state_counts=counts,
    )


def _table_row(device: Device, groups: dict[int, str], desired: DeviceDesiredConfig | None) -> dict[str, Any]:
    row = fleet._device_row(device, groups, desired)
    info = device.info or {}
    row["outbox_depth"] = info.get("outbox_depth")
    return row


# -- fleet overview ---------------------------------------------------------------------------------


def _latest_metrics(
    session: Session, *, since: float, edge_id: str | None = None
) -> dict[str, EdgeMetricsRecord]:
    """Each edge's newest metrics report after ``since`` (one row per edge)."""
    newest = select(EdgeMetricsRecord.edge_id, func.max(EdgeMetricsRecord.ts).label("ts")).where(
        EdgeMetricsRecord.ts >= since
    )
    if edge_id is not None:
        newest = newest.where(EdgeMetricsRecord.edge_id == edge_id)
    latest = newest.group_by(EdgeMetricsRecord.edge_id).subquery()
    records = session.scalars(
        select(EdgeMetricsRecord).join(
            latest, and_(EdgeMetricsRecord.edge_id == latest.c.edge_id, EdgeMetricsRecord.ts == latest.c.ts)
        )
    )
    return {r.edge_id: r for r in records}


def _decisions_per_edge(session: Session, *, since: float) -> dict[str, int]:
    rows = session.execute(
        select(Decision.edge_id, func.count()).where(Decision.ts >= since).group_by(Decision.edge_id)
    )
    return {str(edge): int(count) for edge, count in rows}


def edge_rows(session: Session, *, now: float) -> list[dict[str, Any]]:
    """Every edge for the fleet's edges table: state, last seen, the model it reports serving, its
    windows/s (newest metrics report of the last ``METRICS_FRESH_S``), decisions in the last minute,
    and how many devices are behind it (online / all)."""
    metrics = _latest_metrics(session, since=now - METRICS_FRESH_S)
    decisions = _decisions_per_edge(session, since=now - 60.0)
    devices: dict[str, dict[str, int]] = defaultdict(dict)
    for edge_id, state, count in session.execute(
        select(Device.edge_id, Device.state, func.count())
        .where(Device.edge_id.is_not(None))
        .group_by(Device.edge_id, Device.state)
    ):
        devices[str(edge_id)][str(state)] = int(count)
    rows = []
    for edge in session.scalars(select(EdgeNode).order_by(EdgeNode.edge_id)):
        reported = edge.reported or {}
        latest = metrics.get(edge.edge_id)
        data = latest.data if latest is not None else {}
        behind = devices.get(edge.edge_id, {})
        rows.append(
            {
                "edge_id": edge.edge_id,
                "state": edge.state,
                "last_seen": edge.last_seen,
                "model": _model_ref(
                    reported.get("model_name"), reported.get("model_version") or edge.model_version
                ),
                # An edge gone offline processes nothing, whatever its last report said.
                "windows_per_s": data.get("windows_per_s")
                if latest is not None and edge.state == "online"
                else None,
                "decisions_per_min": decisions.get(edge.edge_id, 0),
                "devices_online": behind.get("online", 0),
                "devices_total": sum(behind.values()),
                "deploy_failed": reported.get("last_deploy_ok") is False,
            }
        )
    return rows


def _model_ref(name: str | None, version: str | None) -> str | None:
    if not version:
        return None
    return f"{name}@{version}" if name else str(version)


def fleet_tiles(
    session: Session, *, now: float, edges: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The fleet page's tiles: edges and devices online / total, windows/s (sum of the edges' newest
    reports), decisions in the last minute, and accuracy over the last ``RECENT_ACCURACY_S``."""
    edge_list = list(edges) if edges is not None else edge_rows(session, now=now)
    devices = device_state_counts(session)
    rates = [e["windows_per_s"] for e in edge_list if e["windows_per_s"] is not None]
    labelled, correct = _labelled_since(session, since=now - RECENT_ACCURACY_S)
    return {
        "edges_online": sum(1 for e in edge_list if e["state"] == "online"),
        "edges_total": len(edge_list),
        "devices_online": devices.get("online", 0),
        "devices_total": sum(devices.values()),
        "windows_per_s": sum(rates) if rates else None,
        "decisions_per_min": int(
            session.scalar(select(func.count()).select_from(Decision).where(Decision.ts >= now - 60.0)) or 0
        ),
        "accuracy": correct / labelled if labelled else None,
        "labelled": labelled,
    }


RECENT_ACCURACY_S = 300.0


def _metric_points(
    session: Session, *, since: float, until: float | None, edge_id: str | None
) -> list[tuple[str, float, int, int, int]]:
    query = select(
        EdgeMetricsRecord.edge_id,
        EdgeMetricsRecord.ts,
        EdgeMetricsRecord.windows_total,
        EdgeMetricsRecord.labelled_windows,
        EdgeMetricsRecord.labelled_correct,
    ).where(EdgeMetricsRecord.ts >= since)
    if until is not None:
        query = query.where(EdgeMetricsRecord.ts <= until)
    if edge_id is not None:
        query = query.where(EdgeMetricsRecord.edge_id == edge_id)
    return [
        (str(e), float(ts), int(w), int(lw), int(lc))
        for e, ts, w, lw, lc in session.execute(
            query.order_by(EdgeMetricsRecord.edge_id, EdgeMetricsRecord.ts)
        )
    ]


def _deltas(
    points: list[tuple[str, float, int, int, int]],
) -> list[tuple[float, int, int, int]]:
    """(ts, windows, labelled, correct) added between each report and the edge's previous one; a
    counter that went down (the edge restarted) counts from zero."""
    out: list[tuple[float, int, int, int]] = []
    previous: dict[str, tuple[int, int, int]] = {}
    for edge, ts, windows, labelled, correct in points:
        before = previous.get(edge)
        previous[edge] = (windows, labelled, correct)
        if before is None:
            continue
        restarted = windows < before[0] or labelled < before[1] or correct < before[2]
        if restarted:
            out.append((ts, windows, labelled, correct))
        else:
            out.append((ts, windows - before[0], labelled - before[1], correct - before[2]))
    return out


def _labelled_since(session: Session, *, since: float) -> tuple[int, int]:
    lookback = since - 2 * METRICS_FRESH_S
    deltas = _deltas(_metric_points(session, since=lookback, until=None, edge_id=None))
    labelled = sum(d[2] for d in deltas if d[0] >= since)
    correct = sum(d[3] for d in deltas if d[0] >= since)
    return labelled, correct


def accuracy_series(
    session: Session, *, since: float, until: float, step_s: float, edge_id: str | None = None
) -> list[list[Any]]:
    """``[times, accuracy, windows/s]`` per complete ``step_s`` bucket between ``since`` and
    ``until`` (bucket start times), over every edge or one: from the deltas of the edges' cumulative
    counters between metrics reports. A bucket without labelled windows has accuracy None, one
    without any report None for both."""
    first = math.floor(since / step_s) * step_s
    last = math.floor(until / step_s) * step_s  # the bucket still filling: not shown yet
    buckets = int(max(0, (last - first) / step_s))
    times = [first + i * step_s for i in range(buckets)]
    windows = [0] * buckets
    labelled = [0] * buckets
    correct = [0] * buckets
    seen = [False] * buckets
    points = _metric_points(session, since=first - 2 * METRICS_FRESH_S, until=last, edge_id=edge_id)
    for ts, w, lw, lc in _deltas(points):
        index = int((ts - first) // step_s)
        if 0 <= index < buckets:
            seen[index] = True
            windows[index] += w
            labelled[index] += lw
            correct[index] += lc
    accuracy = [correct[i] / labelled[i] if labelled[i] else None for i in range(buckets)]
    throughput = [round(windows[i] / step_s, 2) if seen[i] else None for i in range(buckets)]
    return [times, accuracy, throughput]


def fleet_alerts(session: Session, *, now: float) -> list[dict[str, Any]]:
    """What needs a look, worst first: offline edges, failed deployments (of the last
    ``ALERT_RECENT_S``), dead-letter bursts (more than ``DEAD_LETTER_BURST`` of one source in the last
    ``DEAD_LETTER_WINDOW_S``), drift triggers (last ``ALERT_RECENT_S``). Each: kind, level, text,
    link, ts."""
    offline = session.scalars(
        select(EdgeNode).where(EdgeNode.state != "online").order_by(EdgeNode.edge_id).limit(ALERT_LIMIT)
    )
    alerts: list[dict[str, Any]] = [
        {
            "kind": "edge_offline",
            "level": "bad",
            "text": f"edge {edge.edge_id} is {edge.state}",
            "link": f"/edges/{edge.edge_id}",
            "ts": edge.last_seen,
        }
        for edge in offline
    ]
    failed = session.execute(
        select(DeploymentTarget, ModelVersion)
        .join(Deployment, Deployment.id == DeploymentTarget.deployment_id)
        .join(ModelVersion, ModelVersion.id == Deployment.model_version_id)
        .where(DeploymentTarget.ok.is_(False), DeploymentTarget.updated_at >= now - ALERT_RECENT_S)
        .order_by(DeploymentTarget.updated_at.desc())
        .limit(ALERT_LIMIT)
    )
    for target, model in failed:
        alerts.append(
            {
                "kind": "deploy_failed",
                "level": "bad",
                "text": f"deployment of {model.ref} to {target.edge_id} failed"
                + (f" at {target.stage}" if target.stage != "failed" else "")
                + f": {target.reason or 'no reason given'}",
                "link": f"/edges/{target.edge_id}",
                "ts": target.updated_at,
            }
        )
    bursts = session.execute(
        select(DeadLetterRecord.source, func.count(), func.max(DeadLetterRecord.ts))
        .where(DeadLetterRecord.ts >= now - DEAD_LETTER_WINDOW_S)
        .group_by(DeadLetterRecord.source)
        .having(func.count() > DEAD_LETTER_BURST)
    )
    for source, count, newest in bursts:
        alerts.append(
            {
                "kind": "dead_letters",
                "level": "warn",
                "text": f"{count} dead letters from {source} in the last {DEAD_LETTER_WINDOW_S / 60:.0f} min",
                "link": f"/edges/{source}" if source != "ingest" else None,
                "ts": newest,
            }
        )
    drifts = session.scalars(
        select(Trigger)
        .where(Trigger.kind.in_(DRIFT_KINDS), Trigger.ts >= now - ALERT_RECENT_S)
        .order_by(Trigger.ts.desc())
        .limit(ALERT_LIMIT)
    )
    alerts.extend(
        {
            "kind": "drift",
            "level": "warn",
            "text": f"drift on {trigger.model_name} ({trigger.kind}): {trigger.reason}",
            "link": None,
            "ts": trigger.ts,
        }
        for trigger in drifts
    )
    return alerts


def device_state_counts(session: Session) -> dict[str, int]:
    """How many devices per state, over the whole fleet."""
    rows = session.execute(select(Device.state, func.count()).group_by(Device.state))
    return {str(state): int(count) for state, count in rows}


def edge_ids(session: Session) -> list[str]:
    """Every edge id, sorted (the devices filter's choices)."""
    return [str(e) for e in session.scalars(select(EdgeNode.edge_id).order_by(EdgeNode.edge_id))]


# -- one device -------------------------------------------------------------------------------------


def device_detail(session: Session, *, device_id: str) -> dict[str, Any]:
    """``fleet.fleet_device`` (``NotFoundError`` when unknown) plus what its birth said (rate,
    window, hop, channels) and when its status was reported."""
    row = fleet.fleet_device(session, device_id=device_id)
    device = fleet.get_device(session, device_id=device_id)
    info = (device.info or {}) if device is not None else {}
    row.update({k: info.get(k) for k in ("rate_hz", "window", "hop", "channels", "status_ts", "since")})
    return row


def device_commands(session: Session, *, device_id: str, limit: int = 15) -> list[dict[str, Any]]:
    """The device's newest commands with their acks (status, result, error), newest first."""
    records = session.scalars(
        select(CommandRecord)
        .where(CommandRecord.device_id == device_id)
        .order_by(CommandRecord.issued_at.desc(), CommandRecord.id.desc())
        .limit(limit)
    )
    return [command_row(r) for r in records]


def command_row(record: CommandRecord) -> dict[str, Any]:
    """A command as the device page shows it."""
    return {
        "command_id": record.command_id,
        "name": record.name,
        "args": dict(record.args or {}),
        "sender": record.sender,
        "issued_at": record.issued_at,
        "expires_at": record.expires_at,
        "ack_status": record.ack_status,
        "ack_error": record.ack_error,
        "ack_result": record.ack_result,
        "acked_at": record.acked_at,
    }


def command_by_id(session: Session, *, command_id: str) -> dict[str, Any] | None:
    """One recorded command by id, with its ack once it came."""
    found = fleet.commands_by_id(session, command_ids=[command_id])
    return command_row(found[0]) if found else None


def device_decisions(session: Session, *, device_id: str, limit: int = 15) -> list[dict[str, Any]]:
    """The device's newest decisions (rule, class, probability, severity, model), newest first."""
    records = session.scalars(
        select(Decision).where(Decision.device_id == device_id).order_by(Decision.ts.desc()).limit(limit)
    )
    return [
        {
            "ts": d.ts,
            "edge_id": d.edge_id,
            "rule": d.rule,
            "class_name": d.class_name,
            "probability": d.probability,
            "severity": d.severity,
            "model_version": d.model_version,
        }
        for d in records
    ]


def device_activity(
    session: Session, *, device_id: str, since: float, until: float, step_s: float
) -> list[list[Any]]:
    """``[times, decisions, samples]`` per complete ``step_s`` bucket: how many decisions the edges
    took on this device's windows and how many of its windows they uplinked as hard examples."""
    first = math.floor(since / step_s) * step_s
    last = math.floor(until / step_s) * step_s
    buckets = int(max(0, (last - first) / step_s))
    decisions = [0] * buckets
    samples = [0] * buckets
    for column, table_ts, counts in (
        (Decision.device_id, Decision.ts, decisions),
        (Sample.device_id, Sample.ts, samples),
    ):
        for (ts,) in session.execute(
            select(table_ts).where(column == device_id, table_ts >= first, table_ts < last)
        ):
            index = int((float(ts) - first) // step_s)
            if 0 <= index < buckets:
                counts[index] += 1
    return [[first + i * step_s for i in range(buckets)], decisions, samples]


# -- one edge ---------------------------------------------------------------------------------------


def edge_detail(session: Session, *, edge_id: str, now: float) -> dict[str, Any]:
    """An edge's fleet row (desired vs reported model), what it reports serving, and its newest
    metrics report (``metrics``: as sent, or None); ``NotFoundError`` when unknown."""
    edge = fleet.get_edge(session, edge_id=edge_id)
    if edge is None:
        raise NotFoundError(f"edge {edge_id} is not in the registry")
    row = fleet._edge_row(session, edge, _group_names(session))
    reported = edge.reported or {}
    latest = _latest_metrics(session, since=0.0, edge_id=edge_id).get(edge_id)
    row.update(
        {
            "version": edge.version,
            "model": _model_ref(
                reported.get("model_name"), reported.get("model_version") or edge.model_version
            ),
            "model_sha256": reported.get("model_sha256"),
            "last_deploy_ok": reported.get("last_deploy_ok"),
            "last_deploy_reason": reported.get("last_deploy_reason"),
            "metrics": dict(latest.data or {}) if latest is not None else None,
            "metrics_ts": latest.ts if latest is not None else None,
            "metrics_fresh": latest is not None and latest.ts >= now - METRICS_FRESH_S,
            "dead_letters_5min": int(
                session.scalar(
                    select(func.count())
                    .select_from(DeadLetterRecord)
                    .where(
                        DeadLetterRecord.source == edge_id, DeadLetterRecord.ts >= now - DEAD_LETTER_WINDOW_S
                    )
                )
                or 0
            ),
        }
    )
    return row


def edge_dead_letters(session: Session, *, edge_id: str, limit: int = 20) -> dict[str, Any]:
    """The edge's newest dead letters (topic, reason, size, time) and the count per reason."""
    records = session.scalars(
        select(DeadLetterRecord)
        .where(DeadLetterRecord.source == edge_id)
        .order_by(DeadLetterRecord.ts.desc(), DeadLetterRecord.id.desc())
        .limit(limit)
    )
    reasons = session.execute(
        select(DeadLetterRecord.reason, func.count())
        .where(DeadLetterRecord.source == edge_id)
        .group_by(DeadLetterRecord.reason)
        .order_by(func.count().desc())
        .limit(10)
    )
    return {
        "recent": [
            {"ts": r.ts, "topic": r.topic, "reason": r.reason, "payload_size": r.payload_size}
            for r in records
        ],
        "reasons": [{"reason": str(reason), "count": int(count)} for reason, count in reasons],
    }


def edge_deployments(session: Session, *, edge_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The edge's deployment history, newest first: revision, model, rollout, stage, ok, reason."""
    rows = session.execute(
        select(DeploymentTarget, Deployment, ModelVersion)
        .join(Deployment, Deployment.id == DeploymentTarget.deployment_id)
        .join(ModelVersion, ModelVersion.id == Deployment.model_version_id)
        .where(DeploymentTarget.edge_id == edge_id)
        .order_by(DeploymentTarget.revision.desc())
        .limit(limit)
    )
    return [
        {
            "revision": target.revision,
            "model": model.ref,
            "variant": model.variant,
            "rollout_id": deployment.rollout_id,
            "stage": target.stage,
            "ok": target.ok,
            "reason": target.reason,
            "updated_at": target.updated_at,
            "created_at": deployment.created_at,
        }
        for target, deployment, model in rows
    ]

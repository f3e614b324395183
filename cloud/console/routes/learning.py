"""The console's learning page: the retraining triggers that fired, the pipeline runs with each step's
duration (from the lineage events' timestamps), accuracy before and after each retrain, and the
held-out accuracy of every model version over time."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRouter

from cloud.api.deps import get_database_url
from cloud.console.deps import Viewer
from cloud.console.templating import flash_of, render
from cloud.registry import crud, learning_views
from cloud.registry.db import session_scope
from cloud.registry.models import ModelVersion, PipelineRun

router = APIRouter(include_in_schema=False)

MAX_RUNS = 30
MAX_TRIGGERS = 50
MAX_CHART_SERIES = 6
PALETTE = ("#1f6feb", "#1a7f37", "#9a6700", "#cf222e", "#8250df", "#57606a")


def _steps(run: PipelineRun) -> list[dict[str, Any]]:
    """Each recorded step with how long it took: from the previous step (the run's start for the
    first) to its own timestamp."""
    previous = run.started_at
    steps = []
    for event in run.steps:
        steps.append(
            {
                "step": event.step,
                "ts": event.ts,
                "seconds": max(0.0, event.ts - previous),
                "detail": event.detail,
            }
        )
        previous = event.ts
    return steps


def _accuracy(model: ModelVersion | None) -> float | None:
    if model is None:
        return None
    value = (model.metrics or {}).get("accuracy")
    return float(value) if isinstance(value, int | float) else None


def _run_row(run: PipelineRun, built: list[ModelVersion], parents: dict[int, ModelVersion]) -> dict[str, Any]:
    steps = _steps(run)
    deploy_variant = str((run.config or {}).get("deploy_variant") or "")
    gate = next((s["detail"] for s in steps if s["step"] == "gate"), None)
    candidate = next((m for m in built if m.variant == deploy_variant), None)
    if candidate is None and gate is not None:
        candidate = next((m for m in built if m.gate_passed is not None), None)
    base = next((m for m in built if m.variant == "float32"), None)
    previous = parents.get(base.parent_id) if base is not None and base.parent_id is not None else None
    # "Before": production as the gate re-scored it on this run's held-out split, else as recorded.
    before = gate.get("production_accuracy") if gate else None
    if before is None:
        before = _accuracy(previous)
    after = _accuracy(candidate)
    ends = [t for t in (run.finished_at, steps[-1]["ts"] if steps else None) if t is not None]
    end = max(ends) if ends else None
    return {
        "id": run.id,
        "model_name": run.model_name,
        "state": run.state,
        "error": run.error,
        "trigger_id": run.trigger_id,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "seconds": (end - run.started_at) if end is not None else None,
        "steps": steps,
        "slowest": max((s["seconds"] for s in steps), default=0.0),
        "candidate": {"id": candidate.id, "ref": candidate.ref} if candidate is not None else None,
        "previous": {"id": previous.id, "ref": previous.ref} if previous is not None else None,
        "before": float(before) if isinstance(before, int | float) else None,
        "after": after,
        "delta": (after - float(before)) if after is not None and isinstance(before, int | float) else None,
        "gate_passed": candidate.gate_passed if candidate is not None else None,
        "gate_reason": candidate.gate_reason if candidate is not None else None,
    }


def _chart(models: list[ModelVersion]) -> dict[str, Any] | None:
    """uPlot data: x = when each version was built, one series per variant (the most common ones)."""
    points = [(m.created_at, m.variant, _accuracy(m)) for m in models]
    points = [p for p in points if p[2] is not None]
    if not points:
        return None
    counts: dict[str, int] = {}
    for _, variant, _ in points:
        counts[variant] = counts.get(variant, 0) + 1
    variants = sorted(counts, key=lambda v: (-counts[v], v))[:MAX_CHART_SERIES]
    points = [p for p in points if p[1] in variants]
    xs = [p[0] for p in points]
    columns: list[list[float | None]] = [[None] * len(points) for _ in variants]
    for i, (_, variant, value) in enumerate(points):
        columns[variants.index(variant)][i] = value
    return {
        "series": [
            {"label": f"accuracy {v}", "stroke": PALETTE[i % len(PALETTE)], "scale": "%"}
            for i, v in enumerate(variants)
        ],
        "data": [xs, *columns],
        "height": 260,
    }


@router.get("/learning", response_class=HTMLResponse)
def learning_page(request: Request, user: Viewer) -> HTMLResponse:
    """Triggers, pipeline runs with step timings and accuracy before/after, accuracy over time."""
    with session_scope(get_database_url(request)) as session:
        triggers = crud.list_triggers(session, limit=MAX_TRIGGERS)
        runs = crud.list_runs(session, limit=MAX_RUNS)
        built = learning_views.models_of_runs(session, run_ids=[r.id for r in runs])
        by_run: dict[int, list[ModelVersion]] = {}
        for model in built:
            if model.run_id is not None:
                by_run.setdefault(model.run_id, []).append(model)
        parents = learning_views.models_by_id(
            session, model_ids=[m.parent_id for m in built if m.parent_id is not None]
        )
        run_rows = [_run_row(r, by_run.get(r.id, []), parents) for r in runs]
        trigger_rows = [
            {
                "id": t.id,
                "kind": t.kind,
                "reason": t.reason,
                "model_name": t.model_name,
                "run_id": t.run_id,
                "ts": t.ts,
                "detail": dict(t.detail or {}),
            }
            for t in triggers
        ]
        chart = _chart(learning_views.accuracy_history(session))
    finished = [r for r in run_rows if r["state"] in ("published", "rejected", "failed")]
    tiles = {
        "triggers": len(trigger_rows),
        "runs": len(run_rows),
        "published": sum(1 for r in run_rows if r["state"] == "published"),
        "rejected": sum(1 for r in run_rows if r["state"] == "rejected"),
        "failed": sum(1 for r in run_rows if r["state"] == "failed"),
        "last_seconds": finished[0]["seconds"] if finished else None,
    }
    return render(
        request,
        "learning.html",
        user,
        nav="/learning",
        triggers=trigger_rows,
        runs=run_rows,
        chart=chart,
        tiles=tiles,
        **flash_of(request),
    )

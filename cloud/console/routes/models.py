"""The console's models pages: every model version, one version's lineage (dataset -> training run ->
model -> variants -> edges serving it), its compression table and gate verdict, and a side-by-side
diff of two versions."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRouter

from cloud.api.deps import get_database_url
from cloud.console.deps import Viewer
from cloud.console.templating import flash_of, render
from cloud.errors import NotFoundError
from cloud.registry import crud, learning_views
from cloud.registry.db import session_scope
from cloud.registry.models import ModelVersion

router = APIRouter(include_in_schema=False)

# The compression table's columns: (metrics key of cloud.learning.evaluation.Evaluation, label, format).
COMPRESSION_COLUMNS = (
    ("size_bytes", "Size", "size"),
    ("gzip_bytes", "Gzipped", "size"),
    ("accuracy", "Accuracy", "percent"),
    ("macro_f1", "Macro-F1", "percent"),
    ("latency_us_b1", "Latency b1 (µs)", "number"),
    ("throughput_b64", "Throughput b64 (/s)", "number"),
    ("confidence_mean", "Mean confidence", "percent"),
)
# -- pages -------------------------------------------------------------------------------------------


def _row(model: ModelVersion, serving: dict[str, int]) -> dict[str, Any]:
    metrics = model.metrics or {}
    return {
        "id": model.id,
        "ref": model.ref,
        "name": model.name,
        "version": model.version,
        "variant": model.variant,
        "status": model.status,
        "quantization": model.quantization,
        "size": model.artifact_size or metrics.get("size_bytes"),
        "accuracy": metrics.get("accuracy"),
        "latency_us": metrics.get("latency_us_b1"),
        "signed": model.signature is not None,
        "gate_passed": model.gate_passed,
        "gate_reason": model.gate_reason,
        "run_id": model.run_id,
        "parent_id": model.parent_id,
        "serving": serving.get(model.version, 0),
        "created_at": model.created_at,
        "metrics": dict(metrics),
    }


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, user: Viewer, name: str | None = None) -> HTMLResponse:
    """Every model version (newest first), optionally of one name, with status, gate and edges."""
    with session_scope(get_database_url(request)) as session:
        models = crud.list_model_versions(session, name=name or None, limit=200)
        serving = learning_views.serving_counts(session, versions=[m.version for m in models])
        rows = [_row(m, serving) for m in models]
    names = sorted({r["name"] for r in rows})
    return render(
        request, "models.html", user, nav="/models", models=rows, names=names, name=name, **flash_of(request)
    )


def _lineage(session: Any, model: ModelVersion) -> dict[str, Any]:
    run = crud.run_of(session, model=model)
    built = learning_views.models_of_run(session, run_id=run.id) if run is not None else []
    if not built:
        # Not built by a pipeline run (registered by hand): the versions derived from it are its variants.
        built = [model, *learning_views.children_of(session, model_id=model.id)]
    base = next((m for m in built if m.variant == "float32" and m.run_id == model.run_id), None)
    trained_from = base.parent if base is not None and base.parent is not None else None
    if trained_from is None and model.parent is not None and model.parent.run_id != model.run_id:
        trained_from = model.parent
    serving = learning_views.serving_counts(session, versions=[m.version for m in built])
    dataset = model.dataset
    steps = []
    if run is not None:
        previous = run.started_at
        for step in run.steps:
            steps.append(
                {
                    "step": step.step,
                    "ts": step.ts,
                    "seconds": max(0.0, step.ts - previous),
                    "model_version_id": step.model_version_id,
                }
            )
            previous = step.ts
    return {
        "dataset": (
            {
                "id": dataset.id,
                "name": dataset.name,
                "source": dataset.source,
                "sha256": dataset.sha256,
                "n_samples": dataset.n_samples,
                "class_names": list(dataset.class_names or []),
            }
            if dataset is not None
            else None
        ),
        "run": (
            {
                "id": run.id,
                "state": run.state,
                "error": run.error,
                "trigger_id": run.trigger_id,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                "steps": steps,
            }
            if run is not None
            else None
        ),
        "trained_from": _row(trained_from, {}) if trained_from is not None else None,
        "base": _row(base, serving) if base is not None else None,
        "variants": [_row(m, serving) for m in built],
        "edges": [
            {"edge_id": e.edge_id, "state": e.state, "last_seen": e.last_seen}
            for e in learning_views.edges_serving(session, name=model.name, version=model.version)
        ],
        "rollouts": [
            {"rollout_id": r.rollout_id, "state": r.state, "created_at": r.created_at}
            for r in learning_views.rollouts_of_model(session, model_version_id=model.id)
        ],
    }


@router.get("/models/diff", response_class=HTMLResponse)
def model_diff_page(request: Request, user: Viewer, a: int, b: int) -> HTMLResponse:
    """Two versions side by side: training config, metrics and manifest fields, changed rows marked."""
    try:
        with session_scope(get_database_url(request)) as session:
            left = crud.get_model_version(session, model_id=a)
            right = crud.get_model_version(session, model_id=b)
            sections = [
                ("Model", _diff(_summary(left), _summary(right))),
                ("Training config", _diff(left.training_config or {}, right.training_config or {})),
                ("Metrics", _diff(left.metrics or {}, right.metrics or {})),
                ("Manifest", _diff(left.manifest or {}, right.manifest or {})),
            ]
            refs = (_row(left, {}), _row(right, {}))
    except NotFoundError as exc:
        return render(
            request, "model_diff.html", user, nav="/models", status_code=404, error=str(exc), sections=[]
        )
    changed = sum(1 for _, rows in sections for row in rows if row["changed"])
    return render(
        request,
        "model_diff.html",
        user,
        nav="/models",
        a=refs[0],
        b=refs[1],
        sections=sections,
        changed=changed,
        error=None,
    )


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(request: Request, user: Viewer, model_id: int) -> HTMLResponse:
    """One model version: lineage, compression table of its run's variants, gate verdict, metrics."""
    try:
        with session_scope(get_database_url(request)) as session:
            model = crud.get_model_version(session, model_id=model_id)
            row = _row(model, learning_views.serving_counts(session, versions=[model.version]))
            lineage = _lineage(session, model)
            others = [
                {"id": m.id, "ref": m.ref}
                for m in crud.list_model_versions(session, name=model.name, limit=100)
                if m.id != model.id
            ]
            detail = {
                "training_config": model.training_config or {},
                "manifest": model.manifest,
                "key_id": model.key_id,
                "sha256": model.artifact_sha256,
                "artifact_url": model.artifact_url,
            }
    except NotFoundError as exc:
        return render(request, "model.html", user, nav="/models", status_code=404, error=str(exc), model=None)
    return render(
        request,
        "model.html",
        user,
        nav="/models",
        model=row,
        lineage=lineage,
        others=others,
        detail=detail,
        columns=COMPRESSION_COLUMNS,
        **flash_of(request),
    )


# -- the diff ------------------------------------------------------------------------------------------


def _summary(model: ModelVersion) -> dict[str, Any]:
    return {
        "ref": model.ref,
        "variant": model.variant,
        "status": model.status,
        "quantization": model.quantization,
        "artifact_size": model.artifact_size,
        "artifact_sha256": model.artifact_sha256,
        "dataset_id": model.dataset_id,
        "run_id": model.run_id,
        "parent_id": model.parent_id,
        "gate_passed": model.gate_passed,
        "gate_reason": model.gate_reason,
        "key_id": model.key_id,
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``a.b.c`` keys; lists and scalars are leaves."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def _diff(left: dict[str, Any], right: dict[str, Any]) -> list[dict[str, Any]]:
    a, b = flatten(left), flatten(right)
    rows = []
    for key in sorted(set(a) | set(b)):
        if key == "signature":
            continue  # a base64 blob: different for every model, nothing to read in it
        rows.append(
            {
                "key": key,
                "a": _shown(a.get(key)),
                "b": _shown(b.get(key)),
                "changed": a.get(key) != b.get(key),
            }
        )
    return rows

"""The console's rollouts pages: the list with a start form (operators), one rollout's live waves and
gates (server-sent events swap the fragment every tick), and pause / resume / abort / rollback.

Starting and steering call what the API and the CLI call (``cloud.fleet.rollouts``); the targets of
"a group" or "every edge" resolve as the API resolves them."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.routing import APIRouter
from starlette.concurrency import run_in_threadpool

from cloud.api.deps import get_database_url, get_settings
from cloud.api.routes.rollouts import _rollout_edges
from cloud.console.deps import OperatorForm, Viewer
from cloud.console.sse import event_stream
from cloud.console.templating import back_to, flash_of, render, render_fragment
from cloud.errors import CloudError, NotFoundError
from cloud.fleet import rollouts
from cloud.fleet.wave_gates import DEFAULT_GATES, REQUIRED_GATES
from cloud.registry import fleet, learning_views
from cloud.registry.db import session_scope
from shared.errors import MqttError

router = APIRouter(include_in_schema=False)

ACTIONS = ("pause", "resume", "abort")
LIVE_ID = "rollout-live"
# What each gate measures and which way its threshold goes, for the page.
GATE_HELP = {
    "deploy_failures": "edges of the wave whose deployment failed, at most",
    "error_rate": "(errors + dead letters) / windows, at most",
    "p95_latency_ms": "worst edge's inference p95 in ms, at most",
    "confidence_shift": "confidence histogram distance vs the previous version, at most",
    "teacher_agreement": "share of samples the teacher agrees with, at least",
    "accuracy_drop": "previous minus candidate accuracy on labelled windows, at most",
    "min_accuracy": "candidate accuracy on labelled windows, at least",
}
FORM_DEFAULTS = {"canary": 1, "waves": 2, **rollouts.DEFAULT_PARAMS}


# -- the list and the start form ---------------------------------------------------------------------


@router.get("/rollouts", response_class=HTMLResponse)
def rollouts_page(request: Request, user: Viewer) -> HTMLResponse:
    """The newest rollouts; operators also get the form that starts one."""
    with session_scope(get_database_url(request)) as session:
        rows = [rollouts.describe(r) for r in fleet.list_rollouts(session, limit=50)]
        form = None
        if user.may("operator"):
            form = {
                "models": [m.ref for m in learning_views.deployable_models(session)],
                "groups": learning_views.group_names(session),
                "edges": learning_views.edge_ids(session),
            }
    return render(
        request,
        "rollouts.html",
        user,
        nav="/rollouts",
        rollouts=[_summary(r) for r in rows],
        form=form,
        defaults=FORM_DEFAULTS,
        gates=DEFAULT_GATES,
        gate_help=GATE_HELP,
        **flash_of(request),
    )


def _summary(status: dict[str, Any]) -> dict[str, Any]:
    targets = status["targets"]
    return {
        **status,
        "edges": len(targets),
        "serving": sum(1 for t in targets if t["state"] == "serving"),
        "rolled_back": sum(1 for t in targets if t["state"] == "rolled_back"),
    }


def _number(form: Any, key: str, default: float) -> float:
    raw = str(form.get(key) or "").strip()
    if not raw:
        return float(default)
    try:
        return float(raw)
    except ValueError as exc:
        raise CloudError(f"{key}: {raw!r} is not a number") from exc


def _parse_start(form: Any) -> dict[str, Any]:
    """The start form as ``start_rollout`` arguments; ``CloudError`` naming a bad field."""
    model = str(form.get("model") or "").strip()
    if not model:
        raise CloudError("choose a model to roll out")
    edges = [str(e).strip() for e in form.getlist("edges") if str(e).strip()]
    edges += [e for e in str(form.get("edge_list") or "").replace(",", " ").split() if e]
    canary = _number(form, "canary", FORM_DEFAULTS["canary"])
    waves = int(_number(form, "waves", FORM_DEFAULTS["waves"]))
    params = {
        "min_windows": int(_number(form, "min_windows", FORM_DEFAULTS["min_windows"])),
        "soak_s": _number(form, "soak_s", FORM_DEFAULTS["soak_s"]),
    }
    if canary < 0 or waves < 1 or params["min_windows"] < 0 or params["soak_s"] < 0:
        raise CloudError("canary, min windows and soak must be at least 0, waves at least 1")
    return {
        "model": model,
        "target": str(form.get("target") or "edges"),
        "edges": edges,
        "group": str(form.get("group") or "").strip() or None,
        "canary": canary,
        "waves": waves,
        "gates": {name: _number(form, f"gate_{name}", value) for name, value in DEFAULT_GATES.items()},
        "params": params,
    }


def _start(request: Request, actor: str, asked: dict[str, Any]) -> str:
    """Resolve the targets as the API does, then record the rollout (the engine publishes it)."""
    target = asked["target"]
    chosen = _rollout_edges(
        get_database_url(request),
        asked["edges"] if target == "edges" else [],
        asked["group"] if target == "group" else None,
        target == "all",
    )
    return rollouts.start_rollout(
        settings=get_settings(request),
        model_ref=asked["model"],
        edge_ids=chosen,
        canary=asked["canary"],
        waves=asked["waves"],
        gates=asked["gates"],
        params=asked["params"],
        actor=actor,
    )


@router.post("/rollouts")
async def start_rollout(request: Request, user: OperatorForm) -> Response:
    """Start a rollout from the form: a model, its targets (edges, a group or all), canary, waves,
    gate thresholds and the wave parameters; then to its page."""
    form = await request.form()
    try:
        asked = _parse_start(form)
        rollout_id = await run_in_threadpool(_start, request, user.actor, asked)
    except HTTPException as exc:
        return back_to("/rollouts", f"Not started: {exc.detail}", error=True)
    except (CloudError, ValueError) as exc:
        return back_to("/rollouts", f"Not started: {exc}", error=True)
    return back_to(f"/rollouts/{rollout_id}", f"Rollout {rollout_id} of {asked['model']} started")


# -- one rollout -------------------------------------------------------------------------------------


def _waves(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Per wave: its targets, the decision and each gate's value against its threshold."""
    configured = {**DEFAULT_GATES, **(status.get("gates") or {})}
    results = status.get("gate_results") or {}
    waves = []
    for wave in range(int(status["waves"])):
        entry = results.get(str(wave)) or {}
        targets = [t for t in status["targets"] if t["wave"] == wave]
        if wave < status["current_wave"] or status["state"] == "completed":
            phase = "done"
        elif wave == status["current_wave"]:
            phase = "current"
        else:
            phase = "waiting"
        measured = {g["name"]: g for g in entry.get("gates") or []}
        gates = []
        for name, threshold in configured.items():
            found = measured.get(name)
            gates.append(
                {
                    "name": name,
                    "help": GATE_HELP.get(name, ""),
                    "required": name in REQUIRED_GATES,
                    "threshold": found["threshold"] if found else threshold,
                    "value": found["value"] if found else None,
                    "passed": found["passed"] if found else None,
                    "detail": found["detail"] if found else "not evaluated yet",
                }
            )
        waves.append(
            {
                "wave": wave,
                "label": "canary" if wave == 0 else f"wave {wave}",
                "phase": phase,
                "decision": entry.get("decision"),
                "ts": entry.get("ts"),
                "targets": targets,
                "gates": gates,
            }
        )
    return waves


def _live_html(user: Any, status: dict[str, Any]) -> str:
    return render_fragment("partials/rollout_live.html", user=user, r=status, waves=_waves(status))


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_page(request: Request, user: Viewer, rollout_id: str) -> HTMLResponse:
    """One rollout: state, per-wave targets and gates (live), and its actions for operators."""
    try:
        status = rollouts.status(settings=get_settings(request), rollout_id=rollout_id)
    except NotFoundError as exc:
        return render(request, "rollout.html", user, nav="/rollouts", status_code=404, error=str(exc), r=None)
    return render(
        request,
        "rollout.html",
        user,
        nav="/rollouts",
        r=status,
        waves=_waves(status),
        live_id=LIVE_ID,
        error=None,
        **flash_of(request),
    )


@router.get("/events/rollouts/{rollout_id}")
def rollout_events(request: Request, user: Viewer, rollout_id: str) -> StreamingResponse:
    """Server-sent events of one rollout: its live fragment, swapped every tick it changed."""
    settings = get_settings(request)
    rollouts.status(settings=settings, rollout_id=rollout_id)  # NotFoundError (404) before streaming

    def produce() -> list[tuple[str, Any]]:
        status = rollouts.status(settings=settings, rollout_id=rollout_id)
        return [("swap", {LIVE_ID: _live_html(user, status)})]

    return event_stream(request, produce)


@router.post("/rollouts/{rollout_id}/rollback")
async def rollback_rollout(request: Request, user: OperatorForm, rollout_id: str) -> Response:
    """Send every edge that received this rollout's model back to the model it ran before (its
    last-good when the registry does not know it), as ``edgefleet model rollback`` does."""
    settings = get_settings(request)

    def run() -> int:
        with session_scope(settings.resolved_database_url) as session:
            rollout = fleet.get_rollout(session, rollout_id=rollout_id)
            by_ref: dict[str | None, list[str]] = {}
            for target in rollout.targets:
                if target.revision is None or target.state in ("skipped", "rolled_back", "rolling_back"):
                    continue  # never received the model, or already back
                previous = fleet.model_by_id(session, model_id=target.previous_model_id)
                ref = previous.ref if previous is not None and previous.signature is not None else None
                by_ref.setdefault(ref, []).append(target.edge_id)
        for ref, edge_ids in by_ref.items():
            rollouts.rollback_edges(settings=settings, edge_ids=edge_ids, to_ref=ref, actor=user.actor)
        return sum(len(e) for e in by_ref.values())

    try:
        count = await run_in_threadpool(run)
    except MqttError as exc:
        message = f"Rollback recorded, but the broker did not take the orders: {exc}"
        return back_to(f"/rollouts/{rollout_id}", message, error=True)
    except CloudError as exc:
        return back_to(f"/rollouts/{rollout_id}", f"Rollback failed: {exc}", error=True)
    if count == 0:
        return back_to(
            f"/rollouts/{rollout_id}", "No edge of this rollout has its model to roll back", error=True
        )
    return back_to(f"/rollouts/{rollout_id}", f"Rollback ordered for {count} edge(s)")


@router.post("/rollouts/{rollout_id}/{action}")
async def rollout_action(request: Request, user: OperatorForm, rollout_id: str, action: str) -> Response:
    """Pause, resume or abort (which rolls back every edge that received the model)."""
    if action not in ACTIONS:
        return back_to(f"/rollouts/{rollout_id}", f"No rollout action {action!r}", error=True)
    try:
        state = await run_in_threadpool(
            rollouts.set_state,
            settings=get_settings(request),
            rollout_id=rollout_id,
            action=action,
            actor=user.actor,
        )
    except MqttError as exc:
        # Recorded; the engine's next ticks republish what the broker did not take.
        message = f"{action} recorded, but the broker did not take the orders yet (the engine retries): {exc}"
        return back_to(f"/rollouts/{rollout_id}", message, error=True)
    except CloudError as exc:
        return back_to(f"/rollouts/{rollout_id}", f"Not done: {exc}", error=True)
    return back_to(f"/rollouts/{rollout_id}", f"Rollout {rollout_id}: {action} done, now {state}")


@router.get("/rollouts/{rollout_id}/live", response_class=HTMLResponse)
def rollout_fragment(request: Request, user: Viewer, rollout_id: str) -> HTMLResponse:
    """The live fragment alone (what the event stream sends), for htmx or a reload-free refresh."""
    status = rollouts.status(settings=get_settings(request), rollout_id=rollout_id)
    return HTMLResponse(_live_html(user, status))

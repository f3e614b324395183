"""The console's fleet pages: the fleet overview (``/``), one device, one edge; the devices table
fragment htmx swaps in (``/fleet/devices``); a device's command and desired-config forms; and the
event streams that keep the three pages live.

Every query is in ``cloud.registry.fleet_views`` (paged and filtered in SQL); commands and desired
config go through the same functions as the CLI and the API (``cloud.fleet.commands``,
``cloud.fleet.device_config``). Pages work as plain GETs and forms as plain POSTs; htmx only spares
the reloads."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

import json
import math
import time
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import JsonValue

from cloud.api.deps import get_database_url, get_settings
from cloud.console import sse
from cloud.console.auth import ConsoleIdentity
from cloud.console.deps import OperatorForm, Viewer
from cloud.console.templating import render, render_fragment
from cloud.errors import CloudError, DeviceConfigError, DeviceConfigUnpublishedError, NotFoundError
from cloud.fleet import commands, device_config
from cloud.registry import fleet_views
from cloud.registry.db import session_scope
from cloud.registry.fleet_views import DevicePage, DeviceQuery
from shared.errors import MqttError
from shared.schemas import CommandName

router = APIRouter(include_in_schema=False)

# The fleet and edge charts: the last CHART_WINDOW_S in CHART_STEP_S buckets (a point per bucket).
CHART_WINDOW_S = 3600.0
CHART_STEP_S = 30.0
# Edges report every ~10 s: a bucket is drawn once the reports covering it had time to arrive.
CHART_SETTLE_S = 15.0
# A device's sparkline: decisions and uplinked samples per SPARK_STEP_S over the last SPARK_WINDOW_S.
SPARK_WINDOW_S = 3600.0
SPARK_STEP_S = 60.0
# How long a command POST waits for the device's ack (the API waits like this; later acks are
# recorded by the ingest and appear in the device's live command list).
COMMAND_WAIT_S = 5.0
COMMAND_TTL_S = 60.0
COMMAND_NAMES = tuple(c.value for c in CommandName)
DEVICE_COLUMNS = (
    ("device", "Device"),
    ("state", "State"),
    ("edge", "Edge"),
    ("group", "Group"),
    ("last_seen", "Last seen"),
)
ACCURACY_SERIES = [
    {"label": "accuracy", "stroke": "#1a7f37", "scale": "%"},
    {"label": "windows/s", "stroke": "#1f6feb", "scale": "w/s"},
]
ACTIVITY_SERIES = [
    {"label": "decisions/min", "stroke": "#cf222e"},
    {"label": "samples/min", "stroke": "#1f6feb"},
]


def _not_found(request: Request, user: ConsoleIdentity, what: str) -> HTMLResponse:
    return render(request, "not_found.html", user, status_code=404, nav="/", what=what)


def _chart(series: list[dict[str, Any]], data: list[list[Any]], **extra: Any) -> dict[str, Any]:
    return {"series": series, "data": data, **extra}


def _last_bucket(step_s: float, now: float) -> float:
    """Start of the newest complete bucket: what a freshly rendered chart ends with."""
    return math.floor(now / step_s) * step_s - step_s


def _after(raw: str | None, *, step_s: float, window_s: float, now: float) -> float:
    """The ``?after=`` of an event stream: the last bucket the page has (clamped to the window)."""
    try:
        value = float(raw) if raw else _last_bucket(step_s, now)
    except ValueError:
        value = _last_bucket(step_s, now)
    if not math.isfinite(value):
        value = _last_bucket(step_s, now)
    return min(max(value, now - window_s), _last_bucket(step_s, now))


# -- the devices table ------------------------------------------------------------------------------


def _device_query(request: Request, *, edge: str | None = None) -> DeviceQuery:
    params = request.query_params
    return DeviceQuery.parse(
        q=params.get("q"),
        state=params.get("state"),
        edge=edge if edge is not None else params.get("edge"),
        group=params.get("group"),
        sort=params.get("sort"),
        page=params.get("page"),
    )


def _table_links(devices: DevicePage, *, fixed_edge: str | None) -> dict[str, Any]:
    """Plain URLs (``href``, also pushed to the history) and fragment URLs (``hx``) of the table's
    sort headers and pager, keeping the filters."""
    base = f"/edges/{quote(fixed_edge, safe='')}" if fixed_edge else "/"

    def link(**overrides: Any) -> dict[str, str]:
        params = devices.query.params(**overrides)
        if fixed_edge:
            params.pop("edge", None)
        page_qs = urlencode(params)
        fragment = {**params, **({"edge": fixed_edge, "view": "edge"} if fixed_edge else {})}
        return {
            "href": base + (f"?{page_qs}" if page_qs else ""),
            "hx": "/fleet/devices" + (f"?{urlencode(fragment)}" if fragment else ""),
        }

    sorts = {}
    for key, _label in DEVICE_COLUMNS:
        toggled = f"-{key}" if devices.query.sort == key and not devices.query.descending else key
        sorts[key] = link(sort=toggled, page=1)
    return {
        "self": link(),
        "sorts": sorts,
        "prev": link(page=devices.page - 1) if devices.page > 1 else None,
        "next": link(page=devices.page + 1) if devices.page < devices.pages else None,
        "base": base,
    }


def _table_context(devices: DevicePage, *, fixed_edge: str | None) -> dict[str, Any]:
    return {
        "devices": devices,
        "links": _table_links(devices, fixed_edge=fixed_edge),
        "columns": DEVICE_COLUMNS,
        "fixed_edge": fixed_edge,
        "device_states": fleet_views.DEVICE_STATES,
    }


@router.get("/fleet/devices", response_class=HTMLResponse)
def devices_fragment(request: Request, user: Viewer, view: str = "fleet") -> Response:
    """The devices table (rows, sort headers, pager) for htmx; pushes the page's own URL."""
    fixed_edge = request.query_params.get("edge") if view == "edge" else None
    query = _device_query(request)
    with session_scope(get_database_url(request)) as session:
        devices = fleet_views.device_page(session, query=query)
    context = _table_context(devices, fixed_edge=fixed_edge or None)
    if not request.headers.get("hx-request"):
        # Not htmx (a bookmarked fragment URL): the whole page with the same table.
        return RedirectResponse(context["links"]["self"]["href"], status_code=303)
    response = render(request, "partials/fleet_devices.html", user, **context)
    response.headers["HX-Push-Url"] = context["links"]["self"]["href"]
    return response


# -- the fleet overview -----------------------------------------------------------------------------


def _fleet_live(session: Any, now: float) -> dict[str, Any]:
    edges = fleet_views.edge_rows(session, now=now)
    return {
        "edges": edges,
        "tiles": fleet_views.fleet_tiles(session, now=now, edges=edges),
        "alerts": fleet_views.fleet_alerts(session, now=now),
        "state_counts": fleet_views.device_state_counts(session),
    }


@router.get("/", response_class=HTMLResponse)
def fleet_page(request: Request, user: Viewer) -> HTMLResponse:
    """The fleet: tiles, accuracy and throughput over time, alerts, edges, devices (filtered, sorted,
    paged on the server)."""
    now = time.time()
    query = _device_query(request)
    with session_scope(get_database_url(request)) as session:
        live = _fleet_live(session, now)
        devices = fleet_views.device_page(session, query=query)
        series = fleet_views.accuracy_series(
            session, since=now - CHART_WINDOW_S, until=now - CHART_SETTLE_S, step_s=CHART_STEP_S
        )
        groups = fleet_views.group_names(session)
        edge_ids = [e["edge_id"] for e in live["edges"]]
    chart = _chart(ACCURACY_SERIES, series, height=240, maxPoints=int(CHART_WINDOW_S / CHART_STEP_S))
    last = series[0][-1] if series[0] else _last_bucket(CHART_STEP_S, now)
    return render(
        request,
        "fleet.html",
        user,
        nav="/",
        chart=chart,
        chart_step_s=CHART_STEP_S,
        sse_url=f"/events/fleet?after={last:.0f}",
        groups=groups,
        edge_ids=edge_ids,
        **live,
        **_table_context(devices, fixed_edge=None),
    )


# What each live page's stream swaps: element id -> (partial template, the key of the page's live
# parts it renders, passed to the template under the same name).
FLEET_FRAGMENTS = {
    "fleet-tiles": ("partials/fleet_tiles.html", "tiles"),
    "fleet-alerts": ("partials/fleet_alerts.html", "alerts"),
    "fleet-edges": ("partials/fleet_edges.html", "edges"),
    "fleet-device-counts": ("partials/fleet_device_counts.html", "state_counts"),
}
DEVICE_FRAGMENTS = {
    "device-status": ("partials/device_status.html", "device"),
    "device-commands": ("partials/device_commands.html", "commands"),
    "device-decisions": ("partials/device_decisions.html", "decisions"),
}
EDGE_FRAGMENTS = {
    "edge-status": ("partials/edge_status.html", "edge"),
    "edge-dead": ("partials/edge_dead.html", "dead"),
    "edge-deployments": ("partials/edge_deployments.html", "deployments"),
}

# read(session, since, now) -> (the page's live parts, its chart buckets from ``since``), or None
# when what the page shows is gone.
LiveReader = Callable[[Any, float, float], tuple[dict[str, Any], list[list[Any]]] | None]


def _live_stream(
    request: Request,
    *,
    step_s: float,
    window_s: float,
    chart_id: str,
    fragments: dict[str, tuple[str, str]],
    read: LiveReader,
) -> Response:
    """The event stream of a live page: every tick, its ``fragments`` re-rendered from ``read``'s live
    parts (sent when they changed) and a chart point per bucket newer than the page's ``?after=``."""
    url = get_database_url(request)
    state = {
        "after": _after(request.query_params.get("after"), step_s=step_s, window_s=window_s, now=time.time())
    }

    def produce() -> list[tuple[str, Any]]:
        with session_scope(url) as session:
            found = read(session, state["after"] + step_s, time.time())
        if found is None:
            return []
        live, series = found
        swaps = {
            element: render_fragment(template, **{name: live[name]})
            for element, (template, name) in fragments.items()
        }
        return [("swap", swaps), *_points(chart_id, series, state)]

    return sse.event_stream(request, produce)


@router.get("/events/fleet")
def fleet_events(request: Request, _who: Viewer) -> Response:
    """Every tick: the tiles, alerts, edges table and device counts (swapped when they changed), and
    a chart point per newly completed bucket."""

    def read(session: Any, since: float, now: float) -> tuple[dict[str, Any], list[list[Any]]]:
        series = fleet_views.accuracy_series(
            session, since=since, until=now - CHART_SETTLE_S, step_s=CHART_STEP_S
        )
        return _fleet_live(session, now), series

    return _live_stream(
        request,
        step_s=CHART_STEP_S,
        window_s=CHART_WINDOW_S,
        chart_id="fleet-chart",
        fragments=FLEET_FRAGMENTS,
        read=read,
    )


def _points(chart_id: str, series: list[list[Any]], state: dict[str, float]) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    for index, ts in enumerate(series[0]):
        if ts > state["after"]:
            events.append(("point", {"id": chart_id, "point": [column[index] for column in series]}))
            state["after"] = ts
    return events


# -- one device -------------------------------------------------------------------------------------


def _device_live(session: Any, device_id: str) -> dict[str, Any]:
    return {
        "device": fleet_views.device_detail(session, device_id=device_id),
        "commands": fleet_views.device_commands(session, device_id=device_id),
        "decisions": fleet_views.device_decisions(session, device_id=device_id),
    }


def _device_page(
    request: Request,
    user: ConsoleIdentity,
    device_id: str,
    *,
    status_code: int = 200,
    **extra: Any,
) -> HTMLResponse:
    now = time.time()
    with session_scope(get_database_url(request)) as session:
        try:
            live = _device_live(session, device_id)
        except NotFoundError:
            return _not_found(request, user, f"device {device_id}")
        activity = fleet_views.device_activity(
            session, device_id=device_id, since=now - SPARK_WINDOW_S, until=now, step_s=SPARK_STEP_S
        )
        command_id = request.query_params.get("command")
        outcome = fleet_views.command_by_id(session, command_id=command_id) if command_id else None
    if outcome is not None:
        extra.setdefault("command_outcome", outcome)
    saved = request.query_params.get("config")
    if saved == "saved" and "flash" not in extra:
        revision = live["device"]["desired_config_revision"]
        extra["flash"] = f"Desired config r{revision} published to {device_id}."
    last = activity[0][-1] if activity[0] else _last_bucket(SPARK_STEP_S, now)
    device = live["device"]
    config_text = extra.pop("config_text", None)
    if config_text is None:
        config_text = json.dumps(device["desired_config"], indent=2, sort_keys=True)
    return render(
        request,
        "device.html",
        user,
        status_code=status_code,
        nav="/",
        sparkline=_chart(
            ACTIVITY_SERIES, activity, sparkline=True, height=60, maxPoints=int(SPARK_WINDOW_S / SPARK_STEP_S)
        ),
        sse_url=f"/events/devices/{device_id}?after={last:.0f}",
        command_names=COMMAND_NAMES,
        config_text=config_text,
        config_keys=sorted(set(device["desired_config"]) | set(device["reported_config"])),
        **live,
        **extra,
    )


@router.get("/devices/{device_id}", response_class=HTMLResponse)
def device_page(request: Request, device_id: str, user: Viewer) -> HTMLResponse:
    """One device: status and health, desired vs reported config, commands with their acks, recent
    decisions, and a sparkline of its activity."""
    return _device_page(request, user, device_id)


@router.get("/events/devices/{device_id}")
def device_events(request: Request, device_id: str, _who: Viewer) -> Response:
    """Every tick: the device's status, command list (acks as they come) and decisions, and a
    sparkline point per newly completed minute."""

    def read(session: Any, since: float, now: float) -> tuple[dict[str, Any], list[list[Any]]] | None:
        try:
            live = _device_live(session, device_id)
        except NotFoundError:
            return None
        activity = fleet_views.device_activity(
            session, device_id=device_id, since=since, until=now, step_s=SPARK_STEP_S
        )
        return live, activity

    return _live_stream(
        request,
        step_s=SPARK_STEP_S,
        window_s=SPARK_WINDOW_S,
        chart_id="device-activity",
        fragments=DEVICE_FRAGMENTS,
        read=read,
    )


def _device_exists(request: Request, device_id: str) -> bool:
    with session_scope(get_database_url(request)) as session:
        try:
            fleet_views.device_detail(session, device_id=device_id)
        except NotFoundError:
            return False
    return True


@router.post("/devices/{device_id}/command", response_class=HTMLResponse)
def send_command(
    request: Request,
    device_id: str,
    user: OperatorForm,
    name: Annotated[str, Form()] = "",
    args: Annotated[str, Form()] = "",
) -> Response:
    """Send one command to the device and wait up to ``COMMAND_WAIT_S`` for its ack; then show the
    device page with the outcome (a redirect, so a reload does not send it again)."""
    if not _device_exists(request, device_id):
        return _not_found(request, user, f"device {device_id}")
    error = None
    parsed: Any = {}
    if name not in COMMAND_NAMES:
        error = f"unknown command {name!r}: one of {', '.join(COMMAND_NAMES)}"
    else:
        try:
            parsed = json.loads(args) if args.strip() else {}
        except ValueError as exc:
            error = f"arguments are not JSON: {exc}"
        else:
            if not isinstance(parsed, dict):
                error = 'arguments must be a JSON object, e.g. {"rate_hz": 50}'
    if error is None:
        try:
            result = commands.send_commands(
                settings=get_settings(request),
                device_ids=[device_id],
                name=name,
                args=parsed,
                ttl_s=COMMAND_TTL_S,
                wait_s=COMMAND_WAIT_S,
                sender=user.actor,
            )
        except (CloudError, MqttError, OSError) as exc:
            error = f"the command was not sent: {exc}"
        else:
            query = urlencode({"command": result.outcomes[0].command_id})
            return RedirectResponse(
                f"/devices/{quote(device_id, safe='')}?{query}#command-outcome", status_code=303
            )
    return _device_page(
        request,
        user,
        device_id,
        status_code=400,
        flash=error,
        flash_kind="error",
        command_error=error,
        command_form={"name": name, "args": args},
    )


def _parse_config(text: str) -> dict[str, JsonValue]:
    try:
        parsed = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise DeviceConfigError(f"the desired config is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise DeviceConfigError('the desired config must be a JSON object, e.g. {"rate_hz": 50}')
    return parsed


@router.post("/devices/{device_id}/config", response_class=HTMLResponse)
def set_config(
    request: Request,
    device_id: str,
    user: OperatorForm,
    config: Annotated[str, Form()] = "",
) -> Response:
    """Replace the device's desired config with the submitted JSON object (keys left out are unset)
    through ``device_config.set_device_config``, as ``PUT /v1/fleet/devices/{id}/config`` does."""
    with session_scope(get_database_url(request)) as session:
        try:
            current = fleet_views.device_detail(session, device_id=device_id)["desired_config"]
        except NotFoundError:
            return _not_found(request, user, f"device {device_id}")
    try:
        wanted = _parse_config(config)
        device_config.set_device_config(
            settings=get_settings(request),
            device_id=device_id,
            changes={k: v for k, v in wanted.items() if current.get(k) != v},
            unset=sorted(set(current) - set(wanted)),
            actor=user.actor,
        )
    except DeviceConfigUnpublishedError as exc:
        return _device_page(request, user, device_id, status_code=202, flash=str(exc), flash_kind="error")
    except DeviceConfigError as exc:
        return _device_page(
            request,
            user,
            device_id,
            status_code=400,
            flash=str(exc),
            flash_kind="error",
            config_error=str(exc),
            config_text=config,
        )
    return RedirectResponse(f"/devices/{quote(device_id, safe='')}?config=saved", status_code=303)


# -- one edge ---------------------------------------------------------------------------------------


def _edge_live(session: Any, edge_id: str, now: float) -> dict[str, Any]:
    return {
        "edge": fleet_views.edge_detail(session, edge_id=edge_id, now=now),
        "dead": fleet_views.edge_dead_letters(session, edge_id=edge_id),
        "deployments": fleet_views.edge_deployments(session, edge_id=edge_id),
    }


@router.get("/edges/{edge_id}", response_class=HTMLResponse)
def edge_page(request: Request, edge_id: str, user: Viewer) -> HTMLResponse:
    """One edge: the model it serves, its latencies and uplink queue, accuracy over time, dead
    letters with reasons, deployment history, and its devices."""
    now = time.time()
    query = _device_query(request, edge=edge_id)
    with session_scope(get_database_url(request)) as session:
        try:
            live = _edge_live(session, edge_id, now)
        except NotFoundError:
            return _not_found(request, user, f"edge {edge_id}")
        series = fleet_views.accuracy_series(
            session,
            since=now - CHART_WINDOW_S,
            until=now - CHART_SETTLE_S,
            step_s=CHART_STEP_S,
            edge_id=edge_id,
        )
        devices = fleet_views.device_page(session, query=query)
        groups = fleet_views.group_names(session)
    last = series[0][-1] if series[0] else _last_bucket(CHART_STEP_S, now)
    return render(
        request,
        "edge.html",
        user,
        nav="/",
        chart=_chart(ACCURACY_SERIES, series, height=220, maxPoints=int(CHART_WINDOW_S / CHART_STEP_S)),
        chart_step_s=CHART_STEP_S,
        sse_url=f"/events/edges/{edge_id}?after={last:.0f}",
        groups=groups,
        **live,
        **_table_context(devices, fixed_edge=edge_id),
    )


@router.get("/events/edges/{edge_id}")
def edge_events(request: Request, edge_id: str, _who: Viewer) -> Response:
    """Every tick: the edge's status and metrics, dead letters and deployments, and a chart point per
    newly completed bucket."""

    def read(session: Any, since: float, now: float) -> tuple[dict[str, Any], list[list[Any]]] | None:
        try:
            live = _edge_live(session, edge_id, now)
        except NotFoundError:
            return None
        series = fleet_views.accuracy_series(
            session, since=since, until=now - CHART_SETTLE_S, step_s=CHART_STEP_S, edge_id=edge_id
        )
        return live, series

    return _live_stream(
        request,
        step_s=CHART_STEP_S,
        window_s=CHART_WINDOW_S,
        chart_id="edge-chart",
        fragments=EDGE_FRAGMENTS,
        read=read,
    )

"""The console's fleet pages over HTTP, against a real API server and registry (SQLite): sign-in,
roles (a viewer reads but gets no forms and a 403 on a forged POST), CSRF, the devices table's
server-side filtering / sorting / paging (htmx fragments and plain URLs alike), 404s, the device's
config and command forms' errors, the edge page's figures, the event stream, and the fleet page's
first byte with 10,000 devices."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert

from cloud.registry.db import session_scope, upgrade
from cloud.registry.models import Device
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from tests.support.api_server import running_api
from tests.support.console import (
    console_client_for,
    create_console_user,
    csrf_of_page,
    seed_device_id,
    seed_fleet,
)

ROWS = re.compile(r'data-testid="device-row" data-device="([^"]+)"')
TOTAL = re.compile(r'data-testid="device-total">([^<]*)<')


def _settings(root: Path) -> CloudSettings:
    return CloudSettings(
        data_dir=root / "cloud",
        database_url=f"sqlite:///{root / 'registry.db'}",
        broker=MqttSettings(url="mqtt://127.0.0.1:1"),  # nothing listens: publishing fails fast
    )


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CloudSettings, str]]:
    settings = _settings(tmp_path_factory.mktemp("fleet-pages"))
    url = settings.resolved_database_url
    upgrade(url)
    seed_fleet(url, devices=120)
    create_console_user(url, "vera", "viewer")
    create_console_user(url, "otto", "operator")
    with running_api(settings) as base:
        yield settings, base


@pytest.fixture
def viewer(console: tuple[CloudSettings, str]) -> Iterator[httpx.Client]:
    client = console_client_for(console[1], "vera")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def operator(console: tuple[CloudSettings, str]) -> Iterator[httpx.Client]:
    client = console_client_for(console[1], "otto")
    try:
        yield client
    finally:
        client.close()


_open: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open:
        _open.pop().close()


def _rows(html: str) -> list[str]:
    return ROWS.findall(html)


def test_every_fleet_page_needs_a_session(console: tuple[CloudSettings, str]) -> None:
    with httpx.Client(base_url=console[1], timeout=30) as anonymous:
        answer = anonymous.get("/")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/signin"
        answer = anonymous.get("/devices/pump-001")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/signin?next=/devices/pump-001"
        assert anonymous.get("/edges/edge-a").status_code == 303
        assert anonymous.get("/fleet/devices", headers={"HX-Request": "true"}).status_code == 401
        assert anonymous.get("/events/fleet").status_code == 401
        assert anonymous.post("/devices/pump-001/command", data={"name": "ping"}).status_code == 303


def test_viewer_sees_the_fleet_but_no_action_forms(viewer: httpx.Client) -> None:
    page = viewer.get("/")
    assert page.status_code == 200
    html = page.text
    assert "<script>" not in html
    assert "onclick" not in html
    assert 'data-testid="tile-edges"><div class="value">2 / 3<' in html
    # 120 devices: every fifth state is online twice -> 48 online.
    assert 'data-testid="tile-devices"><div class="value">48 / 120<' in html
    assert 'data-testid="tile-windows"><div class="value">100<' in html  # two fresh edges x 50/s
    assert html.count('data-testid="edge-row"') == 3
    assert len(_rows(html)) == 50
    assert "1\N{EN DASH}50 of 120 devices" in html
    assert 'data-sse="/events/fleet?after=' in html
    # Alerts: the offline edge, the failed deployment, the drift trigger.
    assert "edge edge-c is offline" in html
    assert "deployment of vib@1.2.0 to edge-b failed: signature check failed" in html
    assert "drift on vib (drift_accuracy)" in html

    device = viewer.get("/devices/pump-000")
    assert device.status_code == 200
    assert 'data-testid="device-status"' in device.text
    assert 'method="post"' not in device.text.replace('action="/signout"', "").split("</header>", 1)[1]
    assert 'data-testid="command-form"' not in device.text
    assert 'data-testid="config-form"' not in device.text
    assert device.text.count('data-testid="decision-row"') == 5
    edge = viewer.get("/edges/edge-b")
    assert edge.status_code == 200
    assert 'method="post"' not in edge.text.split("</header>", 1)[1]


def test_viewer_forged_posts_are_refused(viewer: httpx.Client) -> None:
    csrf = csrf_of_page(viewer, "/devices/pump-001")  # a valid token: the sign-out form's
    answer = viewer.post("/devices/pump-001/command", data={"csrf_token": csrf, "name": "ping", "args": "{}"})
    assert answer.status_code == 403
    assert "needs operator" in answer.text
    answer = viewer.post("/devices/pump-001/config", data={"csrf_token": csrf, "config": '{"rate_hz": 5}'})
    assert answer.status_code == 403


def test_operator_posts_need_the_csrf_token(operator: httpx.Client) -> None:
    page = operator.get("/devices/pump-001")
    assert 'data-testid="command-form"' in page.text
    assert 'data-testid="config-form"' in page.text
    for path, data in (
        ("/devices/pump-001/command", {"name": "ping", "args": "{}"}),
        ("/devices/pump-001/config", {"config": "{}"}),
    ):
        assert operator.post(path, data=data).status_code == 403
        assert operator.post(path, data={**data, "csrf_token": "forged"}).status_code == 403


def test_devices_are_filtered_sorted_and_paged_on_the_server(viewer: httpx.Client) -> None:
    first = viewer.get("/").text
    assert _rows(first) == [seed_device_id(i) for i in range(50)]
    second = viewer.get("/?page=2").text
    assert _rows(second) == [seed_device_id(i) for i in range(50, 100)]
    clamped = viewer.get("/?page=99").text  # past the end: the last page
    assert _rows(clamped) == [seed_device_id(i) for i in range(100, 120)]
    assert "page 3 of 3" in clamped
    assert _rows(viewer.get("/?page=-4").text) == _rows(first)
    assert _rows(viewer.get("/?page=abc").text) == _rows(first)

    assert _rows(viewer.get("/?sort=-device").text)[:2] == ["pump-119", "pump-118"]
    # Newest last_seen first = lowest index (seeded now - index).
    assert _rows(viewer.get("/?sort=-last_seen").text)[:3] == ["pump-000", "pump-001", "pump-002"]
    by_state = _rows(viewer.get("/?sort=state&page=1").text)
    assert by_state[0] == "pump-002"  # "offline" sorts first, ids break ties
    # Unknown sort keys and injected SQL fall back to the default order.
    assert _rows(viewer.get("/?sort=device_id;DROP TABLE devices").text) == _rows(first)

    offline = viewer.get("/?state=offline").text
    assert _rows(offline) == [seed_device_id(i) for i in range(2, 120, 5)]
    assert "1\N{EN DASH}24 of 24 devices" in offline
    assert _rows(viewer.get("/?state=nonsense").text) == _rows(first)  # an unknown state: ignored
    assert _rows(viewer.get("/?q=PUMP-01").text) == [seed_device_id(i) for i in range(10, 20)]
    assert _rows(viewer.get("/?q=%25").text) == []  # LIKE wildcards are matched literally
    assert _rows(viewer.get("/?group=hall-9").text) == [seed_device_id(i) for i in range(0, 120, 10)]
    line_b = viewer.get("/?group=line-b&edge=edge-b").text
    assert _rows(line_b) == [seed_device_id(i) for i in range(120) if i % 2 == 1 and i % 3 == 1]
    combined = viewer.get("/?group=line-a&state=online&q=pump-0&sort=-device").text
    expected = [seed_device_id(i) for i in range(99, -1, -1) if i % 2 == 0 and i % 5 in (0, 1)]
    assert _rows(combined) == expected

    # The htmx fragment: just the table, and the page URL to push into the history.
    fragment = viewer.get("/fleet/devices?state=offline&sort=-device&page=1", headers={"HX-Request": "true"})
    assert fragment.status_code == 200
    assert "<html" not in fragment.text
    assert _rows(fragment.text)[0] == "pump-117"
    assert fragment.headers["HX-Push-Url"] == "/?state=offline&sort=-device"
    # Sort and pager links keep the filters, as plain URLs and as fragment URLs.
    assert 'href="/?state=offline&amp;sort=state"' in fragment.text
    assert 'hx-get="/fleet/devices?state=offline&amp;sort=state"' in fragment.text
    assert 'href="/?state=offline"' in fragment.text  # -device toggles back to the default order
    # The same URL without htmx (bookmarked): the whole page.
    plain = viewer.get("/fleet/devices?state=offline")
    assert plain.status_code == 303
    assert plain.headers["location"] == "/?state=offline"

    # The edge page's table is the edge's devices, its links stay on the edge page.
    edge = viewer.get("/edges/edge-b?sort=-device").text
    assert _rows(edge)[0] == "pump-118"
    assert len(_rows(edge)) == 40
    fragment = viewer.get(
        "/fleet/devices?view=edge&edge=edge-b&page=1&q=pump-1", headers={"HX-Request": "true"}
    )
    assert fragment.headers["HX-Push-Url"] == "/edges/edge-b?q=pump-1"
    assert set(_rows(fragment.text)) == {seed_device_id(i) for i in range(100, 120) if i % 3 == 1}


def test_unknown_device_and_edge_are_404_pages(viewer: httpx.Client, operator: httpx.Client) -> None:
    for path, what in (("/devices/nope-1", "device nope-1"), ("/edges/nope-2", "edge nope-2")):
        answer = viewer.get(path)
        assert answer.status_code == 404
        assert f"{what} is not in the registry" in answer.text
        assert 'data-testid="whoami"' in answer.text  # the layout, not a JSON error
    csrf = csrf_of_page(operator, "/")
    answer = operator.post("/devices/nope-1/command", data={"csrf_token": csrf, "name": "ping"})
    assert answer.status_code == 404


def test_bad_command_and_config_input_is_shown_not_sent(operator: httpx.Client) -> None:
    csrf = csrf_of_page(operator, "/devices/pump-003")
    answer = operator.post(
        "/devices/pump-003/command", data={"csrf_token": csrf, "name": "ping", "args": "{not json"}
    )
    assert answer.status_code == 400
    assert "arguments are not JSON" in answer.text
    assert "{not json" in answer.text  # the form keeps what was typed
    answer = operator.post("/devices/pump-003/command", data={"csrf_token": csrf, "name": "explode"})
    assert answer.status_code == 400
    assert "unknown command &#39;explode&#39;" in answer.text
    answer = operator.post(
        "/devices/pump-003/command", data={"csrf_token": csrf, "name": "ping", "args": "[1]"}
    )
    assert answer.status_code == 400
    assert "must be a JSON object" in answer.text

    answer = operator.post(
        "/devices/pump-003/config", data={"csrf_token": csrf, "config": '{"broker_url": 1}'}
    )
    assert answer.status_code == 400
    assert "broker_url cannot be set on a running device" in answer.text
    answer = operator.post("/devices/pump-003/config", data={"csrf_token": csrf, "config": "[]"})
    assert answer.status_code == 400
    assert "must be a JSON object" in answer.text
    # A valid config with the broker down: recorded (a new revision), not published, and said so.
    answer = operator.post("/devices/pump-003/config", data={"csrf_token": csrf, "config": '{"rate_hz": 50}'})
    assert answer.status_code == 202
    assert "is recorded but not published" in answer.text
    page = operator.get("/devices/pump-003").text
    assert "Desired r1 by console:otto" in page
    assert "&#34;rate_hz&#34;: 50" in page or '"rate_hz": 50' in page


def test_edge_page_shows_model_latency_uplink_dead_letters_and_deployments(viewer: httpx.Client) -> None:
    html = viewer.get("/edges/edge-b").text
    assert "vib@1.2.0" in html
    assert "0.40 / 1.10 ms" in html  # inference p50 / p95 from its newest metrics report
    assert 'data-testid="edge-uplink"><div class="value">8<' in html
    assert html.count('data-testid="dead-row"') == 3
    assert "bad window" in html
    assert html.count('data-testid="deployment-row"') == 1
    assert "signature check failed" in html
    assert 'data-sse="/events/edges/edge-b?after=' in html


def test_fleet_chart_shows_the_drift_dip_and_recovery(viewer: httpx.Client) -> None:
    html = viewer.get("/").text
    found = re.search(r'<script type="application/json" id="fleet-chart-data">(.*?)</script>', html, re.S)
    assert found
    chart = json.loads(found.group(1))
    times, accuracy, throughput = chart["data"]
    assert len(times) >= 118
    assert [s["label"] for s in chart["series"]] == ["accuracy", "windows/s"]
    known = [(t, a) for t, a in zip(times, accuracy, strict=True) if a is not None]
    now = time.time()
    dip = [a for t, a in known if 1250 <= now - t <= 1750]
    normal = [a for t, a in known if now - t <= 900 or now - t >= 2000]
    assert dip
    assert max(dip) < 0.65
    assert normal
    assert min(normal) > 0.9
    # 3 edges x 50 windows/s (the first bucket starts before the seeded reports do).
    assert all(w is None or 140 <= w <= 160 for w in throughput[1:])


def test_event_stream_sends_fragments(viewer: httpx.Client) -> None:
    with viewer.stream("GET", "/events/fleet") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        event = None
        for line in lines:
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "swap":
                parts = json.loads(line.removeprefix("data: "))
                assert set(parts) == {"fleet-tiles", "fleet-alerts", "fleet-edges", "fleet-device-counts"}
                assert "48 / 120" in parts["fleet-tiles"]
                break
    for path, ids in (
        ("/events/devices/pump-000", {"device-status", "device-commands", "device-decisions"}),
        ("/events/edges/edge-b", {"edge-status", "edge-dead", "edge-deployments"}),
    ):
        with viewer.stream("GET", path) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    assert set(json.loads(line.removeprefix("data: "))) == ids
                    break


def test_fleet_pages_page_through_10000_devices(tmp_path: Path) -> None:
    """Every view of a 10,000-device registry answers with one page of rows (speed is measured by
    ``edgefleet bench console``, not here)."""
    settings = _settings(tmp_path)
    url = settings.resolved_database_url
    upgrade(url)
    seed_fleet(url, devices=0)
    now = time.time()
    with session_scope(url) as session:
        session.execute(
            insert(Device),
            [
                {
                    "device_id": f"dev-{i:05d}",
                    "edge_id": ("edge-a", "edge-b", "edge-c")[i % 3],
                    "state": ("online", "offline")[i % 2],
                    "tags": [],
                    "info": {"outbox_depth": i % 5},
                    "last_seen": now - i,
                    "created_at": now,
                }
                for i in range(10_000)
            ],
        )
    create_console_user(url, "vera", "viewer")
    with running_api(settings) as base:
        client = console_client_for(base, "vera")
        _open.append(client)
        for path in ("/", "/?sort=-last_seen&page=150", "/?q=dev-09&state=offline", "/edges/edge-a"):
            answer = client.get(path)
            assert answer.status_code == 200, path
            assert answer.text.count('data-testid="device-row"') <= 50, path
        assert "1\N{EN DASH}50 of 10,000 devices" in client.get("/").text


def test_the_queries_behave_the_same_on_postgresql(postgres_url: str) -> None:
    """The devices table's SQL (JSON tags as text, ILIKE with escaping, NULLS LAST, grouped counts)
    and the overview's figures on PostgreSQL, straight through ``fleet_views``."""
    from cloud.registry import fleet_views  # noqa: PLC0415
    from cloud.registry.db import downgrade, engine_for  # noqa: PLC0415

    upgrade(postgres_url)
    try:
        now = time.time()
        seed_fleet(postgres_url, devices=120, now=now)
        with session_scope(postgres_url) as session:

            def ids(**params: str) -> list[str]:
                page = fleet_views.device_page(session, query=fleet_views.DeviceQuery.parse(**params))
                return [row["device_id"] for row in page.rows]

            assert ids() == [seed_device_id(i) for i in range(50)]
            assert ids(page="9") == [seed_device_id(i) for i in range(100, 120)]
            assert ids(sort="-last_seen")[:2] == ["pump-000", "pump-001"]
            assert ids(group="hall-9") == [seed_device_id(i) for i in range(0, 120, 10)]
            assert ids(q="PUMP-01", state="online") == ["pump-010", "pump-011", "pump-015", "pump-016"]
            assert ids(q="%") == []
            assert ids(group="line-b", edge="edge-b", sort="-device")[0] == "pump-115"
            tiles = fleet_views.fleet_tiles(session, now=now)
            assert (tiles["edges_online"], tiles["devices_online"], tiles["devices_total"]) == (2, 48, 120)
            assert tiles["windows_per_s"] == 100
            kinds = [a["kind"] for a in fleet_views.fleet_alerts(session, now=now)]
            assert kinds == ["edge_offline", "deploy_failed", "drift"]
            times, accuracy, _ = fleet_views.accuracy_series(session, since=now - 3600, until=now, step_s=60)
            assert len(times) >= 59
            assert min(a for a in accuracy if a is not None) < 0.65
            edge = fleet_views.edge_detail(session, edge_id="edge-b", now=now)
            assert edge["metrics"]["inference_latency"]["p95_ms"] == 1.1
            assert fleet_views.edge_dead_letters(session, edge_id="edge-b")["reasons"] == [
                {"reason": "bad window", "count": 3}
            ]
            activity = fleet_views.device_activity(
                session, device_id="pump-010", since=now - 3600, until=now, step_s=60
            )
            assert (sum(activity[1]), sum(activity[2])) == (15, 10)
    finally:
        engine_for(postgres_url).dispose()
        downgrade(postgres_url, "base")

"""The fleet pages in a real browser (Debian's chromium through Playwright) against a real API server,
registry and mosquitto: sign in as an operator through the form, look at the fleet, filter and sort
the devices without a reload, open a device, send it a command a device answers over the broker and
see the ack, open its edge, and watch a registry change arrive on the open fleet page by itself.

Leaves ``fleet.png``, ``device.png`` and ``edge.png`` in ``test-artifacts/console/`` (the docs link
them). Console errors on any page fail the test (the ``page`` fixture)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cloud.console import sse
from cloud.console.routes import fleet as fleet_routes
from cloud.registry import crud
from cloud.registry.db import session_scope, upgrade
from shared.schemas import AckStatus, Command, CommandAck
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from tests.support.api_server import running_api
from tests.support.brokers import Mosquitto
from tests.support.browser import screenshot
from tests.support.console import browser_sign_in, create_console_user, seed_fleet
from tests.support.edge_fixtures import FakeDevice

if TYPE_CHECKING:
    from playwright.sync_api import Page

WAIT_MS = 15_000


def _poll(page: Page, expression: str, timeout_s: float = WAIT_MS / 1000) -> None:
    """Wait until ``expression`` is true in the page (``wait_for_function`` would evaluate it with
    ``eval``, which the console's CSP rightly refuses)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout_s} s: {expression}"
        time.sleep(0.1)


@pytest.fixture
def live_console(
    tmp_path: Path, mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[CloudSettings, str]]:
    """A seeded registry behind a real API server whose broker is a real mosquitto; event streams
    tick every 0.3 s. Requested before ``page`` so the page closes before the server stops."""
    monkeypatch.setattr(sse, "EVENT_INTERVAL_S", 0.3)
    settings = CloudSettings(
        data_dir=tmp_path / "cloud",
        database_url=f"sqlite:///{tmp_path / 'registry.db'}",
        broker=MqttSettings(url=mosquitto.url),
    )
    url = settings.resolved_database_url
    upgrade(url)
    seed_fleet(url, devices=120)
    create_console_user(url, "otto", "operator")
    with running_api(settings) as base:
        yield settings, base


def test_operator_walks_the_fleet_sends_a_command_and_sees_live_updates(
    live_console: tuple[CloudSettings, str], mosquitto: Mosquitto, page: Page, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, base = live_console
    device = FakeDevice(mosquitto.url, "pump-010")  # answers its commands over the broker
    try:
        page.goto(f"{base}/")
        assert "/signin" in page.url
        browser_sign_in(page, base, "otto")
        assert page.url.rstrip("/") == base
        assert page.get_by_test_id("whoami").inner_text() == "otto · operator"

        # The fleet: tiles, the chart drawn by uPlot, alerts, edges, the first page of devices.
        assert page.get_by_test_id("tile-edges").locator(".value").inner_text() == "2 / 3"
        page.wait_for_selector("#fleet-chart canvas", timeout=WAIT_MS)
        assert page.get_by_test_id("edge-row").count() == 3
        assert page.get_by_test_id("device-row").count() == 50
        assert "edge edge-c is offline" in page.get_by_test_id("fleet-alerts").inner_text()
        page.wait_for_selector("body[data-sse-updates]", timeout=WAIT_MS)  # the stream is live
        screenshot(page, "fleet")

        # Filter: typing swaps only the table (htmx) and pushes a URL that works on its own.
        page.evaluate("window.__samePage = true")
        page.fill("#device-q", "pump-01")
        total = page.get_by_test_id("device-total")
        total.filter(has_text="of 10 devices").wait_for(timeout=WAIT_MS)
        assert page.get_by_test_id("device-row").count() == 10
        page.wait_for_url(re.compile(r"\?q=pump-01$"), timeout=WAIT_MS)
        page.get_by_test_id("sort-device").click()
        page.wait_for_url(re.compile(r"sort=-device"), timeout=WAIT_MS)
        page.locator("[data-testid=device-row]").first.filter(has_text="pump-019").wait_for(timeout=WAIT_MS)
        page.select_option("#device-state", "online")
        page.wait_for_url(re.compile(r"state=online"), timeout=WAIT_MS)
        page.locator("[data-testid=device-total]", has_text="of 4 devices").wait_for(timeout=WAIT_MS)
        assert page.evaluate("window.__samePage") is True, "filtering reloaded the page"

        # A device: status, config, commands. Send it a command; the page shows its ack.
        page.click("[data-testid=device-row][data-device=pump-010] a[href='/devices/pump-010']")
        page.wait_for_url(f"{base}/devices/pump-010", timeout=WAIT_MS)
        assert page.get_by_test_id("device-state").inner_text() == "online"
        page.select_option("[data-testid=command-name]", "set_rate")
        page.fill("[data-testid=command-args]", '{"rate_hz": 50}')
        page.click("[data-testid=command-send]")
        ack = page.get_by_test_id("command-ack-status")
        ack.wait_for(timeout=WAIT_MS)
        assert ack.inner_text() == "ok"
        assert page.get_by_test_id("command-row").first.get_by_test_id("command-row-ack").inner_text() == "ok"
        assert [(c.name.value, c.args) for c in device.commands] == [("set_rate", {"rate_hz": 50})]
        assert device.commands[0].sender == "console:otto"
        page.wait_for_selector("#device-activity canvas", timeout=WAIT_MS)
        screenshot(page, "device")
        # The command list is live: a command sent elsewhere shows up, then its late ack.
        late = Command.create(device_id="pump-010", name="ping", sender="cli")
        with session_scope(settings.resolved_database_url) as session:
            crud.record_command(session, command=late)
        row = page.locator(f"[data-testid=command-row][data-command='{late.command_id}']")
        row.get_by_test_id("command-row-ack").filter(has_text="waiting").wait_for(timeout=WAIT_MS)
        with session_scope(settings.resolved_database_url) as session:
            crud.record_ack(
                session,
                ack=CommandAck(
                    command_id=late.command_id,
                    device_id="pump-010",
                    status=AckStatus.ERROR,
                    ok=False,
                    error="sensor busy",
                ),
            )
        row.get_by_test_id("command-row-ack").filter(has_text="error").wait_for(timeout=WAIT_MS)
        assert "sensor busy" in row.inner_text()

        # Its edge: serving model, latencies, uplink queue, dead letters, deployments, its devices.
        page.click("#device-status a[href='/edges/edge-b']")
        page.wait_for_url(f"{base}/edges/edge-b", timeout=WAIT_MS)
        assert "vib@1.2.0" in page.get_by_test_id("edge-model").inner_text()
        assert "0.40 / 1.10 ms" in page.get_by_test_id("edge-latency").inner_text()
        assert page.get_by_test_id("deployment-row").count() == 1
        assert page.get_by_test_id("device-row").count() == 40
        page.wait_for_selector("#edge-chart canvas", timeout=WAIT_MS)
        screenshot(page, "edge")

        # Live: a device comes online in the registry; the open fleet page shows it without a reload.
        page.goto(f"{base}/")
        tile = page.get_by_test_id("tile-devices").locator(".value")
        assert tile.inner_text() == "48 / 120"
        page.evaluate("window.__samePage = true")
        with session_scope(settings.resolved_database_url) as session:
            crud.upsert_device(session, device_id="pump-002", state="online")
            crud.upsert_edge(session, edge_id="edge-c", state="online")
        page.get_by_test_id("tile-devices").filter(has_text="49 / 120").wait_for(timeout=WAIT_MS)
        page.get_by_test_id("tile-edges").filter(has_text="3 / 3").wait_for(timeout=WAIT_MS)
        assert "edge edge-c is offline" not in page.get_by_test_id("fleet-alerts").inner_text()
        assert page.evaluate("window.__samePage") is True, "the update reloaded the page"
        assert int(page.get_attribute("body", "data-sse-updates") or 0) >= 1

        # The chart grows by itself: with 2 s buckets, a new edge's two reports (10 labelled windows,
        # 5 correct) become a point at 50 % accuracy.
        monkeypatch.setattr(fleet_routes, "CHART_STEP_S", 2.0)
        monkeypatch.setattr(fleet_routes, "CHART_SETTLE_S", 0.0)
        monkeypatch.setattr(fleet_routes, "CHART_WINDOW_S", 60.0)
        page.goto(f"{base}/")
        page.wait_for_selector("#fleet-chart canvas", timeout=WAIT_MS)
        newest = "window.edgefleetConsole.charts['fleet-chart'].data[0].slice(-1)[0]"
        before = page.evaluate(newest)
        with session_scope(settings.resolved_database_url) as session:
            first = time.time()
            for ts, windows, labelled, correct in ((first, 0, 0, 0), (first + 0.05, 100, 10, 5)):
                crud.add_metrics(
                    session,
                    edge_id="edge-z",
                    ts=ts,
                    model_version="1.2.0",
                    windows_total=windows,
                    labelled_windows=labelled,
                    labelled_correct=correct,
                    data={"windows_per_s": 50.0},
                )
        _poll(page, "window.edgefleetConsole.charts['fleet-chart'].data[1].includes(0.5)")
        assert page.evaluate(newest) > before  # appended (the oldest points drop off)
        page.goto("about:blank")  # close the event stream before the server stops
    finally:
        device.close()

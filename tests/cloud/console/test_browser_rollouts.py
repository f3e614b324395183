"""The console in a real browser against a real fleet: the API and console on a real registry, a
private mosquitto, the real ingest, two in-process edge nodes running real LiteRT models fed labelled
windows, and the rollout engine ticking. An operator starts a rollout from the form and watches it
complete on its page without reloading (server-sent events), starts another and aborts it (the
edges roll back); then the models, learning, audit and admin pages, each left as a screenshot."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cloud.console import sse
from cloud.fleet import rollouts
from cloud.registry import crud
from cloud.registry.db import session_scope
from tests.support.api_server import running_api
from tests.support.browser import screenshot
from tests.support.console import browser_sign_in, create_console_user
from tests.support.edge_fixtures import (
    edge_models_fixture,  # noqa: F401  (fixture)
    wait_for,
)
from tests.support.rollout_fleet import RolloutFleet, running_fleet, seed_learning_history

if TYPE_CHECKING:
    from playwright.sync_api import Page

ROLLOUT_WAIT_MS = 180_000


@dataclass
class Console:
    fleet: RolloutFleet
    url: str


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, edge_models: dict[str, Path]) -> Iterator[Console]:
    workdir = tmp_path_factory.mktemp("console-fleet")
    patch = pytest.MonkeyPatch()
    patch.setattr(sse, "EVENT_INTERVAL_S", 0.5)  # the page follows the engine's 0.5 s ticks
    try:
        with running_fleet(workdir, edge_models) as fleet:
            seed_learning_history(fleet.settings)
            url = fleet.settings.resolved_database_url
            create_console_user(url, "olga", "operator")
            create_console_user(url, "adam", "admin")
            with running_api(fleet.settings) as base:
                yield Console(fleet, base)
    finally:
        patch.undo()


def _runs(console: Console, edge: str, version: str) -> bool:
    return console.fleet.reported(edge).get("model_version") == version


def _start_from_form(page: Page, console: Console, model: str, *, min_windows: int) -> str:
    page.goto(f"{console.url}/rollouts")
    form = page.locator("[data-testid=start-rollout]")
    form.locator("[data-testid=rollout-model]").select_option(model)
    form.locator("[data-testid=target-all]").check()
    form.locator("input[name=canary]").fill("1")
    form.locator("input[name=waves]").fill("1")
    form.locator("input[name=min_windows]").fill(str(min_windows))
    form.locator("input[name=soak_s]").fill("0")
    # The engine's defaults are filled in; these two are loosened for a CPU shared with the tests.
    assert form.locator("[data-testid=gate-p95_latency_ms]").input_value() == "50.0"
    form.locator("[data-testid=gate-p95_latency_ms]").fill("500")
    form.locator("[data-testid=gate-error_rate]").fill("0.05")
    form.locator("[data-testid=rollout-start]").click()
    page.wait_for_url(re.compile(r"/rollouts/ro-[0-9a-f]+\?"))
    found = re.search(r"/rollouts/(ro-[0-9a-f]+)", page.url)
    assert found is not None
    assert "started" in page.locator("[data-testid=flash]").inner_text()
    return found.group(1)


def test_operator_starts_a_rollout_and_watches_it_complete_live(page: Page, console: Console) -> None:
    browser_sign_in(page, console.url, "olga")
    rollout_id = _start_from_form(page, console, console.fleet.models["v1"], min_windows=20)
    page.evaluate("window.__notReloaded = true")
    live = page.locator("[data-testid=rollout-state]")
    assert live.inner_text() == "running"

    assert page.locator("[data-testid=rollout-abort]").is_visible()
    assert page.locator("[data-testid=rollout-rollback]").is_hidden()
    live.filter(has_text="completed").wait_for(timeout=ROLLOUT_WAIT_MS)
    # The same document all along: the state arrived over the event stream, not by reloading.
    assert page.evaluate("window.__notReloaded") is True
    assert int(page.evaluate("document.body.getAttribute('data-sse-updates')")) > 1
    for edge in console.fleet.edges:
        assert page.locator(f"[data-testid=target-{edge}] .badge").inner_text() == "serving"
    # The actions follow the live state: nothing left to pause or abort, its edges may roll back.
    assert page.locator("[data-testid=rollout-abort]").is_hidden()
    assert page.locator("[data-testid=rollout-pause]").is_hidden()
    assert page.locator("[data-testid=rollout-rollback]").is_visible()
    assert page.locator("[data-testid=wave-0-decision]").inner_text() == "pass"
    canary = page.locator("[data-testid=wave-0]").inner_text()
    assert "deploy_failures" in canary
    assert "error_rate" in canary
    status = rollouts.status(settings=console.fleet.settings, rollout_id=rollout_id)
    assert status["state"] == "completed"
    assert status["created_by"] == "console:olga"
    assert status["gates"]["p95_latency_ms"] == 500.0
    screenshot(page, "rollout")
    for edge in console.fleet.edges:
        wait_for(functools.partial(_runs, console, edge, "1.0.0"), f"{edge} on 1.0.0")


def test_operator_aborts_a_rollout_and_sees_the_rollback(page: Page, console: Console) -> None:
    browser_sign_in(page, console.url, "olga")
    # More windows than it will see: the canary's gates wait until the abort.
    rollout_id = _start_from_form(page, console, console.fleet.models["v2"], min_windows=1_000_000)
    canary = console.fleet.edges[0]
    page.locator(f"[data-testid=target-{canary}] .badge").filter(has_text="serving").wait_for(
        timeout=ROLLOUT_WAIT_MS
    )
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("[data-testid=rollout-abort]").click()
    page.wait_for_url(re.compile(r"flash="))
    assert "abort done" in page.locator("[data-testid=flash]").inner_text()
    page.locator("[data-testid=rollout-state]").filter(has_text="aborted").wait_for(timeout=10_000)
    assert "aborted by console:olga" in page.locator("[data-testid=rollout-reason]").inner_text()
    # The canary rolls back to 1.0.0 (live, on this page); the other edge never received 2.0.0.
    page.locator(f"[data-testid=target-{canary}] .badge").filter(has_text="rolled_back").wait_for(
        timeout=ROLLOUT_WAIT_MS
    )
    other = console.fleet.edges[1]
    assert page.locator(f"[data-testid=target-{other}] .badge").inner_text() == "skipped"
    assert page.locator("[data-testid=rollout-abort]").is_hidden()
    assert page.locator("[data-testid=rollout-rollback]").is_visible()
    wait_for(
        lambda: console.fleet.reported(canary).get("model_version") == "1.0.0", f"{canary} back on 1.0.0"
    )
    assert console.fleet.reported(other).get("model_version") == "1.0.0"
    screenshot(page, "rollout-aborted")
    status = rollouts.status(settings=console.fleet.settings, rollout_id=rollout_id)
    assert [t["state"] for t in status["targets"]] == ["rolled_back", "skipped"]


def test_models_learning_audit_and_admin_pages(page: Page, console: Console) -> None:
    browser_sign_in(page, console.url, "olga")
    page.goto(f"{console.url}/rollouts")
    assert page.locator("[data-testid=rollouts-table] tbody tr").count() == 2
    screenshot(page, "rollouts")

    page.goto(f"{console.url}/models")
    assert page.locator("[data-testid=models-table]").inner_text().count("vib@") >= 5
    page.locator("[data-testid=diff-submit]").click()
    page.locator("tr.diff-changed").first.wait_for()
    screenshot(page, "model-diff")
    page.goto(f"{console.url}/models")
    page.locator("a", has_text="vib@r2-int8").first.click()
    page.locator("[data-testid=lineage]").wait_for()
    assert "run 2" in page.locator("[data-testid=lineage]").inner_text()
    screenshot(page, "models")

    page.goto(f"{console.url}/learning")
    page.locator("#accuracy-chart canvas").wait_for()  # uPlot drew the chart
    assert "drift_accuracy" in page.locator("[data-testid=triggers-table]").inner_text()
    run = page.locator("[data-testid=run-2]").inner_text()
    assert "+6.0 pt" in run
    assert "20.0 s" in run
    screenshot(page, "learning")

    page.goto(f"{console.url}/audit")
    page.locator("[data-testid=filter-actor]").fill("console:olga")
    page.locator("[data-testid=filter-action]").select_option("rollout_abort")
    page.locator("[data-testid=filter-apply]").click()
    page.wait_for_url(re.compile(r"action=rollout_abort"))
    rows = page.locator("[data-testid=audit-table] tbody tr")
    assert rows.count() == 1
    assert "console:olga" in rows.first.inner_text()
    page.goto(f"{console.url}/audit")
    screenshot(page, "audit")

    assert page.locator("nav a[href='/admin']").count() == 0
    page.context.clear_cookies()
    browser_sign_in(page, console.url, "adam")
    page.goto(f"{console.url}/admin")
    page.locator("[data-testid=token-name]").fill("dashboard")
    page.locator("[data-testid=token-role]").select_option("viewer")
    page.locator("[data-testid=token-submit]").click()
    secret = page.locator("[data-testid=new-token-secret]").inner_text()
    assert secret.startswith("eft_")
    page.locator("[data-testid=user-name]").fill("petra")
    page.locator("[data-testid=user-role]").select_option("operator")
    page.locator("[data-testid=user-password]").fill("a long enough password")
    page.locator("[data-testid=user-submit]").click()
    page.locator("[data-testid=flash]", has_text="User petra created").wait_for()
    assert page.locator("[data-testid=key-id]").inner_text() != ""
    screenshot(page, "admin")
    with session_scope(console.fleet.settings.resolved_database_url) as session:
        done = {(a.actor, a.action, a.target) for a in crud.list_audit(session, limit=200)}
    assert ("console:adam", "token_create", "dashboard") in done
    assert ("console:adam", "user_create", "petra") in done

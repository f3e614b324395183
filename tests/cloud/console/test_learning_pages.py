"""The console's models, rollouts, learning, audit and admin pages over HTTP, against a real API
server and registry seeded the way the pipeline and the rollout engine write it: what each role sees,
403 for forged or token-less forms, the start / pause / abort of a rollout from its forms, the live
fragment's event stream, tokens and users created from the admin page, and the audit filters."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest

from cloud.console.sse import format_event
from cloud.fleet import rollouts
from cloud.registry import accounts, crud, fleet
from cloud.registry.db import session_scope, upgrade
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from tests.support.api_server import running_api
from tests.support.console import console_client_for, create_console_user, csrf_of_page
from tests.support.rollout_fleet import seed_learning_history

POST_FORM = re.compile(r'<form[^>]*method="post"[^>]*action="([^"]+)"')


@dataclass
class Seeded:
    settings: CloudSettings
    url: str
    base_id: int
    int8_id: int
    previous_id: int
    rollout_id: str


def _seed(settings: CloudSettings) -> tuple[int, int, int, str]:
    """Two pipeline runs of vib (r1 published, r2 retrained from it after a drift trigger), a signed
    candidate, an edge serving it, a rollout with gate results, and audit entries."""
    history = seed_learning_history(settings)
    with session_scope(settings.resolved_database_url) as session:
        int8 = crud.get_model_version(session, model_id=history.int8_id)
        crud.upsert_edge(
            session,
            edge_id="edge-1",
            state="online",
            model_version="r2-int8",
            reported={"model_name": "vib", "model_version": "r2-int8"},
        )
        crud.upsert_edge(session, edge_id="edge-2", state="online", model_version="r1-int8", reported={})
        rollout = fleet.create_rollout(
            session,
            rollout_id="ro-seeded",
            model=int8,
            plan=[["edge-1"], ["edge-2"]],
            gates={"error_rate": 0.02},
            params={"min_windows": 10, "soak_s": 0},
            created_by="console:otto",
        )
        rollout.state = "completed"
        rollout.current_wave = 1
        rollout.gate_results = {
            "0": {
                "decision": "pass",
                "ts": time.time(),
                "gates": [
                    {
                        "name": "deploy_failures",
                        "passed": True,
                        "value": 0.0,
                        "threshold": 0.0,
                        "detail": "ok",
                    },
                    {
                        "name": "error_rate",
                        "passed": True,
                        "value": 0.004,
                        "threshold": 0.02,
                        "detail": "2 in 500",
                    },
                    {
                        "name": "p95_latency_ms",
                        "passed": False,
                        "value": 61.0,
                        "threshold": 50.0,
                        "detail": "slow",
                    },
                ],
            }
        }
        for target in rollout.targets:
            target.state, target.revision = "serving", 1
        crud.audit(
            session, actor="cli:root", action="token_create", target="ci-bot", detail={"role": "viewer"}
        )
        crud.audit(session, actor="rollout-engine", action="rollout_completed", target="ro-seeded")
        return history.base_id, history.int8_id, history.previous_id, rollout.rollout_id


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    root = tmp_path_factory.mktemp("console-pages")
    settings = CloudSettings(
        data_dir=root / "cloud",
        database_url=f"sqlite:///{root / 'registry.db'}",
        broker=MqttSettings(url="mqtt://127.0.0.1:1"),  # nothing here publishes
        dev_mode=True,
    )
    upgrade(settings.resolved_database_url)
    base_id, int8_id, previous_id, rollout_id = _seed(settings)
    for name, role in (("vera", "viewer"), ("otto", "operator"), ("ada", "admin")):
        create_console_user(settings.resolved_database_url, name, role)
    with running_api(settings) as url:
        yield Seeded(settings, url, base_id, int8_id, previous_id, rollout_id)


_clients: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def signed_in(seeded: Seeded, name: str) -> httpx.Client:
    client = console_client_for(seeded.url, name)
    _clients.append(client)
    return client


def _pages(seeded: Seeded) -> list[str]:
    return [
        "/models",
        f"/models/{seeded.int8_id}",
        f"/models/diff?a={seeded.base_id}&b={seeded.int8_id}",
        "/rollouts",
        f"/rollouts/{seeded.rollout_id}",
        "/learning",
        "/audit",
    ]


def test_every_page_answers_a_viewer_with_its_data_and_no_action(seeded: Seeded) -> None:
    client = signed_in(seeded, "vera")
    for path in _pages(seeded):
        page = client.get(path)
        assert page.status_code == 200, (path, page.text[:2000])
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "<script>" not in page.text, path
        assert " onclick=" not in page.text, path
        # The only form a viewer may post is signing out.
        assert POST_FORM.findall(page.text) == ["/signout"], path
    models = client.get("/models").text
    assert "vib@r2-int8" in models
    assert "vib@r1-int8" in models
    assert client.get("/admin").status_code == 403
    assert 'href="/admin"' not in models


def test_model_page_shows_lineage_compression_and_gate(seeded: Seeded) -> None:
    client = signed_in(seeded, "vera")
    page = client.get(f"/models/{seeded.int8_id}").text
    lineage = page[page.index('data-testid="lineage"') :]
    for expected in ("vibration", "builtin:vibration", "run 2", "vib@r1-int8", "vib@r2-float32", "edge-1"):
        assert expected in lineage, expected
    table = page[page.index('data-testid="compression-table"') :]
    assert "94.0 %" in table
    assert "95.0 %" in table
    assert "21.0 KB" in table
    assert "80.0 KB" in table
    assert "passed" in page
    assert "0.94 &gt;= 0.90" in page
    assert client.get("/models/99999").status_code == 404


def test_model_diff_marks_changed_rows(seeded: Seeded) -> None:
    client = signed_in(seeded, "vera")
    page = client.get(f"/models/diff?a={seeded.previous_id}&b={seeded.int8_id}").text
    rows = re.findall(r'<tr class="(diff-changed)?"><td class="mono">([^<]+)</td>', page)
    changed = {key for mark, key in rows if mark}
    same = {key for mark, key in rows if not mark}
    assert {"training.epochs", "accuracy", "variant"} <= changed | {"variant"}
    assert "training.epochs" in changed
    assert "accuracy" in changed
    assert "training.lr" in same
    assert "quantization" in same
    assert "signature" not in changed | same
    assert client.get("/models/diff?a=1&b=99999").status_code == 404


def test_learning_page_shows_triggers_step_timings_and_accuracy_change(seeded: Seeded) -> None:
    client = signed_in(seeded, "vera")
    page = client.get("/learning").text
    assert "drift_accuracy" in page
    assert "accuracy 0.81 below 0.85 on edge-1" in page
    run = page[page.index('data-testid="run-2"') :]
    run = run[: run.index("</tr>")]
    assert 'train <span class="muted">12.0 s</span>' in run  # 14.0 - 2.0: from the lineage timestamps
    assert 'dataset <span class="muted">2.0 s</span>' in run
    assert "88.0 %" in run
    assert "94.0 %" in run
    assert "+6.0 pt" in run
    chart = re.search(r'<script type="application/json" id="accuracy-chart-data">(.*?)</script>', page, re.S)
    assert chart is not None
    spec = json.loads(chart.group(1))
    assert {s["label"] for s in spec["series"]} == {"accuracy int8", "accuracy float32"}
    assert len(spec["data"][0]) == 3


def test_rollout_page_shows_gates_against_thresholds_and_streams_them(seeded: Seeded) -> None:
    client = signed_in(seeded, "vera")
    page = client.get(f"/rollouts/{seeded.rollout_id}").text
    assert 'data-sse="/events/rollouts/ro-seeded"' in page
    wave = page[page.index('data-testid="wave-0"') : page.index('data-testid="wave-1"')]
    assert "0.004" in wave
    assert "0.02" in wave
    assert "gate-pass" in wave
    assert '<span class="gate-fail">fail</span> slow' in wave
    assert "edge-1" in wave
    with client.stream("GET", f"/events/rollouts/{seeded.rollout_id}") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        event = next(line for line in lines if line.startswith("event:"))
        data = json.loads(next(lines).removeprefix("data: "))
    assert event == "event: swap"
    assert "rollout-live" in data
    assert "completed" in data["rollout-live"]
    assert format_event("swap", {"a": 1}).startswith("event: swap\n")
    assert client.get("/rollouts/ro-missing").status_code == 404
    assert client.get("/events/rollouts/ro-missing").status_code == 404


def test_viewer_forged_posts_are_refused_even_with_a_valid_csrf_token(seeded: Seeded) -> None:
    client = signed_in(seeded, "vera")
    token = csrf_of_page(client, "/rollouts")  # the sign-out form's: a valid token of this session
    forged = {
        "/rollouts": {"model": "vib@r2-int8", "target": "all"},
        f"/rollouts/{seeded.rollout_id}/abort": {},
        f"/rollouts/{seeded.rollout_id}/rollback": {},
        "/admin/tokens": {"name": "sneaky", "role": "admin"},
        "/admin/users": {"username": "sneaky", "role": "admin", "password": "x" * 12},
    }
    for path, data in forged.items():
        answer = client.post(path, data={"csrf_token": token, **data})
        assert answer.status_code == 403, (path, answer.text[:500])
    with session_scope(seeded.settings.resolved_database_url) as session:
        assert "sneaky" not in [t.name for t in fleet.list_tokens(session)]
        assert accounts.user_by_name(session, username="sneaky") is None
        assert fleet.get_rollout(session, rollout_id=seeded.rollout_id).state == "completed"


def test_operator_needs_the_csrf_token_and_may_not_open_admin(seeded: Seeded) -> None:
    client = signed_in(seeded, "otto")
    answer = client.post("/rollouts", data={"model": "vib@r2-int8", "target": "all"})
    assert answer.status_code == 403
    answer = client.post("/rollouts", data={"model": "vib@r2-int8", "target": "all", "csrf_token": "wrong"})
    assert answer.status_code == 403
    assert client.get("/admin").status_code == 403
    assert (
        client.post("/admin/tokens", data={"csrf_token": csrf_of_page(client, "/rollouts")}).status_code
        == 403
    )


def test_operator_starts_pauses_resumes_and_aborts_a_rollout_from_the_forms(seeded: Seeded) -> None:
    client = signed_in(seeded, "otto")
    page = client.get("/rollouts").text
    assert 'action="/rollouts"' in page
    assert '<option value="vib@r2-int8">' in page
    assert 'name="gate_p95_latency_ms" value="50.0"' in page  # the engine's defaults
    token = csrf_of_page(client, "/rollouts")
    answer = client.post(
        "/rollouts",
        data={
            "csrf_token": token,
            "model": "vib@r2-int8",
            "target": "edges",
            "edges": ["edge-1", "edge-2"],
            "canary": "1",
            "waves": "1",
            "min_windows": "25",
            "soak_s": "0",
            "gate_p95_latency_ms": "400",
        },
    )
    assert answer.status_code == 303, answer.text[:500]
    location = answer.headers["location"]
    rollout_id = re.search(r"/rollouts/(ro-[0-9a-f]+)\?flash=", location).group(1)  # type: ignore[union-attr]
    status = rollouts.status(settings=seeded.settings, rollout_id=rollout_id)
    assert status["created_by"] == "console:otto"
    assert [t["edge_id"] for t in status["targets"]] == ["edge-1", "edge-2"]
    assert status["gates"]["p95_latency_ms"] == 400.0
    assert status["gates"]["error_rate"] == 0.02
    assert status["params"] == {"min_windows": 25, "soak_s": 0.0}
    shown = client.get(location).text
    assert "started" in shown
    assert 'data-testid="flash"' in shown
    assert f'action="/rollouts/{rollout_id}/pause"' in shown
    assert f'data-confirm="Abort rollout {rollout_id}?' in shown

    for action, state in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
        answer = client.post(f"/rollouts/{rollout_id}/{action}", data={"csrf_token": token})
        assert answer.status_code == 303
        assert rollouts.status(settings=seeded.settings, rollout_id=rollout_id)["state"] == state
    # Aborting again is the engine's refusal, shown on the page: not a 500.
    answer = client.post(f"/rollouts/{rollout_id}/abort", data={"csrf_token": token}, follow_redirects=True)
    assert answer.status_code == 200
    assert "flash-error" in answer.text
    assert "cannot abort" in answer.text
    # A model that does not exist: the registry's message, on the list page.
    answer = client.post(
        "/rollouts", data={"csrf_token": token, "model": "vib@nope", "target": "all"}, follow_redirects=True
    )
    assert answer.status_code == 200
    assert "model vib@nope does not exist" in answer.text
    with session_scope(seeded.settings.resolved_database_url) as session:
        actions = [
            (a.actor, a.action) for a in crud.list_audit(session, limit=50) if a.actor == "console:otto"
        ]
    assert ("console:otto", "rollout_start") in actions
    assert ("console:otto", "rollout_abort") in actions


def test_admin_creates_a_token_and_a_user_and_changes_it(seeded: Seeded) -> None:
    client = signed_in(seeded, "ada")
    page = client.get("/admin")
    assert page.status_code == 200
    assert 'data-testid="signing-keys"' in page.text
    assert "enrolment does not exist yet" in page.text
    token = csrf_of_page(client, "/admin")

    answer = client.post("/admin/tokens", data={"csrf_token": token, "name": "ci-reader", "role": "viewer"})
    assert answer.status_code == 200
    secret = re.search(r'data-testid="new-token-secret">(eft_[^<]+)</pre>', answer.text).group(1)  # type: ignore[union-attr]
    api = httpx.get(f"{seeded.url}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert api.status_code == 200
    again = client.get("/admin").text
    assert secret not in again
    assert "ci-reader" in again

    answer = client.post("/admin/tokens", data={"csrf_token": token, "name": "ci-reader", "role": "viewer"})
    assert answer.status_code == 303
    assert "flash_kind=error" in answer.headers["location"]

    answer = client.post(
        "/admin/users",
        data={"csrf_token": token, "username": "nina", "role": "operator", "password": "a long enough one"},
    )
    assert answer.status_code == 303, answer.text[:500]
    nina = console_client_for(seeded.url, "nina", "a long enough one")
    _clients.append(nina)
    assert "nina · operator" in nina.get("/rollouts").text
    answer = client.post(
        "/admin/users", data={"csrf_token": token, "username": "x", "role": "viewer", "password": "short"}
    )
    assert "flash_kind=error" in answer.headers["location"]

    assert client.post("/admin/users/nina", data={"csrf_token": token, "role": "viewer"}).status_code == 303
    assert client.post("/admin/users/nina", data={"csrf_token": token, "disabled": "yes"}).status_code == 303
    with session_scope(seeded.settings.resolved_database_url) as session:
        user = accounts.user_by_name(session, username="nina")
        assert user is not None
        assert user.role == "viewer"
        assert user.disabled_at is not None
    assert nina.get("/rollouts", follow_redirects=False).status_code == 303  # its session ended

    assert client.post("/admin/tokens/ci-reader/revoke", data={"csrf_token": token}).status_code == 303
    api = httpx.get(f"{seeded.url}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert api.status_code == 401

    answer = client.post("/admin/signin-links", data={"csrf_token": token, "name": "guest", "role": "viewer"})
    link = re.search(r'data-testid="new-link-url">([^<]+)</pre>', answer.text).group(1)  # type: ignore[union-attr]
    assert link.startswith(f"{seeded.url}/signin/link/")

    with session_scope(seeded.settings.resolved_database_url) as session:
        entries = [
            (a.action, a.target) for a in crud.list_audit(session, limit=100) if a.actor == "console:ada"
        ]
    for expected in (
        ("token_create", "ci-reader"),
        ("user_create", "nina"),
        ("user_set", "nina"),
        ("token_revoke", "ci-reader"),
        ("signin_link_create", "guest"),
    ):
        assert expected in entries


def test_audit_filters_and_pages_on_the_server(seeded: Seeded) -> None:
    with session_scope(seeded.settings.resolved_database_url) as session:
        for i in range(60):
            crud.audit(session, actor="bulk-loader", action="bulk_test", target=f"item-{i:02d}")
    client = signed_in(seeded, "vera")
    rows = re.compile(r'<td class="mono">(item-\d\d)</td>')

    first = client.get("/audit", params={"actor": "BULK", "action": "bulk_test"}).text
    assert rows.findall(first)[:2] == ["item-59", "item-58"]
    assert len(rows.findall(first)) == 50
    older = re.search(r'href="([^"]+)" data-testid="page-older"', first)
    assert older is not None
    second = client.get(older.group(1).replace("&amp;", "&")).text
    assert rows.findall(second) == [f"item-{i:02d}" for i in range(9, -1, -1)]
    assert 'data-testid="page-older"' not in second
    assert 'data-testid="page-newer"' in second

    only = client.get("/audit", params={"target": "item-07"}).text
    assert rows.findall(only) == ["item-07"]
    engine = client.get("/audit", params={"action": "rollout_completed"}).text
    assert "ro-seeded" in engine
    assert "item-" not in engine

    future = datetime.fromtimestamp(time.time() + 3600, UTC).strftime("%Y-%m-%dT%H:%M")
    assert 'data-testid="audit-empty"' in client.get("/audit", params={"since": future}).text
    assert len(rows.findall(client.get("/audit", params={"until": future, "actor": "bulk"}).text)) == 50
    bad = client.get("/audit", params={"since": "yesterday"})
    assert bad.status_code == 200
    assert "flash-error" in bad.text


def test_rollback_with_the_broker_down_is_a_message_not_a_500(seeded: Seeded) -> None:
    """The orders are recorded; the broker (unreachable here) did not take them: the page says so."""
    client = signed_in(seeded, "otto")
    token = csrf_of_page(client, f"/rollouts/{seeded.rollout_id}")
    answer = client.post(f"/rollouts/{seeded.rollout_id}/rollback", data={"csrf_token": token})
    assert answer.status_code == 303
    assert "flash_kind=error" in answer.headers["location"]
    page = client.get(answer.headers["location"]).text
    assert "Rollback recorded, but the broker did not take the orders" in page
    with session_scope(seeded.settings.resolved_database_url) as session:
        entries = [(a.actor, a.action) for a in crud.list_audit(session, limit=20)]
    assert ("console:otto", "model_rollback") in entries

"""Signing in to the web console in tests: over HTTP (httpx, the real sign-in form with its
double-submit CSRF cookie) and in a real browser (Playwright). Users are created with the same
function ``edgefleet admin user create`` uses."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import httpx

from cloud.console import auth

if TYPE_CHECKING:
    from playwright.sync_api import Page

CONSOLE_PASSWORD = "correct horse battery staple"
_CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


def create_console_user(
    database_url: str, username: str, role: str, password: str = CONSOLE_PASSWORD
) -> None:
    """A console user with ``role`` (viewer, operator or admin)."""
    auth.create_user(database_url=database_url, username=username, role=role, password=password)


def csrf_of_page(client: httpx.Client, path: str) -> str:
    """The CSRF token in the first form of the page at ``path`` (the page must answer 200)."""
    page = client.get(path)
    assert page.status_code == 200, page.text[:2000]
    found = _CSRF_FIELD.search(page.text)
    assert found, f"{path} has no form with a CSRF token"
    return found.group(1)


def console_client_for(base_url: str, username: str, password: str = CONSOLE_PASSWORD) -> httpx.Client:
    """An httpx client signed in as ``username`` through the sign-in form (the caller closes it)."""
    client = httpx.Client(base_url=base_url, timeout=30)
    try:
        answer = client.post(
            "/signin",
            data={"csrf_token": csrf_of_page(client, "/signin"), "username": username, "password": password},
        )
        assert answer.status_code == 303, answer.text[:2000]
    except BaseException:
        client.close()
        raise
    return client


def browser_sign_in(page: Page, base_url: str, username: str, password: str = CONSOLE_PASSWORD) -> None:
    """Sign ``page`` in as ``username`` with the password form; waits for the signed-in layout."""
    page.goto(f"{base_url}/signin")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", password)
    page.click("[data-testid=signin-password]")
    page.wait_for_selector("[data-testid=whoami]")


# -- a fleet to look at (the fleet pages' tests) -----------------------------------------------------

SEED_EDGES = ("edge-a", "edge-b", "edge-c")  # edge-c is offline
SEED_GROUPS = ("line-a", "line-b")
SEED_STATES = ("online", "online", "offline", "unreachable", "unknown")


def seed_device_id(index: int) -> str:
    """``pump-007``: the ids ``seed_fleet`` gives its devices."""
    return f"pump-{index:03d}"


def seed_fleet(database_url: str, *, devices: int = 120, now: float | None = None) -> dict[str, object]:
    """A registry fleet through the registry's own functions: three edges (``edge-c`` offline, a
    failed deployment on ``edge-b``), ``devices`` devices ``pump-000``... spread over the edges,
    states (``SEED_STATES`` in turn), groups (even: line-a, odd: line-b; every tenth tagged
    ``hall-9``), the last hour of edge metrics reports with a drift dip and recovery, decisions,
    dead letters and a drift trigger. Returns what a test checks against."""
    from cloud.registry import crud  # noqa: PLC0415 - test helper: imports only when seeding
    from cloud.registry.db import session_scope  # noqa: PLC0415

    now = time.time() if now is None else now
    with session_scope(database_url) as session:
        model = crud.create_model_version(session, name="vib", version="1.2.0", variant="int8")
        for index, edge_id in enumerate(SEED_EDGES):
            crud.upsert_edge(
                session,
                edge_id=edge_id,
                state="offline" if edge_id == "edge-c" else "online",
                version="0.9.0",
                model_version="1.2.0",
                reported={"model_name": "vib", "model_version": "1.2.0", "desired_revision": 1},
            )
            crud.create_deployment(session, model_version_id=model.id, targets={edge_id: 1})
            crud.update_deployment_target(
                session,
                edge_id=edge_id,
                revision=1,
                stage="failed" if edge_id == "edge-b" else "swapped",
                ok=edge_id != "edge-b",
                reason="signature check failed" if edge_id == "edge-b" else None,
            )
            # Every 10 s for the last hour: 50 windows/s, 20 labelled windows per report, 95 %
            # correct except a drift dip (60 %) 20 to 10 minutes ago.
            windows = labelled = correct = 0
            for step in range(360):
                ts = now - 3600 + step * 10 + index
                windows += 500
                labelled += 20
                dip = 1200 <= now - ts <= 1800
                correct += 12 if dip else 19
                crud.add_metrics(
                    session,
                    edge_id=edge_id,
                    ts=ts,
                    model_version="1.2.0",
                    windows_total=windows,
                    confidence_mean=0.9,
                    labelled_windows=labelled,
                    labelled_correct=correct,
                    data={
                        "edge_id": edge_id,
                        "ts": ts,
                        "windows_total": windows,
                        "windows_per_s": 50.0,
                        "inference_latency": {"p50_ms": 0.4, "p95_ms": 1.1, "p99_ms": 2.0},
                        "e2e_latency": {"p50_ms": 1.2, "p95_ms": 3.4, "p99_ms": 5.0},
                        "uplink_queue_depth": 7 + index,
                        "uplink_dropped_total": 0,
                        "devices_seen": devices,
                        "cache_hit_rate": 0.5,
                    },
                )
            for n in range(3):
                crud.add_dead_letter(
                    session,
                    source=edge_id,
                    topic="ef/v1/dev/x/telemetry",
                    reason="bad window",
                    payload=b"x" * n,
                )
        for index in range(devices):
            device_id = seed_device_id(index)
            crud.assign(
                session,
                device_id=device_id,
                group=SEED_GROUPS[index % 2],
                tags=["hall-9"] if index % 10 == 0 else [],
            )
            crud.upsert_device(
                session,
                device_id=device_id,
                edge_id=SEED_EDGES[index % len(SEED_EDGES)],
                state=SEED_STATES[index % len(SEED_STATES)],
                info={
                    "outbox_depth": index % 7,
                    "agent_version": "0.9.0",
                    "sensor": "vibration",
                    "rate_hz": 100,
                },
                last_seen=now - index,
            )
        for n in range(5):
            crud.add_decision(
                session,
                decision_id=f"dec-{n}",
                edge_id="edge-a",
                device_id=seed_device_id(0),
                rule="bearing_fault",
                class_name="outer_race",
                probability=0.93,
                severity="high",
                model_version="1.2.0",
                ts=now - 30 * n,
            )
        # pump-010: a decision every 4 minutes and a hard example every 6 over the last hour.
        for n in range(15):
            crud.add_decision(
                session,
                decision_id=f"dec-10-{n}",
                edge_id="edge-b",
                device_id=seed_device_id(10),
                rule="imbalance",
                class_name="imbalance",
                probability=0.8 + n / 100,
                severity="medium",
                model_version="1.2.0",
                ts=now - 240 * n - 90,
            )
        for n in range(10):
            crud.add_sample(
                session,
                sample_id=f"sample-10-{n}",
                edge_id="edge-b",
                device_id=seed_device_id(10),
                seq=n,
                ts=now - 360 * n - 100,
                model_version="1.2.0",
                predicted="normal",
                confidence=0.41,
                reason="low_confidence",
                privacy="full",
                label=None,
                label_source="none",
            )
        crud.record_trigger(session, kind="drift_accuracy", reason="accuracy 60 % < 85 %", model_name="vib")
    return {"edges": SEED_EDGES, "devices": devices, "model": "vib@1.2.0"}

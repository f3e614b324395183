"""``edgefleet bench console --devices 10000 --json``: how fast the web console's fleet page answers
over a large fleet.

Builds a registry (a temporary SQLite file, or ``--database-url``: an empty database, PostgreSQL for
instance) holding N devices behind N/100 edges with groups, tags, an hour of edge metrics and
decisions (``cloud.registry.synthetic``); serves it with the real ``edgefleet cloud api`` (uvicorn, its
own process, a free loopback port); signs in like a browser (the sign-in form, its CSRF cookie and a
password); then times, after warm-ups, each of:

- ``fleet_page``: ``GET /`` (the first page of the fleet);
- ``fleet_page_deep``: ``GET /?page=100&sort=last_seen`` (far into the fleet, another sort order);
- ``fleet_filter``: ``GET /?q=dev-0123`` (a search: 10 devices of 10 000);
- ``healthz``: ``GET /healthz``, the same-run baseline (no registry, no template): the machine is
  shared and noisy, so compare ratios.

For each: time to first byte (``*_ttfb_ms``: the response's headers read) and to the whole body
(``*_full_ms``), as p50, p95 and max in milliseconds. ``met``: every fleet page's TTFB p95 is within
``target.fleet_page_ttfb_ms_p95``."""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from shared.private_broker import free_port, wait_port

logger = logging.getLogger(__name__)

TARGET_FLEET_PAGE_TTFB_MS_P95 = 300.0
START_TIMEOUT_S = 60.0
USERNAME = "bench"
PASSWORD = "bench-console-password"  # noqa: S105 - a throwaway user of a throwaway registry
PAGES = {
    "fleet_page": "/",
    "fleet_page_deep": "/?page=100&sort=last_seen",
    "fleet_filter": "/?q=dev-0123",
    "healthz": "/healthz",
}
FLEET_PAGES = ("fleet_page", "fleet_page_deep", "fleet_filter")


def _stats(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    p95 = ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]
    return {
        "p50": round(statistics.median(ordered) * 1000, 2),
        "p95": round(p95 * 1000, 2),
        "max": round(ordered[-1] * 1000, 2),
    }


def build_registry(database_url: str, devices: int) -> tuple[dict[str, Any], float]:
    """Migrate ``database_url``, fill it with a synthetic fleet and a console user; (what it holds,
    seconds it took)."""
    from cloud.console.auth import create_user  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry import synthetic  # noqa: PLC0415  (SQLAlchemy: not for --help)
    from cloud.registry.db import session_scope, upgrade  # noqa: PLC0415  (SQLAlchemy: not for --help)

    start = time.perf_counter()
    upgrade(database_url)
    with session_scope(database_url) as session:
        if not synthetic.is_empty(session):
            raise click.ClickException(f"{database_url}: the registry is not empty (give an empty database)")
        fleet = synthetic.populate(session, devices=devices)
    create_user(database_url=database_url, username=USERNAME, role="viewer", password=PASSWORD)
    return (
        {
            "edges": fleet.edges,
            "groups": fleet.groups,
            "decisions": fleet.decisions,
            "metrics_records": fleet.metrics_records,
        },
        time.perf_counter() - start,
    )


def start_console(database_url: str, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """``edgefleet cloud api`` on ``127.0.0.1:port`` over ``database_url`` (its log in ``data_dir``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env |= {"EDGEFLEET_DATABASE_URL": database_url, "EDGEFLEET_DATA_DIR": str(data_dir)}
    log = (data_dir / "console.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "cloud", "api", "--host", "127.0.0.1", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    log.close()
    if not wait_port(port, timeout=START_TIMEOUT_S, alive=lambda: proc.poll() is None):
        stop_console(proc)
        log_text = (data_dir / "console.log").read_text()[-3000:]
        raise click.ClickException(f"the console did not listen on 127.0.0.1:{port}:\n{log_text}")
    return proc


def stop_console(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the console's process group; SIGKILL if it is still there after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


def sign_in(client: Any) -> None:
    """Sign in like a browser: show the form (its CSRF cookie), post it back with the password."""
    form = client.get("/signin")
    form.raise_for_status()
    csrf = client.cookies.get("ef_signin_csrf")
    answer = client.post(
        "/signin",
        data={"csrf_token": csrf or "", "username": USERNAME, "password": PASSWORD, "next": "/"},
    )
    if answer.status_code != 303 or "ef_session" not in client.cookies:
        raise click.ClickException(f"sign-in failed: HTTP {answer.status_code}\n{answer.text[:2000]}")


def time_page(client: Any, path: str, *, requests: int, warmup: int) -> dict[str, Any]:
    """Time ``GET path`` ``requests`` times after ``warmup`` untimed ones (each must answer 200)."""
    ttfb: list[float] = []
    full: list[float] = []
    size = 0
    for i in range(warmup + requests):
        start = time.perf_counter()
        with client.stream("GET", path) as answer:
            first_byte = time.perf_counter()  # the status line and headers are read
            body = answer.read()
            done = time.perf_counter()
        if answer.status_code != 200:
            raise click.ClickException(f"GET {path}: HTTP {answer.status_code}\n{body[:2000]!r}")
        if i >= warmup:
            ttfb.append(first_byte - start)
            full.append(done - start)
            size = len(body)
    return {"ttfb_ms": _stats(ttfb), "full_ms": _stats(full), "bytes": size}


def run(devices: int, database_url: str | None, *, requests: int, warmup: int, tmp: Path) -> dict[str, Any]:
    """Build the registry, serve it, sign in and time the pages; the benchmark's JSON object."""
    import httpx  # noqa: PLC0415  (httpx: only when the benchmark runs)

    url = database_url or f"sqlite:///{(tmp / 'registry.db').resolve()}"
    built, build_s = build_registry(url, devices)
    port = free_port()
    proc = start_console(url, tmp, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as client:
            sign_in(client)
            timed = {
                name: time_page(client, path, requests=requests, warmup=warmup)
                for name, path in PAGES.items()
            }
    finally:
        stop_console(proc)
    result: dict[str, Any] = {
        "benchmark": "console",
        "devices": devices,
        **built,
        "database": url.split(":", 1)[0].split("+", 1)[0],
        "build_s": round(build_s, 1),
        "requests": requests,
        "warmup": warmup,
    }
    for name, path in PAGES.items():
        result[f"{name}_path"] = path
        result[f"{name}_ttfb_ms"] = timed[name]["ttfb_ms"]
        result[f"{name}_full_ms"] = timed[name]["full_ms"]
        result[f"{name}_bytes"] = timed[name]["bytes"]
    base = max(timed["healthz"]["ttfb_ms"]["p50"], 0.01)
    result["ttfb_p50_over_healthz"] = {
        name: round(timed[name]["ttfb_ms"]["p50"] / base, 1) for name in FLEET_PAGES
    }
    result["target"] = {"fleet_page_ttfb_ms_p95": TARGET_FLEET_PAGE_TTFB_MS_P95}
    result["met"] = all(
        timed[name]["ttfb_ms"]["p95"] <= TARGET_FLEET_PAGE_TTFB_MS_P95 for name in FLEET_PAGES
    )
    return result


@click.command("console")
@click.option("--devices", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True)
@click.option(
    "--database-url",
    default=None,
    help="an EMPTY registry database to fill, e.g. postgresql://... (default: a temporary SQLite file)",
)
@click.option("--requests", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--warmup", type=click.IntRange(0, 1000), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the JSON object only")
def bench_console(devices: int, database_url: str | None, requests: int, warmup: int, as_json: bool) -> None:
    """Console fleet page over N devices: time to first byte of /, a deep page, a filter; vs /healthz."""
    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-console-") as tmp:
        result = run(devices, database_url, requests=requests, warmup=warmup, tmp=Path(tmp))
    click.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))

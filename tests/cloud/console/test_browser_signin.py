"""Signing in and out, and what is refused, in a real browser (Debian's chromium through Playwright)
against a real API server and registry: a viewer sees the fleet without a single action form and is
refused the admin page and a forged POST; a cross-site form (another origin, the session cookie
attached) is refused for want of the CSRF token; sign-out ends the session; a one-time sign-in link
works once. Console errors on any page fail the test (the ``page`` fixture)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from cloud.console import auth
from cloud.registry.db import upgrade
from shared.settings import MqttSettings
from shared.settings.cloud import CloudSettings
from tests.support.api_server import running_api
from tests.support.browser import expect_console_errors, screenshot
from tests.support.console import browser_sign_in, create_console_user, seed_fleet

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

DEVICE = "pump-000"


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[CloudSettings, str]]:
    """A seeded registry behind a real API server (requested before ``page``, so the page closes first)."""
    settings = CloudSettings(
        data_dir=tmp_path / "cloud",
        database_url=f"sqlite:///{tmp_path / 'registry.db'}",
        broker=MqttSettings(url="mqtt://127.0.0.1:1"),
    )
    url = settings.resolved_database_url
    upgrade(url)
    seed_fleet(url, devices=12)
    create_console_user(url, "vera", "viewer")
    create_console_user(url, "otto", "operator")
    with running_api(settings) as base:
        yield settings, base


@pytest.fixture
def other_site(console: tuple[CloudSettings, str]) -> Iterator[str]:
    """An attacker's page on another origin: a form that posts a command to the console."""
    _, base = console
    body = (
        "<!doctype html><title>win a prize</title>"
        f'<form method="post" action="{base}/devices/{DEVICE}/command">'
        '<input type="hidden" name="name" value="reboot"><input type="hidden" name="args" value="{}">'
        '<button id="go" type="submit">claim</button></form>'
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_viewer_reads_everything_and_is_refused_every_action(
    console: tuple[CloudSettings, str], page: Page
) -> None:
    _, base = console
    browser_sign_in(page, base, "vera")
    assert page.locator("[data-testid=whoami]").inner_text() == "vera · viewer"
    for path in ("/", f"/devices/{DEVICE}", "/models", "/rollouts", "/learning", "/audit"):
        page.goto(f"{base}{path}")
        assert page.locator("[data-testid=whoami]").is_visible(), path
        # The only form a viewer gets is sign-out.
        forms = page.locator("form[method=post]")
        assert forms.count() == 1, f"{path}: a viewer sees action forms"
        assert forms.first.get_attribute("action") == "/signout"
    assert page.locator("nav a[href='/admin']").count() == 0
    expect_console_errors(page, r"status of 403 \(Forbidden\) \(http://127\.0\.0\.1:\d+/admin:")
    answer = page.goto(f"{base}/admin")
    assert answer is not None
    assert answer.status == 403
    assert "needs admin" in page.locator("[data-testid=forbidden-reason]").inner_text()
    screenshot(page, "viewer-refused")
    # A forged POST with the viewer's own, valid CSRF token: the role refuses it.
    page.goto(f"{base}/")
    token = page.locator("form[action='/signout'] input[name=csrf_token]").get_attribute("value")
    forged = page.request.post(
        f"{base}/devices/{DEVICE}/command",
        form={"csrf_token": token or "", "name": "reboot", "args": "{}"},
        headers={"Origin": base},
        max_redirects=0,
    )
    assert forged.status == 403


def test_a_form_from_another_site_is_refused_without_the_csrf_token(
    console: tuple[CloudSettings, str], other_site: str, page: Page
) -> None:
    _, base = console
    browser_sign_in(page, base, "otto")
    page.goto(other_site)
    expect_console_errors(
        page, r"status of 403 \(Forbidden\) \(http://127\.0\.0\.1:\d+/devices/pump-000/command:"
    )
    with page.expect_navigation():
        page.click("#go")
    # Loopback ports are one "site", so the session cookie went along: the CSRF token stops it.
    assert "CSRF token is missing or wrong" in page.content()
    screenshot(page, "csrf-refused")


def test_sign_out_ends_the_session(console: tuple[CloudSettings, str], page: Page) -> None:
    settings, base = console
    browser_sign_in(page, base, "otto")
    cookie = next(c["value"] for c in page.context.cookies() if c["name"] == "ef_session")
    page.click("[data-testid=signout]")
    page.wait_for_url(f"{base}/signin")
    assert auth.session_of(database_url=settings.resolved_database_url, cookie=cookie) is None
    page.goto(f"{base}/rollouts")
    assert page.url == f"{base}/signin?next=/rollouts"
    assert page.locator("[data-testid=whoami]").count() == 0


def test_a_signin_link_signs_in_once(console: tuple[CloudSettings, str], browser: Browser) -> None:
    settings, base = console
    secret = auth.create_signin_link(database_url=settings.resolved_database_url, name="demo", role="admin")
    first = browser.new_context()
    second = browser.new_context()
    try:
        page = first.new_page()
        page.goto(f"{base}/signin/link/{secret}")
        assert page.url == f"{base}/"
        assert page.locator("[data-testid=whoami]").inner_text() == "demo · admin"
        again = second.new_page()
        answer = again.goto(f"{base}/signin/link/{secret}")
        assert answer is not None
        assert answer.status == 401
        assert "used already" in again.locator("[data-testid=signin-error]").inner_text()
    finally:
        first.close()
        second.close()

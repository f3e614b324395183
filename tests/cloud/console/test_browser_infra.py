"""The browser test infrastructure itself (tests/support/browser.py), on tiny static pages.

Served by Python's ``http.server`` on a loopback port, so these fail only when the browser plumbing
does, not when the console does.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.browser import VIEWPORT, BrowserConsoleError, ConsoleWatch, screenshot

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

# rel=icon data: keeps chromium from asking for /favicon.ico (a 404 would be a console error).
CLICK_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>click</title><link rel="icon" href="data:,"></head>
<body style="font: 24px sans-serif; padding: 2em">
  <p id="status">waiting</p>
  <button id="go" onclick="document.getElementById('status').textContent = 'clicked'">Go</button>
</body></html>
"""

BROKEN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>broken</title><link rel="icon" href="data:,"></head>
<body>
  <script>console.error("boom from the page");</script>
  <script>throw new Error("kaboom");</script>
</body></html>
"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test output is no place for an access log


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    """The pages above over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    (tmp_path / "click.html").write_text(CLICK_PAGE)
    (tmp_path / "broken.html").write_text(BROKEN_PAGE)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()
        thread.join(timeout=5)


def test_page_loads_clicks_and_screenshots(page: Page, site: str) -> None:
    page.goto(f"{site}/click.html")
    assert page.text_content("#status") == "waiting"

    page.click("#go")
    page.locator("#status", has_text="clicked").wait_for(timeout=5_000)
    assert page.text_content("#status") == "clicked"

    path = screenshot(page, "browser-infra-click")
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert path.stat().st_size > 1000


def test_console_errors_and_uncaught_exceptions_fail_the_check(browser: Browser, site: str) -> None:
    # Its own context, not the page fixture: that one would (rightly) fail this test at teardown.
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        watch = ConsoleWatch()
        watch.attach(page)
        with page.expect_event("pageerror"):
            page.goto(f"{site}/broken.html")
        page.evaluate("1")  # a round trip: events sent before it have been delivered

        with pytest.raises(BrowserConsoleError) as raised:
            watch.check()
        message = str(raised.value)
        assert "console.error: boom from the page" in message
        assert "kaboom" in message

        # A page with nothing to report passes, and expected messages can be allowed.
        clean = ConsoleWatch()
        clean.attach(page)
        page.goto(f"{site}/click.html")
        page.evaluate("1")
        clean.check()

        tolerant = ConsoleWatch(allow=[r"boom from the page", r"kaboom"])
        tolerant.attach(page)
        with page.expect_event("pageerror"):
            page.goto(f"{site}/broken.html")
        page.evaluate("1")
        tolerant.check()
    finally:
        context.close()

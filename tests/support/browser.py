"""Headless Chromium for the web console's browser tests: Playwright's sync API on Debian's chromium.

No browser is downloaded (none can be here): ``scripts/setup`` installs Debian's ``chromium`` and
Playwright drives it through ``executable_path`` (``/usr/bin/chromium``, or ``$EDGEFLEET_CHROMIUM``).

- ``launch_browser()``: backs the session-scoped ``browser`` fixture (tests/conftest.py). A missing
  chromium or playwright fails the test under CI (``$CI`` set) and skips it elsewhere.
- ``open_page(browser, request)``: backs the ``page`` fixture: a fresh context (1280x860) and page
  whose console errors and uncaught exceptions fail the test at teardown (``ConsoleWatch``); a
  failed test leaves a screenshot.
- ``screenshot(page, name)``: a PNG in ``$EDGEFLEET_TEST_ARTIFACTS/console/`` (default
  ``<repo>/test-artifacts/console/``), to look at what a person would see.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Error, Page, ViewportSize

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHROMIUM = "/usr/bin/chromium"
VIEWPORT: ViewportSize = {"width": 1280, "height": 860}
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root (CI too), where chromium refuses to start sandboxed
    "--disable-gpu",
    # No traffic beyond the loopback server under test: no QUIC, updates, sync or background fetches.
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# The outcome of each phase of a test, so the ``page`` fixture knows at teardown whether it failed.
PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def chromium_path() -> Path:
    """The chromium executable Playwright drives: ``$EDGEFLEET_CHROMIUM`` or Debian's."""
    return Path(os.environ.get("EDGEFLEET_CHROMIUM") or DEFAULT_CHROMIUM)


def artifacts_dir() -> Path:
    """Where browser tests leave screenshots: ``$EDGEFLEET_TEST_ARTIFACTS/console/``."""
    base = os.environ.get("EDGEFLEET_TEST_ARTIFACTS")
    return (Path(base) if base else REPO_ROOT / "test-artifacts") / "console"


def screenshot(page: Page, name: str) -> Path:
    """Save a full-page PNG of ``page`` as ``<artifacts>/console/<name>.png`` and return its path."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "page"
    path = artifacts_dir() / f"{safe}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    logger.info("screenshot %s", path)
    return path


class BrowserConsoleError(AssertionError):
    """The page logged console errors or threw uncaught exceptions."""


@dataclass
class ConsoleWatch:
    """Collects a page's ``console.error`` messages and uncaught exceptions (``pageerror``).

    ``allow`` holds regular expressions for messages a test expects; anything else collected makes
    ``check()`` raise.
    """

    allow: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        """Start collecting from ``page`` (before it loads anything, to miss nothing)."""
        page.on("console", self._on_console)
        page.on("pageerror", self._on_pageerror)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            location = message.location
            where = f" ({location['url']}:{location['lineNumber']})" if location.get("url") else ""
            self._collect(f"console.error: {message.text}{where}")

    def _on_pageerror(self, error: Error) -> None:
        self._collect(f"uncaught {error.name or 'exception'}: {error.message}")

    def _collect(self, problem: str) -> None:
        if any(re.search(pattern, problem) for pattern in self.allow):
            return
        logger.warning("browser: %s", problem)
        self.problems.append(problem)

    def summary(self) -> str:
        """Everything collected, one line each ("" when nothing was)."""
        if not self.problems:
            return ""
        listed = "\n".join(f"  - {problem}" for problem in self.problems)
        return f"the page logged {len(self.problems)} console error(s)/exception(s):\n{listed}"

    def check(self) -> None:
        """Raise ``BrowserConsoleError`` listing everything collected, if anything was."""
        if self.problems:
            raise BrowserConsoleError(self.summary())


def _missing(reason: str) -> NoReturn:
    # CI must not pass by testing less; a developer without chromium still runs everything else.
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: scripts/setup installs it")
    pytest.skip(f"{reason} (scripts/setup installs it)")


def launch_browser() -> Iterator[Browser]:
    """Start headless chromium through Playwright; yields the browser, closes it after."""
    try:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415 - optional dev dependency
    except ImportError as exc:
        _missing(f"playwright is not installed ({exc}): pip install -e '.[all,dev]'")
    executable = chromium_path()
    if not os.access(executable, os.X_OK):
        _missing(f"chromium is not installed at {executable} (set EDGEFLEET_CHROMIUM to another)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(executable), headless=True, args=CHROMIUM_ARGS
        )
        logger.info("chromium %s from %s", browser.version, executable)
        try:
            yield browser
        finally:
            browser.close()


def remember_report(item: pytest.Item, report: pytest.TestReport) -> None:
    """Keep each phase's report on the test item (called by conftest's makereport hook)."""
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report


def _test_failed(item: pytest.Item) -> bool:
    reports = item.stash.get(PHASE_REPORTS, {})
    return any(report.failed for report in reports.values())


# The watch of each open page (by id), so a test can declare the errors it provokes.
_WATCHES: dict[int, ConsoleWatch] = {}


def expect_console_errors(page: Page, *patterns: str) -> None:
    """Declare console errors ``page`` will log on purpose (e.g. chromium's "Failed to load resource:
    ... 403" for a page the test expects to be refused): regular expressions, matched per message."""
    _WATCHES[id(page)].allow.extend(patterns)


def open_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh context and page for one test; fails it at teardown on console errors."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        watch = ConsoleWatch()
        watch.attach(page)
        _WATCHES[id(page)] = watch
        try:
            yield page
        finally:
            _WATCHES.pop(id(page), None)
        if _test_failed(request.node) or watch.problems:
            try:
                path = screenshot(page, f"FAILED-{request.node.nodeid}")
            except Exception as exc:  # a crashed page cannot be shot: report the test, not this
                logger.warning("no screenshot of %s: %s", request.node.nodeid, exc)
            else:
                logger.warning("screenshot of the failed test: %s", path)
        if watch.problems:
            pytest.fail(watch.summary(), pytrace=False)
    finally:
        context.close()

"""The console's Jinja2 environment: autoescaped templates, formatting filters, cache-busted static
URLs, ``render`` which every page uses so the layout always gets who is signed in, partials rendered
alone (event-stream swaps), and the flash message a redirect after a POST leaves for the next page."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from cloud.console.auth import ConsoleIdentity

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"

# Longest flash message carried in a redirect's query.
MAX_FLASH = 300

# The navigation bar: (path, label); a page passes its own path as ``nav``.
NAVIGATION = (
    ("/", "Fleet"),
    ("/models", "Models"),
    ("/rollouts", "Rollouts"),
    ("/learning", "Learning"),
    ("/audit", "Audit"),
    ("/admin", "Admin"),
)


@cache
def _static_version(relative: str) -> str:
    path = STATIC_DIR / relative
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"


def static_url(relative: str) -> str:
    """``/static/<relative>?v=<content hash>``: browsers cache assets until they change."""
    return f"/static/{relative}?v={_static_version(relative)}"


def ago(ts: float | None) -> str:
    """``12 s ago``, ``3 min ago``, ``2 h ago``, ``4 d ago``; ``never`` for None."""
    if ts is None:
        return "never"
    delta = max(0.0, time.time() - ts)
    if delta < 90:
        return f"{delta:.0f} s ago"
    if delta < 90 * 60:
        return f"{delta / 60:.0f} min ago"
    if delta < 36 * 3600:
        return f"{delta / 3600:.0f} h ago"
    return f"{delta / 86400:.0f} d ago"


def when(ts: float | None) -> str:
    """An ISO-8601 UTC time to the second, ``-`` for None."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def percent(value: float | None, digits: int = 1) -> str:
    """``97.5 %`` from 0.975; ``-`` for None."""
    return "-" if value is None else f"{100 * value:.{digits}f} %"


def number(value: float | None, digits: int = 1) -> str:
    """A number with thousands separators (``digits`` decimals when not whole); ``-`` for None."""
    if value is None:
        return "-"
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def size(value: int | None) -> str:
    """``12.3 KB``-style byte counts (powers of 1000); ``-`` for None."""
    if value is None:
        return "-"
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if amount < 1000 or unit == "GB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    return f"{amount:.1f} GB"


def to_json(value: Any) -> str:
    """JSON for a ``<script type="application/json">`` block (``</`` escaped so it cannot close it)."""
    return json.dumps(value, separators=(",", ":"), default=str).replace("</", "<\\/")


templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
templates.env.globals.update(static=static_url, navigation=NAVIGATION)
templates.env.filters.update(ago=ago, when=when, percent=percent, number=number, size=size, to_json=to_json)


def render(
    request: Request,
    template: str,
    identity: ConsoleIdentity | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    """Render ``template`` with ``identity`` as ``user`` (None on the sign-in page) and ``context``."""
    return templates.TemplateResponse(
        request, template, {"user": identity, **context}, status_code=status_code
    )


def render_fragment(template: str, **context: Any) -> str:
    """A partial template rendered to a string (what an event stream swaps into a page)."""
    return templates.env.get_template(template).render(**context)


def flash_of(request: Request) -> dict[str, Any]:
    """The ``flash`` / ``flash_kind`` a redirect after a POST left in the query (base.html shows it)."""
    message = request.query_params.get("flash")
    kind = "error" if request.query_params.get("flash_kind") == "error" else "ok"
    return {"flash": message[:MAX_FLASH] if message else None, "flash_kind": kind}


def back_to(path: str, message: str, *, error: bool = False) -> RedirectResponse:
    """A 303 to ``path`` that shows ``message`` there (as an error when ``error``)."""
    query = {"flash": message[:MAX_FLASH], **({"flash_kind": "error"} if error else {})}
    separator = "&" if "?" in path else "?"
    return RedirectResponse(f"{path}{separator}{urlencode(query)}", status_code=303)

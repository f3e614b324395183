"""The console's audit page: who did what to what, filtered by actor, action, target text and time
range, newest first, a page at a time (all of it in the registry query, never in the browser)."""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases at runtime.

from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Query, Request
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRouter

from cloud.api.deps import get_database_url
from cloud.console.deps import Viewer
from cloud.console.templating import flash_of, render
from cloud.registry import learning_views
from cloud.registry.db import session_scope

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 50
TIME_FORMATS = ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")


def parse_time(text: str | None) -> float | None:
    """A UTC time as the filter form sends it (``2026-12-05T06:30``, or a date) -> epoch seconds;
    None when empty; ``ValueError`` naming it when it is not one."""
    if not text or not text.strip():
        return None
    value = text.strip()
    for fmt in TIME_FORMATS:
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    raise ValueError(f"{value!r} is not a time like 2026-12-05T06:30 (UTC)")


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    user: Viewer,
    *,
    actor: str = "",
    action: str = "",
    target: str = "",
    since: str = "",
    until: str = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    """The audit log, filtered and paged on the server."""
    error = None
    try:
        since_ts, until_ts = parse_time(since), parse_time(until)
    except ValueError as exc:
        error, since_ts, until_ts = str(exc), None, None
    with session_scope(get_database_url(request)) as session:
        found = learning_views.audit_page(
            session,
            actor=actor.strip() or None,
            action=action.strip() or None,
            target=target.strip() or None,
            since=since_ts,
            until=until_ts,
            offset=(page - 1) * PAGE_SIZE,
            limit=PAGE_SIZE,
        )
        entries = [
            {
                "id": e.id,
                "ts": e.ts,
                "actor": e.actor,
                "action": e.action,
                "target": e.target,
                "detail": e.detail,
            }
            for e in found.entries
        ]
        actions = learning_views.audit_actions(session)
    filters = {"actor": actor, "action": action, "target": target, "since": since, "until": until}
    kept = {k: v for k, v in filters.items() if v}

    def page_url(number: int) -> str:
        return "/audit?" + urlencode({**kept, "page": number})

    context: dict[str, Any] = {
        "entries": entries,
        "actions": actions,
        "filters": filters,
        "page": page,
        "newer": page_url(page - 1) if page > 1 else None,
        "older": page_url(page + 1) if found.has_more else None,
        "filtered": bool(kept),
        **flash_of(request),
    }
    if error:
        context.update(flash=error, flash_kind="error")
    return render(request, "audit.html", user, nav="/audit", **context)

"""Server-sent events for the console's live pages.

A page's stream is a producer called every ``interval_s`` in a worker thread (it queries the
registry); what it returns is sent as events (``swap`` fragments, ``chart`` data, ``point``s) only
when it changed. Streams end after ``STREAM_MAX_S`` (the browser reconnects on its own) or when the
client goes away, so a server stopping never waits long on them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

logger = logging.getLogger(__name__)

EVENT_INTERVAL_S = 2.0
STREAM_MAX_S = 300.0
# Tells the browser how long to wait before reconnecting after a stream ends.
RETRY_MS = 2000

# A producer returns [(event name, data), ...] for one tick.
Producer = Callable[[], list[tuple[str, Any]]]


def format_event(event: str, data: Any) -> str:
    """One SSE frame: ``event: NAME`` and the JSON data on one ``data:`` line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


async def _frames(request: Request, producer: Producer, interval_s: float) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    started = time.monotonic()
    last_sent: dict[str, str] = {}
    while time.monotonic() - started < STREAM_MAX_S:
        if await request.is_disconnected():
            return
        try:
            events = await run_in_threadpool(producer)
        except Exception:
            # One failed tick (a registry hiccup) must not end every open page's updates.
            logger.exception("console event producer failed")
            events = []
        for event, data in events:
            frame = format_event(event, data)
            key = f"{event}:{data.get('id', '') if isinstance(data, dict) and event != 'swap' else ''}"
            if event == "point" or last_sent.get(key) != frame:
                last_sent[key] = frame
                yield frame
        await asyncio.sleep(interval_s)
    yield format_event("reconnect", {})


def event_stream(
    request: Request, producer: Producer, *, interval_s: float | None = None
) -> StreamingResponse:
    """A ``text/event-stream`` response running ``producer`` every ``interval_s`` (default
    ``EVENT_INTERVAL_S``, read at call time so tests can patch it)."""
    interval = EVENT_INTERVAL_S if interval_s is None else interval_s
    return StreamingResponse(
        _frames(request, producer, interval),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )

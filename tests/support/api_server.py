"""The real admin API (with the console) for tests: uvicorn in a thread on a loopback port, and
the CLI over the same registry."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from click.testing import CliRunner

from cloud.console.app import create_app
from shared.cli import cli as edgefleet
from shared.private_broker import free_port
from shared.settings import CloudSettings

START_TIMEOUT_S = 30.0


@contextmanager
def running_api(settings: CloudSettings, port: int | None = None) -> Iterator[str]:
    """Serve the admin API over ``settings`` (on ``port``, or a free one); yields its base URL."""
    port = port if port is not None else free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            # Open event streams (console pages) must not hold the server's stop for long.
            timeout_graceful_shutdown=2,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def run_cli(settings: CloudSettings, *args: str, stdin: str | None = None) -> str:
    """``edgefleet ARGS`` on the registry of ``settings``; its output (the command must succeed)."""
    result = CliRunner().invoke(
        edgefleet,
        list(args),
        env={
            "EDGEFLEET_DATABASE_URL": settings.resolved_database_url,
            "EDGEFLEET_DATA_DIR": str(settings.data_dir),
        },
        input=stdin,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    return result.output

"""How a worker process of ``cloud.worker.app`` is started by benchmarks and tests (no import of the
app itself: importing it builds the app from this process's environment)."""

from __future__ import annotations

import sys


def worker_argv(hostname: str, *extra: str) -> list[str]:
    """The command line of one quiet worker process of this app (concurrency 1, prefork, no gossip,
    mingle or heartbeat: nothing to wait for at start), as benchmarks and tests start them; ``extra``
    goes before the options (e.g. ``-B -s FILE`` for beat)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "cloud.worker.app",
        "worker",
        *extra,
        "--loglevel=INFO",
        "--concurrency=1",
        "--pool=prefork",
        f"--hostname={hostname}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]

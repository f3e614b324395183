"""A real Celery worker of the cloud app (``cloud.worker.app``) as a subprocess, for the tests that
need one: optionally with an embedded beat, its output in a log file the test prints on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from cloud.worker.process import worker_argv

STOP_TIMEOUT_S = 30.0


def start_celery_worker(
    env: dict[str, str], log_path: Path, *, name: str, beat_schedule: Path | None = None
) -> subprocess.Popen[bytes]:
    """One prefork process; ``beat_schedule``: also run beat (``-B``) with that schedule file."""
    beat = ["-B", "-s", str(beat_schedule)] if beat_schedule is not None else []
    with log_path.open("ab") as log:
        return subprocess.Popen(
            worker_argv(f"{name}-{os.getpid()}@%h", *beat),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_celery_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown (SIGTERM), killed if it takes longer than ``STOP_TIMEOUT_S``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def celery_worker(
    env: dict[str, str], log_path: Path, *, name: str, beat_schedule: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_celery_worker(env, log_path, name=name, beat_schedule=beat_schedule)
    try:
        yield proc
    finally:
        stop_celery_worker(proc)
